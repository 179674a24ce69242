"""A deep stack of identical blocks measured from three shallow copies of the model: a lower bound.

A decoder is an embedding, N identical blocks and a head. At any one moment of
its step (an op in block j's forward, the loss, the optimizer's update of one
tensor...) the live bytes are a sum of tensors whose number grows with N by the
same bytes per block: affine in N. :func:`shallow_run` traces the step at three
depths ``d``, ``d + p``, ``d + 2p`` (``p``: the period of what differs from block
to block: ``checkpointing``'s ``every``, a pattern of layer types), takes the
moment of the shallow traces' peak, and extrapolates its figures (the allocated
bytes, each category and each phase's peak, the parameter count, the FLOPs) to the
model's depth, when each moves by exactly the same bytes from the first depth to
the second as from the second to the third and the peak stays in one phase. The
first period may differ from the ones after it (with activations offloaded, the
first block's forward holds one hidden state more; a short stack's peak can be in
another phase than a deep one's): when those checks fail, the depths one period on
(``d + p``, ``d + 2p``, ``d + 3p``: one more run) are tried; otherwise it says why
and the caller traces the whole model.

The parameter count and the FLOPs extrapolate exactly. The peak does not always:
another moment, with more bytes per block, can overtake the shallow traces' peak
at full depth (a moment in backward whose gradients pile up faster than the
optimizer's state). So the extrapolated peak is a *lower bound* on the whole
trace's peak: ``tests/engines/test_depth.py`` checks it against whole traces of
every bundled decoder at its own depth, for every shipped recipe (equal in most
cases, never above). ``memprof plan`` relies only on that: a combination whose
extrapolated allocated peak alone, with the overheads, is over the budget does not
fit; any other is traced whole.

The caching allocator's reserved memory is not extrapolated (how blocks of
different sizes pack into segments at depth N is not in a shallow replay), nor
the module breakdown or the timeline. :func:`extend_run` does better where it can:
the shallow traces themselves extended to the model's depth
(:mod:`memprof.engines.depth_trace`, exact or refused) and replayed through the
allocator model, which gives the whole trace's figures, reserved memory included.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from memprof.engines.depth_trace import extend, peaks
from memprof.engines.pool import in_worker, run_beside
from memprof.profile import PhaseStat, Profile
from memprof.tracking import TraceEvent

if TYPE_CHECKING:
    from memprof.engines.base import Engine, Measure, RunResult
    from memprof.models import ResolvedModel
    from memprof.workload import StepSetup

#: decoder-only families whose blocks are identical but for a periodic ``layer_types``
#: pattern (sliding or full attention); mixtures of experts are not here (the routing
#: assumption is per layer), nor encoders, encoder-decoders, vision or audio models
STACKS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo2", "granite"}
#: the fewest periods traced at the first depth (the first blocks may differ)
FIRST_PERIODS = 1


@dataclass
class Depths:
    """The depths traced and the model's own."""

    full: int
    traced: tuple[int, int, int]
    period: int

    def describe(self) -> str:
        a, b, c = self.traced
        return f"traced at {a}, {b} and {c} of {self.full} blocks and extrapolated"

    def deeper(self) -> Depths | None:
        """The depths one period on (the second and third, and one more), or None: not shallower than the model."""
        a, b, c = self.traced
        if c + self.period >= self.full:
            return None
        return Depths(full=self.full, traced=(b, c, c + self.period), period=self.period)

    def describe_extended(self) -> str:
        a, b, c = self.traced
        return f"traced at {a}, {b} and {c} of {self.full} blocks, the whole step's allocations extended from them"


@dataclass
class Shallow:
    """What an extrapolated result came from (``RunResult.shallow``): for :func:`extend_run`."""

    depths: Depths
    profiles: list[Profile]
    #: the three traces, when the engine records them (None: no extension)
    traces: list[list[TraceEvent]] | None


def _period(types: list[Any]) -> int:
    """The shortest period of a list (its length when it has none)."""
    n = len(types)
    for q in range(1, n + 1):
        if all(types[i] == types[i % q] for i in range(n)):
            return q
    return n


def depths(rm: ResolvedModel, setup: StepSetup) -> Depths | str:
    """The three depths to trace, or why the model's depth cannot be extrapolated."""
    cfg = rm.config
    if cfg is None or rm.model_type not in STACKS:
        return f"{rm.model_type}: not a stack of identical decoder blocks memprof extrapolates"
    if setup.shard is not None:
        return "a sharded step (FSDP groups the blocks)"
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        return "no num_hidden_layers in the config"
    period = 1
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        if len(types) != n:
            return "layer_types does not list every layer"
        period = _period(list(types))
    for st in setup.steps:
        every = (st.get("options") or {}).get("every") if st.get("name") == "checkpointing" else None
        if isinstance(every, int) and every > 1:
            period = math.lcm(period, every)
    first = FIRST_PERIODS * period + (n - FIRST_PERIODS * period) % period
    traced = (first, first + period, first + 2 * period)
    if traced[2] >= n:
        return f"{n} blocks: too few to gain from tracing fewer"
    return Depths(full=n, traced=traced, period=period)


