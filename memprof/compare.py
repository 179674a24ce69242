"""Before/after: the baseline step, then each recipe step applied cumulatively.

Every row is a full measurement on the same model, workload, engine, inputs
and seed: memory (a :class:`~memprof.profile.Profile`), FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode`` (under fake tensors too), and on
real engines the median time of untracked steps and a quality check (the loss
and main output of an eval-mode forward, and the loss after two training
steps, against the baseline's). A step that does not apply is kept as a
skipped row with its reason.

JSON (schema ``memprof.compare/1``): ``schema``, ``model``, ``engine``,
``recipe``, ``baseline`` (a profile), ``baseline_flops``, ``baseline_seconds``,
``steps`` (list of {``name``, ``options``, ``label``, ``skipped``, ``profile``,
``flops``, ``seconds``, ``quality``}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memprof.data import DataSpec, encode, padding_plan
from memprof.engines.base import Engine, Measure, RunResult
from memprof.engines.pool import Job, available_workers, run_many
from memprof.errors import EnvironmentProblem, InputError, OutOfMemory
from memprof.gpus import GpuPreset
from memprof.prepare import apply_step, fake_model, prepare
from memprof.profile import Profile
from memprof.recipes import Recipe
from memprof.workload import StepSetup, Workload

SCHEMA = "memprof.compare/1"


@dataclass
class StepResult:
    """One row: an optimization stacked on everything above it."""

    name: str
    options: dict[str, Any]
    label: str
    profile: Profile | None = None
    skipped: str | None = None
    flops: int | None = None
    seconds: float | None = None
    quality: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": self.options,
            "label": self.label,
            "skipped": self.skipped,
            "error": self.error,
            "profile": self.profile.to_dict() if self.profile else None,
            "flops": self.flops,
            "seconds": self.seconds,
            "quality": self.quality,
        }


@dataclass
class Comparison:
    """The baseline and the cumulative steps of a recipe."""

    model: str
    engine: str
    recipe: dict[str, Any]
    baseline: Profile
    baseline_flops: int | None
    baseline_seconds: float | None
    baseline_quality: dict[str, Any] | None
    steps: list[StepResult] = field(default_factory=list)
    #: steps stacked (True) or each alone against the baseline (--separate)
    cumulative: bool = True
    schema: str = SCHEMA

    @property
    def final(self) -> Profile:
        """The profile of the last step that ran (the baseline if none did)."""
        for s in reversed(self.steps):
            if s.profile is not None and s.error is None:
                return s.profile
        return self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "engine": self.engine,
            "recipe": self.recipe,
            "baseline": self.baseline.to_dict(),
            "baseline_flops": self.baseline_flops,
            "baseline_seconds": self.baseline_seconds,
            "baseline_quality": self.baseline_quality,
            "cumulative": self.cumulative,
            "steps": [s.to_dict() for s in self.steps],
        }


def quality_delta(base: RunResult, run: RunResult) -> dict[str, Any] | None:
    """The optimized step's loss and output against the baseline's (real engines)."""
    if run.loss_before is None or base.loss_before is None:
        return None
    q: dict[str, Any] = {
        "loss": run.loss_before,
        "loss_abs_diff": abs(run.loss_before - base.loss_before),
        "output_max_abs_diff": None,
        "output_max_rel_diff": None,
        "loss_after_steps": run.loss_after,
        "loss_after_steps_abs_diff": (
            abs(run.loss_after - base.loss_after)
            if run.loss_after is not None and base.loss_after is not None
            else None
        ),
    }
    a, b = run.output, base.output
    if a is not None and b is not None and a.shape == b.shape:
        q["output_max_abs_diff"], q["output_max_rel_diff"] = output_difference(a, b)
    e, f = run.embeddings, base.embeddings
    if e is not None and f is not None and e.shape == f.shape:
        cos = torch.nn.functional.cosine_similarity(e, f, dim=1)
        q["text_cosine_mean"], q["text_cosine_min"] = float(cos.mean()), float(cos.min())
        q["texts"] = int(e.shape[0])
    return q


def output_difference(new: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference, and the same relative to the reference's largest magnitude."""
    new, ref = new.float(), ref.float()
    diff = float((new - ref).abs().max()) if new.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))


def baseline_quality(base: RunResult) -> dict[str, Any] | None:
    if base.loss_before is None:
        return None
    return {"loss": base.loss_before, "loss_after_steps": base.loss_after}


