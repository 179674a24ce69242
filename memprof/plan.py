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
the most aggressive combination: if even its allocated peak does not fit,
nothing does). A combination is skipped without a run when

* it is component-wise less aggressive than one whose allocated peak was
  measured not to fit (monotonicity: more of a lever never allocates more; the
  reserved memory above the allocated peak is not monotone, so only the
  allocated peak is carried over);
* a cheaper measured plan is component-wise below it (it would fit, at a
  higher cost);
* its parameters, gradients and optimizer state alone (rescaled from the
  baseline's categories) exceed the budget;
* its estimate exceeds the budget by more than :data:`ESTIMATE_MARGIN`. The
  estimator composes per-lever effects on the categories (parameters,
  optimizer state, activations, optimizer temporaries) from the nearest runs
  below it (an optimizer's state is rescaled from the parameters' shapes:
  8-bit moments, Adafactor's factored ones; pure bf16 halves the parameters
  and state; micro-batches divide the activations), never less than the
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
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import yaml

from memprof import optimizations, recipes
from memprof.allocator_model import SMALL_BUFFER
from memprof.api import fake_model, prepare
from memprof.compare import _apply
from memprof.engines.base import Engine, Measure
from memprof.engines.sim import SimEngine
from memprof.errors import EnvironmentProblem, InputError, NoPlanFits, OutOfMemory
from memprof.models import DTYPES, ResolvedModel
from memprof.profile import Profile
from memprof.units import format_bytes
from memprof.workload import StepSetup, Workload, repeated_blocks

SCHEMA = "memprof.plan/1"
MiB = 2**20
#: the CUDA context assumed when none is given: recent drivers with lazy module
#: loading take 300-600 MiB per process on an H100 (measure yours with
#: ``memprof analyze --engine cuda``)
DEFAULT_CONTEXT_BYTES = 512 * MiB
MAXIMIZE = ("batch-size", "seq-len")
#: a combination whose estimate exceeds the usable budget by more than this
#: fraction is skipped without a run (and reported as estimated)
ESTIMATE_MARGIN = 0.05
#: a fb-phase transient within this fraction of the gradients may be the gradients
#: (the end of backward), not the activations: the activations are then only bounded
_CENSOR = 1.03

#: side costs, in units of FLOP overhead (0.10 = as costly as 10% more FLOPs): what a
#: lever level costs besides FLOPs. A stated guess, used to rank plans; shown in the output.
SIDE_COSTS: dict[str, tuple[float, str]] = {
    "autocast": (0.005, "bf16 matmuls under autocast (float32 master weights kept)"),
    "pure_bf16": (0.04, "numerics: no float32 master weights, updates below bf16 resolution are lost"),
    "adamw8bit": (0.02, "numerics: 8-bit optimizer moments (block-wise quantized)"),
    "adafactor": (0.04, "numerics: Adafactor's factored second moment, no first moment (retune the LR)"),
    "fsdp_keep": (0.03, "communication: one all-gather per block and forward, reduce-scatter of gradients"),
    "fsdp": (
        0.05,
        "communication: all-gathers in forward and again in backward, reduce-scatter of gradients",
    ),
    "micro_batch": (
        0.02,
        "smaller kernels: lower GPU utilisation (same FLOPs), per halving of the micro-batch",
    ),
    "offload": (0.25, "PCIe traffic: every saved activation crosses the bus twice"),
    "in_backward": (0.01, "no gradient clipping over all parameters, no accumulation"),
    "expandable": (0.001, "none measurable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"),
}

#: registered optimizations never searched, and why
NOT_SEARCHED: dict[str, str] = {
    "pruning": "changes the model's function",
    "quantization": "changes the model's function (and applies to inference)",
    "glu": "changes the model's function",
    "local_attention": "changes the model's function",
    "dynamic_padding": "changes the batches (it needs the data's lengths)",
}

Progress = Callable[[str], None]

# components of a step's memory the estimator composes
_COMPONENTS = ("params", "state", "acts", "temps")


# -- levers ------------------------------------------------------------------------------------


@dataclass
class Level:
    """One level of a lever: the optimizations it adds, and what it costs besides FLOPs."""

    label: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    side: str | None = None  # key of SIDE_COSTS
    side_cost: float = 0.0
    #: prior ratios of the memory components (params, state, acts, temps); missing: learned from runs
    prior: dict[str, float] = field(default_factory=dict)
    #: prior FLOP change as a fraction of the baseline's FLOPs (None: learned)
    flops_prior: float | None = 0.0
    #: checkpointing: blocks checkpointed; micro-batches: their number (interpolation)
    amount: float = 0.0


@dataclass
class Lever:
    """An ordered list of levels, level 0 the step as given."""

    name: str
    levels: list[Level]
    #: the lever changes the step's FLOPs (its levels take part in a FLOP signature)
    flops: bool = False
    #: an unmeasured level's activation effect is interpolated from the strongest level's
    interpolate: bool = False
    #: from the same trace, no run of its own (the allocator setting)
    derived: bool = False


def _opt(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": dict(options)}


def _side(level: Level, key: str, scale: float = 1.0) -> Level:
    level.side = key
    level.side_cost = SIDE_COSTS[key][0] * scale
    return level


def state_bytes_8bit(model: torch.nn.Module) -> int:
    """AdamW8bit's state: two 1-byte moments per element plus a float32 scale per 256-element block.

    torchao and bitsandbytes keep parameters under 4096 elements in float32 (8 bytes an element).
    """
    total = 0
    for p in _unique_params(model):
        n = p.numel()
        total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256)
    return total


def state_bytes_adafactor(model: torch.nn.Module) -> int:
    """Adafactor's state (transformers, no first moment): row and column second moments of each matrix."""
    total = 0
    for p in _unique_params(model):
        e = p.element_size()
        if p.dim() >= 2:
            total += (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) * e
        else:
            total += p.numel() * e
        total += 4  # the step counter
    return total


def _unique_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model))


