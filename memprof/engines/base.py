"""The common driver: build, warm up, measure one step, return a Profile.

Each engine supplies the device, the tensor mode around the work (real or
fake), the allocator rounding, and what it reads before and after the measured
step (allocator counters, NVML). The driver is the same for all of them, so the
three engines produce the same profile format by construction.
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from memprof import gcpause
from memprof._version import __version__
from memprof.distill_loss import SIDES, resolve_teacher
from memprof.engines.moe import router_counts
from memprof.engines.runner import RunEnv, StepRunner
from memprof.errors import InputError, InternalError, MemprofError, NotSupported, OutOfMemory
from memprof.models import DTYPES, ResolvedModel, build_model, parameter_count, parameter_split
from memprof.optimizations.registry import check_setup, config_overrides
from memprof.profile import Profile, from_tracker
from memprof.sharding import Launch, init_launched_group, largest_layer_params, zero3_estimate
from memprof.tracking import CATEGORIES, TraceEvent, Tracker, TrackerResult
from memprof.workload import StepSetup, Workload

Progress = Callable[[str], None]

#: After each run's final garbage collection, freeze what survives (``gc.freeze``):
#: libraries' objects, caches, the caller's own. Later collections (one before every
#: measured step) then skip them: with torch and transformers loaded that is ~400k
#: objects and ~0.4 s a collection, half of a small model's sim run. Off by default:
#: frozen objects are never collected, a choice for the process's owner to make
#: (the ``memprof`` console script and the test suite turn it on).
freeze_survivors = False


@dataclass
class Measure:
    """What to measure beside memory (``memprof compare`` asks for all of it)."""

    #: count the step's FLOPs (torch.utils.flop_counter; works under fake tensors)
    flops: bool = False
    #: time this many untracked steps (real engines), report the median
    timing_steps: int = 0
    #: probe loss and output before and the loss after the steps (real engines)
    quality: bool = False
    #: torch.manual_seed before the build and before the warm-up step
    seed: int = 0
    #: a tokenized batch of real texts (memprof.data.encode): with ``quality``, the
    #: main output pooled per text is kept, to compare rows by cosine similarity
    texts: dict[str, Any] | None = None
    #: bytes the step's tensors may use: the moment the live total first rises above
    #: it is kept (``Profile.budget["crossing"]``), for an out-of-memory diagnosis
    budget: int | None = None
    #: keep the memory timeline (``Profile.timeline``)
    timeline: bool = True
    #: run a whole warm-up step even where creating its leftovers suffices (the
    #: tests compare both ways; see :meth:`Engine.full_warm_up_reason`); a string
    #: is the reason the profile's note gives
    full_warm_up: bool | str = False


@dataclass
class RunResult:
    """A profile and what else was measured on the way."""

    profile: Profile
    flops: int | None = None
    seconds: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    output: torch.Tensor | None = None
    #: one pooled output vector per probe text (Measure.texts)
    embeddings: torch.Tensor | None = None
    #: an extrapolated result's shallow traces (memprof.engines.depth.Shallow), for extend_run
    shallow: Any = None


def _noop(msg: str) -> None:
    pass


def versions() -> dict[str, str]:
    import transformers

    return {
        "memprof": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def extra_flop_formulas() -> dict[Any, Any]:
    """FLOP formulas torch's counter lacks: torch.ao's dynamic int8 Linear (quantized::linear_dynamic)."""

    def linear_dynamic(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        k = x_shape[-1]
        return 2 * math.prod(out_shape) * k

    out: dict[Any, Any] = {}
    quantized = getattr(torch.ops, "quantized", None)
    op = getattr(quantized, "linear_dynamic", None) if quantized is not None else None
    if op is not None:
        out[op] = linear_dynamic
    return out


def flop_counter() -> Any:
    """A ``FlopCounterMode`` (not entered) for the tracker to count with; None where this torch lacks
    the dispatch mode it decomposes under (the FLOPs are then counted on a whole warm-up step)."""
    from torch.utils import flop_counter as fc

    if not hasattr(fc, "_FlopCounterMode"):  # pragma: no cover - torch >= 2.13 has it
        return None
    return fc.FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


def is_oom(e: BaseException) -> bool:
    """True for an out-of-memory error from CUDA or the CPU allocator."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e)
        return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    return False


