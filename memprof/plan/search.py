"""Best-first search over the combinations of lever levels, cheapest first.

The two ends are measured first (the step as given: if it fits there is nothing to do;
the most aggressive combinations, traced shallow (:meth:`Search.measure` with
``whole=False``): if even their allocated peak does not fit, nothing does; a bound that
may fit is kept in ``SearchState.bounds`` and settles nothing). Best-first runs the next
candidate beside the current one (:meth:`Search._speculate`) without changing the search,
where runs are traced whole: a run traced shallow already splits its depths over two
processes, so those run one at a time.
A combination is then skipped without a run when

* it is component-wise less aggressive than one whose allocated peak was measured not
  to fit (monotonicity: more of a lever never allocates more; the reserved memory above
  the allocated peak is not monotone, so only the allocated peak is carried over);
* a cheaper measured plan is component-wise below it (it would fit, at a higher cost);
* its parameters, gradients and optimizer state alone (rescaled from the baseline's
  categories) exceed the budget; stepped in backward, one gradient and its step's
  temporaries instead of all gradients (:meth:`Search._in_backward_floor`);
* its estimate (:class:`~memprof.plan.estimator.Estimator`) exceeds the budget by more
  than :data:`ESTIMATE_MARGIN`.

A run that fails the way a step may fail (out of memory, a step the sim engine
knowingly cannot run, a level that does not apply, a missing package) is recorded,
and a lever level never seen working is dropped; any other exception is a bug and
propagates.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from memprof.budget import Budget
from memprof.engines.base import Engine, Measure, RunResult
from memprof.engines.depth import depths, extend_run, shallow_run
from memprof.errors import EnvironmentProblem, InputError, MemprofError, OutOfMemory
from memprof.models import DTYPES, ResolvedModel
from memprof.plan.combinations import Combinations, Key, enumerate_setups
from memprof.plan.estimator import Estimator, Measured
from memprof.plan.levers import NOT_SEARCHED, Lever, optimizer_trace_problem, step_transient
from memprof.plan.result import Candidate, PlanResult, Run, SingleFix, pareto
from memprof.plan.result import dominant as dominant_of
from memprof.units import CUDA_BLOCK_BYTES, format_bytes
from memprof.workload import StepSetup, Workload

#: a combination whose estimate exceeds the usable budget by more than this
#: fraction is skipped without a run (and reported as estimated)
ESTIMATE_MARGIN = 0.05

Progress = Callable[[str], None]


@dataclass
class SearchState:
    """What the search knows so far: every combination's candidate, the runs, what it gave up."""

    #: every valid combination (both allocator settings), resolved or not
    candidates: dict[Key, Candidate]
    runs: list[Run] = field(default_factory=list)
    #: the run of each run key measured
    by_key: dict[Key, Run] = field(default_factory=dict)
    #: run keys traced only at shallow depths whose allocated peak's lower bound fits: not
    #: settled (a whole trace decides, if the search gets to them), only a bound for the estimator
    bounds: dict[Key, Run] = field(default_factory=dict)
    #: lever levels dropped (the sim engine could not run them), and why: (lever, level) -> reason
    dropped: dict[tuple[int, int], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def settle(self, status: str, skip: str, reason: str, level: tuple[int, int] | None = None) -> None:
        """Resolve every unresolved candidate (with lever ``level[0]`` at ``level[1]``) without a run."""
        for key, c in self.candidates.items():
            if c.status == "unresolved" and (level is None or key[level[0]] == level[1]):
                c.status, c.skip, c.reason = status, skip, reason


class Search:
    """The search for one step and budget: measure with :meth:`measure`, search with :meth:`run`.

    Args:
        rm, eng, wl, model: the model, the sim engine, the step, the model on fake tensors.
        levers: what is searched (:func:`~memprof.plan.levers.build_levers`).
        budget: the budget accounting (its cuBLAS workspace is set by the first run).
        max_overhead: the most FLOP overhead a plan may add (None: no limit).
        max_plans: stop once this many cheapest plans are known.
        max_runs: the most sim runs.
        allow_pickle: permit loading ``.bin`` checkpoints.
        say: progress, one line per run.
        left_out: the levels left out and why, for the result.
    """

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
        left_out: list[str] | None = None,
    ) -> None:
        self.rm, self.eng, self.wl, self.model = rm, eng, wl, model
        #: results of runs made side by side ahead of :meth:`measure` (:meth:`prefetch`)
        self._prefetched: dict[
            Key, tuple[RunResult | BaseException, str | None, bool, int | None, float]
        ] = {}
        #: the shallow results of the runs in ``state.bounds``, with their traces (memprof.engines.depth)
        self._kept: dict[Key, tuple[RunResult, str]] = {}
        self.levers = levers
        self.budget = budget
        self.max_overhead = max_overhead
        self.max_plans = max_plans
        self.max_runs = max_runs
        self.allow_pickle = allow_pickle
        self.say = say
        self.left_out = list(left_out or [])
        self.combinations = combos = Combinations(levers)
        self.estimator = Estimator(combos, training=wl.training)
        self.estimator.in_backward_floor = self._in_backward_floor
        #: step_transient by optimizer and parameter dtype, measured once each
        self._transients: dict[tuple[str, torch.dtype], int] = {}
        #: every in-backward floor is measured (:meth:`_in_backward_floors` ran once)
        self._floors_measured = False
        self.setups, self.invalid = enumerate_setups(levers, model, wl)
        self.state = SearchState(
            candidates={
                key: Candidate(
                    levels=key,
                    steps=combos.steps_of(key),
                    label=combos.label(key),
                    side_cost=combos.side_cost(key),
                    side_notes=combos.side_notes(key),
                )
                for run_key in self.setups
                for key in combos.with_alloc(run_key)
            }
        )
        self._share_offloaded_optimizers()

    def _share_offloaded_optimizers(self) -> None:
        """Under optimizer offload, every optimizer level is measured by one run: the least one's.

        The offload keeps every parameter of at least ``minimal_size`` elements, its state
        and its step in host memory (:class:`~memprof.optimizations.optimizer_offload.OptimizerOffload`);
        when every trainable parameter is that large, nothing of the optimizer is left on the
        device, and the device memory is the same whatever the optimizer: the allocated
        peak, each phase's, the reserved memory (tests/plan/test_search.py; one 512-byte block
        at the peak may count as an activation in one step, a temporary in the other). Adafactor under
        offload then takes no run of its own (its host memory differs; the plan is of device
        memory). Not with adapters, FSDP (sharded parameters) or distillation (a teacher).
        """
        combos, wl = self.combinations, self.wl
        opt, off = combos.lever("optimizer"), combos.lever("optimizer offload")
        if opt is None or off is None or wl.mode != "train" or combos.trains_adapters():
            return
        if combos.lever("fsdp") is not None or wl.world_size > 1:
            return
        from memprof import optimizations

        smallest = min((p.numel() for p in self.model.parameters() if p.requires_grad), default=None)
        if smallest is None:
            return
        # the offload levels that leave no parameter's optimizer on the device
        whole = set()
        for level, lv in enumerate(self.levers[off].levels):
            minimal = [
                optimizations.make(s["name"], s["options"]).config.minimal_size
                for s in lv.steps
                if s["name"] == "optimizer_offload"
            ]
            if minimal and smallest >= min(minimal):
                whole.add(level)
        for key in sorted(self.setups):
            if key[off] not in whole or not key[opt]:
                continue
            for level in range(key[opt]):  # the least level that applies with the others
                by = (*key[:opt], level, *key[opt + 1 :])
                if by in self.setups:
                    combos.share(key, combos.run_key(by))
                    break
        if combos.sharing:
            self.state.notes.append(
                "optimizer offload: every parameter is offloaded, so the device memory is the same "
                "whatever the optimizer; each offloaded combination is measured once, with the least "
                "optimizer level (the others' host memory differs)"
            )

    @property
    def runs(self) -> list[Run]:
        return self.state.runs

    def candidate(self, key: Key) -> Candidate:
        return self.state.candidates[key]

    def maximal(self) -> list[Key]:
        """The valid run combinations no other valid one is more aggressive than."""
        dropped = self.state.dropped
        run_keys = dict.fromkeys(self.combinations.run_key(k) for k in self.setups)  # one run each
        keys = [k for k in run_keys if not any((i, lvl) in dropped for i, lvl in enumerate(k))]
        if not keys:
            return []
        # estimator.le(k, o) for every pair at once (hundreds of keys: a Python loop took seconds)
        levels = torch.tensor(keys)
        k, o = levels[:, None, :], levels[None, :, :]
        ok = o >= k
        fixed = sorted(self.estimator.non_monotone)
        if fixed:
            ok[:, :, fixed] = (o == k)[:, :, fixed]
        above = ok.all(-1) & (o != k).any(-1)  # above[a, b]: key b is more aggressive than key a
        return [key for key, dominated in zip(keys, above.any(1).tolist()) if not dominated]

    # measuring --------------------------------------------------------------------------------
    def _probe_optimizer(self, key: Key) -> bool:
        """An optimizer level never run is first stepped on one small fake matrix (milliseconds).

        An optimizer the sim engine cannot trace (one that reads its state's values) is
        dropped then, not after a whole step.
        """
        dropped = self.state.dropped
        i = self.combinations.lever("optimizer")
        if i is None or not key[i] or (i, key[i]) in dropped:
            return (i, key[i]) not in dropped if i is not None else True
        if any(r.profile is not None and r.key[i] == key[i] for r in self.runs):
            return True
        name = self.levers[i].levels[key[i]].steps[0]["options"]["type"]
        why = optimizer_trace_problem(name, DTYPES[self.wl.dtype])
        if why is None:
            return True
        what = f"optimizer {name}"
        dropped[(i, key[i])] = why
        self.state.notes.append(f"not searched: {what} cannot be traced by the sim engine ({why})")
        reason = f"{what} cannot be traced by the sim engine: {why}"
        self.state.settle("not measurable", "not measurable", reason, (i, key[i]))
        return False

    @functools.cached_property
    def _largest_trainable(self) -> torch.nn.Parameter | None:
        """The model's largest trainable parameter (None: none trains), found once per search."""
        return max((p for p in self.model.parameters() if p.requires_grad), key=torch.numel, default=None)

    def _in_backward_floor(self, key: Key) -> float:
        """What an optimizer stepped in backward holds at once, at the least (the estimator's floor).

        The largest trainable parameter's gradient and its optimizer step's temporaries
        (:func:`~memprof.plan.levers.step_transient`), in the combination's parameter
        dtype: they are live together when its gradient hook steps it, beside every
        parameter and state. 0 for adapters (small ones train) and for an optimizer whose
        implementation is chosen by hand (the measurement steps the sim's default).
        """
        setup = self.setups.get(self.combinations.run_key(key))
        if setup is None or self.combinations.trains_adapters():
            return 0.0
        if any(
            s.get("name") == "optimizer" and (s.get("options") or {}).get("impl", "auto") != "auto"
            for s in setup.steps
        ):
            return 0.0
        largest = self._largest_trainable
        if largest is None:
            return 0.0
        name, dtype = setup.workload.optimizer, DTYPES[setup.workload.dtype]
        if (name, dtype) not in self._transients:
            self._transients[(name, dtype)] = step_transient(name, tuple(largest.shape), dtype)
        grad = math.ceil(largest.numel() * dtype.itemsize / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
        return float(grad + self._transients[(name, dtype)])

    def _in_backward_floors(self) -> None:
        """Every in-backward floor the search may read (:meth:`_in_backward_floor`), measured now.

        Run while this process would wait for a worker (the first shallow run's two
        shallower depths): the first best-first step reads them all at once, and the
        first step of some optimizers (Adafactor's module imports PEFT) takes a second.
        Each is cached and does not depend on when it is measured; the later shallow runs
        find them all measured.
        """
        if self._floors_measured or not self.estimator.training:
            return
        self._floors_measured = True
        for key in self.setups:
            if self.combinations.in_backward(key):
                self._in_backward_floor(key)  # one step per optimizer and dtype, cached

    def measure(self, key: Key, purpose: str, *, whole: bool = True) -> Run | None:
        """Run ``key``'s step in the sim engine and resolve the candidates it measures.

        ``whole=False``: shallow traces (:meth:`_shallow`) are enough, whatever they show.
        A combination whose extrapolated allocated peak may fit is then not settled: the
        run is kept in ``state.bounds`` (the estimator learns from it) and the whole
        model is traced if the search measures it again.

        Returns:
            The run (``error`` set when the step failed the way a step may fail), or None
            when its optimizer was found not to trace under fake tensors (no run).

        Raises:
            InternalError: the step raised something unexpected (a bug), from the engine;
                any other exception from memprof's own code propagates as it is.
        """
        key = self.combinations.run_key(key)
        if not self._probe_optimizer(key):
            return None
        count = self.estimator.counts_flops(key)
        index = len(self.runs) + 1
        label = self.combinations.label(key)
        self.say(f"run {index}: {label} ({purpose})")
        run = Run(index=index, key=key, steps=self.combinations.steps_of(key), seconds=0.0, purpose=purpose)
        done = self._prefetched.pop(key, None)
        if done is None:
            t0 = time.perf_counter()
            try:
                done = self._execute(
                    key, count, lambda m: self.say(f"run {index}: {label}: {m}"), whole=whole
                )
            except MemprofError as e:
                done = (e, None, False, None, time.perf_counter() - t0)
        r, how, extended, exp_reserved, run.seconds = done
        if extended:
            run.extended = how  # the whole step's figures, from shallow traces extended
        else:
            run.depth = how
        if isinstance(r, OutOfMemory):
            run.error = f"out of memory: {r}"
        elif isinstance(r, (InputError, EnvironmentProblem)):
            # a step the sim engine knowingly cannot run (NotSupported), a level that does not
            # apply on top of the others, a package a level needs. Anything else is a bug: it
            # propagates (the command line reports an internal error, exit 70)
            run.error = str(r)
        elif isinstance(r, BaseException):
            raise r
        else:
            run.profile = r.profile
            run.reserved = r.profile.peak_reserved_bytes
            run.reserved_expandable = exp_reserved
            if count:
                run.flops = r.flops
            else:
                run.flops, run.flops_from = self.estimator.counted_flops(key) or (None, None)
            ws = r.profile.overheads.get("cublas_workspace_bytes")
            if isinstance(ws, int) and not self.runs:
                self.budget.cublas_workspace_bytes = ws
                # a model with convolutions needs a cuDNN workspace in every combination
                cudnn = (r.profile.overheads.get("non_tensor") or {}).get("cudnn_workspace_bytes")
                self.budget.cudnn_workspace_bytes = int(cudnn or 0)
        self.runs.append(run)
        bound = (
            run.depth is not None
            and run.profile is not None
            and not self.allocated_over(run.profile.peak_bytes)
        )
        if bound:
            self.state.bounds[key] = run
            assert isinstance(r, RunResult)  # a bound has a profile
            self._kept[key] = (r, str(run.depth))  # its shallow traces: extended if measured whole
        else:
            self._kept.pop(key, None)
            self.state.bounds.pop(key, None)
            self.state.by_key[key] = run
        if run.profile is not None:
            measured = Measured.of(key, index, run.profile, run.flops if count else None)
            self.state.notes += self.estimator.add(measured)
        if not bound:
            self._resolve_run(run)
        return run

    def _execute(
        self, key: Key, count: bool, say: Callable[[str], None], *, whole: bool = True
    ) -> tuple[RunResult, str | None, bool, int | None, float]:
        """Run ``key``'s step: the result, how its depth was traced (None: whole), whether its
        shallow traces were extended (the whole step's figures), the reserved memory with
        expandable segments, and the seconds it took.

        Shallow traces first (:meth:`_shallow`, unless they were made before): their result
        when they settle the combination (its allocated peak alone is over the budget) or
        when ``whole`` is False; otherwise their traces extended to the model's depth
        (:func:`~memprof.engines.depth.extend_run`: the whole trace's figures, reserved
        memory included), or, where the trace is not shown periodic, the whole model traced.

        Reads the search's state only to know which shallow traces were made, so
        :meth:`prefetch` can run several side by side.

        Raises:
            What :meth:`Engine.run_detailed` raises.
        """
        t0 = time.perf_counter()
        setup = self.setups[key]
        shallow = self._kept.get(key) if key in self.state.bounds else self._shallow(setup, count, say)
        if shallow is not None:
            r, how = shallow
            if not whole or self.allocated_over(r.profile.peak_bytes):
                return r, how, False, None, time.perf_counter() - t0
            # the whole step's trace from the shallow ones, when it is periodic in depth
            ext = extend_run(self.eng, setup, r)
            if not isinstance(ext, str):
                exp = getattr(self.eng, "expandable_estimate", None)
                reserved_exp = exp.peak_reserved_bytes if exp is not None else None
                return ext[0], ext[1], True, reserved_exp, time.perf_counter() - t0
            say(f"traced whole: {ext}")
        r = self.eng.run_detailed(
            self.rm,
            setup,
            progress=say,
            allow_pickle=self.allow_pickle,
            track_modules=False,
            measure=Measure(flops=count, timeline=False),
        )
        # the sim engine replays every trace with expandable segments too (its hint)
        exp = getattr(self.eng, "expandable_estimate", None)
        return r, None, False, exp.peak_reserved_bytes if exp is not None else None, time.perf_counter() - t0

    def prefetch(self, keys: list[Key], *, whole: bool = True) -> None:
        """Run these combinations side by side (memprof.engines.pool); :meth:`measure` takes their results.

        Only combinations the search measures next (the most aggressive ones, with
        ``whole`` as :meth:`measure` will be called), or may measure (:meth:`_speculate`):
        the search stays the one a run at a time makes.
        """
        keys = [
            k for k in dict.fromkeys(self.combinations.run_key(k) for k in keys) if k not in self.state.by_key
        ]
        from memprof.engines.pool import available_workers, run_beside, run_calls

        if len(keys) < 2 or available_workers() < 2 or not self.eng.simulated:
            return  # measure() runs them one at a time
        if all(self._traced_beside(k) for k in keys):
            # each run's shallow depths run beside each other already (shallow_run): one at a
            # time keeps both cores as busy, splits each run evenly, and runs nothing in vain
            return
        keys = [k for k in keys if self._probe_optimizer(k)]
        if len(keys) < 2:
            return

        counts = {k: self.estimator.counts_flops(k) for k in keys}
        self.say(f"{len(keys)} runs side by side")
        t0 = time.perf_counter()
        calls = [partial(self._execute, k, counts[k], lambda m: None, whole=whole) for k in keys]
        where: dict[str, str | None] = {"model": self.rm.name, "engine": self.eng.name}
        if len(calls) == 2:
            # one here, one in a worker: this process's fake-tensor cache keeps warming
            side, here = run_beside(calls[1], [partial(_caught, calls[0])], where=where)
            out = [*here, side]
        else:
            out = run_calls(calls, parallel=True, where=where)
        for k, r in zip(keys, out):
            # an error comes back as the class raised: measure() settles it as a run of its own would
            self._prefetched[k] = (
                (r, None, False, None, time.perf_counter() - t0) if isinstance(r, BaseException) else r
            )

    def _traced_beside(self, key: Key) -> bool:
        """``key``'s run is traced shallow, its depths in two processes (:func:`shallow_run`)."""
        return key not in self.state.bounds and not isinstance(depths(self.rm, self.setups[key]), str)

    def _shallow(
        self, setup: StepSetup, count: bool, say: Callable[[str], None]
    ) -> tuple[RunResult, str] | None:
        """The step traced at three shallow depths (:mod:`memprof.engines.depth`), or None.

        Its allocated peak is a lower bound of the whole trace's, and the reserved memory
        is not extrapolated. So it settles a combination whose extrapolated allocated peak
        alone, with the overheads, is over the budget (the whole peak and the reserved
        memory are no less). None when the depth cannot be extrapolated or a shallow step
        fails: the whole model is traced (and says why in its own words).
        """
        try:
            r, how = shallow_run(
                self.eng,
                self.rm,
                setup,
                Measure(flops=count, timeline=False),
                allow_pickle=self.allow_pickle,
                progress=say,
                meanwhile=self._in_backward_floors,
            )
        except (OutOfMemory, InputError, EnvironmentProblem):
            return None  # the whole model's run says so, in its own words
        return None if r is None else (r, how)

    def need(self, reserved: float) -> int:
        return self.budget.need(reserved)

    def allocated_over(self, peak_bytes: int) -> bool:
        """An allocated peak alone, with the overheads, is over the budget: so is the reserved memory."""
        return self.need(peak_bytes) > self.budget.budget_bytes

    def cost(self, key: Key) -> float:
        ov, _ = self.estimator.overhead(key)
        return (ov or 0.0) + self.state.candidates[key].side_cost

    def _resolve_run(self, run: Run) -> None:
        alloc = self.combinations.alloc
        for key in self.combinations.measured_by(run.key):
            a = key[alloc] if alloc is not None else 0
            c = self.state.candidates[key]
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
            if run.depth:  # the allocated peak alone: reserved memory is no less
                c.reserved_bytes = None
                c.reason = f"allocated peak alone over the budget ({run.depth})"
            c.categories, c.peak_phase = dict(p.categories_at_peak), p.peak_phase
            ov, src = self.estimator.overhead(c.levels)
            c.flops = int(self.estimator.flops_of(c.levels)[0] or 0) or None
            c.flop_overhead, c.flops_source = ov, src
            if c.need_bytes <= self.budget.budget_bytes:
                if self.max_overhead is not None and ov is not None and ov > self.max_overhead + 1e-9:
                    c.status = "over max overhead"
                    c.reason = f"FLOPs {ov:+.0%}, above --max-overhead {self.max_overhead:.0%}"
                else:
                    c.status = "fits"
            else:
                c.status = "does not fit"
        if run.profile is None:
            self._drop(run)

    def _drop(self, run: Run) -> None:
        """A run that failed: a lever level never seen working is dropped from the search."""
        ok = {(i, lvl) for r in self.runs if r.profile is not None for i, lvl in enumerate(r.key) if lvl}
        suspects = [(i, lvl) for i, lvl in enumerate(run.key) if lvl and (i, lvl) not in ok]
        if len(suspects) != 1:
            return
        i, lvl = suspects[0]
        what = f"{self.levers[i].name} {self.levers[i].levels[lvl].label}"
        self.state.dropped[(i, lvl)] = run.error or "failed"
        self.state.notes.append(f"not searched further: {what} failed in the sim engine ({run.error})")
        reason = f"{what} failed in the sim engine (run {run.index})"
        self.state.settle("not measurable", "not measurable", reason, (i, lvl))

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        """The whole search: the two ends, then best-first (runs already made are reused).

        Raises:
            InputError: the step as given could not run in the sim engine.
        """
        zero = self.combinations.zero
        by_key = self.state.by_key
        if zero not in by_key:  # a diagnosis measures it first
            self.measure(zero, "baseline")
        base = self.state.candidates[zero]
        if base.status == "failed":
            raise InputError(f"the baseline step could not run in the sim engine: {base.reason}")
        if base.status == "fits":
            self.state.settle("not needed", "not needed", "the step fits as it is")
            return
        # The most aggressive ends are traced shallow: enough to rule everything out when even
        # their allocated peak does not fit; one that may fit is traced whole only if the
        # search gets to it (the cheaper plans usually come first).
        bounds = self.state.bounds
        for _ in range(3):  # again when a probe dropped an optimizer the sim cannot trace
            todo = [k for k in self.maximal() if k not in by_key and k not in bounds]
            self.prefetch(todo[: self.max_runs - len(self.runs)], whole=False)
            for key in self.maximal():
                if len(self.runs) >= self.max_runs:
                    break
                if key not in by_key and key not in bounds:
                    self.measure(key, "most aggressive", whole=False)
            if all(k in by_key or k in bounds for k in self.maximal()):
                break
        measured_max = [by_key[k] for k in self.maximal() if k in by_key]
        if (
            measured_max
            and all(r.profile is not None and self._misfit_everywhere(r.key) for r in measured_max)
            and len(measured_max) == len(self.maximal())
        ):
            # monotonicity: nothing less aggressive fits either
            self.state.settle(
                "pruned",
                "nothing fits",
                "less aggressive than the most aggressive combination, whose allocated peak alone "
                "does not fit",
            )
            return
        self.best_first()

    def levers_alone(self) -> list[SingleFix]:
        """The step as given, then each lever's strongest level alone on it, measured.

        A lever whose strongest level does not apply to the step is taken at its strongest
        level that does; no more than ``max_runs`` runs are made (a lever not measured then,
        or whose run failed, is left out). The runs are reused by :meth:`run` and
        :meth:`best_first`.
        """
        zero = self.combinations.zero
        cands, by_key = self.state.candidates, self.state.by_key
        if zero not in by_key:
            self.measure(zero, "baseline")
        out = []
        for i, lever in enumerate(self.levers):
            for level in range(len(lever.levels) - 1, 0, -1):
                k = list(zero)
                k[i] = level
                key = tuple(k)
                if key not in cands:  # not applicable to this step
                    continue
                if self.combinations.run_key(key) not in by_key and len(self.runs) < self.max_runs:
                    self.measure(key, f"effect of {lever.name}")
                c = cands[key]
                if c.source == "measured" and c.need_bytes is not None:
                    out.append(SingleFix(lever.name, c))
                break
        return out

    def _misfit_everywhere(self, key: Key) -> bool:
        keys = self.combinations.measured_by(key)
        cands = self.state.candidates
        return all(cands[k].status == "does not fit" and self.hard_misfit(cands[k]) for k in keys)

    def plans(self) -> list[Candidate]:
        """The measured plans that fit and have no cheaper fitting plan below them, cheapest first.

        A plan that is component-wise above another one that fits only adds steps (and cost).
        """
        le = self.estimator.le
        fits = [c for c in self._measured() if c.status == "fits"]
        out = [c for c in fits if not any(o is not c and le(o.levels, c.levels) for o in fits)]
        out.sort(key=lambda c: (c.cost, -(c.headroom(self.budget.budget_bytes) or 0)))
        return out

    def best_first(self) -> None:
        """Measure the cheapest unresolved combination that cannot be skipped, until the plans are known."""
        usable = self.budget.usable_bytes
        cands = self.state.candidates
        while True:
            pending = [k for k, c in cands.items() if c.status == "unresolved"]
            if not pending:
                return
            costs = {k: self.cost(k) for k in pending}
            pending.sort(key=lambda k: (costs[k], sum(1 for x in k if x), k))
            plans = self.plans()
            ran = False
            for at, key in enumerate(pending):
                c = cands[key]
                if len(plans) >= self.max_plans and costs[key] > plans[self.max_plans - 1].cost:
                    reason = f"costlier than the {self.max_plans} plans found"
                    self.state.settle("not needed", "not needed", reason)
                    return
                if self.combinations.run_key(key) in self.state.by_key:
                    continue  # measured (both allocator settings come from one run)
                if self._prune(key):
                    continue
                if len(self.runs) >= self.max_runs:
                    reason = f"the run limit ({self.max_runs}) was reached first"
                    self.state.settle("not reached", "run limit", reason)
                    return
                peak, reserved = self.estimator.estimate(key)
                if reserved > usable * (1 + ESTIMATE_MARGIN):
                    c.status, c.source, c.skip = "estimated not to fit", "estimated", "estimate"
                    c.peak_bytes, c.reserved_bytes, c.need_bytes = (
                        int(peak),
                        int(reserved),
                        self.need(reserved),
                    )
                    c.flop_overhead, c.flops_source = self.estimator.overhead(key)
                    c.reason = (
                        f"estimated {format_bytes(reserved)} reserved, more than {ESTIMATE_MARGIN:.0%} over the "
                        f"usable {format_bytes(usable)}"
                    )
                    continue
                chosen = self._what_to_run(key)
                self._speculate(chosen, pending[at + 1 :], costs, plans)
                self.measure(chosen, f"candidate (estimated {format_bytes(reserved)} reserved)")
                ran = True
                break
            if not ran:
                return

    def _speculate(
        self, first: Key, rest: list[Key], costs: dict[Key, float], plans: list[Candidate]
    ) -> None:
        """Run ``first`` side by side with the run :meth:`best_first` would make after it.

        The second is the one chosen if ``first``'s result changes nothing the choice
        reads; when it does change it, the second result waits in :meth:`prefetch`'s
        store (the search measures it later, or never: a core's time lost, not a
        different search). The runs, their order and every figure are those of the
        search one run at a time.
        """
        if first in self._prefetched or len(self.runs) + 2 > self.max_runs or not self.eng.simulated:
            return
        by_key, cands = self.state.by_key, self.state.candidates
        usable = self.budget.usable_bytes
        for key in rest:
            if len(plans) >= self.max_plans and costs[key] > plans[self.max_plans - 1].cost:
                return  # the search stops before it
            rk = self.combinations.run_key(key)
            if cands[key].status != "unresolved" or rk in by_key or rk == first:
                continue
            if self._prune(key, apply=False):
                continue
            if self.estimator.estimate(key)[1] > usable * (1 + ESTIMATE_MARGIN):
                continue
            second = self._what_to_run(key)
            if second != first and second not in by_key and self._optimizer_known(second):
                self.prefetch([first, second])
            return

    def _optimizer_known(self, key: Key) -> bool:
        """``key``'s optimizer level was run before: :meth:`measure` will not probe it (no side effect)."""
        i = self.combinations.lever("optimizer")
        if i is None or not key[i]:
            return True
        return any(r.profile is not None and r.key[i] == key[i] for r in self.runs)

    def _what_to_run(self, key: Key) -> Key:
        """The candidate itself, or the same with an interpolated lever at its strongest level.

        One run of the strongest level teaches the estimator the lever's whole range.
        """
        rk = list(self.combinations.run_key(key))
        learned = self.estimator.learned
        for i, lvl in enumerate(rk):
            lv = self.levers[i]
            top = len(lv.levels) - 1
            if not lvl or not lv.interpolate or lvl == top:
                continue
            if learned(i, top, "acts") is None and learned(i, lvl, "acts") is None:
                trial = list(rk)
                trial[i] = top
                t = tuple(trial)
                if (
                    t in self.setups
                    and t not in self.state.by_key
                    and not self._below_misfit(t)
                    and not self._above_plan(t)
                ):
                    rk = trial
        return tuple(rk)

    def hard_misfit(self, c: Candidate) -> bool:
        """Measured with its *allocated* peak alone (plus the overheads) over the budget.

        Only that carries over to less aggressive combinations (their allocated peak is no
        lower); the reserved memory above it moves with the allocations' sizes and order.
        """
        return c.source == "measured" and c.peak_bytes is not None and self.allocated_over(c.peak_bytes)

    def _measured(self) -> list[Candidate]:
        """The combinations measured so far (two per run with the allocator lever)."""
        cands = self.state.candidates
        return [cands[k] for r in self.runs for k in self.combinations.measured_by(r.key)]

    def _below_misfit(self, key: Key) -> Candidate | None:
        for c in self._measured():
            if c.status == "does not fit" and self.hard_misfit(c) and self.estimator.le(key, c.levels):
                return c
        return None

    def _above_plan(self, key: Key) -> Candidate | None:
        """A measured plan that fits below ``key``: ``key`` would only add steps to it."""
        for p in self._measured():
            if p.status in ("fits", "over max overhead") and self.estimator.le(p.levels, key):
                return p
        return None

    def _prune(self, key: Key, *, apply: bool = True) -> bool:
        """Whether ``key`` is skipped without a run (see the module); ``apply``: settle it so."""
        c = self.state.candidates[key]
        usable = self.budget.usable_bytes
        m = self._below_misfit(key)
        if m is not None:
            if not apply:
                return True
            c.status, c.skip = "pruned", "misfit"
            c.reason = (
                f"less aggressive than run {m.run} ({m.label}), whose allocated peak alone does not fit"
            )
            return True
        p = self._above_plan(key)
        if p is not None:
            if not apply:
                return True
            c.status, c.skip = "pruned", "plan"
            c.reason = f"more aggressive than run {p.run} ({p.label}), which fits"
            return True
        floor = self.estimator.floor(key)
        if floor is not None and floor > usable:
            if not apply:
                return True
            c.status, c.source, c.skip = "pruned", "estimated", "state"
            c.peak_bytes = int(floor)
            c.reason = (
                f"parameters, optimizer state and gradients alone take {format_bytes(floor)} "
                f"(rescaled from the baseline), more than the usable {format_bytes(usable)}"
            )
            return True
        if self.max_overhead is not None:
            ov, src = self.estimator.overhead(key)
            if ov is not None and ov > self.max_overhead + (0 if src.startswith("counted") else 0.02):
                if not apply:
                    return True
                c.status, c.flop_overhead, c.flops_source = "over max overhead", ov, src
                c.skip = "overhead"
                c.reason = f"FLOPs {ov:+.0%} ({src}), above --max-overhead {self.max_overhead:.0%}"
                return True
        return False

    # the result ----------------------------------------------------------------------------------
    def result(self) -> PlanResult:
        """What the search found so far, as a :class:`PlanResult` (no recipe, no maximize)."""
        cands = self.state.candidates
        wl = self.wl
        plans = self.plans()
        resolved = [c for c in cands.values() if c.status != "unresolved"]
        resolved.sort(key=lambda c: (c.run is None, c.run or 0, c.cost))
        misfits = [c for c in cands.values() if c.source == "measured" and c.status == "does not fit"]
        alloc = self.combinations.alloc
        n_alloc = len(self.levers[alloc].levels) if alloc is not None else 1
        counts = {
            "product_of_levels": math.prod(len(lv.levels) for lv in self.levers),
            "combinations": len(cands),
            "incompatible": len(self.invalid) * n_alloc,
            "runs": len(self.runs),
            "measured": sum(1 for c in cands.values() if c.source == "measured"),
        }
        for code in ("misfit", "plan", "state", "estimate", "overhead", "nothing fits"):
            counts[f"pruned_{code.replace(' ', '_')}"] = sum(1 for c in cands.values() if c.skip == code)
        counts["pruned"] = sum(counts[k] for k in list(counts) if k.startswith("pruned_"))
        counts["not_needed"] = sum(1 for c in cands.values() if c.skip == "not needed")
        counts["not_reached"] = sum(1 for c in cands.values() if c.skip == "run limit")
        counts["not_measurable"] = sum(1 for c in cands.values() if c.skip == "not measurable")
        not_searched = [f"{name}: {why}" for name, why in NOT_SEARCHED.items()] + self.left_out
        notes = list(self.state.notes)
        unreached = [c for c in cands.values() if c.skip == "run limit"]
        if unreached and plans:
            cheaper = [c for c in unreached if self.cost(c.levels) < plans[0].cost]
            if cheaper:
                notes.append(
                    f"the run limit ({self.max_runs}) came first: {len(cheaper)} combinations estimated "
                    "cheaper than plan #1 were not measured (raise --max-runs)"
                )
        if wl.world_size > 1:
            notes.append(
                f"per rank of {wl.world_size}: batch size {wl.batch_size} is per rank; NCCL's communication "
                "buffers are counted at NCCL's defaults (the budget's row; measure them on the GPUs)"
            )
        result = PlanResult(
            model=self.rm.name,
            workload=wl.to_dict(),
            engine=self.eng.name,
            budget=self.budget,
            max_overhead=self.max_overhead,
            levers=self.levers,
            not_searched=not_searched,
            baseline=cands[self.combinations.zero],
            candidates=resolved,
            runs=self.runs,
            counts=counts,
            plans=plans,
            frontier=pareto(misfits),
            notes=notes,
        )
        if not plans:
            closest = min(
                (c for c in cands.values() if c.source == "measured" and c.need_bytes is not None),
                key=lambda c: c.need_bytes or 0,
                default=None,
            )
            if closest is not None:
                result.dominant = dominant_of(closest, self.budget, wl, self.levers)
        return result


def _caught(call: Callable[[], Any]) -> Any:
    """``call()``, or the :class:`MemprofError` it raised (as a worker returns it)."""
    try:
        return call()
    except MemprofError as e:
        return e