def build_levers(
    model: torch.nn.Module, workload: Workload, *, derived_allocator: bool = True
) -> tuple[list[Lever], list[str]]:
    """The levers searched for this model and step, and the levers left out with the reason.

    Levels that do not apply to the model or step (checked with each optimization's
    own ``applies_to`` on the baseline setup) are left out.
    """
    wl = workload
    levers: list[Lever] = []
    left_out: list[str] = []
    base = StepSetup.of(wl)
    train = wl.training
    elem = DTYPES[wl.dtype].itemsize
    adamw_state = 2 * param_bytes(model)  # two moments in the parameters' dtype

    def applies(level: Level) -> str | None:
        trial = base.copy()
        for st in level.steps:
            reason = _apply(optimizations.make(st["name"], st["options"]), model, trial)
            if reason:
                return reason
        return None

    def add(lever: Lever) -> None:
        kept = [lever.levels[0]]
        for lv in lever.levels[1:]:
            reason = applies(lv)
            if reason:
                left_out.append(f"{lever.name} {lv.label}: {reason}")
            else:
                kept.append(lv)
        if len(kept) > 1:
            lever.levels = kept
            levers.append(lever)

    if wl.attn == "eager":
        add(
            Lever(
                "attention",
                [
                    Level("eager"),
                    Level("sdpa", [_opt("attention")], prior={"params": 1, "state": 1, "temps": 1}),
                ],
                flops=True,
            )
        )
    if wl.dtype == "float32":
        half = 2 / elem
        add(
            Lever(
                "precision",
                [
                    Level("float32"),
                    _side(
                        Level(
                            "bf16 autocast",
                            [_opt("mixed_precision")],
                            prior={"params": 1, "state": 1, "temps": 1},
                        ),
                        "autocast",
                    ),
                    _side(
                        Level(
                            "pure bf16",
                            [_opt("mixed_precision", pure=True)],
                            prior={"params": half, "state": half, "temps": half},
                        ),
                        "pure_bf16",
                    ),
                ],
            )
        )
    if train and wl.optimizer == "adamw":
        r8 = state_bytes_8bit(model) / adamw_state if adamw_state else 1.0
        raf = state_bytes_adafactor(model) / adamw_state if adamw_state else 1.0
        add(
            Lever(
                "optimizer",
                [
                    Level("adamw"),
                    # the state is rescaled (measured when a plan uses it); its temporaries taken
                    # as none until measured: optimistic, so a plan is measured rather than skipped
                    _side(
                        Level(
                            "adamw8bit",
                            [_opt("optimizer", type="adamw8bit")],
                            prior={"params": 1, "state": r8, "acts": 1, "temps": 0.0},
                        ),
                        "adamw8bit",
                    ),
                    _side(
                        Level(
                            "adafactor",
                            [_opt("optimizer", type="adafactor")],
                            prior={"params": 1, "state": raf, "acts": 1},
                        ),
                        "adafactor",
                    ),
                ],
            )
        )
    if train and wl.world_size > 1:
        n = wl.world_size
        shard = {"params": 1 / n, "state": 1 / n, "temps": 1 / n, "acts": 1}
        add(
            Lever(
                "fsdp",
                [
                    Level("off"),
                    _side(
                        Level(
                            "keep gathered", [_opt("fsdp", reshard_after_forward=False)], prior=dict(shard)
                        ),
                        "fsdp_keep",
                    ),
                    _side(
                        Level("reshard", [_opt("fsdp", reshard_after_forward=True)], prior=dict(shard)),
                        "fsdp",
                    ),
                ],
            )
        )
    if train:
        n_blocks = len(repeated_blocks(model))
        levels = [Level("off")]
        seen: set[int] = set()
        for every in (4, 2, 1):
            count = math.ceil(n_blocks / every) if n_blocks else 0
            if not count or count in seen:
                continue
            seen.add(count)
            frac = count / n_blocks
            levels.append(
                Level(
                    f"every {every}",
                    [_opt("checkpointing", every=every)],
                    prior={"params": 1, "state": 1, "temps": 1},
                    # one more forward of the checkpointed blocks: about a third of a step's FLOPs
                    flops_prior=0.31 * frac,
                    amount=count,
                )
            )
        add(Lever("checkpointing", levels, flops=True, interpolate=True))
        b = wl.batch_size
        # micro-batches of halving size down to 1 sample (more levels add runs, not insight)
        ks = [k for k in (2, 4, 8, 16) if k <= b and b % k == 0]
        if b > 1 and b not in ks:
            ks.append(b)
        if ks:
            add(
                Lever(
                    "micro-batches",
                    [Level("1")]
                    + [
                        _side(
                            Level(
                                f"{k} x {b // k}",
                                [_opt("grad_accumulation", steps=k)],
                                prior={"params": 1, "state": 1, "temps": 1, "acts": 1 / k},
                                amount=k,
                            ),
                            "micro_batch",
                            math.log2(k),
                        )
                        for k in ks
                    ],
                    flops=True,
                )
            )
    if wl.mode == "train" and wl.seq_len > 1:
        size = 256 if wl.seq_len > 512 else max(1, wl.seq_len // 4)
        head = getattr(model, "get_output_embeddings", lambda: None)()
        n_params = sum(p.numel() for p in _unique_params(model))
        # the head runs once more (its forward, per chunk): 2 x tokens x in x out FLOPs,
        # against about 6 x tokens x parameters for the step
        share = (
            head.weight.numel() / (3 * n_params) if isinstance(head, torch.nn.Linear) and n_params else 0.0
        )
        add(
            Lever(
                "chunked loss",
                [
                    Level("off"),
                    Level(
                        f"{size} tokens",
                        [_opt("chunking", form="loss", size=size)],
                        prior={"params": 1, "state": 1, "temps": 1},
                        flops_prior=share,
                    ),
                ],
                flops=True,
            )
        )
    if wl.mode == "infer" and wl.seq_len > 1:
        size = 256 if wl.seq_len > 512 else max(1, wl.seq_len // 4)
        add(
            Lever(
                "chunked prefill",
                [
                    Level("off"),
                    Level(
                        f"{size} tokens",
                        [_opt("chunking", form="prefill", size=size)],
                        prior={"params": 1, "state": 1, "temps": 1},
                    ),
                ],
                flops=True,
            )
        )
    if wl.mode == "infer":
        add(
            Lever(
                "inference_mode",
                [
                    Level("off"),
                    Level("on", [_opt("inference_mode")], prior={"params": 1, "state": 1, "temps": 1}),
                ],
            )
        )
    if wl.mode == "distill":
        add(
            Lever(
                "teacher",
                [
                    Level("as loaded"),
                    Level(
                        "no_grad",
                        [_opt("distill_teacher", no_grad=True)],
                        prior={"params": 1, "state": 1, "temps": 1},
                    ),
                ],
                flops=True,
            )
        )
    if train:
        add(
            Lever(
                "activation offload",
                [
                    Level("off"),
                    _side(
                        Level(
                            "on", [_opt("activation_offload")], prior={"params": 1, "state": 1, "temps": 1}
                        ),
                        "offload",
                    ),
                ],
            )
        )
        if wl.optimizer != "none":
            # its effect is structural (no full gradients, no optimizer phase): no ratios to learn
            add(
                Lever(
                    "optimizer in backward",
                    [
                        Level("off"),
                        _side(
                            Level(
                                "on",
                                [_opt("optimizer_in_backward")],
                                prior={"params": 1, "state": 1, "acts": 1, "temps": 1},
                            ),
                            "in_backward",
                        ),
                    ],
                )
            )
    if derived_allocator:
        levers.append(
            Lever(
                "allocator",
                [
                    Level("default"),
                    _side(
                        Level("expandable", [_opt("allocator", expandable_segments=True)], prior={}),
                        "expandable",
                    ),
                ],
                derived=True,
            )
        )
    return levers, left_out


# -- runs, candidates, the result -----------------------------------------------------------------


@dataclass
class Run:
    """One sim run: the combination measured and what it showed."""

    index: int
    key: tuple[int, ...]
    steps: list[dict[str, Any]]
    seconds: float
    profile: Profile | None = None
    #: peak reserved with PyTorch's default allocator settings, and with expandable segments
    reserved: int | None = None
    reserved_expandable: int | None = None
    flops: int | None = None
    #: the run whose FLOP count this one shares (same checkpointing, chunking, micro-batches)
    flops_from: int | None = None
    #: why the run failed (the sim engine could not trace it)
    error: str | None = None
    #: why it ran: "baseline", "most aggressive", "candidate", "effect of <lever>"
    purpose: str = "candidate"

    def to_dict(self) -> dict[str, Any]:
        p = self.profile
        return {
            "index": self.index,
            "purpose": self.purpose,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "peak_bytes": p.peak_bytes if p else None,
            "reserved_bytes": self.reserved,
            "reserved_expandable_bytes": self.reserved_expandable,
            "peak_phase": p.peak_phase if p else None,
            "categories_at_peak": dict(p.categories_at_peak) if p else None,
            "flops": self.flops,
            "flops_from_run": self.flops_from,
            "error": self.error,
        }


@dataclass
class Candidate:
    """A combination of lever levels, and what the search made of it."""

    levels: tuple[int, ...]
    steps: list[dict[str, Any]]
    label: str
    #: fits | does not fit | over max overhead | failed (measured); estimated not to fit | pruned |
    #: not needed | not reached | not measurable (no run)
    status: str = "unresolved"
    #: why it had no run, in short: misfit (below a measured misfit), plan (above a cheaper plan that
    #: fits), state (its state alone is over the budget), estimate, overhead, not needed, run limit,
    #: not measurable, nothing fits
    skip: str | None = None
    #: why it was skipped, or what it failed with
    reason: str = ""
    #: measured (a run), estimated (the estimator), or none (no numbers)
    source: str = "none"
    run: int | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    #: reserved + the CUDA context + the cuBLAS workspace: what the budget must hold
    need_bytes: int | None = None
    flops: int | None = None
    flop_overhead: float | None = None
    flops_source: str = "estimated"
    side_cost: float = 0.0
    #: the side costs of its levels, one phrase each
    side_notes: list[str] = field(default_factory=list)
    categories: dict[str, int] | None = None
    peak_phase: str | None = None

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def cost(self) -> float:
        return (self.flop_overhead or 0.0) + self.side_cost

    def headroom(self, budget: int) -> int | None:
        return None if self.need_bytes is None else budget - self.need_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            "skip": self.skip,
            "fits": self.fits,
            "source": self.source,
            "run": self.run,
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
            "need_bytes": self.need_bytes,
            "flops": self.flops,
            "flop_overhead": self.flop_overhead,
            "flops_source": self.flops_source,
            "side_cost": self.side_cost,
            "side_notes": self.side_notes,
            "cost": self.cost,
            "categories_at_peak": self.categories,
            "peak_phase": self.peak_phase,
        }


@dataclass
class Budget:
    """What the budget must hold besides the step's tensors, and what is left for them."""

    budget_bytes: int
    #: the CUDA context: an assumption (no GPU to measure it), ``--context-overhead``
    context_bytes: int
    #: cuBLAS workspace, from the sim profile (allocated on the first matmul, outside the peak)
    cublas_workspace_bytes: int
    world_size: int = 1

    @property
    def usable_bytes(self) -> int:
        """What is left for the caching allocator's reserved memory."""
        return self.budget_bytes - self.context_bytes - self.cublas_workspace_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "context_bytes": self.context_bytes,
            "context_source": "assumed (--context-overhead); measure it with memprof analyze --engine cuda",
            "cublas_workspace_bytes": self.cublas_workspace_bytes,
            "usable_bytes": self.usable_bytes,
            "fragmentation": "peak reserved of the sim's caching-allocator model (replaying the step)",
            "per_rank": self.world_size > 1,
            "world_size": self.world_size,
        }