def op_name(op: Any) -> str:
    """An op as people write it: ``aten.mm`` for the overload ``aten.mm.default``."""
    packet = getattr(op, "overloadpacket", None)
    return str(packet if packet is not None else op)


_DISPATCH_CODE = Tracker.__torch_dispatch__.__code__


def failure_site(
    e: BaseException, model: torch.nn.Module | None, tracker: Tracker | None
) -> tuple[str | None, bool, str | None]:
    """Where an exception escaped a step: the op, whether that op raised it, the module.

    Read once, after the failure: the op a fake-tensor exception names, else the
    tracker's last op (``tracker``: the failure happened in its region), else the
    innermost op being dispatched in the traceback; the tracker's failing module,
    else the innermost module ``forward`` in the traceback, named as in ``model``.

    Returns:
        ``(op, op_raised, module)``: ``op`` as ``aten.name`` (None: unknown);
        ``op_raised`` False when the exception came from Python code after the op
        returned; ``module`` the qualified name (``<model>`` for the root).
    """
    frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]  # outermost first
    overload = torch._ops.OpOverload
    op: Any = getattr(e, "func", None)
    raised = True
    if not isinstance(op, overload):
        op = None
        if tracker is not None and tracker.last_op is not None:
            op = tracker.last_op
            # the op raised when the tracker's dispatch of it is on the traceback
            raised = any(f.f_code is _DISPATCH_CODE for f in frames)
        else:  # fake tensors' dispatch holds the op in a local
            for f in reversed(frames):
                if isinstance(f.f_locals.get("func"), overload):
                    op = f.f_locals["func"]
                    break
    module = tracker.error_module if tracker is not None else None
    if module is None:
        names = {id(m): n or "<model>" for n, m in model.named_modules()} if model is not None else {}
        for f in reversed(frames):
            obj = f.f_locals.get("self")
            if f.f_code.co_name == "forward" and isinstance(obj, torch.nn.Module):
                module = names.get(id(obj), type(obj).__name__)
                break
    return (op_name(op) if op is not None else None), raised, module