def compare(
    spec: str,
    recipe: Recipe,
    workload: Workload,
    *,
    engine: str | Engine = "auto",
    task: str | None = None,
    timing_steps: int = 2,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cumulative: bool = True,
    data: DataSpec | None = None,
    probe_texts: int = 128,
    progress: Callable[[str], None] | None = None,
    gpu: GpuPreset | None = None,
) -> Comparison:
    """Profile the baseline, then each step of the recipe stacked on the ones before.

    Args:
        spec: a MODEL spec.
        recipe: the validated recipe (:func:`memprof.recipes.load`).
        workload: the baseline step.
        engine: ``auto``, ``cuda``, ``cpu``, ``sim`` or an :class:`Engine`.
        timing_steps: untracked steps timed per row on real engines (0: no timing).
        cumulative: stack the steps (the default); False measures each alone on the baseline.
        data: a data sample (``--data FILE`` or ``--lengths``): its token lengths are what
            dynamic padding batches; a file's first ``probe_texts`` texts also feed the
            quality check on real engines (cosine of each text's pooled output to the baseline's).
        progress: called with short status lines.
        gpu: a GPU preset (``--gpu``): every row projected onto it in the sim engine.

    Raises:
        InputError, EnvironmentProblem: see :mod:`memprof.errors` (OutOfMemory of a
        row is kept in that row; of the baseline, it is raised).
    """
    say = progress or (lambda msg: None)
    workload.validate()
    available_workers()  # a bad MEMPROF_WORKERS is refused before any work
    rm, eng = prepare(
        spec, workload, engine, task=task, trust_remote_code=trust_remote_code, progress=say, gpu=gpu
    )
    workload = workload.for_model(rm)
    real = not eng.simulated
    measure = Measure(flops=True, timing_steps=timing_steps if real else 0, quality=real)
    base_setup = StepSetup.of(workload)
    base_setup.pretrained = rm.has_weights and eng.load_weights
    tok_folder = tokenizer_folder(rm)
    samples = data.load(tok_folder, rm.name) if data else None
    if samples is not None:
        base_setup.data_lengths = samples.lengths
        if workload.mode == "train" or not workload.decode_tokens:
            fixed = padding_plan(samples.lengths, workload.batch_size, workload.seq_len, "fixed")
            base_setup.notes.append(
                f"data {samples.describe()}; padded to a fixed length: {fixed.describe()}"
            )
        if real and samples.texts and probe_texts > 0:
            folder = (data.tokenizer if data else None) or tok_folder
            measure.texts = encode(samples.texts[:probe_texts], folder, workload.seq_len)
    total = len(recipe.steps) + 1

    def run(setup: StepSetup, label: str, i: int) -> RunResult:
        return eng.run_detailed(
            rm,
            setup,
            progress=lambda m: say(f"[{i}/{total}] {label}: {m}"),
            allow_pickle=allow_pickle,
            measure=measure,
        )

    base = run(base_setup, "baseline", 1)
    cmp = Comparison(
        model=rm.name,
        engine=eng.name,
        recipe=recipe.to_dict(),
        baseline=base.profile,
        baseline_flops=base.flops,
        baseline_seconds=base.seconds,
        baseline_quality=baseline_quality(base),
        cumulative=cumulative,
    )
    model_view: torch.nn.Module | None = None
    try:
        model_view = fake_model(rm, workload)
    except InputError:
        model_view = None
    cmp.steps = [StepResult(name=st.name, options=st.options, label=st.describe()) for st in recipe.steps]
    # The rows run side by side where they can (memprof.engines.pool). A stacked row
    # builds on the rows above that ran; one that fails (out of memory, a library
    # missing) leaves the rows below built on it to run again without it.
    setup, start = base_setup, 0
    while start < len(recipe.steps):
        batch: list[tuple[int, StepSetup]] = []
        stacked = setup
        for i in range(start, len(recipe.steps)):
            row = cmp.steps[i]
            row.skipped = None
            trial = stacked.copy() if cumulative else base_setup.copy()
            reason = apply_step(recipe.steps[i], model_view, trial)
            if reason:
                row.skipped = reason
                continue
            batch.append((i, trial))
            if cumulative:
                stacked = trial
        if not batch:
            break
        results = run_many(
            eng,
            rm,
            [Job(trial, measure) for _, trial in batch],
            allow_pickle=allow_pickle,
            stop_at_error=cumulative,
            progress=lambda k, m, batch=batch: say(  # type: ignore[misc]
                f"[{batch[k][0] + 2}/{total}] {cmp.steps[batch[k][0]].label}: {m}"
            ),
        )
        start = len(recipe.steps)
        for (i, trial), r in zip(batch, results):
            row = cmp.steps[i]
            if isinstance(r, BaseException):
                if isinstance(r, OutOfMemory):
                    row.profile = r.profile if isinstance(r.profile, Profile) else None
                    row.error = f"out of memory: {r}"
                elif isinstance(r, (InputError, EnvironmentProblem)):
                    # this step cannot run here (a library, a kernel the engine cannot trace):
                    # the row says why, the other rows still run
                    row.error = str(r)
                else:
                    raise r
                if cumulative:  # the rows below were built on this one: again, without it
                    start = i + 1
                    break
                continue
            row.profile, row.flops, row.seconds = r.profile, r.flops, r.seconds
            row.quality = quality_delta(base, r)
            if cumulative:
                setup = trial
    return cmp


def tokenizer_folder(rm: Any) -> Any:
    """Where the model's tokenizer would be (a bundled config's folder holds configs, not a tokenizer)."""
    return None if rm.source == "bundled" else (rm.folder or rm.weights_dir)
