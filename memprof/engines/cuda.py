"""The cuda engine: a real step on the GPU; the caching allocator is the truth.

Protocol (as PyTorch's own memory-tracker tests): a warm-up step first (cuBLAS
workspace, lazy kernel initialisation, optimizer state), then synchronize,
collect garbage, empty the cache and reset the peak statistics, and only then
the measured step. ``max_memory_allocated`` gives the peak; the tracker (with
512-byte rounding) gives the categories and modules, and whatever the allocator
holds that tensors do not explain is reported as such. NVML reconciles what
nvidia-smi shows (CUDA context, allocator cache) with allocated and reserved.

The allocator's history (its allocations, frees and segments) is recorded over
the measured step, without stack traces (cheap); from the snapshot taken at its
end :func:`memprof.snapshot.cuda_allocator_view` gives allocated and reserved
over the step, the fragmentation at their peaks and whether expandable segments
would help. With a ``snapshot_path`` the history keeps Python stack traces and
the snapshot is written there.

Allocator settings (``StepSetup.alloc_conf``, the ``allocator`` optimization)
only take effect through ``PYTORCH_CUDA_ALLOC_CONF`` before CUDA initialises,
so a step with them is measured in a child process (:mod:`.child`) that sets
the variable first; the parent's environment is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Iterator
from typing import Any

import torch

from memprof.allocator_model import ENV_VAR, GENERIC_ENV_VAR
from memprof.engines.base import Engine, Measure, Progress, RunResult
from memprof.engines.child import child_env_updates, run_in_child
from memprof.engines.cuda_semantics import CUDA_BLOCK_ROUNDING
from memprof.errors import EnvironmentProblem
from memprof.models import ResolvedModel
from memprof.optimizations.registry import check_setup
from memprof.sharding import Launch
from memprof.snapshot import cuda_allocator_view, device_trace, write_snapshot
from memprof.workload import StepSetup, Workload

#: allocator history entries kept for the measured step (a ring buffer: past it the
#: oldest go); a 8B-parameter training step makes about 100k-200k
HISTORY_ENTRIES = 1_000_000
#: with --snapshot (stack traces make each entry several KB)
SNAPSHOT_HISTORY_ENTRIES = 200_000


def record_history(stacks: bool, max_entries: int) -> None:
    """Start recording the caching allocator's history, cleared of any earlier one.

    Args:
        stacks: keep Python stack traces (for a snapshot someone will read);
            without them only the actions are kept, which costs little.
        max_entries: the history's ring-buffer size.
    """
    kwargs: dict[str, Any] = {"max_entries": max_entries, "clear_history": True}
    if not stacks:
        kwargs["context"] = None
    try:
        torch.cuda.memory._record_memory_history(enabled="all", **kwargs)
    except TypeError:
        # older PyTorch: no clear_history (the history was off since the last step)
        del kwargs["clear_history"]
        torch.cuda.memory._record_memory_history(enabled="all", **kwargs)


def nvml_snapshot(index: int = 0) -> dict[str, Any] | None:
    """Device total/used and this process's usage through NVML, or None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        proc_bytes = None
        try:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == os.getpid():
                    proc_bytes = int(p.usedGpuMemory) if p.usedGpuMemory is not None else None
        except Exception:
            pass
        name = pynvml.nvmlDeviceGetName(h)
        return {
            "device_name": name.decode() if isinstance(name, bytes) else str(name),
            "device_total_bytes": int(mem.total),
            "device_used_bytes": int(mem.used),
            "process_used_bytes": proc_bytes,
            "driver_version": _str(pynvml.nvmlSystemGetDriverVersion()),
        }
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class CudaEngine(Engine):
    """A real step on CUDA device ``index``."""

    name = "cuda"
    gpu = True
    block_rounding = CUDA_BLOCK_ROUNDING
    load_weights = True
    foreach = None  # torch's default on CUDA is foreach

    def __init__(
        self, index: int | None = None, snapshot_path: str | None = None, *, in_child: bool = False
    ) -> None:
        """
        Args:
            index: the CUDA device.
            snapshot_path: write an allocator snapshot of the measured step there.
            in_child: this engine runs in the child process of another one (it
                measures in-process whatever the allocator settings).
        """
        super().__init__()
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                "--engine cuda: no CUDA GPU is visible to PyTorch (use --engine sim to project a GPU run, or --engine cpu)"
            )
        if index is None:
            # under torchrun each rank measures its own GPU (LOCAL_RANK), else GPU 0

            launch = Launch.from_env()
            index = launch.local_rank if launch is not None else 0
        self.index = index
        self.snapshot_path = snapshot_path
        self.in_child = in_child
        self._peak: int | None = None
        self._reserved: int | None = None
        self._start_allocated = 0
        self._start_reserved = 0
        self._allocator: dict[str, Any] | None = None

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
        """Measure one step; with allocator settings, in a child process (see the module docstring)."""
        setup = StepSetup.of(workload)
        if self.in_child or not setup.alloc_conf:
            return super().run_detailed(
                rm,
                setup,
                progress=progress,
                allow_pickle=allow_pickle,
                track_modules=track_modules,
                measure=measure,
            )
        check_setup(setup)
        if torch.cuda.is_initialized():
            # the parent's cached blocks would be memory the child cannot have
            gc.collect()
            torch.cuda.empty_cache()
        factory = functools.partial(
            CudaEngine, index=self.index, snapshot_path=self.snapshot_path, in_child=True
        )
        out = run_in_child(
            factory,
            child_env_updates(setup.alloc_conf),
            rm,
            setup,
            progress=progress,
            allow_pickle=allow_pickle,
            track_modules=track_modules,
            measure=measure,
        )
        profile = out["profile"]
        profile.engine_reason = self.reason or profile.engine_reason
        profile.notes.append(
            f"measured in a child process started with {ENV_VAR}={out['env'].get(ENV_VAR) or '(unset)'} "
            "(the allocator reads it when CUDA initialises)"
        )
        output = out["output"]
        return RunResult(
            profile=profile,
            flops=out["flops"],
            seconds=out["seconds"],
            loss_before=out["loss_before"],
            loss_after=out["loss_after"],
            output=output.to(self.device()) if output is not None else None,
        )

    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.index)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with torch.device(self.device()):
            yield

    def before_measure(self) -> None:
        torch.cuda.synchronize(self.index)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.index)
        self._start_allocated = torch.cuda.memory_allocated(self.index)
        self._start_reserved = torch.cuda.memory_reserved(self.index)
        if self.snapshot_path:
            record_history(stacks=True, max_entries=SNAPSHOT_HISTORY_ENTRIES)
        else:
            record_history(stacks=False, max_entries=HISTORY_ENTRIES)

    def after_measure(self, extra: dict[str, Any]) -> None:
        torch.cuda.synchronize(self.index)
        self._peak = int(torch.cuda.max_memory_allocated(self.index))
        self._reserved = int(torch.cuda.max_memory_reserved(self.index))
        stats = torch.cuda.memory_stats(self.index)
        try:
            snap = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.snapshot_path:
            write_snapshot(snap, self.snapshot_path)
        conf = os.environ.get(GENERIC_ENV_VAR) or os.environ.get(ENV_VAR, "")
        extra["allocator"] = {
            "source": "measured",
            "conf": conf,
            "peak_reserved_bytes": self._reserved,
            "peak_allocated_bytes": self._peak,
            # what the cache held beyond the tensors at the peaks: fragmentation
            "fragmentation_bytes": self._reserved - self._peak,
            "segments": int(stats.get("segment.all.peak", 0)),
            "segments_allocated": int(stats.get("num_device_alloc", 0)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "ooms": int(stats.get("num_ooms", 0)),
        }
        limit = SNAPSHOT_HISTORY_ENTRIES if self.snapshot_path else HISTORY_ENTRIES
        complete = len(device_trace(snap, self.index)) < limit
        try:
            view = cuda_allocator_view(
                snap,
                device=self.index,
                # a full ring buffer lost the step's first entries: derive the start from the end
                start_allocated=int(self._start_allocated) if complete else None,
                start_reserved=int(self._start_reserved) if complete else None,
                conf=conf,
                measured_reserved_bytes=self._reserved,
            )
        except (KeyError, TypeError, ValueError) as e:
            # a snapshot format this code does not know must not cost the measurement
            view = {
                "timeline": None,
                "at_peak": {"allocated": None, "reserved": None},
                "expandable_segments_hint": None,
                "notes": [f"no allocator view: unexpected snapshot format ({type(e).__name__}: {e})"],
            }
        if not complete:
            view["notes"].append(
                f"the allocator history kept only the step's last {limit} entries: the timeline starts late"
            )
        extra["allocator"].update(view)
        self._allocator = extra["allocator"]
        in_effect = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # PyTorch 2.8+
        if in_effect is not None:
            # what the allocator parsed, to check the environment reached it
            extra["allocator"]["settings_in_effect"] = str(in_effect())
        nv = nvml_snapshot(self.index)
        extra["nvml"] = nv
        extra["overheads"] = {
            "allocated_before_step_bytes": int(self._start_allocated),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "included_in_peak": True,
        }
        if nv and nv.get("process_used_bytes") is not None:
            # what nvidia-smi shows beyond the allocator's reservation: CUDA context, libraries
            extra["overheads"]["context_and_libraries_bytes"] = nv["process_used_bytes"] - int(
                torch.cuda.memory_reserved(self.index)
            )

    def allocator_peak(self) -> int | None:
        return self._peak

    def peak_reserved(self) -> int | None:
        return self._reserved

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def notes(self) -> list[str]:
        out = [
            "cuda engine: peak is torch.cuda.max_memory_allocated of the measured step (reset after the warm-up)"
        ]
        if self.snapshot_path:
            out.append(
                f"allocator snapshot written to {self.snapshot_path} (open it at pytorch.org/memory_viz)"
            )
        hint = (self._allocator or {}).get("expandable_segments_hint")
        if hint and hint.get("message"):
            out.append(hint["message"])
        return out
