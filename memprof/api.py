"""Public API: :func:`track` for your own step, :func:`analyze` for a MODEL spec."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memprof import optimizations
from memprof.budget import DEFAULT_CONTEXT_BYTES, fit
from memprof.budget import check as check_budget
from memprof.diagnose import diagnose
from memprof.engines import SimEngine
from memprof.engines.base import Engine, Measure, versions
from memprof.errors import InputError, MemprofError, OutOfMemory
from memprof.gpus import GpuPreset
from memprof.models import ResolvedModel, parameter_count
from memprof.prepare import estimate_state_bytes, fake_model, prepare, stack
from memprof.profile import Profile, from_tracker
from memprof.recipes import Recipe
from memprof.sharding import Launch, gather_profiles
from memprof.tracking import Tracker
from memprof.units import CUDA_BLOCK_BYTES, format_bytes
from memprof.workload import MOE_ROUTINGS, StepSetup, Workload


class TrackSession:
    """What :func:`track` yields: mark phases and inputs, then read the profile."""

    def __init__(self, tracker: Tracker, model: torch.nn.Module | None, device: str) -> None:
        self.tracker = tracker
        self._model = model
        self._device = device

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Mark a phase (``forward``, ``backward``, ``optimizer``...)."""
        return self.tracker.phase(name)

    def mark_inputs(self, *tensors: torch.Tensor) -> None:
        """Count these tensors as the step's inputs."""
        self.tracker.mark_inputs(tensors)

    def profile(self, name: str | None = None) -> Profile:
        """The plain-data profile of what ran inside the ``with`` block."""
        r = self.tracker.result()
        model = self._model
        return from_tracker(
            r,
            engine="track",
            engine_reason="memprof.track() around user code",
            device=self._device,
            model={
                "name": name or (type(model).__name__ if model is not None else "unknown"),
                "parameters": parameter_count(model) if model is not None else 0,
            },
            workload={},
            versions=versions(),
        )


@contextlib.contextmanager
def track(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    cuda_rounding: bool = False,
) -> Iterator[TrackSession]:
    """Track live tensor memory of the code inside the ``with`` block.

    Tensors that exist on entry (parameters, buffers, gradients, optimizer state)
    are counted from the start. Every hook and mode is removed on exit, also when
    the block raises; the model and optimizer are left unchanged.

    Args:
        model: the model whose memory is broken down by category and module.
        optimizer: its state is counted as ``optimizer_state``.
        cuda_rounding: round each storage to the CUDA allocator's 512-byte blocks.

    Yields:
        A :class:`TrackSession`; call ``.profile()`` after (or inside) the block.
    """
    tracker = Tracker(model, optimizer, block_rounding=CUDA_BLOCK_BYTES if cuda_rounding else 1)
    device = "cpu"
    if model is not None:
        p = next(model.parameters(), None)
        if p is not None:
            device = str(p.device)
    with tracker:
        yield TrackSession(tracker, model, device)


