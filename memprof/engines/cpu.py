"""The cpu engine: a real step on the CPU, live tensor bytes tracked exactly."""

from __future__ import annotations

from memprof.engines.base import Engine


class CpuEngine(Engine):
    """A real step on the CPU; exact bytes (no allocator rounding), deterministic."""

    name = "cpu"
    block_rounding = 1
    load_weights = True
    foreach = None  # torch's CPU default

    def notes(self) -> list[str]:
        return ["cpu engine: exact live tensor bytes of a real step on the CPU (no CUDA allocator rounding)"]
