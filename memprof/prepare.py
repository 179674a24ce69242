"""The shared preparation layer: a model and an engine made ready, a stack of optimizations applied.

Every command (analyze, compare, plan, diagnose, apply, baseline) starts the same way:
resolve the MODEL spec, pick the engine, build the model on fake tensors where only
its structure is needed, and apply the optimizations of a recipe to a step setup.
That lives here, below the commands, so none of them imports another's helpers.

Layers (imports run downhill only): ``cli -> report -> {api, compare, plan, diagnose,
apply, gate} -> prepare -> {engines, optimizations, recipes} -> {workload, models,
profile} -> {units, errors}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from memprof.choices import Task
from memprof.distill_loss import resolve_teacher
from memprof.engines import get_engine
from memprof.engines.base import Engine
from memprof.engines.fake_fidelity import host_constants
from memprof.errors import EnvironmentProblem, InputError
from memprof.gpus import GpuPreset
from memprof.models import DTYPES, ResolvedModel, build_model, fetch_hub_weights, parameter_count, resolve
from memprof.optimizations.registry import check_setup
from memprof.workload import StepSetup, Workload

if TYPE_CHECKING:
    from memprof.optimizations.registry import Optimization
    from memprof.recipes import Recipe


def fake_model(rm: ResolvedModel, workload: Workload) -> torch.nn.Module:
    """The model built on fake tensors: its structure and sizes, no memory, no values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    notes = list(rm.notes)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), host_constants():
            model, _ = build_model(
                rm, dtype=workload.dtype, attn=workload.attn, load_weights=False, init_weights=False
            )
    finally:
        rm.notes[:] = notes
    return model


def estimate_state_bytes(rm: ResolvedModel, workload: Workload) -> int:
    """Parameters (+ gradients + optimizer state for training), counted on a fake build."""
    n = parameter_count(fake_model(rm, workload))
    per = torch.tensor([], dtype=DTYPES[workload.dtype]).element_size()
    copies = 1
    if workload.training:
        copies += 1 + {"adamw": 2, "sgd": 1}.get(workload.optimizer, 0)
    total = n * per * copies
    if workload.mode == "distill" and workload.teacher:
        # the teacher's parameters, in the student's dtype (the baseline's)
        total += parameter_count(fake_model(resolve_teacher(rm, workload.teacher), workload)) * per
    return total


#: the tasks whose models generate tokens (a KV cache and a greedy decode: ``--decode-tokens``)
GENERATES = tuple(
    t.value for t in (Task.causal_lm, Task.seq2seq_lm, Task.speech_seq2seq, Task.image_text_to_text)
)


def check_positions(rm: ResolvedModel, workload: Workload) -> None:
    """Refuse a decode the model cannot run, or a prefill plus decode longer than its positions,
    before anything is built.

    Raises:
        InputError: ``decode_tokens`` for a model that does not generate (an encoder, a
            classifier); ``seq_len + decode_tokens`` past :meth:`ResolvedModel.position_limit`
            (``seq_len`` alone: :meth:`memprof.inputs.InputBuilder.validate`, once a step runs).
    """
    if not workload.decode_tokens:  # --seq-len alone: the input builder checks it, where a step runs
        return
    if rm.task not in GENERATES:
        raise InputError(
            f"--decode-tokens: {rm.name} is {'an' if str(rm.task)[:1] in 'aeiou' else 'a'} {rm.task} model, "
            "which does not generate tokens; decoding "
            f"needs a {', '.join(GENERATES[:-1])} or {GENERATES[-1]} model (a --task)"
        )
    limit = rm.position_limit()
    if limit is None or rm.task == "image-classification":
        return
    if workload.seq_len + workload.decode_tokens > limit:
        raise InputError(
            f"--seq-len {workload.seq_len} + --decode-tokens {workload.decode_tokens} is past {rm.name}'s "
            f"position limit of {limit}; decode at most {limit - workload.seq_len} tokens after this prefill"
        )


def prepare(
    spec: str,
    workload: Workload,
    engine: str | Engine = "auto",
    *,
    task: str | None = None,
    snapshot: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    gpu: GpuPreset | None = None,
    context_bytes: int | None = None,
) -> tuple[ResolvedModel, Engine]:
    """Resolve a MODEL spec and pick the engine (``auto`` decides from the model's size).

    ``gpu`` (a preset, ``--gpu``) projects the step onto that GPU: the sim engine
    (:func:`memprof.engines.get_engine`); ``context_bytes`` is the CUDA context it reports.
    Callers resolve what depends on the model in their workload right after:
    ``workload = workload.for_model(rm)`` (``attn="auto"``).

    Raises:
        InputError, EnvironmentProblem: see :mod:`memprof.errors`.
    """
    rm = resolve(spec, task=task, trust_remote_code=trust_remote_code)
    if workload.mode == "distill" and workload.teacher:
        resolve_teacher(rm, workload.teacher)  # a teacher that cannot teach fails here, before any build
    if isinstance(engine, Engine):
        eng = engine
    else:
        estimate = None
        if engine == "auto" and gpu is None:
            check_positions(rm, workload)  # before the fake build that counts parameters
            if progress:
                progress("Counting parameters")
            estimate = estimate_state_bytes(rm, workload)
        eng = get_engine(
            engine, estimate_bytes=estimate, snapshot=snapshot, gpu=gpu, context_bytes=context_bytes
        )
    # after the engine's own check (no GPU for --engine cuda is the machine's problem first)
    check_positions(rm, workload)
    if rm.source == "hub" and eng.load_weights and not rm.has_weights:
        try:
            fetch_hub_weights(rm)
        except EnvironmentProblem:
            rm.notes.append(
                "weights: not in the local cache; random initialisation (memory does not depend on values)"
            )
    return rm, eng


def apply_step(step: Optimization, model: torch.nn.Module | None, setup: StepSetup) -> str | None:
    """Apply one optimization to ``setup`` (in place); the reason it does not apply, or None.

    ``model`` (a fake build, or None) lets the optimization check what it needs of
    the architecture. On a reason, ``setup`` may be half changed: apply to a copy.
    """
    reason = step.applies_to(model, setup)
    if reason:
        return reason
    step.apply(setup)
    setup.steps.append({"name": step.name, "options": step.options})
    try:
        check_setup(setup)
    except InputError as e:
        return str(e)
    return None


def stack(
    recipe: Recipe,
    workload: Workload,
    model: torch.nn.Module | None,
    *,
    pretrained: bool = False,
    data_lengths: list[int] | None = None,
) -> tuple[StepSetup, list[str]]:
    """The setup with every applicable step of the recipe, and the skipped steps' reasons.

    ``pretrained``: the model's weights are trained ones (see :attr:`StepSetup.pretrained`);
    ``data_lengths``: the token lengths of the data (what dynamic padding batches).
    """
    setup = StepSetup.of(workload)
    setup.pretrained = pretrained
    setup.data_lengths = list(data_lengths or [])
    skipped = []
    for step in recipe.steps:
        trial = setup.copy()
        reason = apply_step(step, model, trial)
        if reason:
            skipped.append(f"{step.describe()}: {reason}")
        else:
            setup = trial
    return setup, skipped


__all__ = ["apply_step", "check_positions", "estimate_state_bytes", "fake_model", "prepare", "stack"]