def analyze(
    spec: str,
    *,
    mode: str = "train",
    batch_size: int = 8,
    seq_len: int = 512,
    dtype: str = "float32",
    optimizer: str = "adamw",
    attn: str = "auto",
    task: str | None = None,
    decode_tokens: int = 0,
    teacher: str | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    world_size: int = 1,
    shard: str | None = None,
    moe_routing: str = "balanced",
    experts: str = "auto",
    engine: str | Engine = "auto",
    snapshot: str | None = None,
    budget: int | None = None,
    context_overhead: int | None = None,
    fixes: int = 3,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    recipe: Recipe | None = None,
    skip_inapplicable: bool = False,
    gpu: GpuPreset | None = None,
) -> Profile:
    """Profile one step of a model, as ``memprof analyze`` does.

    Args:
        spec: a MODEL spec (directory, config.json, bundled name, Hub id, ``module:factory``).
        mode: ``train``, ``infer`` or ``distill`` (a training step of the student against ``teacher``).
        batch_size: sequences (or images) per step.
        seq_len: tokens per sequence.
        dtype: parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        optimizer: ``adamw``, ``sgd`` or ``none``.
        attn: ``eager``, ``sdpa`` or ``auto`` (the model's own: sdpa where its class supports it,
            else eager, as ``from_pretrained`` picks).
        task: override the task picked from the config.
        decode_tokens: for causal LMs in infer mode, decode steps after the prefill.
        teacher: distill: the teacher's MODEL spec (same vocabulary as the student).
        temperature: distill: softmax temperature of the KL.
        ce_weight: distill: weight of the student's cross-entropy; the KL gets ``1 - ce_weight``.
        world_size: ranks running the step together (``batch_size`` is per rank); under
            torchrun, torchrun's world size (the default then).
        shard: ``"fsdp"``: shard the model with FSDP2 over ``world_size`` ranks. The sim
            engine projects rank 0 over a fake process group; the cpu and cuda engines
            measure real ranks under ``torchrun`` (each rank measures itself, rank 0
            gets every rank's profile in :attr:`Profile.ranks`). ``auto`` picks sim
            outside torchrun.
        engine: ``auto``, ``cuda``, ``cpu``, ``sim`` or an :class:`Engine`.
        snapshot: write a CUDA allocator snapshot pickle (memory_viz format): cuda engine,
            measured; sim engine, the allocator model's.
        budget: GPU memory bytes to check the step against: the profile's ``budget``
            says whether it fits, where the step's tensors first cross the usable
            budget (budget less the CUDA context and the cuBLAS workspace), what was
            live then, and, when it does not fit, the ``fixes`` optimizations that
            cut the most (each a sim run) and the cheapest stack that fits
            (:mod:`memprof.diagnose`). A real out-of-memory error is diagnosed the
            same way, against the GPU's memory on cuda.
        context_overhead: the CUDA context assumed in the budget (default 512 MiB).
        fixes: how many single optimizations the diagnosis shows.
        allow_pickle: permit loading ``.bin`` checkpoints.
        trust_remote_code: permit models that ship their own code.
        progress: called with a short status line as the work advances.
        recipe: optimizations to apply to the step first (``--recipe``/``--step``); every
            one must apply (one that does not is an InputError with the reason) unless
            ``skip_inapplicable`` (a recipe: those are skipped, as ``compare`` does, and the
            profile's notes say why).
        gpu: a GPU preset (:mod:`memprof.gpus`, ``--gpu``): the step is projected onto it
            in the sim engine (its compute capability, memory, CUDA context estimate
            unless ``context_overhead`` is given), and the profile's ``fit`` says whether
            the reserved memory and every non-tensor byte fit its memory (or ``budget``).

    Returns:
        The profile of the measured step (rank 0's under torchrun, on every rank).

    Raises:
        InputError, EnvironmentProblem, OutOfMemory: see :mod:`memprof.errors`.
    """
    given_context = context_overhead
    if context_overhead is None:
        context_overhead = gpu.context_bytes if gpu is not None else DEFAULT_CONTEXT_BYTES
    context = context_overhead
    if context < 0:
        raise InputError("--context-overhead must be 0 or more")
    if fixes < 0:
        raise InputError(f"--fixes must be 0 or more, got {fixes}")
    if budget is not None and budget <= 0:
        raise InputError(f"--budget must be more than 0, got {budget}")
    launch = Launch.from_env() if shard else None
    if launch is not None and world_size == 1:
        world_size = launch.world_size
    workload = Workload(
        mode=mode,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        attn=attn,
        task=task,
        decode_tokens=decode_tokens,
        teacher=teacher,
        temperature=temperature,
        ce_weight=ce_weight,
        world_size=world_size,
        moe_routing=moe_routing,
        experts=experts,
    )
    workload.validate()
    steps = recipe.steps if recipe is not None else []
    if steps and shard:
        raise InputError("--shard with --step/--recipe: add the fsdp step to them instead")
    if steps and budget is not None:
        raise InputError(
            "--budget diagnoses the step as given; for a step with optimizations use memprof plan "
            "(which searches them) or memprof compare"
        )
    setup = sharded_setup(workload, shard)
    if shard and engine == "auto" and gpu is None:
        if launch is None:
            engine = SimEngine()
            engine.reason = "auto: a sharded step outside torchrun is projected over a fake process group"
        else:
            engine = "cuda" if torch.cuda.is_available() else "cpu"
    rm, eng = prepare(
        spec,
        workload,
        engine,
        task=task,
        snapshot=snapshot,
        trust_remote_code=trust_remote_code,
        progress=progress,
        gpu=gpu,
        context_bytes=given_context,
    )
    workload = workload.for_model(rm)
    setup.update_workload(attn=workload.attn)
    skipped: list[str] = []
    if steps:
        assert recipe is not None
        setup, skipped = stack(recipe, workload, fake_model(rm, workload), pretrained=bool(rm.has_weights))
        if skipped and not skip_inapplicable:
            raise InputError("not applied: " + "; ".join(skipped))
        if not setup.steps:
            raise InputError("no step of the recipe applies: " + "; ".join(skipped))
    measure = Measure()
    if budget is not None:
        measure.budget = check_budget(budget, context, eng.workspace_bytes(workload.training))
    oom: OutOfMemory | None = None
    try:
        if launch is None:
            profile = eng.run(rm, setup, progress=progress, allow_pickle=allow_pickle, measure=measure)
        else:
            profile = run_ranks(eng, rm, setup, progress=progress, allow_pickle=allow_pickle, measure=measure)
    except OutOfMemory as e:
        if not isinstance(e.profile, Profile):
            raise
        oom, profile = e, e.profile
        if budget is None and eng.gpu and torch.cuda.is_available():
            budget = int(torch.cuda.get_device_properties(eng.device()).total_memory)
    if oom is None and launch is None:
        other_routing(eng, rm, setup, profile, progress=progress, allow_pickle=allow_pickle)
    if budget is not None:
        profile.budget = diagnose(
            spec,
            workload,
            profile,
            budget,
            context_bytes=context,
            fixes=fixes,
            task=task,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
            gpu=gpu,
        )
    profile.notes.extend(f"skipped (does not apply): {why}" for why in skipped)
    named = (profile.overheads or {}).get("non_tensor")
    if named and (gpu is not None or budget is not None):
        reserved = (
            profile.peak_reserved_bytes if profile.peak_reserved_bytes is not None else profile.peak_bytes
        )
        if budget is not None:
            against, memory = f"--budget {format_bytes(budget)}", budget
        else:
            assert gpu is not None
            against, memory = f"{gpu.name} ({format_bytes(gpu.memory_bytes)})", gpu.memory_bytes
        profile.fit = fit(reserved, named, memory, against)
    if oom is not None:
        raise oom
    return profile