def _at_depth(rm: ResolvedModel, d: int) -> ResolvedModel:
    cfg = copy.deepcopy(rm.config)
    types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = d
    if isinstance(types, (list, tuple)) and types:
        cfg.layer_types = list(types)[:d]
    return replace(rm, config=cfg, notes=list(rm.notes))


def _figures(r: RunResult) -> dict[str, Any]:
    p = r.profile
    out: dict[str, Any] = {"peak": p.peak_bytes, "parameters": p.model.get("parameters"), "flops": r.flops}
    out.update({f"category {k}": v for k, v in p.categories_at_peak.items()})
    out.update({f"phase {ph.name}": ph.peak_bytes for ph in p.phases})
    return out


def shallow_run(
    engine: Engine,
    rm: ResolvedModel,
    setup: StepSetup,
    measure: Measure,
    *,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[RunResult | None, str]:
    """The step's allocated figures at the model's depth, from three shallow traces (see the module).

    ``meanwhile``: work of the caller's to do here while the shallower depths still run in
    a worker (:func:`~memprof.engines.pool.run_beside`).

    Returns:
        ``(result, how)``: the extrapolated result and :meth:`Depths.describe`, or
        ``(None, why)`` when the depth cannot be extrapolated (the caller traces
        the whole model). The result's profile has, at full depth, the parameter
        count and the FLOPs (exact) and the allocated peak with its categories and
        each phase's peak (lower bounds of the whole trace's); no reserved memory,
        module breakdown or timeline.

    Raises:
        What :meth:`Engine.run_detailed` raises for a shallow copy (out of memory,
        an input error, a step the engine cannot run): the whole model would raise it too.
    """
    found = depths(rm, setup)
    if isinstance(found, str):
        return None, found
    plan: Depths = found
    say = progress or (lambda msg: None)

    def traced_at(d: int) -> tuple[RunResult, list[TraceEvent] | None]:
        def status(msg: str) -> None:
            if not in_worker():  # a forked worker's status lines would garble the terminal
                say(f"{d} of {plan.full} blocks: {msg}")

        r = engine.run_detailed(
            _at_depth(rm, d),
            setup,
            allow_pickle=allow_pickle,
            track_modules=False,
            measure=measure,
            progress=status,
        )
        return r, engine.last_trace

    def shallower() -> list[tuple[RunResult, list[TraceEvent] | None]]:
        return [traced_at(d) for d in plan.traced[:2]]

    kept = engine.keep_trace
    engine.keep_trace = engine.record_trace
    try:
        if engine.simulated:
            # the two shallower depths in a forked worker, beside the deepest here (a sim run
            # keeps one core busy): this process's engine ends as after the deepest, as before
            side, (deepest,) = run_beside(
                shallower,
                [partial(traced_at, plan.traced[2])],
                where={"model": rm.name, "engine": engine.name},
                meanwhile=meanwhile,
            )
            if isinstance(side, BaseException):
                raise side
            done = [*side, deepest]
        else:
            done = [traced_at(d) for d in plan.traced]
        out, why = _extrapolated(plan, done)
        deeper = plan.deeper()
        if out is None and deeper is not None and any(r in why for r in RETRIED):
            # the first period may differ from the ones after it (the first block's forward
            # peak with activations offloaded, adapters' state overtaking a short stack's
            # activations): one period deeper, from the second depth on
            plan = deeper
            out, why = _extrapolated(plan, [*done[1:], traced_at(plan.traced[2])])
    finally:
        engine.keep_trace, engine.last_trace = kept, None
    return out, why


#: the refusals :func:`shallow_run` tries again one period deeper (the first period may differ)
RETRIED = ("the peak moves between phases", "is not affine in depth")


def _extrapolated(
    plan: Depths, done: list[tuple[RunResult, list[TraceEvent] | None]]
) -> tuple[RunResult | None, str]:
    """The model's figures from the runs at ``plan.traced`` (:func:`shallow_run`), or why not."""
    runs = [r for r, _ in done]
    traces = [t for _, t in done]
    figs = [_figures(r) for r in runs]
    phases = {str(r.profile.peak_phase) for r in runs}
    if len(phases) != 1:
        return None, f"the peak moves between phases ({', '.join(sorted(phases))}) as blocks are added"
    if not (figs[0].keys() == figs[1].keys() == figs[2].keys()):
        return None, "the shallow traces do not report the same figures"
    steps = (plan.full - plan.traced[0]) // plan.period
    full: dict[str, Any] = {}
    for k, a in figs[0].items():
        b, c = figs[1][k], figs[2][k]
        if a is None or b is None or c is None:
            if not (a is None and b is None and c is None):
                return None, f"{k}: not measured at every depth"
            full[k] = None
            continue
        if b - a != c - b:
            return None, f"{k} is not affine in depth ({a}, {b}, {c} bytes at {plan.traced})"
        full[k] = a + steps * (b - a)
    base = runs[0].profile
    profile = replace(
        base,
        model={**base.model, "parameters": full["parameters"]},
        peak_bytes=full["peak"],
        categories_at_peak={k: full[f"category {k}"] for k in base.categories_at_peak},
        phases=[PhaseStat(ph.name, full[f"phase {ph.name}"]) for ph in base.phases],
        peak_reserved_bytes=None,
        allocator=None,
        modules=[],
        timeline=None,
        parameters=None,
        host=None,
        notes=[*base.notes, f"depth: {plan.describe()} (allocated figures, the peak a lower bound)"],
    )
    out = replace(runs[0], profile=profile, flops=full["flops"])
    out.shallow = Shallow(
        depths=plan,
        profiles=[r.profile for r in runs],
        traces=[t for t in traces if t is not None] if all(t is not None for t in traces) else None,
    )
    return out, plan.describe()


def _affine(values: list[Any], steps: int) -> Any:
    """Plain data (dicts, lists, ints) at the model's depth from three shallow depths, or
    :data:`NOT_AFFINE` when a number does not move by the same amount each period."""
    a, b, c = values
    if isinstance(a, bool) or not isinstance(a, (int, dict, list)):
        return a if a == b == c else NOT_AFFINE
    if isinstance(a, int):
        if not (isinstance(b, int) and isinstance(c, int)) or b - a != c - b:
            return NOT_AFFINE
        return a + steps * (b - a)
    if isinstance(a, dict):
        if not (isinstance(b, dict) and isinstance(c, dict)) or not (a.keys() == b.keys() == c.keys()):
            return NOT_AFFINE
        out = {k: _affine([a[k], b[k], c[k]], steps) for k in a}
        return NOT_AFFINE if any(v is NOT_AFFINE for v in out.values()) else out
    if not (isinstance(b, list) and isinstance(c, list)) or not len(a) == len(b) == len(c):
        return NOT_AFFINE
    items = [_affine([x, y, z], steps) for x, y, z in zip(a, b, c)]
    return NOT_AFFINE if any(v is NOT_AFFINE for v in items) else items


NOT_AFFINE = object()

#: a number in a note: digits with thousands separators, maybe a decimal part
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def affine_notes(notes: list[list[str]], steps: int) -> list[str] | None:
    """The notes of three shallow depths at the model's depth, or None when one cannot be told.

    A note the same at the three depths is the model's. One that differs only in whole
    numbers (a count of layers, of adapter parameters, of kernel calls) has each number
    moved by the same amount from one depth to the next, ``steps`` periods on from the
    first; written with thousands separators, as memprof writes its counts, unless a depth
    shows it at 1,000 or more without them. Anything else (a decimal that moves: rounded
    bytes, a share) is None: the caller traces the whole model.
    """
    if not len(notes[0]) == len(notes[1]) == len(notes[2]):
        return None
    out = []
    for a, b, c in zip(*notes):
        if a == b == c:
            out.append(a)
            continue
        if not _NUMBER.split(a) == _NUMBER.split(b) == _NUMBER.split(c):
            return None
        numbers = []
        for x, y, z in zip(_NUMBER.findall(a), _NUMBER.findall(b), _NUMBER.findall(c)):
            if x == y == z:
                numbers.append(x)
                continue
            if "." in x + y + z or any(v.startswith("0") and v != "0" for v in (x, y, z)):
                return None
            i, j, k = (int(v.replace(",", "")) for v in (x, y, z))
            separated = "," in x + y + z
            if j - i != k - j or (
                separated and any(("," in v) != (int(v.replace(",", "")) >= 1000) for v in (x, y, z))
            ):
                return None
            v = i + steps * (j - i)
            if v < 0:
                return None
            # memprof writes its counts with separators: a count below 1,000 at every shallow
            # depth is written as one; one written without them at 1,000 or more stays so
            plain = not separated and max(i, j, k) >= 1000
            numbers.append(str(v) if plain else f"{v:,}")
        parts = _NUMBER.split(a)
        out.append("".join(p + q for p, q in zip(parts, [*numbers, ""])))
    return out


def extend_run(engine: Engine, setup: StepSetup, r: RunResult) -> tuple[RunResult, str] | str:
    """An extrapolated result made whole: its shallow traces extended to the model's depth, or why not.

    :func:`memprof.engines.depth_trace.extend` builds the whole step's trace from the
    three shallow ones (every event, what each free releases, the op counters; checked
    against the third depth). Its peak must be the extrapolated one (the shallow traces'
    peak moment is the whole step's, so the categories extrapolated are the peak's) and
    the shallow traces must give their own profiles' peaks. The trace is then replayed
    through the engine's allocator model (:meth:`Engine.replay_trace`): the result has the
    whole trace's figures (allocated peak, categories, each phase's peak, reserved
    memory, the allocator's figures, the host memory, the SDPA kernels) without a whole
    run; no module breakdown or timeline (the search traces without them).

    Returns:
        ``(result, how)``, or why the whole model must be traced instead.

    Raises:
        What :meth:`Engine.replay_trace` raises (the snapshot cannot be written).
    """
    sh = r.shallow
    if not isinstance(sh, Shallow) or sh.traces is None:
        return "the engine keeps no trace to extend"
    plan = sh.depths
    whole = extend(sh.traces, plan.traced, plan.full)
    if isinstance(whole, str):
        return whole
    # A phase without an event (the optimizer's, when it steps in backward) is one
    # moment: its extrapolated peak is exact; the others' peaks are read off the trace
    for t, p in zip(sh.traces, sh.profiles):
        pk, ph = peaks(t)
        if pk != p.peak_bytes or any(ph[x.name] != x.peak_bytes for x in p.phases if x.name in ph):
            return "a shallow trace's peaks are not its profile's (memory outside the trace)"
        if not ph.keys() <= {x.name for x in p.phases}:
            return "a shallow trace has a phase its profile has not"
    peak, phase_peaks = peaks(whole)
    if peak != r.profile.peak_bytes:
        return "the whole step's peak is at another moment than the shallow traces'"
    steps = (plan.full - plan.traced[0]) // plan.period
    host = _affine([p.host for p in sh.profiles], steps)
    params = _affine([p.parameters for p in sh.profiles], steps)
    kernels = _affine([p.overheads.get("sdpa_kernels") for p in sh.profiles], steps)
    if any(v is NOT_AFFINE for v in (host, params, kernels)):
        return "the host memory, parameters or kernels are not affine in depth"
    extra: dict[str, Any] = {}
    engine.replay_trace(whole, setup, extra)
    allocator = extra.get("allocator")
    if allocator is not None and host and host.get("paged_bytes"):
        allocator["outside_allocator_bytes"] = host["paged_bytes"]
    from memprof.allocator_model import ENV_VAR
    from memprof.engines.sim import KERNELS_NOTE, RESERVED_NOTE, kernel_note

    # the engine's notes on the shallowest replay and kernels, in their places, for the whole step's;
    # any other note is the same at every depth or counts what the depth adds (affine_notes)
    stale = (RESERVED_NOTE, KERNELS_NOTE, ENV_VAR + "=", "depth: ")
    kept = [[n for n in p.notes if not n.startswith(stale)] for p in sh.profiles]
    at_depth = affine_notes(kept, steps)
    if at_depth is None:
        return "a note of the profile depends on the depth"
    own = iter(at_depth)
    notes: list[str] = []
    for n in r.profile.notes:
        if n.startswith(RESERVED_NOTE):
            notes += engine.replay_notes()
        elif n.startswith(KERNELS_NOTE):
            notes.append(kernel_note(kernels))
        elif not n.startswith(stale):
            notes.append(next(own))
    notes.append(f"depth: {plan.describe_extended()} (every event checked against the third depth)")
    profile = replace(
        r.profile,
        peak_reserved_bytes=engine.peak_reserved(),
        allocator=allocator,
        phases=[PhaseStat(ph.name, phase_peaks.get(ph.name, ph.peak_bytes)) for ph in r.profile.phases],
        overheads={**r.profile.overheads, "sdpa_kernels": kernels}
        if kernels is not None
        else r.profile.overheads,
        host=host,
        parameters=params,
        notes=notes,
    )
    return replace(r, profile=profile, shallow=None), plan.describe_extended()


__all__ = ["STACKS", "Depths", "Shallow", "depths", "extend_run", "shallow_run"]
