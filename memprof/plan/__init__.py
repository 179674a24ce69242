"""Plan: the least costly optimizations that make a step fit a GPU memory budget.

"Will this fit my GPU, and if not, what is the least painful way to make it
fit?" :func:`plan` answers from sim-engine traces of the real model code (fake
tensors projected to a CUDA GPU, :class:`~memprof.engines.SimEngine`), not
from a formula: every plan it proposes was measured.

**Budget accounting.** A GPU's memory holds more than tensors. The usable
budget is the budget minus the CUDA context (not measurable without a GPU: an
assumption, ``context_overhead``, 512 MiB by default) and the cuBLAS workspace
(from the sim profile). A step fits when its *reserved* memory, the peak of the
caching allocator's model replaying the step's allocations (fragmentation
included, :mod:`memprof.allocator`), is within the usable budget. Each trace is
also replayed with ``expandable_segments``, so that allocator setting is a
lever that costs no extra run.

**Levers.** Each optimization that keeps the model's function is a lever with
ordered levels of increasing memory saving and cost: precision (bf16 autocast,
pure bf16), optimizer (8-bit AdamW, Adafactor), sharding (FSDP, with
``world_size > 1``), checkpointing (every 4, 2, 1 blocks), micro-batches
(gradient accumulation), chunked loss, activation offload, optimizer step in
backward, the allocator setting. Pruning, quantization, GLU, sliding windows
and dynamic padding change the model or the data and are never searched.

**Cost** of a plan: its FLOP overhead against the baseline (counted by the sim
engine's FlopCounter) plus a stated side cost per lever level for what FLOPs do
not show (PCIe traffic of offloading, smaller kernels of micro-batches, the
numerics of an 8-bit optimizer or pure bf16, the communication of sharding),
see :data:`SIDE_COSTS`. Plans are ranked by cost, then headroom.

**Search.** Best-first over the combinations of levels, cheapest first; the
two ends are measured first (the baseline: if it fits there is nothing to do;
the most aggressive combinations, traced shallow where the model's depth
extrapolates: if even their allocated peak does not fit, nothing does; a bound
that may fit settles nothing, and such a combination is traced whole only if the
search gets to it). While a candidate runs, the one the search would measure
next runs beside it in a forked worker; the runs, their order and every figure
are those of one run at a time. A combination is skipped without a run when

* it is component-wise less aggressive than one whose allocated peak was
  measured not to fit (monotonicity: more of a lever never allocates more; the
  reserved memory above the allocated peak is not monotone, so only the
  allocated peak is carried over);
* a cheaper measured plan is component-wise below it (it would fit, at a
  higher cost);
* its parameters, gradients and optimizer state alone (rescaled from the
  baseline's categories) exceed the budget; with the optimizer stepped in
  backward, one gradient and its step's temporaries instead of all gradients
  (the largest parameter's, measured by one step on a fake tensor);
* its estimate exceeds the budget by more than :data:`ESTIMATE_MARGIN`. The
  estimator composes per-lever effects on the categories (parameters,
  optimizer state, activations, optimizer temporaries) from the nearest runs
  below it (an optimizer's state is rescaled from the parameters' shapes:
  8-bit moments, Adafactor's factored ones; pure bf16 halves the parameters,
  a state kept in their dtype (not 8-bit moments) and, at the least, the
  activations; micro-batches divide the activations), never less than the
  allocated peak of a measured combination above it; its reserved memory is
  that peak rounded up to whole 2 MiB segments, a lower bound (fragmentation
  moves by a quarter between neighbouring combinations: it is measured, not
  estimated). An effect not known yet is learned from the next run that shows
  it (a run that shows one new effect teaches it; a lever's strongest level
  teaches the levels between by interpolation); until then it is taken as
  optimistic, so a combination is measured rather than wrongly skipped.

Every plan reported as fitting was measured; skipped combinations are counted
and, in JSON, listed with the reason and whether their numbers are estimates.
The search stops when the ``max_plans`` cheapest plans (not counting one that
only adds steps to a cheaper one) are known, or after ``max_runs`` runs.

Known limitations: sharding needs the sim engine's FSDP support (until then a
sharded step measures like an unsharded one); the CUDA context and the NCCL
buffers of a multi-GPU job are not measured; numerics (bf16, 8-bit optimizer
state) are costs stated, not measured.

The package, in the order the data flows: :mod:`~memprof.plan.levers` (the lever
catalogue, which levels apply), :mod:`~memprof.plan.combinations` (a key: one level
per lever), :mod:`~memprof.plan.estimator` (the estimate of a combination from the
measured runs), :mod:`~memprof.plan.search` (the best-first search and its state),
:mod:`~memprof.plan.result` (plain data, JSON), :mod:`~memprof.plan.recipe` (the YAML
recipe), :mod:`~memprof.plan.maximize`, and :mod:`~memprof.plan.planner` (the entry
points :func:`plan` and :func:`single_fixes`).
"""

from memprof.plan.combinations import Combinations, Key
from memprof.plan.estimator import Estimator, Footprint, Measured
from memprof.plan.levers import (
    NOT_SEARCHED,
    SIDE_COSTS,
    Level,
    Lever,
    build_levers,
    optimizer_trace_problem,
    param_bytes,
    state_bytes_8bit,
    state_bytes_adafactor,
)
from memprof.plan.maximize import MAXIMIZE
from memprof.plan.planner import DEFAULT_CONTEXT_BYTES, new_search, plan, single_fixes
from memprof.plan.recipe import compare_command, recipe_text
from memprof.plan.result import (
    SCHEMA,
    Budget,
    Candidate,
    Maximized,
    PlanResult,
    Run,
    SingleFix,
    SingleFixes,
    dominant,
    pareto,
)
from memprof.plan.search import ESTIMATE_MARGIN, Search, SearchState

__all__ = [
    "DEFAULT_CONTEXT_BYTES",
    "ESTIMATE_MARGIN",
    "MAXIMIZE",
    "NOT_SEARCHED",
    "SCHEMA",
    "SIDE_COSTS",
    "Budget",
    "Candidate",
    "Combinations",
    "Estimator",
    "Footprint",
    "Key",
    "Level",
    "Lever",
    "Maximized",
    "Measured",
    "PlanResult",
    "Run",
    "Search",
    "SearchState",
    "SingleFix",
    "SingleFixes",
    "build_levers",
    "compare_command",
    "dominant",
    "new_search",
    "optimizer_trace_problem",
    "param_bytes",
    "pareto",
    "plan",
    "recipe_text",
    "single_fixes",
    "state_bytes_8bit",
    "state_bytes_adafactor",
]