def other_routing(
    eng: Engine,
    rm: ResolvedModel,
    setup: StepSetup,
    profile: Profile,
    *,
    progress: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> None:
    """A sim profile of a mixture-of-experts model whose memory depends on the routing: measure the other assumption too.

    Its peak goes in ``profile.moe["other"]`` (and the report). When no size depended
    on the routing (transformers' grouped_mm experts) the other gives the same trace,
    and nothing runs.
    """
    moe = profile.moe
    if not moe or not moe.get("routing_dependent") or moe.get("routing") not in MOE_ROUTINGS:
        return
    other = next(r for r in MOE_ROUTINGS if r != moe["routing"])
    if progress:
        progress(f"Mixture of experts: the step again with --moe-routing {other}")
    again = setup.copy()
    again.update_workload(moe_routing=other)
    peak: int | None
    try:
        peak = eng.run(rm, again, allow_pickle=allow_pickle, measure=Measure(timeline=False)).peak_bytes
    except OutOfMemory as e:
        peak = e.profile.peak_bytes if isinstance(e.profile, Profile) else None
    if peak is not None:
        moe["other"] = {"routing": other, "peak_bytes": int(peak)}
        profile.notes.append(
            f"--moe-routing {other} measured too: peak {format_bytes(int(peak), 2)} "
            f"({'+' if peak >= profile.peak_bytes else ''}{format_bytes(int(peak) - profile.peak_bytes, 2)})"
        )


def sharded_setup(workload: Workload, shard: str | None) -> StepSetup:
    """The step of ``workload``, sharded with ``shard`` (None: as it is).

    Raises:
        InputError: an unknown sharding, or one that does not apply to the workload.
    """
    setup = StepSetup.of(workload)
    if shard is None:
        return setup
    if shard != "fsdp":
        raise InputError(f"unknown sharding {shard!r}; use: fsdp")

    opt = optimizations.make("fsdp")
    reason = opt.applies_to(None, setup)
    if reason:
        raise InputError(f"--shard fsdp: {reason}")
    opt.apply(setup)
    setup.steps.append({"name": opt.name, "options": opt.options})
    return setup


def run_ranks(
    eng: Engine,
    rm: ResolvedModel,
    setup: StepSetup,
    *,
    progress: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
    measure: Measure | None = None,
) -> Profile:
    """Under torchrun: every rank measures its own step; rank 0's profile holds all of them.

    A rank whose step fails still joins the gather (with its error), so the
    others do not wait for it; the error is raised on that rank and reported
    in rank 0's table.
    """
    import torch.distributed as dist

    error: BaseException | None = None
    profile: Profile | None = None
    try:
        profile = eng.run(rm, setup, progress=progress, allow_pickle=allow_pickle, measure=measure)
        mine: dict[str, Any] = profile.to_dict()
    except (MemprofError, RuntimeError) as e:
        error = e
        mine = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        if isinstance(e, OutOfMemory) and isinstance(e.profile, Profile):
            mine = e.profile.to_dict() | mine
    try:
        if dist.is_initialized():
            everyone = gather_profiles(mine)
            dist.barrier()
        else:  # the step failed before joining the group
            everyone = None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if error is not None:
        raise error
    assert profile is not None
    if everyone is not None:
        profile.ranks = everyone
    return profile


# estimate_state_bytes, fake_model and prepare live in the shared layer (memprof.prepare);
# they stay importable from here, where they were
__all__ = ["TrackSession", "analyze", "estimate_state_bytes", "fake_model", "prepare", "track"]