@contextlib.contextmanager
def _gradients_seen(params: list[torch.nn.Parameter], seen: set[int]) -> Iterator[None]:
    """Add to ``seen`` the id of each of ``params`` whose gradient accumulates while inside."""
    handles = [p.register_post_accumulate_grad_hook(lambda t: seen.add(id(t))) for p in params]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Engine:
    """Base engine; subclasses set the class attributes and override the hooks."""

    name = "base"
    #: the step runs on fake tensors: no values, no real memory (the engine's capabilities
    #: are attributes; nothing tests an engine by its name)
    simulated = False
    #: the step runs on a CUDA device
    gpu = False
    block_rounding = 1
    #: keep the measured step's allocation trace (the sim engine replays it)
    record_trace = False
    #: keep the measured step's trace in ``last_trace`` (engines with ``record_trace``;
    #: memprof.engines.depth extends shallow traces to the model's depth)
    keep_trace = False
    last_trace: list[TraceEvent] | None = None
    load_weights = True
    init_weights = True
    foreach: bool | None = None

    def __init__(self) -> None:
        self.reason = ""

    # hooks --------------------------------------------------------------
    def device(self) -> torch.device:
        return torch.device("cpu")

    def device_name(self) -> str:
        return platform.processor() or platform.machine() or "cpu"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        yield

    def before_measure(self) -> None:
        gc.collect()

    def after_measure(self, profile_extra: dict[str, Any]) -> None:
        pass

    def peak_reserved(self) -> int | None:
        return None

    def replay_trace(self, trace: list[TraceEvent], setup: StepSetup, extra: dict[str, Any]) -> None:
        """Engines with ``record_trace``: use the measured step's allocations and frees."""

    def replay_notes(self) -> list[str]:
        """The profile notes on the last :meth:`replay_trace` (the sim engine's allocator model)."""
        return []

    def workspace_bytes(self, training: bool = False) -> int:
        """Device memory outside the measured peak that a budget must also hold (sim: cuBLAS workspaces)."""
        return 0

    def allocator_peak(self) -> int | None:
        """The allocator's own peak for the measured step, where there is one."""
        return None

    def kernel_scratch(self) -> dict[Any, Any] | None:
        """Ops whose kernels allocate beyond their outputs, for the tracker to count (sim: CUDA's).

        Real engines measure what their kernels allocate (cuda: in the allocator's peak).
        """
        return None

    def notes(self) -> list[str]:
        return []

    def translate_error(self, e: Exception, model: str, where: str) -> MemprofError | None:
        """An engine's reading of an exception its step raised: a known limit, or None (a bug).

        Args:
            e: the exception.
            model: the model's name.
            where: where it happened (``aten.nonzero in module model.layers.0``), or "".
        """
        return None

    # driver -------------------------------------------------------------
    def run(
        self,
        rm: ResolvedModel,
        workload: Workload | StepSetup,
        *,
        progress: Progress | None = None,
        allow_pickle: bool = False,
        track_modules: bool = True,
        measure: Measure | None = None,
    ) -> Profile:
        """Measure one step of ``workload`` on ``rm``.

        Raises:
            InputError: the model or workload is invalid.
            OutOfMemory: the measured step ran out of memory (the partial profile is attached).
        """
        return self.run_detailed(
            rm,
            workload,
            progress=progress,
            allow_pickle=allow_pickle,
            track_modules=track_modules,
            measure=measure,
        ).profile

    def run_detailed(
        self,
        rm: ResolvedModel,
        workload: Workload | StepSetup,
        *,
        progress: Progress | None = None,
        allow_pickle: bool = False,
        track_modules: bool = True,
        measure: Measure | None = None,
    ) -> RunResult:
        """Measure one step, and optionally its FLOPs, its time and a quality probe.

        The step: build the model (seeded), apply the setup, probe its output
        (real engines, ``measure.quality``), warm up (training: create the
        optimizer state as a step leaves it, or run a whole warm-up step where
        :meth:`full_warm_up_reason` says why), time
        untracked steps (real engines, ``measure.timing_steps``), then the tracked
        step, then probe the loss again. FLOPs (``measure.flops``) are counted on
        the tracked step (the tracker applies ``FlopCounterMode``'s formulas), or on
        the whole warm-up step where one runs anyway. A training step that leaves a trainable
        parameter without a gradient after the fast warm-up is measured again
        after a whole warm-up step (a whole step gives that parameter no state).

        Raises:
            InputError: the model or setup is invalid; ``NotSupported``: a step the
                engine knowingly cannot run (the sim engine: one that reads tensor values).
            OutOfMemory: a step ran out of memory (the measured one: the partial profile is attached).
            InternalError: an unexpected exception while building or stepping (a bug),
                from the original, with the model, engine, op and module it happened in.
        """
        gcpause.resume()  # the console script's imports are over: no step runs with it paused
        say = progress or _noop
        measure = measure or Measure()
        given = workload  # a copy is measured: the setup gathers notes on the way
        setup = StepSetup.of(workload)
        if setup.workload.attn == "auto":  # commands resolve it first; library callers may not
            setup.update_workload(attn=setup.workload.for_model(rm).attn)
        check_setup(setup)
        workload = setup.workload
        extra: dict[str, Any] = {}
        dev = self.device()
        real = not self.simulated
        notes_before = list(rm.notes)
        # resolved before anything is built: a teacher that cannot teach fails fast
        trm = (
            resolve_teacher(rm, workload.teacher, load_weights=self.load_weights)
            if workload.mode == "distill" and workload.teacher
            else None
        )
        out = RunResult(profile=None)  # type: ignore[arg-type]
        model: torch.nn.Module | None = None
        unreached = False
        # the tracker while its region runs: an exception there is placed by its op and module
        in_region: Tracker | None = None
        try:
            with self.ranks(setup) as mesh, self.context(), contextlib.ExitStack() as model_stack:
                say(f"Building {rm.name} ({self.name} engine)")
                model, builder = self._build(rm, setup, allow_pickle, measure.seed)
                self.saw_model(model, setup)
                builder.validate(workload.batch_size, workload.seq_len)
                moe = model_stack.enter_context(self.experts_context(model, setup))
                if dev.type != "cpu":
                    model = model.to(dev)
                train = workload.training
                model.train(train)
                if not train:
                    for p in model.parameters():
                        p.requires_grad_(False)
                inputs = builder.build(workload.batch_size, workload.seq_len, dev, with_labels=train)
                env = RunEnv(
                    device_type=dev.type,
                    simulate_cuda=self.simulated,
                    default_foreach=self.foreach,
                    recompute_context=self.recompute_context(),
                    mesh=mesh,
                )
                runner = StepRunner(model, setup, env)
                setup = runner.setup  # with what the runner measured (model transforms) in its notes
                n_params = parameter_count(model)  # after any surgery
                if train:
                    extra["parameters"] = parameter_split(model)  # the student's, in distillation
                sharding = self._sharding_info(model, setup, n_params) if setup.shard else None
                teacher_info = None
                if trm is not None:
                    teacher_info = self._attach_teacher(
                        rm, trm, runner, inputs, allow_pickle, measure.seed, say
                    )
                try:
                    if real and measure.quality:
                        say("Quality probe (eval-mode forward)")
                        out.loss_before, out.output = runner.probe(inputs)
                        if measure.texts is not None:
                            say("Quality probe on the data's texts")
                            batch = {k: v.to(dev) for k, v in measure.texts.items()}
                            out.embeddings = runner.embed(batch)
                    # An inference step on cpu or sim needs no warm-up: it leaves nothing
                    # behind (no optimizer, no persistent buffer: the KV cache is the step's own).
                    reached: set[int] | None = None  # the fast warm-up: what gets gradients
                    fast = False
                    if train:
                        extra["warm_up"] = why_full = self.full_warm_up_reason(runner, measure, moe)
                        fast = why_full is None
                    # FLOPs: counted by the tracker on the measured step, unless a whole
                    # warm-up step runs anyway (it counts them, as it always has)
                    counter = (
                        flop_counter()
                        if measure.flops and (fast or not (train or self.gpu or measure.timing_steps))
                        else None
                    )
                    if fast:
                        say("Warm-up: optimizer state without a step")
                        torch.manual_seed(measure.seed)
                        runner.warm_up_state()
                        reached = set()
                    elif train or self.gpu or measure.timing_steps:
                        say("Warm-up step (creates optimizer state, initialises kernels)")
                        torch.manual_seed(measure.seed)
                        if measure.flops:
                            from torch.utils.flop_counter import FlopCounterMode

                            counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
                            with counter:
                                runner.step(inputs)
                            out.flops = int(counter.get_total_flops())
                        else:
                            runner.step(inputs)
                    if real and measure.timing_steps:
                        times = []
                        # Python's automatic collections depend on what ran before (how many
                        # objects earlier runs left, what was frozen): paused while timing, so
                        # no row of a comparison pays for another's garbage
                        gc.collect()
                        gc_was_on = gc.isenabled()
                        gc.disable()
                        try:
                            for i in range(measure.timing_steps):
                                say(f"Timed step {i + 1}/{measure.timing_steps}")
                                self.synchronize()
                                t0 = time.perf_counter()
                                runner.step(inputs)
                                self.synchronize()
                                times.append(time.perf_counter() - t0)
                        finally:
                            if gc_was_on:
                                gc.enable()
                        out.seconds = statistics.median(times)
                    self.before_measure()
                    if moe is not None:
                        moe.reset()
                    say("Measured step")
                    tracker = Tracker(
                        runner.tracked,
                        runner.optimizers,
                        block_rounding=self.block_rounding,
                        track_modules=track_modules,
                        device_type=dev.type if dev.type == "cuda" else None,
                        record_trace=self.record_trace,
                        groups=SIDES if runner.pair is not None else (),
                        distributed=setup.shard is not None,
                        record_timeline=measure.timeline,
                        budget=measure.budget,
                        flop_counter=counter,
                        scratch=self.kernel_scratch(),
                    )
                    oom: dict[str, Any] | None = None
                    error: BaseException | None = None
                    in_region = tracker
                    seen = _gradients_seen(runner.trainable(), reached) if reached is not None else None
                    try:
                        with tracker, seen or contextlib.nullcontext():
                            tracker.mark_inputs(v for v in inputs.values() if isinstance(v, torch.Tensor))
                            runner.step(
                                inputs, tracker=tracker, on_phase=lambda p: say(f"Measured step: {p}")
                            )
                    except BaseException as e:
                        if not is_oom(e):
                            raise
                        error = e
                        oom = {
                            "phase": tracker.error_phase,
                            "module": tracker.error_module,
                            "message": str(e).splitlines()[0][:300],
                            "live_bytes": tracker.current,
                            "live_by_category": tracker.live_by_category(),
                            # inclusive bytes per module when it failed (the diagnosis ranks them)
                            "live_by_module": tracker.state()["modules"],
                        }
                    in_region = None
                    if error is None and reached is not None and len(reached) < len(runner.trainable()):
                        # a trainable parameter the step never reaches (an unused head) gets
                        # no optimizer state from a whole step, but got it from warm_up_state:
                        # measured again below (a step that ran out of memory keeps its profile)
                        unreached = True
                    if counter is not None and error is None:
                        out.flops = tracker.flops
                    self.after_measure(extra)
                    if tracker.trace is not None:
                        self.replay_trace(tracker.trace, setup, extra)
                        # kept for memprof.engines.depth (extends shallow traces), else dropped: it can be long
                        self.last_trace = tracker.trace if self.keep_trace else None
                        tracker.trace = None
                    result = tracker.result()
                    extra["timeline"] = tracker.timeline()
                    extra["host"] = host = runner.host_memory()
                    if host and host["paged_bytes"] and extra.get("allocator") is not None:
                        # unified memory never passes through the caching allocator
                        extra["allocator"]["outside_allocator_bytes"] = host["paged_bytes"]
                    if moe is not None:
                        extra["moe"] = moe.to_dict()
                        setup.notes.append(moe.note())
                    if measure.budget is not None:
                        extra["budget"] = {"usable_bytes": measure.budget, "crossing": tracker.crossing}
                    if real and measure.quality and train and error is None:
                        out.loss_after, _ = runner.probe(inputs)
                finally:
                    runner.close()
            if sharding is not None:
                sharding["at_peak"] = dict(result.sharding_at_peak)
            out.profile = self._profile(rm, setup, n_params, result, extra, oom, teacher_info, sharding)
        except MemprofError:
            raise
        except Exception as e:  # KeyboardInterrupt and the like pass untouched
            raise self._unexpected(e, rm, model, in_region) from e
        finally:
            rm.notes[:] = notes_before
        del model, runner, inputs
        gc.collect()
        if freeze_survivors:
            gc.freeze()
        if unreached:
            say("Some trainable parameters get no gradient: measuring again after a whole warm-up step")
            return Engine.run_detailed(  # the subclass's wrapper is already around this call
                self,
                rm,
                given,
                progress=progress,
                allow_pickle=allow_pickle,
                track_modules=track_modules,
                measure=replace(measure, full_warm_up="a trainable parameter gets no gradient in the step"),
            )
        if error is not None:
            raise OutOfMemory(
                f"out of memory in the {oom['phase'] if oom else '?'} phase"
                f"{' in ' + oom['module'] if oom and oom['module'] else ''}: {oom['message'] if oom else error}",
                out.profile,
            )
        return out

    def _unexpected(
        self, e: Exception, rm: ResolvedModel, model: torch.nn.Module | None, tracker: Tracker | None
    ) -> MemprofError:
        """What an exception that escaped building or stepping means: a known limit, or a bug."""
        op, raised, module = failure_site(e, model, tracker)
        parts = [op if raised else f"after {op}"] if op else []
        where = " ".join(parts + ([f"in module {module}"] if module else []))
        if is_oom(e):  # outside the measured step (which keeps its partial profile): the build, the warm-up
            line = str(e).strip().splitlines()
            return OutOfMemory(
                f"out of memory outside the measured step{f' ({where})' if where else ''}: "
                f"{line[0][:300] if line else type(e).__name__}"
            )
        known = self.translate_error(e, rm.name, where) or _packed_weight_read(e, rm.name, model, where)
        if known is not None:
            return known
        return InternalError(e, model=rm.name, engine=self.name, op=op, op_raised=raised, module=module)

    def _attach_teacher(
        self,
        rm: ResolvedModel,
        trm: ResolvedModel,
        runner: StepRunner,
        inputs: dict[str, Any],
        allow_pickle: bool,
        seed: int,
        say: Progress,
    ) -> dict[str, Any]:
        """Build the distillation teacher and hand it to the runner; what the profile says of it."""
        setup = runner.setup
        wl = setup.workload
        dtype = setup.teacher_dtype or wl.dtype
        say(f"Building the teacher {trm.name}")
        # The student's config overrides and model transforms are not the teacher's;
        # another seed, or a teacher of the student's architecture would equal it.
        tsetup = StepSetup(workload=replace(wl, dtype=dtype, mode="infer", teacher=None))
        teacher, tbuilder = self._build(trm, tsetup, allow_pickle, seed + 1)
        tbuilder.validate(wl.batch_size, wl.seq_len)
        dev = self.device()
        if dev.type != "cpu":
            teacher = teacher.to(dev)
        info = {
            "name": trm.name,
            "spec": trm.spec,
            "source": trm.source,
            "model_type": trm.model_type,
            "parameters": parameter_count(teacher),
            "dtype": dtype,
            "no_grad": setup.teacher_no_grad or bool(setup.teacher_topk),
            "topk": setup.teacher_topk,
        }
        if setup.teacher_topk:
            say(f"Teacher: offline top-{setup.teacher_topk} pass")
        setup.notes.append(runner.attach_teacher(teacher, inputs, rm.task))
        setup.notes += [f"teacher {n}" if n.startswith("weights:") else n for n in trm.notes]
        del teacher  # with top-k the runner kept none: the teacher leaves memory here
        gc.collect()
        return info

    def full_warm_up_reason(self, runner: StepRunner, measure: Measure, moe: Any) -> str | None:
        """Why a training profile's warm-up must be a whole step, or None.

        The warm-up exists so the measured step finds what every step but the first
        finds: the optimizer state (moments, step counters, 8-bit and paged buffers,
        per-parameter and host optimizers' state) and the loss scaler's. Where nothing
        else of a step persists, :meth:`StepRunner.warm_up_state` creates exactly that
        without a forward and backward (in the sim on Llama-3-8B b1 s2048 bf16 here:
        0.4 s instead of a whole fake step's 2.0 s, of a ~10 s process; bench/speed.py). Where something else does, or the
        step itself is what is wanted, the whole step runs; each reason below.
        """
        if measure.full_warm_up:
            return measure.full_warm_up if isinstance(measure.full_warm_up, str) else "asked for"
        if self.gpu:
            # kernel initialisation, the cuBLAS workspace and the caching allocator's
            # segments: the allocator's counters must see them before the measured step
            return "the first step on a GPU initialises kernels and the cuBLAS workspace"
        if measure.timing_steps or measure.quality:
            # real updates: the quality probe's loss after the steps, and timed steps
            # after one that initialised the CPU kernels
            return "timed or quality-probed steps follow a real step"
        if runner.pair is not None:
            # the teacher's first forward runs under the student's step, and the
            # baseline teacher's gradients (never zeroed) persist from it
            return "distillation: the teacher's forward and its gradients persist"
        if moe is not None:
            # which experts get gradients (and so optimizer state) depends on the routing
            return "mixture of experts: the routing decides which experts get optimizer state"
        return runner.full_warm_up_reason()

    def saw_model(self, model: torch.nn.Module, setup: StepSetup) -> None:
        """The model built for the step, before it runs (the sim engine counts its convolutions)."""

    def recompute_context(self) -> Callable[[], Any] | None:
        """What checkpoint recomputation must run under (see :class:`RunEnv`)."""
        return None

    def experts_context(
        self, model: torch.nn.Module, setup: StepSetup
    ) -> contextlib.AbstractContextManager[Any]:
        """Around the built model's steps: what its mixture-of-experts layers do (None: it has none).

        Real engines run the model's own router and count what the experts got; the
        sim engine overrides this with a routing assumption (:mod:`memprof.engines.moe`).
        """
        return router_counts(model)

    @contextlib.contextmanager
    def ranks(self, setup: StepSetup) -> Iterator[Any]:
        """The ranks a sharded step runs on: yields their device mesh (None: not sharded).

        Real engines join torchrun's process group; the sim engine overrides
        this with a fake one.

        Raises:
            InputError: a sharded step outside torchrun, or a world size torchrun does not have.
        """
        if setup.shard is None:
            yield None
            return
        with self.mesh(setup) as mesh:
            yield mesh

    @contextlib.contextmanager
    def mesh(self, setup: StepSetup) -> Iterator[Any]:
        """The device mesh of a sharded step's ranks: torchrun's (the sim engine: a fake group's)."""

        launch = Launch.from_env()
        n = setup.workload.world_size
        if launch is None:
            raise InputError(
                f"--shard {setup.shard} on the {self.name} engine measures real ranks: run it under "
                f"torchrun --nproc-per-node {n} -m memprof ..., or project it with --engine sim"
            )
        if launch.world_size != n:
            raise InputError(f"--world-size {n} but torchrun started {launch.world_size} ranks")
        yield init_launched_group(self.device().type)

    def launcher(self) -> str:
        return "torchrun"

    def sharding_notes(self) -> list[str]:
        return ["sharded step measured on real ranks under torchrun: each rank measured its own step"]

    def _sharding_info(self, model: torch.nn.Module, setup: StepSetup, n_params: int) -> dict[str, Any]:
        import torch.distributed as dist

        n = setup.workload.world_size
        return {
            "method": setup.shard,
            "world_size": n,
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "launcher": self.launcher(),
            "reshard_after_forward": setup.reshard_after_forward,
            # a DTensor parameter's numel is its global size: n_params is the whole model's
            "zero3_estimate": zero3_estimate(n_params, largest_layer_params(model), n),
        }

    def synchronize(self) -> None:
        """Wait for the device (real GPU engines)."""

    def _build(
        self, rm: ResolvedModel, setup: StepSetup, allow_pickle: bool, seed: int
    ) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(seed)
        workload = setup.workload
        overrides = config_overrides(setup) or None
        random_init = self.init_weights and not (self.load_weights and rm.has_weights)
        if random_init and workload.dtype != "float32":
            # Initialise in float32 and cast: the same seed gives the same weights
            # (up to rounding) in every dtype, so quality checks compare like with like.
            model, builder = build_model(
                rm,
                dtype="float32",
                attn=workload.attn,
                load_weights=False,
                init_weights=True,
                config_overrides=overrides,
                experts=workload.experts,
            )
            model = model.to(DTYPES[workload.dtype])
            builder.dtype = DTYPES[workload.dtype]
            return model, builder
        return build_model(
            rm,
            dtype=workload.dtype,
            attn=workload.attn,
            load_weights=self.load_weights,
            allow_pickle=allow_pickle,
            init_weights=self.init_weights,
            config_overrides=overrides,
            experts=workload.experts,
        )

    def _profile(
        self,
        rm: ResolvedModel,
        setup: StepSetup,
        n_params: int,
        r: TrackerResult,
        extra: dict[str, Any],
        oom: dict[str, Any] | None,
        teacher: dict[str, Any] | None = None,
        sharding: dict[str, Any] | None = None,
    ) -> Profile:
        workload = setup.workload
        cats = {c: int(r.categories_at_peak.get(c, 0)) for c in CATEGORIES}
        peak = int(r.peak_bytes)
        alloc_peak = self.allocator_peak()
        if alloc_peak is not None and oom is None:
            # The allocator is the truth; what tensors do not explain (cuBLAS
            # workspace, kernels' scratch) is reported as temporaries and in overheads.
            residual = alloc_peak - peak
            extra.setdefault("overheads", {})["untracked_at_peak_bytes"] = residual
            cats["temporaries"] += residual
            if r.groups_at_peak:
                r.groups_at_peak["other"]["temporaries"] += residual
            # the phase of the peak holds it: its peak is the allocator's too (the
            # other phases keep their tensors' peaks, measured without the residual)
            for ph in r.phases:
                if ph["name"] == r.peak_phase:
                    ph["peak_bytes"] = max(int(ph["peak_bytes"]), alloc_peak)
            peak = alloc_peak
        notes = list(rm.notes)
        attn_note = rm.attn_note(workload.attn)
        if attn_note:
            notes.append(attn_note)
        notes += self.notes()
        notes += setup.notes
        if sharding is not None:
            notes += self.sharding_notes()
        if workload.training:
            why = extra.get("warm_up", "")
            if "warm_up" in extra and why is None:
                notes.append(
                    "steady state: the optimizer state was created before the measured step as one step leaves "
                    "it (zero gradients through the step's own optimizer phase; no warm-up forward), so it "
                    "exists as in every step but the first"
                )
            else:
                notes.append(
                    "steady state: one warm-up step ran first"
                    + (f" ({why})" if why else "")
                    + ", so optimizer state exists as in every step but the first"
                )
        return from_tracker(
            r,
            engine=self.name,
            engine_reason=self.reason,
            device=self.device_name(),
            model={
                "name": rm.name,
                "spec": rm.spec,
                "source": rm.source,
                "model_type": rm.model_type,
                "task": rm.task,
                "parameters": n_params,
            }
            | ({"teacher": teacher} if teacher else {}),
            workload=workload.to_dict() | {"task": rm.task},
            peak_bytes=peak,
            peak_reserved_bytes=self.peak_reserved(),
            categories_at_peak=cats,
            overheads=extra.get("overheads", {}),
            nvml=extra.get("nvml"),
            versions=versions(),
            notes=notes,
            oom=oom,
            optimizations=[dict(st) for st in setup.steps],
            allocator=extra.get("allocator"),
            split_at_peak={g: {c: int(v) for c, v in cs.items()} for g, cs in r.groups_at_peak.items()},
            sharding=sharding,
            timeline=extra.get("timeline"),
            budget=extra.get("budget"),
            moe=extra.get("moe"),
            host=extra.get("host"),
            parameters=extra.get("parameters"),
        )


def _packed_weight_read(
    e: Exception, model_name: str, model: torch.nn.Module | None, where: str
) -> NotSupported | None:
    """A model that reads a 4-bit layer's weight outside the layer (Jamba's Mamba mixer takes
    ``dt_proj.weight`` into a matmul of its own), or None.

    bitsandbytes packs the weight two values to a byte (uint8) and unpacks it only in
    ``Linear4bit``'s forward, so such a model fails on a GPU too: transformers'
    answer is to leave those modules unquantized (``llm_int8_skip_modules``). Not a
    bug of memprof's, so not an internal error.
    """
    if model is None or "uint8" not in str(e):
        return None
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return None
    at = f" ({where})" if where else ""
    return NotSupported(
        model_name,
        f"the model reads a 4-bit quantized layer's weight outside the layer{at}; bitsandbytes "
        "unpacks it only in the layer's own forward, on a GPU too (transformers leaves such "
        "modules unquantized with llm_int8_skip_modules); use lora instead of qlora for it",
    )
