"""The common driver: build, warm up, measure one step, return a Profile.

Each engine supplies the device, the tensor mode around the work (real or
fake), the allocator rounding, and what it reads before and after the measured
step (allocator counters, NVML). The driver is the same for all of them, so the
three engines produce the same profile format by construction.
"""

from __future__ import annotations

import contextlib
import gc
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memprof import __version__
from memprof.errors import OutOfMemory
from memprof.models import ResolvedModel, build_model, parameter_count
from memprof.profile import ModuleStat, PhaseStat, Profile
from memprof.tracking import CATEGORIES, Tracker, TrackerResult
from memprof.workload import Workload, make_optimizer, run_step

Progress = Callable[[str], None]


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


def is_oom(e: BaseException) -> bool:
    """True for an out-of-memory error from CUDA or the CPU allocator."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e)
        return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    return False


class Engine:
    """Base engine; subclasses set the class attributes and override the hooks."""

    name = "base"
    block_rounding = 1
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

    def allocator_peak(self) -> int | None:
        """The allocator's own peak for the measured step, where there is one."""
        return None

    def notes(self) -> list[str]:
        return []

    # driver -------------------------------------------------------------
    def run(
        self,
        rm: ResolvedModel,
        workload: Workload,
        *,
        progress: Progress | None = None,
        allow_pickle: bool = False,
        track_modules: bool = True,
    ) -> Profile:
        """Measure one step of ``workload`` on ``rm``.

        Raises:
            InputError: the model or workload is invalid.
            OutOfMemory: the measured step ran out of memory (the partial profile is attached).
        """
        say = progress or _noop
        workload.validate()
        extra: dict[str, Any] = {}
        dev = self.device()
        with self.context():
            say(f"Building {rm.name} ({self.name} engine)")
            model, builder = build_model(
                rm,
                dtype=workload.dtype,
                attn=workload.attn,
                load_weights=self.load_weights,
                allow_pickle=allow_pickle,
                init_weights=self.init_weights,
            )
            builder.validate(workload.batch_size, workload.seq_len)
            if dev.type != "cpu":
                model = model.to(dev)
            n_params = parameter_count(model)
            train = workload.mode == "train"
            model.train(train)
            if not train:
                for p in model.parameters():
                    p.requires_grad_(False)
            inputs = builder.build(workload.batch_size, workload.seq_len, dev, with_labels=train)
            optimizer = make_optimizer(workload.optimizer, model, foreach=self.foreach) if train else None
            if train or self.name == "cuda":
                say("Warm-up step (creates optimizer state, initialises kernels)")
                run_step(model, inputs, workload, optimizer)
            self.before_measure()
            say("Measured step")
            tracker = Tracker(
                model, optimizer, block_rounding=self.block_rounding, track_modules=track_modules
            )
            oom: dict[str, Any] | None = None
            error: BaseException | None = None
            try:
                with tracker:
                    tracker.mark_inputs(v for v in inputs.values() if isinstance(v, torch.Tensor))
                    run_step(
                        model,
                        inputs,
                        workload,
                        optimizer,
                        tracker=tracker,
                        on_phase=lambda p: say(f"Measured step: {p}"),
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
                }
            self.after_measure(extra)
            result = tracker.result()
        profile = self._profile(rm, workload, n_params, result, extra, oom)
        del model, optimizer, inputs
        gc.collect()
        if error is not None:
            raise OutOfMemory(
                f"out of memory in the {oom['phase'] if oom else '?'} phase"
                f"{' in ' + oom['module'] if oom and oom['module'] else ''}: {oom['message'] if oom else error}",
                profile,
            )
        return profile

    def _profile(
        self,
        rm: ResolvedModel,
        workload: Workload,
        n_params: int,
        r: TrackerResult,
        extra: dict[str, Any],
        oom: dict[str, Any] | None,
    ) -> Profile:
        cats = {c: int(r.categories_at_peak.get(c, 0)) for c in CATEGORIES}
        peak = int(r.peak_bytes)
        alloc_peak = self.allocator_peak()
        if alloc_peak is not None and oom is None:
            # The allocator is the truth; what tensors do not explain (cuBLAS
            # workspace, kernels' scratch) is reported as temporaries and in overheads.
            residual = alloc_peak - peak
            extra.setdefault("overheads", {})["untracked_at_peak_bytes"] = residual
            cats["temporaries"] += residual
            peak = alloc_peak
        notes = list(rm.notes)
        notes += self.notes()
        if workload.mode == "train":
            notes.append(
                "steady state: one warm-up step ran first, so optimizer state exists as in every step but the first"
            )
        return Profile(
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
            },
            workload=workload.to_dict() | {"task": rm.task},
            peak_bytes=peak,
            peak_reserved_bytes=self.peak_reserved(),
            categories_at_peak=cats,
            phases=[PhaseStat(p["name"], int(p["peak_bytes"])) for p in r.phases],
            modules=[
                ModuleStat(m.name, m.type, int(m.peak_bytes), int(m.activation_bytes), int(m.bytes_at_peak))
                for m in r.modules
            ],
            peak_phase=r.peak_phase,
            peak_module=r.peak_module,
            overheads=extra.get("overheads", {}),
            nvml=extra.get("nvml"),
            versions=versions(),
            notes=notes,
            oom=oom,
        )
