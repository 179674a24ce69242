"""The CUDA caching allocator's pool settings (``PYTORCH_CUDA_ALLOC_CONF``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.allocator_model import ENV_VAR, LARGE_BUFFER, AllocatorSettings, MiB, alloc_conf_string
from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class Allocator(Optimization):
    """Change how the caching allocator carves segments, to cut reserved-but-unused memory.

    No tensor changes size, so allocated memory stays the same: what moves is
    the memory the allocator reserves beyond it (fragmentation), which counts
    against the GPU like any other. ``expandable_segments`` grows one segment
    per pool in pages instead of allocating a segment per large request, so
    free space is not stranded in segments of the wrong size;
    ``max_split_size_mb`` keeps large cached blocks whole for large requests;
    ``garbage_collection_threshold`` releases old cached segments above a
    fraction of the memory (PyTorch does this only under a memory fraction,
    ``torch.cuda.set_per_process_memory_fraction``).

    The settings must be in ``PYTORCH_CUDA_ALLOC_CONF`` before CUDA initialises:
    the cuda engine measures them in a child process, the sim engine replays
    the step's allocations through a model of the allocator (an estimate).
    """

    name = "allocator"
    summary = (
        "caching-allocator settings (PYTORCH_CUDA_ALLOC_CONF): moves reserved-but-unused memory "
        "(fragmentation), not allocated"
    )
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        expandable_segments: bool = option(True, "grow one segment per pool in pages (less fragmentation)")
        max_split_size_mb: int = option(
            0, "never split cached blocks this large or larger, MiB (0: unset; else more than 20)", min=0
        )
        garbage_collection_threshold: float = option(
            0.0,
            "release old cached segments above this fraction of the memory (0: off; needs a memory fraction)",
            min=0.0,
            max=1.0,
        )

        def problems(self) -> list[str]:
            out = []
            if 0 < self.max_split_size_mb <= LARGE_BUFFER // MiB:
                out.append(
                    f"option 'max_split_size_mb' must be 0 (unset) or more than {LARGE_BUFFER // MiB}, "
                    f"got {self.max_split_size_mb}"
                )
            if self.garbage_collection_threshold >= 1:
                out.append(
                    "option 'garbage_collection_threshold' must be below 1 (PyTorch rejects 1), "
                    f"got {self.garbage_collection_threshold}"
                )
            return out

    def settings(self) -> AllocatorSettings:
        return AllocatorSettings(
            expandable_segments=self.config.expandable_segments,
            max_split_size_mb=self.config.max_split_size_mb,
            garbage_collection_threshold=self.config.garbage_collection_threshold,
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        merged = AllocatorSettings.from_dict({**setup.alloc_conf, **self._changes()})
        if merged == AllocatorSettings.from_dict(setup.alloc_conf):
            return "these allocator settings are already in effect (PyTorch's defaults or an earlier step)"
        return None

    def _changes(self) -> dict[str, Any]:
        """The settings this step sets: all but the unset ones (a later step overrides an earlier one)."""
        s = self.settings().to_dict()
        return {k: v for k, v in s.items() if k == "expandable_segments" or v}

    def apply(self, setup: StepSetup) -> None:
        setup.alloc_conf.update(self._changes())
        conf = alloc_conf_string(setup.alloc_conf)
        setup.notes.append(
            f"allocator settings: set {ENV_VAR}={conf or '(unset)'} in the environment before CUDA "
            "initialises (before the first CUDA call; in the shell that launches training). Allocated "
            "memory is unchanged; reserved memory (fragmentation) is what moves"
        )
        if self.config.garbage_collection_threshold:
            setup.notes.append(
                "garbage_collection_threshold only acts under a memory fraction: also call "
                "torch.cuda.set_per_process_memory_fraction(...) in the training script"
            )