@dataclass
class Maximized:
    """The largest batch size or sequence length that fits with the chosen plan."""

    dimension: str  # batch-size | seq-len
    start: int
    best: int
    #: the smallest value found not to fit (None: the limit was reached first)
    first_misfit: int | None
    #: why the search stopped growing (a misfit, the model's position limit, the probe limit)
    limit: str
    #: the value and need of every probe, in order ({"value", "need_bytes", "fits", "error"})
    probes: list[dict[str, Any]] = field(default_factory=list)
    best_profile: Profile | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "start": self.start,
            "best": self.best,
            "first_misfit": self.first_misfit,
            "limit": self.limit,
            "probes": self.probes,
            "best_peak_bytes": self.best_profile.peak_bytes if self.best_profile else None,
            "best_reserved_bytes": self.best_profile.peak_reserved_bytes if self.best_profile else None,
        }


@dataclass
class PlanResult:
    """What :func:`plan` found: the budget, every evaluated combination, the plans that fit.

    JSON (``to_dict``, schema ``memprof.plan/1``): ``schema``, ``model``, ``workload``,
    ``engine``, ``budget`` (the accounting), ``max_overhead``, ``levers`` (name and
    level labels), ``not_searched``, ``candidates`` (every combination resolved: steps,
    status, source, peak, reserved, need, FLOPs, cost), ``plans`` (those that fit,
    cheapest first), ``chosen`` (the first plan, or null), ``frontier`` (of those that do
    not fit: no other needs less memory at a lower cost), ``runs`` (each sim run),
    ``counts`` (combinations, runs, pruned by reason), ``maximize``, ``recipe`` (YAML
    text of the chosen plan), ``dominant`` (what dominates the closest plan's memory
    when none fits), ``notes``, ``seconds``.
    """

    model: str
    workload: dict[str, Any]
    engine: str
    budget: Budget
    max_overhead: float | None
    levers: list[Lever]
    not_searched: list[str]
    baseline: Candidate
    candidates: list[Candidate]
    runs: list[Run]
    counts: dict[str, int]
    plans: list[Candidate] = field(default_factory=list)
    frontier: list[Candidate] = field(default_factory=list)
    maximize: Maximized | None = None
    recipe: str | None = None
    dominant: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    schema: str = SCHEMA

    @property
    def chosen(self) -> Candidate | None:
        """The cheapest plan that fits (the baseline, with no steps, when it fits as it is)."""
        return self.plans[0] if self.plans else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "workload": self.workload,
            "engine": self.engine,
            "budget": self.budget.to_dict(),
            "max_overhead": self.max_overhead,
            "levers": [
                {"name": lv.name, "levels": [lvl.label for lvl in lv.levels], "derived": lv.derived}
                for lv in self.levers
            ],
            "not_searched": self.not_searched,
            "side_costs": {k: {"cost": v[0], "what": v[1]} for k, v in SIDE_COSTS.items()},
            "baseline": self.baseline.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "plans": [c.to_dict() for c in self.plans],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "frontier": [c.to_dict() for c in self.frontier],
            "runs": [r.to_dict() for r in self.runs],
            "counts": self.counts,
            "maximize": self.maximize.to_dict() if self.maximize else None,
            "recipe": self.recipe,
            "dominant": self.dominant,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }


# -- the search -----------------------------------------------------------------------------------


def optimizer_trace_problem(name: str, dtype: torch.dtype) -> str | None:
    """Why optimizer ``name`` cannot step under fake tensors, or None (one 128 x 128 step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.workload import make_optimizer

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer = torch.nn.Linear(128, 128, bias=False, dtype=dtype)
            opt = make_optimizer(name, layer, foreach=True)
            if opt is None:
                return None
            layer.weight.grad = torch.zeros_like(layer.weight)
            opt.step()
    except (InputError, EnvironmentProblem) as e:
        return str(e)
    except Exception as e:  # a library reading tensor values (e.g. .tolist()) under fake tensors
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


@dataclass
class _Comp:
    """A measured step's memory in the estimator's terms (bytes)."""

    params: float
    other: float  # buffers and inputs
    state: float
    #: activations and what scales with them, at the forward/backward peak (None: only bounded)
    acts: float | None
    #: the optimizer step's temporaries beyond the gradients (None: not seen)
    temps: float | None
    peak: int
    frag: float
    frag_expandable: float | None


class _Search:
    """Best-first search over the combinations of lever levels (see the module docstring)."""

    def __init__(
        self,
        rm: ResolvedModel,
        eng: Engine,
        wl: Workload,
        model: torch.nn.Module,
        levers: list[Lever],
        budget: Budget,
        *,
        max_overhead: float | None,
        max_plans: int,
        max_runs: int,
        allow_pickle: bool,
        say: Progress,
    ) -> None:
        self.rm, self.eng, self.wl, self.model = rm, eng, wl, model
        self.levers = levers
        self.budget = budget
        self.max_overhead = max_overhead
        self.max_plans = max_plans
        self.max_runs = max_runs
        self.allow_pickle = allow_pickle
        self.say = say
        self.training = wl.training
        self.alloc = next((i for i, lv in enumerate(levers) if lv.derived), None)
        self.runs: list[Run] = []
        self.by_key: dict[tuple[int, ...], Run] = {}
        self.comps: dict[tuple[int, ...], _Comp] = {}
        self.cands: dict[tuple[int, ...], Candidate] = {}
        self.learned: dict[tuple[int, int, str], float] = {}
        self.flops_by_sig: dict[tuple[int, ...], tuple[int, int]] = {}  # signature -> (flops, run index)
        self.flops_learned: dict[tuple[int, int], float] = {}
        self.dropped: dict[tuple[int, int], str] = {}
        self.non_monotone: set[int] = set()
        self.notes: list[str] = []
        self.setups: dict[tuple[int, ...], StepSetup] = {}
        self.invalid: dict[tuple[int, ...], str] = {}
        self._enumerate()

    # combinations ---------------------------------------------------------------------------
    def _run_key(self, key: tuple[int, ...]) -> tuple[int, ...]:
        if self.alloc is None:
            return key
        k = list(key)
        k[self.alloc] = 0
        return tuple(k)

    def steps_of(self, key: tuple[int, ...]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for lv, i in zip(self.levers, key):
            out += [dict(s) for s in lv.levels[i].steps]
        return out

    def label(self, key: tuple[int, ...]) -> str:
        steps = self.steps_of(key)
        if not steps:
            return "as it is"
        return " + ".join(optimizations.make(s["name"], s["options"]).describe() for s in steps)

    def _enumerate(self) -> None:
        """Every valid combination's setup, stacked lever by lever (a prefix is stacked once)."""
        run_levers = [
            lv if not lv.derived else Lever(lv.name, lv.levels[:1], derived=True) for lv in self.levers
        ]

        def walk(depth: int, key: tuple[int, ...], setup: StepSetup) -> None:
            if depth == len(run_levers):
                self.setups[key] = setup
                return
            for i, level in enumerate(run_levers[depth].levels):
                trial = setup.copy() if level.steps else setup
                reason = None
                for st in level.steps:
                    reason = _apply(optimizations.make(st["name"], st["options"]), self.model, trial)
                    if reason:
                        break
                if reason:
                    rest = [range(len(lv.levels)) for lv in run_levers[depth + 1 :]]
                    for tail in itertools.product(*rest):
                        self.invalid[(*key, i, *tail)] = reason
                    continue
                walk(depth + 1, (*key, i), trial)

        walk(0, (), StepSetup.of(self.wl))
        for key in (k for run_key in self.setups for k in self._with_alloc(run_key)):
            self.cands[key] = Candidate(
                levels=key,
                steps=self.steps_of(key),
                label=self.label(key),
                side_cost=sum(lv.levels[i].side_cost for lv, i in zip(self.levers, key)),
                side_notes=[
                    SIDE_COSTS[lv.levels[i].side][1]  # type: ignore[index]
                    for lv, i in zip(self.levers, key)
                    if i and lv.levels[i].side
                ],
            )

    def le(self, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        """a is component-wise no more aggressive than b (equal on levers seen not to be monotone)."""
        return all(x <= y and (x == y or i not in self.non_monotone) for i, (x, y) in enumerate(zip(a, b)))

    def maximal(self) -> list[tuple[int, ...]]:
        """The valid run combinations no other valid one is more aggressive than."""
        keys = [k for k in self.setups if not any((i, lvl) in self.dropped for i, lvl in enumerate(k))]
        return [k for k in keys if not any(o != k and self.le(k, o) for o in keys)]

    # structure of a combination ---------------------------------------------------------------
    def _lever(self, name: str) -> int | None:
        return next((i for i, lv in enumerate(self.levers) if lv.name == name), None)

    def in_backward(self, key: tuple[int, ...]) -> bool:
        i = self._lever("optimizer in backward")
        return i is not None and key[i] > 0

    def micro_batches(self, key: tuple[int, ...]) -> int:
        i = self._lever("micro-batches")
        return int(self.levers[i].levels[key[i]].amount) if i is not None and key[i] else 1

    def signature(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(k if lv.flops else 0 for lv, k in zip(self.levers, key))

    # measuring --------------------------------------------------------------------------------
    def _probe_optimizer(self, key: tuple[int, ...]) -> bool:
        """An optimizer level never run is first stepped on one small fake matrix (milliseconds).

        An optimizer the sim engine cannot trace (one that reads its state's values) is
        dropped then, not after a whole step.
        """
        i = self._lever("optimizer")
        if i is None or not key[i] or (i, key[i]) in self.dropped:
            return (i, key[i]) not in self.dropped if i is not None else True
        if any(r.profile is not None and r.key[i] == key[i] for r in self.runs):
            return True
        name = self.levers[i].levels[key[i]].steps[0]["options"]["type"]
        why = optimizer_trace_problem(name, DTYPES[self.wl.dtype])
        if why is None:
            return True
        what = f"optimizer {name}"
        self.dropped[(i, key[i])] = why
        self.notes.append(f"not searched: {what} cannot be traced by the sim engine ({why})")
        for k, c in self.cands.items():
            if k[i] == key[i] and c.status == "unresolved":
                c.status, c.skip = "not measurable", "not measurable"
                c.reason = f"{what} cannot be traced by the sim engine: {why}"
        return False

    def measure(self, key: tuple[int, ...], purpose: str) -> Run | None:
        key = self._run_key(key)
        if not self._probe_optimizer(key):
            return None
        setup = self.setups[key]
        sig = self.signature(key)
        count = sig not in self.flops_by_sig
        index = len(self.runs) + 1
        label = self.label(key)
        self.say(f"run {index}: {label} ({purpose})")
        t0 = time.perf_counter()
        run = Run(index=index, key=key, steps=self.steps_of(key), seconds=0.0, purpose=purpose)
        try:
            r = self.eng.run_detailed(
                self.rm,
                setup,
                progress=lambda m: self.say(f"run {index}: {label}: {m}"),
                allow_pickle=self.allow_pickle,
                track_modules=False,
                measure=Measure(flops=count, timeline=False),
            )
        except OutOfMemory as e:
            run.error = f"out of memory: {e}"
        except (InputError, EnvironmentProblem) as e:
            run.error = str(e)
        except Exception as e:  # the sim engine could not trace this step (a library under fake tensors)
            run.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        else:
            run.profile = r.profile
            run.reserved = r.profile.peak_reserved_bytes
            # the sim engine replays every trace with expandable segments too (its hint)
            exp = getattr(self.eng, "expandable_estimate", None)
            run.reserved_expandable = exp.peak_reserved_bytes if exp is not None else None
            if count:
                run.flops = r.flops
                if r.flops is not None:
                    self.flops_by_sig[sig] = (r.flops, index)
            elif sig in self.flops_by_sig:
                run.flops, run.flops_from = self.flops_by_sig[sig]
            ws = r.profile.overheads.get("cublas_workspace_bytes")
            if isinstance(ws, int) and not self.runs:
                self.budget.cublas_workspace_bytes = ws
        run.seconds = time.perf_counter() - t0
        self.runs.append(run)
        self.by_key[key] = run
        if run.profile is not None:
            self.comps[key] = self._decompose(key, run)
            self._learn(key)
            self._learn_flops(sig)
        self._resolve_run(run)
        return run

    def _decompose(self, key: tuple[int, ...], run: Run) -> _Comp:
        p = run.profile
        assert p is not None
        c = p.categories_at_peak
        params, state = float(c["parameters"]), float(c["optimizer_state"])
        other = float(c["buffers"] + c["inputs"])
        base = params + state + other
        phases = {ph.name: ph.peak_bytes for ph in p.phases}
        fb = max([v for k, v in phases.items() if k != "optimizer"] or [p.peak_bytes])
        x = max(fb - base, 0.0)
        y = max(phases.get("optimizer", 0) - base, 0.0)
        grads = params  # full fine-tuning: every parameter has a gradient of its dtype
        acts: float | None
        temps: float | None = None
        if not self.training or self.in_backward(key):
            acts = x
        elif self.micro_batches(key) > 1:
            acts = max(x - grads, 0.0)  # the gradients of the earlier micro-batches are there
            temps = max(y - grads, 0.0)
        else:
            # the fb peak is the start of backward (activations) or its end (gradients)
            acts = x if x > grads * _CENSOR else None
            temps = max(y - grads, 0.0)
        peak = p.peak_bytes or 1
        return _Comp(
            params=params,
            other=other,
            state=state,
            acts=acts,
            temps=temps,
            peak=p.peak_bytes,
            frag=(run.reserved or peak) / peak,
            frag_expandable=(run.reserved_expandable / peak) if run.reserved_expandable else None,
        )

    # what a lever level does: priors, learned ratios -------------------------------------------
    def ratio(self, i: int, level: int, comp: str) -> float | None:
        if level == 0:
            return 1.0
        lv = self.levers[i]
        got = self.learned.get((i, level, comp))
        if got is not None:
            return got
        lvl = lv.levels[level]
        if comp in lvl.prior:
            return float(lvl.prior[comp])
        if comp == "acts" and lv.interpolate:
            top = len(lv.levels) - 1
            r_top = self.learned.get((i, top, comp))
            if r_top is not None and lv.levels[top].amount:
                return 1.0 - (1.0 - r_top) * lvl.amount / lv.levels[top].amount
        if lv.derived:
            return 1.0
        return None

    def _compose(self, comp: str, key: tuple[int, ...], anchors: list[tuple[int, ...]]) -> float | None:
        """The component for ``key`` from the nearest anchor where it is known, or None."""
        for a in anchors:
            v = getattr(self.comps[a], comp)
            if v is None:
                continue
            factor = 1.0
            for i, (x, y) in enumerate(zip(a, key)):
                if x == y or self.levers[i].derived:
                    continue
                rx, ry = self.ratio(i, x, comp), self.ratio(i, y, comp)
                if rx is None or ry is None or rx == 0:
                    factor = math.nan
                    break
                factor *= ry / rx
            if not math.isnan(factor):
                return float(v) * factor
        return None

    def _anchors(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        rk = self._run_key(key)
        out = [a for a in self.comps if self.le(a, rk)]
        out.sort(key=lambda a: sum(1 for x, y in zip(a, rk) if x != y))
        return out

    def _learn(self, key: tuple[int, ...]) -> None:
        """Learn, per component, the one effect this run shows that no run has shown yet.

        A level whose effect no run has shown is learned against the nearest measured
        combination without it (its prior, if any, is replaced); when several are, the one
        with no prior is learned, the others taken at their priors.
        """
        for comp in _COMPONENTS:
            value = getattr(self.comps[key], comp)
            if value is None:
                continue
            levels = [(i, lvl) for i, lvl in enumerate(key) if lvl and not self.levers[i].derived]
            unlearned = [(i, lvl) for i, lvl in levels if (i, lvl, comp) not in self.learned]
            if len(unlearned) != 1:
                unlearned = [(i, lvl) for i, lvl in levels if self._known(i, lvl, comp) is None]
            if len(unlearned) != 1:
                continue
            i, lvl = unlearned[0]
            for a in self._anchors(key):
                va = getattr(self.comps[a], comp)
                if a == key or a[i] != 0 or not va:
                    continue
                factor = 1.0
                for j, (x, y) in enumerate(zip(a, key)):
                    if j == i or x == y or self.levers[j].derived:
                        continue
                    rx, ry = self.ratio(j, x, comp), self.ratio(j, y, comp)
                    if rx is None or ry is None or rx == 0:
                        factor = math.nan
                        break
                    factor *= ry / rx
                if math.isnan(factor) or factor == 0:
                    continue
                self.learned[(i, lvl, comp)] = value / (va * factor)
                break

    def _known(self, i: int, level: int, comp: str) -> float | None:
        """A ratio from a prior or a run (not interpolated)."""
        got = self.learned.get((i, level, comp))
        if got is not None:
            return got
        prior = self.levers[i].levels[level].prior
        return float(prior[comp]) if comp in prior else None

    # FLOPs ---------------------------------------------------------------------------------------
    def _learn_flops(self, sig: tuple[int, ...]) -> None:
        if sig not in self.flops_by_sig:
            return
        f = self.flops_by_sig[sig][0]
        for other, (g, _) in self.flops_by_sig.items():
            diff = [i for i, (x, y) in enumerate(zip(sig, other)) if x != y]
            if len(diff) == 1 and other[diff[0]] == 0:
                self.flops_learned.setdefault((diff[0], sig[diff[0]]), float(f - g))

    def flops_of(self, key: tuple[int, ...]) -> tuple[float | None, str]:
        """The step's FLOPs: counted for this signature, or estimated from the others."""
        sig = self.signature(key)
        if sig in self.flops_by_sig:
            f, idx = self.flops_by_sig[sig]
            return float(f), f"counted (run {idx})"
        base = self.flops_by_sig.get(tuple(0 for _ in key))
        if base is None:
            return None, "unknown"
        total = float(base[0])
        for i, lvl in enumerate(sig):
            if not lvl:
                continue
            d = self.flops_learned.get((i, lvl))
            if d is None and self.levers[i].interpolate:
                top = len(self.levers[i].levels) - 1
                dt = self.flops_learned.get((i, top))
                if dt is not None and self.levers[i].levels[top].amount:
                    d = dt * self.levers[i].levels[lvl].amount / self.levers[i].levels[top].amount
            if d is None:
                prior = self.levers[i].levels[lvl].flops_prior
                d = (prior or 0.0) * base[0]
            total += d
        return total, "estimated"

    def overhead(self, key: tuple[int, ...]) -> tuple[float | None, str]:
        f, src = self.flops_of(key)
        base = self.flops_by_sig.get(tuple(0 for _ in key))
        if f is None or base is None or not base[0]:
            return None, src
        return (f - base[0]) / base[0], src

    def cost(self, key: tuple[int, ...]) -> float:
        ov, _ = self.overhead(key)
        return (ov or 0.0) + self.cands[key].side_cost

    # estimates -----------------------------------------------------------------------------------
    def floor(self, key: tuple[int, ...]) -> float | None:
        """Parameters, optimizer state and (outside backward) all gradients: a lower bound of the peak."""
        base = self.comps.get(tuple(0 for _ in key))
        if base is None:
            return None
        params = self._compose("params", key, [tuple(0 for _ in key)])
        state = self._compose("state", key, [tuple(0 for _ in key)])
        if params is None or state is None:
            return None
        grads = params if self.training and not self.in_backward(key) else 0.0
        return params + state + base.other + grads

    def estimate(self, key: tuple[int, ...]) -> tuple[float, float]:
        """(peak, reserved) of a combination not measured: optimistic where an effect is unknown.

        The nearest measured combinations below it (the anchors) and the lever effects
        (priors, or learned from runs) give its parameters, optimizer state, activations
        and optimizer temporaries; the structure of the step puts them together: the peak is
        the forward/backward peak (activations, or the gradients at the end of backward, plus
        the earlier micro-batches' gradients) or the optimizer step's (all gradients and the
        optimizer's temporaries), whichever is higher; none with the optimizer in backward.
        """
        anchors = self._anchors(key)
        base = self.comps[tuple(0 for _ in key)]
        params = self._compose("params", key, anchors) or base.params
        state = self._compose("state", key, anchors)
        state = base.state if state is None else state
        acts = self._compose("acts", key, anchors) or 0.0
        temps = self._compose("temps", key, anchors) or 0.0
        grads = params
        if not self.training or self.in_backward(key):
            x, y = acts, 0.0
        elif self.micro_batches(key) > 1:
            x, y = acts + grads, grads + temps
        else:
            x, y = max(acts, grads), grads + temps
        peak = params + state + base.other + max(x, y)
        # a measured combination at least as aggressive allocates no more (monotonicity)
        rk = self._run_key(key)
        above = [self.comps[m].peak for m in self.comps if self.le(rk, m)]
        peak = max([peak, *above])
        # reserved: at least the allocated peak rounded up to whole 2 MiB segments (pages, with
        # expandable segments). A lower bound: the fragmentation above it moves with the sizes
        # and order of the allocations (by a quarter between neighbouring runs), and an
        # estimate must only skip what cannot fit
        return peak, float(math.ceil(peak / SMALL_BUFFER) * SMALL_BUFFER)

    # resolving -----------------------------------------------------------------------------------
    def need(self, reserved: float) -> int:
        return int(reserved) + self.budget.context_bytes + self.budget.cublas_workspace_bytes

    def _resolve_run(self, run: Run) -> None:
        for key in self._with_alloc(run.key):
            a = key[self.alloc] if self.alloc is not None else 0
            c = self.cands[key]
            c.run = run.index
            if run.profile is None:
                c.status, c.reason, c.source = "failed", run.error or "", "measured"
                continue
            reserved = run.reserved if a == 0 else run.reserved_expandable
            if reserved is None:
                reserved = run.profile.peak_bytes
            p = run.profile
            c.source = "measured"
            c.peak_bytes, c.reserved_bytes = p.peak_bytes, int(reserved)
            c.need_bytes = self.need(reserved)
            c.categories, c.peak_phase = dict(p.categories_at_peak), p.peak_phase
            ov, src = self.overhead(c.levels)
            c.flops = int(self.flops_of(c.levels)[0] or 0) or None
            c.flop_overhead, c.flops_source = ov, src
            if c.need_bytes <= self.budget.budget_bytes:
                if self.max_overhead is not None and ov is not None and ov > self.max_overhead + 1e-9:
                    c.status = "over max overhead"
                    c.reason = f"FLOPs {ov:+.0%}, above --max-overhead {self.max_overhead:.0%}"
                else:
                    c.status = "fits"
            else:
                c.status = "does not fit"
        self._check_monotone(run)
        if run.profile is None:
            self._drop(run)

    def _check_monotone(self, run: Run) -> None:
        """A lever whose stronger level was measured needing more memory is not assumed monotone.

        Compared on the allocated peak: the reserved memory moves by a fraction of a percent
        with the order of allocations, which says nothing of the lever.
        """
        if run.profile is None:
            return
        for other in self.runs:
            if other is run or other.profile is None:
                continue
            diff = [i for i, (x, y) in enumerate(zip(run.key, other.key)) if x != y]
            if len(diff) != 1:
                continue
            i = diff[0]
            lo, hi = (other, run) if other.key[i] < run.key[i] else (run, other)
            assert lo.profile is not None and hi.profile is not None
            if hi.profile.peak_bytes > lo.profile.peak_bytes * 1.005 + MiB and i not in self.non_monotone:
                self.non_monotone.add(i)
                self.notes.append(
                    f"{self.levers[i].name}: a stronger level needed more memory (runs {lo.index} and "
                    f"{hi.index}); the search does not assume it monotone"
                )

    def _drop(self, run: Run) -> None:
        """A run that failed: a lever level never seen working is dropped from the search."""
        ok = {(i, lvl) for r in self.runs if r.profile is not None for i, lvl in enumerate(r.key) if lvl}
        suspects = [(i, lvl) for i, lvl in enumerate(run.key) if lvl and (i, lvl) not in ok]
        if len(suspects) != 1:
            return
        i, lvl = suspects[0]
        what = f"{self.levers[i].name} {self.levers[i].levels[lvl].label}"
        self.dropped[(i, lvl)] = run.error or "failed"
        self.notes.append(f"not searched further: {what} failed in the sim engine ({run.error})")
        for key, c in self.cands.items():
            if key[i] == lvl and c.status == "unresolved":
                c.status, c.skip = "not measurable", "not measurable"
                c.reason = f"{what} failed in the sim engine (run {run.index})"

    # the loop ------------------------------------------------------------------------------------
    def search(self) -> None:
        zero = tuple(0 for _ in self.levers)
        if zero not in self.by_key:  # a diagnosis measures it first
            self.measure(zero, "baseline")
        base = self.cands[zero]
        if base.status == "failed":
            raise InputError(f"the baseline step could not run in the sim engine: {base.reason}")
        if base.status == "fits":
            for c in self.cands.values():
                if c.status == "unresolved":
                    c.status, c.skip, c.reason = "not needed", "not needed", "the step fits as it is"
            return
        for _ in range(3):  # again when a probe dropped an optimizer the sim cannot trace
            for key in self.maximal():
                if len(self.runs) >= self.max_runs:
                    break
                if key not in self.by_key:
                    self.measure(key, "most aggressive")
            if all(k in self.by_key for k in self.maximal()):
                break
        measured_max = [self.by_key[k] for k in self.maximal() if k in self.by_key]
        if (
            measured_max
            and all(r.profile is not None and self._misfit_everywhere(r.key) for r in measured_max)
            and len(measured_max) == len(self.maximal())
        ):
            # monotonicity: nothing less aggressive fits either
            for c in self.cands.values():
                if c.status == "unresolved":
                    c.status, c.skip = "pruned", "nothing fits"
                    c.reason = (
                        "less aggressive than the most aggressive combination, whose allocated peak alone "
                        "does not fit"
                    )
            return
        self._best_first()

    def _misfit_everywhere(self, key: tuple[int, ...]) -> bool:
        keys = self._with_alloc(key)
        return all(self.cands[k].status == "does not fit" and self.hard_misfit(self.cands[k]) for k in keys)

    def _plans(self) -> list[Candidate]:
        """The measured plans that fit and have no cheaper fitting plan below them, cheapest first.

        A plan that is component-wise above another one that fits only adds steps (and cost).
        """
        fits = [c for c in self._measured() if c.status == "fits"]
        out = [c for c in fits if not any(o is not c and self.le(o.levels, c.levels) for o in fits)]
        out.sort(key=lambda c: (c.cost, -(c.headroom(self.budget.budget_bytes) or 0)))
        return out

    def _best_first(self) -> None:
        usable = self.budget.usable_bytes
        while True:
            pending = [k for k, c in self.cands.items() if c.status == "unresolved"]
            if not pending:
                return
            costs = {k: self.cost(k) for k in pending}
            pending.sort(key=lambda k: (costs[k], sum(1 for x in k if x), k))
            plans = self._plans()
            ran = False
            for key in pending:
                c = self.cands[key]
                if len(plans) >= self.max_plans and costs[key] > plans[self.max_plans - 1].cost:
                    for k in pending:
                        if self.cands[k].status == "unresolved":
                            self.cands[k].status, self.cands[k].skip = "not needed", "not needed"
                            self.cands[k].reason = f"costlier than the {self.max_plans} plans found"
                    return
                rk = self._run_key(key)
                if rk in self.by_key:  # measured (both allocator settings come from one run)
                    continue
                if self._prune(key):
                    continue
                if len(self.runs) >= self.max_runs:
                    for k in pending:
                        if self.cands[k].status == "unresolved":
                            self.cands[k].status, self.cands[k].skip = "not reached", "run limit"
                            self.cands[k].reason = f"the run limit ({self.max_runs}) was reached first"
                    return
                peak, reserved = self.estimate(key)
                if reserved > usable * (1 + ESTIMATE_MARGIN):
                    c.status, c.source, c.skip = "estimated not to fit", "estimated", "estimate"
                    c.peak_bytes, c.reserved_bytes, c.need_bytes = (
                        int(peak),
                        int(reserved),
                        self.need(reserved),
                    )
                    ov, src = self.overhead(key)
                    c.flop_overhead, c.flops_source = ov, src
                    c.reason = (
                        f"estimated {format_bytes(reserved)} reserved, more than {ESTIMATE_MARGIN:.0%} over the "
                        f"usable {format_bytes(usable)}"
                    )
                    continue
                self.measure(
                    self._what_to_run(key), f"candidate (estimated {format_bytes(reserved)} reserved)"
                )
                ran = True
                break
            if not ran:
                return

    def _what_to_run(self, key: tuple[int, ...]) -> tuple[int, ...]:
        """The candidate itself, or the same with an interpolated lever at its strongest level.

        One run of the strongest level teaches the estimator the lever's whole range.
        """
        rk = list(self._run_key(key))
        for i, lvl in enumerate(rk):
            lv = self.levers[i]
            top = len(lv.levels) - 1
            if not lvl or not lv.interpolate or lvl == top:
                continue
            if self.learned.get((i, top, "acts")) is None and self.learned.get((i, lvl, "acts")) is None:
                trial = list(rk)
                trial[i] = top
                t = tuple(trial)
                if t in self.setups and t not in self.by_key and not self._below_misfit(t):
                    rk = trial
        return tuple(rk)

    def hard_misfit(self, c: Candidate) -> bool:
        """Measured with its *allocated* peak alone (plus the overheads) over the budget.

        Only that carries over to less aggressive combinations (their allocated peak is no
        lower); the reserved memory above it moves with the allocations' sizes and order.
        """
        return (
            c.source == "measured"
            and c.peak_bytes is not None
            and self.need(c.peak_bytes) > self.budget.budget_bytes
        )

    def _measured(self) -> list[Candidate]:
        """The combinations measured so far (two per run with the allocator lever)."""
        return [self.cands[k] for r in self.runs for k in self._with_alloc(r.key)]

    def _with_alloc(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.alloc is None:
            return [key]
        out = []
        for a in range(len(self.levers[self.alloc].levels)):
            k = list(key)
            k[self.alloc] = a
            out.append(tuple(k))
        return out

    def _below_misfit(self, key: tuple[int, ...]) -> Candidate | None:
        for c in self._measured():
            if c.status == "does not fit" and self.hard_misfit(c) and self.le(key, c.levels):
                return c
        return None

    def _prune(self, key: tuple[int, ...]) -> bool:
        c = self.cands[key]
        usable = self.budget.usable_bytes
        m = self._below_misfit(key)
        if m is not None:
            c.status, c.skip = "pruned", "misfit"
            c.reason = (
                f"less aggressive than run {m.run} ({m.label}), whose allocated peak alone does not fit"
            )
            return True
        for p in self._measured():
            if p.status in ("fits", "over max overhead") and self.le(p.levels, key):
                c.status, c.skip = "pruned", "plan"
                c.reason = f"more aggressive than run {p.run} ({p.label}), which fits"
                return True
        floor = self.floor(key)
        if floor is not None and floor > usable:
            c.status, c.source, c.skip = "pruned", "estimated", "state"
            c.peak_bytes = int(floor)
            c.reason = (
                f"parameters, optimizer state and gradients alone take {format_bytes(floor)} "
                f"(rescaled from the baseline), more than the usable {format_bytes(usable)}"
            )
            return True
        if self.max_overhead is not None:
            ov, src = self.overhead(key)
            if ov is not None and ov > self.max_overhead + (0 if src.startswith("counted") else 0.02):
                c.status, c.flop_overhead, c.flops_source = "over max overhead", ov, src
                c.skip = "overhead"
                c.reason = f"FLOPs {ov:+.0%} ({src}), above --max-overhead {self.max_overhead:.0%}"
                return True
        return False


# -- the public function ----------------------------------------------------------------------------


def new_search(
    spec: str,
    wl: Workload,
    budget_bytes: int,
    *,
    context_overhead: int,
    engine: Engine | None,
    max_overhead: float | None,
    max_plans: int,
    max_runs: int,
    task: str | None,
    allow_pickle: bool,
    trust_remote_code: bool,
    say: Progress,
) -> tuple[_Search, list[str]]:
    """The search over ``wl``'s levers, nothing measured yet, and the levels left out with the reason.

    Shared by :func:`plan` and :func:`memprof.diagnose.diagnose`.

    Raises:
        InputError: a bad workload, or an engine other than sim.
    """
    wl.validate()
    eng = engine if engine is not None else SimEngine()
    if eng.name != "sim":
        raise InputError(f"memprof plan searches in the sim engine, not {eng.name}")
    rm, eng = prepare(spec, wl, eng, task=task, trust_remote_code=trust_remote_code, progress=say)
    wl = wl.for_model(rm)
    say("Building the model on fake tensors (its structure, for the levers)")
    model = fake_model(rm, wl)
    levers, left_out = build_levers(model, wl, derived_allocator=isinstance(eng, SimEngine))
    budget = Budget(budget_bytes, context_overhead, 0, wl.world_size)
    search = _Search(
        rm,
        eng,
        wl,
        model,
        levers,
        budget,
        max_overhead=max_overhead,
        max_plans=max_plans,
        max_runs=max_runs,
        allow_pickle=allow_pickle,
        say=say,
    )
    return search, left_out


def plan(
    spec: str,
    workload: Workload,
    budget_bytes: int,
    *,
    world_size: int = 1,
    max_overhead: float | None = None,
    maximize: str | None = None,
    context_overhead: int = DEFAULT_CONTEXT_BYTES,
    engine: Engine | None = None,
    progress: Progress | None = None,
    max_plans: int = 3,
    max_runs: int = 12,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    recipe_path: str = "plan.yaml",
) -> PlanResult:
    """Find the least costly optimizations that make a step fit a GPU memory budget.

    Args:
        spec: a MODEL spec (directory, config.json, bundled name, Hub id, ``module:factory``).
        workload: the step as given (mode, batch size per rank, sequence length, dtype...).
        budget_bytes: the GPU's memory (per rank), e.g. ``memprof.units.parse_size("24GiB")``.
        world_size: ranks sharing the job; above 1, FSDP sharding is searched and every
            figure is per rank (the batch size is per rank).
        max_overhead: the most FLOP overhead a plan may add, as a fraction (0.4 for 40%);
            None: no limit.
        maximize: ``"batch-size"`` or ``"seq-len"``: also find the largest value that fits
            with the chosen plan (each probe a sim run).
        context_overhead: the CUDA context's bytes (assumed: there is no GPU to measure it).
        engine: a sim engine (default :class:`SimEngine`, which also replays each trace
            with expandable segments).
        progress: called with a short line naming the combination being measured.
        max_plans: stop once this many plans that fit are known to be the cheapest (plans
            that only add steps to a cheaper one are not counted).
        max_runs: the most sim runs of the search (the maximize probes not counted). The
            search is best-first, so the limit cuts alternatives first; the result notes
            when combinations cheaper than the first plan were left unmeasured.
        task: override the task picked from the config.
        allow_pickle: permit loading ``.bin`` checkpoints.
        trust_remote_code: permit models that ship their own code.
        recipe_path: the path named in the recipe's confirming command.

    Returns:
        The search: budget accounting, every combination resolved, the plans that fit
        (cheapest first; the first with no steps when the step fits as it is), the frontier
        of those that do not, the chosen plan's recipe.

    Raises:
        InputError: a bad argument, model or workload.
        EnvironmentProblem: see :mod:`memprof.errors`.
        NoPlanFits: no searched combination fits; ``result`` holds the search.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    if world_size < 1:
        raise InputError(f"--world-size must be at least 1, got {world_size}")
    if max_overhead is not None and max_overhead < 0:
        raise InputError(f"--max-overhead must be 0% or more, got {max_overhead:.0%}")
    if maximize is not None and maximize not in MAXIMIZE:
        raise InputError(f"--maximize must be one of {', '.join(MAXIMIZE)}, got {maximize!r}")
    if context_overhead < 0:
        raise InputError("--context-overhead must be 0 or more")
    if max_plans < 1 or max_runs < 2:
        raise InputError("max_plans must be at least 1 and max_runs at least 2")
    if budget_bytes <= context_overhead:
        raise InputError(
            f"--budget {format_bytes(budget_bytes)} leaves nothing after the CUDA context "
            f"({format_bytes(context_overhead)}, --context-overhead)"
        )
    wl = replace(workload, world_size=world_size) if world_size != 1 else workload
    search, left_out = new_search(
        spec,
        wl,
        budget_bytes,
        context_overhead=context_overhead,
        engine=engine,
        max_overhead=max_overhead,
        max_plans=max_plans,
        max_runs=max_runs,
        task=task,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        say=say,
    )
    search.search()
    rm = search.rm
    wl = search.wl  # with the model's attention resolved
    result = _result(search, rm.name, wl, left_out)
    if result.chosen is not None:
        result.recipe = recipe_text(result, spec, recipe_path) if result.chosen.steps else None
        if maximize:
            result.maximize = _maximize(search, result.chosen, maximize, say)
    result.seconds = time.perf_counter() - t0
    if result.chosen is None:
        closest = result.frontier[0] if result.frontier else None
        msg = f"no plan fits {format_bytes(budget_bytes)}"
        if result.counts.get("not_reached"):
            msg = (
                f"no plan found that fits {format_bytes(budget_bytes)} in {max_runs} sim runs "
                f"({result.counts['not_reached']} combinations not measured: raise --max-runs)"
            )
        elif closest is not None and closest.need_bytes is not None:
            msg += f": the closest needs {format_bytes(closest.need_bytes)} (run {closest.run})"
        raise NoPlanFits(msg, result)
    return result


def _result(search: _Search, model: str, wl: Workload, left_out: list[str]) -> PlanResult:
    cands = search.cands
    zero = tuple(0 for _ in search.levers)
    plans = search._plans()
    resolved = [c for c in cands.values() if c.status != "unresolved"]
    resolved.sort(key=lambda c: (c.run is None, c.run or 0, c.cost))
    misfits = [c for c in cands.values() if c.source == "measured" and c.status == "does not fit"]
    frontier = pareto(misfits)
    n_alloc = len(search.levers[search.alloc].levels) if search.alloc is not None else 1
    counts = {
        "product_of_levels": math.prod(len(lv.levels) for lv in search.levers),
        "combinations": len(cands),
        "incompatible": len(search.invalid) * n_alloc,
        "runs": len(search.runs),
        "measured": sum(1 for c in cands.values() if c.source == "measured"),
    }
    for code in ("misfit", "plan", "state", "estimate", "overhead", "nothing fits"):
        counts[f"pruned_{code.replace(' ', '_')}"] = sum(1 for c in cands.values() if c.skip == code)
    counts["pruned"] = sum(counts[k] for k in list(counts) if k.startswith("pruned_"))
    counts["not_needed"] = sum(1 for c in cands.values() if c.skip == "not needed")
    counts["not_reached"] = sum(1 for c in cands.values() if c.skip == "run limit")
    counts["not_measurable"] = sum(1 for c in cands.values() if c.skip == "not measurable")
    not_searched = [f"{name}: {why}" for name, why in NOT_SEARCHED.items()] + left_out
    notes = list(search.notes)
    unreached = [c for c in cands.values() if c.skip == "run limit"]
    if unreached and plans:
        cheaper = [c for c in unreached if search.cost(c.levels) < plans[0].cost]
        if cheaper:
            notes.append(
                f"the run limit ({search.max_runs}) came first: {len(cheaper)} combinations estimated cheaper "
                "than plan #1 were not measured (raise --max-runs)"
            )
    if wl.world_size > 1:
        notes.append(
            f"per rank of {wl.world_size}: batch size {wl.batch_size} is per rank; NCCL's communication "
            "buffers are not included (measure them on the GPUs)"
        )
    result = PlanResult(
        model=model,
        workload=wl.to_dict(),
        engine=search.eng.name,
        budget=search.budget,
        max_overhead=search.max_overhead,
        levers=search.levers,
        not_searched=not_searched,
        baseline=cands[zero],
        candidates=resolved,
        runs=search.runs,
        counts=counts,
        plans=plans,
        frontier=frontier,
        notes=notes,
    )
    if not plans:
        closest = min(
            (c for c in cands.values() if c.source == "measured" and c.need_bytes is not None),
            key=lambda c: c.need_bytes or 0,
            default=None,
        )
        if closest is not None:
            result.dominant = dominant(closest, search.budget, wl, search.levers)
    return result


def pareto(cands: Iterable[Candidate]) -> list[Candidate]:
    """Those no other needs less memory at no more cost (lowest memory first)."""
    pts = sorted((c for c in cands if c.need_bytes is not None), key=lambda c: (c.cost, c.need_bytes))
    out: list[Candidate] = []
    best = math.inf
    for c in pts:
        if (c.need_bytes or 0) < best:
            out.append(c)
            best = c.need_bytes or 0
    out.sort(key=lambda c: c.need_bytes or 0)
    return out


_WHAT = {
    "parameters": "parameters",
    "optimizer_state": "optimizer state",
    "gradients": "gradients",
    "activations": "activations",
    "temporaries": "temporaries",
    "buffers": "buffers",
    "inputs": "inputs",
}


def dominant(closest: Candidate, budget: Budget, wl: Workload, levers: list[Lever]) -> list[str]:
    """What dominates the closest plan's memory at its peak, in sentences (largest first)."""
    cats = closest.categories or {}
    usable = budget.usable_bytes
    sharded = any(s["name"] == "fsdp" for s in closest.steps)
    where = f" at the peak (in {closest.peak_phase})" if closest.peak_phase else " at the peak"
    out = []
    for cat, n in sorted(cats.items(), key=lambda kv: -kv[1]):
        if n < 0.05 * usable:
            continue
        share = f"{format_bytes(n)}{where}, {n / usable:.0%} of the usable {format_bytes(usable)}"
        if cat == "parameters":
            if sharded:
                why = f"even fully sharded over {wl.world_size} ranks"
            else:
                why = "no searched optimization shrinks them further on one GPU" + (
                    "" if wl.world_size > 1 else "; shard them over more GPUs (--world-size N)"
                )
                why += (
                    ", or train fewer of them (LoRA) or quantize them (not searched: they change the model)"
                )
            out.append(f"parameters {share}: {why}")
        elif cat == "activations":
            out.append(
                f"activations {share}, at batch {wl.batch_size} x {wl.seq_len} tokens: a smaller batch or "
                "a shorter sequence"
            )
        elif (
            cat == "temporaries"
            and closest.peak_phase == "backward"
            and any(s["name"] == "optimizer_in_backward" for s in closest.steps)
        ):
            out.append(
                f"temporaries {share}: the optimizer's working copies as it steps each parameter in backward"
            )
        else:
            out.append(f"{_WHAT.get(cat, cat)} {share}")
    return out


# -- the recipe -------------------------------------------------------------------------------------


def compare_command(spec: str, wl: Workload, path: str) -> str:
    """The ``memprof compare`` command that measures a plan's recipe step by step."""
    args = ["memprof", "compare", spec, "--recipe", path, "--engine", "sim"]
    d = Workload()
    if wl.mode != d.mode:
        args += ["--mode", wl.mode]
    args += ["-b", str(wl.batch_size), "-s", str(wl.seq_len)]
    if wl.dtype != d.dtype:
        args += ["--dtype", wl.dtype]
    if wl.optimizer != d.optimizer:
        args += ["--optimizer", wl.optimizer]
    if wl.attn not in (d.attn, "sdpa"):  # sdpa: what auto resolved to
        args += ["--attn", wl.attn]
    if wl.task:
        args += ["--task", wl.task]
    if wl.teacher:
        args += ["--teacher", wl.teacher]
    if wl.decode_tokens:
        args += ["--decode-tokens", str(wl.decode_tokens)]
    if wl.world_size > 1:
        args += ["--world-size", str(wl.world_size)]
    return " ".join(args)


def recipe_text(result: PlanResult, spec: str, path: str) -> str:
    """The chosen plan as a recipe (YAML), validated by :func:`memprof.recipes.parse`.

    Raises:
        InputError: the plan has no steps (the step fits as it is: no recipe).
        RecipeError: the recipe does not validate (a bug: please report it).
    """
    c = result.chosen
    if c is None or not c.steps:
        raise InputError("the step fits as it is: there is no recipe to write")
    b = result.budget
    wl = Workload(**{k: v for k, v in result.workload.items() if k in Workload.__dataclass_fields__})
    entries = []
    for st in c.steps:
        opt = optimizations.make(st["name"], st["options"])
        defaults = dataclasses.asdict(opt.Config())
        entries.append({"name": st["name"], **{k: v for k, v in opt.options.items() if defaults.get(k) != v}})
    over = f"FLOPs {c.flop_overhead:+.0%}" if c.flop_overhead is not None else "FLOPs not counted"
    header = [
        f"memprof plan: {result.model}, {wl.mode} b{wl.batch_size} s{wl.seq_len} {wl.dtype} {wl.optimizer}"
        + (f", per rank of {wl.world_size}" if wl.world_size > 1 else "")
        + f", budget {format_bytes(b.budget_bytes)}",
        f"sim run {c.run}: peak {format_bytes(c.peak_bytes)} allocated, {format_bytes(c.reserved_bytes)} reserved "
        f"(+ CUDA context {format_bytes(b.context_bytes)} assumed + cuBLAS {format_bytes(b.cublas_workspace_bytes)} "
        f"= {format_bytes(c.need_bytes)}); {over}",
        f"confirm: {compare_command(spec, wl, path)}",
    ]
    body = yaml.safe_dump(
        {
            "description": f"Fit {result.model} in {format_bytes(b.budget_bytes)} (memprof plan)",
            "optimizations": entries,
        },
        sort_keys=False,
    )
    text = "".join(f"# {h}\n" for h in header) + body
    recipes.parse(text, path)
    return text


# -- maximize -----------------------------------------------------------------------------------------


def _maximize(search: _Search, chosen: Candidate, dimension: str, say: Progress) -> Maximized:
    """The largest batch size or sequence length that fits with ``chosen``: grow, then bisect."""
    wl = search.wl
    start = wl.batch_size if dimension == "batch-size" else wl.seq_len
    # grad accumulation splits the batch: keep its micro-batch count, probe multiples of it
    step = 1
    for st in chosen.steps:
        if st["name"] == "grad_accumulation":
            step = int(st["options"].get("steps", 2))
    if dimension == "seq-len":
        step = max(1, 2 ** (int(math.log2(start)) - 5)) if start >= 64 else 1
    cap = None
    if dimension == "seq-len":
        cap = search.rm.position_limit() if hasattr(search.rm, "position_limit") else None
    out = Maximized(dimension=dimension, start=start, best=start, first_misfit=None, limit="")
    budget = search.budget.budget_bytes
    max_probes = 14

    def probe(v: int) -> bool:
        w = replace(wl, batch_size=v) if dimension == "batch-size" else replace(wl, seq_len=v)
        setup = StepSetup.of(w)
        for st in chosen.steps:
            reason = _apply(optimizations.make(st["name"], st["options"]), search.model, setup)
            if reason:
                out.probes.append({"value": v, "need_bytes": None, "fits": False, "error": reason})
                return False
        say(f"maximize {dimension}: probing {v}")
        try:
            r = search.eng.run_detailed(
                search.rm,
                setup,
                progress=lambda m: say(f"maximize {dimension}: {v}: {m}"),
                allow_pickle=search.allow_pickle,
                track_modules=False,
            )
        except (InputError, EnvironmentProblem, OutOfMemory) as e:
            out.probes.append({"value": v, "need_bytes": None, "fits": False, "error": str(e)})
            return False
        reserved = r.profile.peak_reserved_bytes or r.profile.peak_bytes
        need = search.need(reserved)
        ok = need <= budget
        out.probes.append(
            {
                "value": v,
                "peak_bytes": r.profile.peak_bytes,
                "reserved_bytes": reserved,
                "need_bytes": need,
                "fits": ok,
            }
        )
        if ok:
            out.best_profile = r.profile
        return ok

    lo, hi = start, None
    while len(out.probes) < max_probes:
        v = lo * 2
        if cap is not None and v > cap:
            v = cap
        if v <= lo:
            out.limit = f"the model's position limit ({cap})"
            break
        if probe(v):
            lo = v
        else:
            hi = v
            break
    while hi is not None and hi - lo > step and len(out.probes) < max_probes:
        mid = lo + max(step, ((hi - lo) // 2) // step * step)
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    out.best, out.first_misfit = lo, hi
    if hi is not None:
        out.limit = f"{hi} does not fit" + (
            "" if hi - lo <= step else f" (stopped after {max_probes} probes)"
        )
    elif not out.limit:
        out.limit = f"stopped after {max_probes} probes"
    return out
