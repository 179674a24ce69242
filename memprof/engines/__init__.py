"""Engines: run a workload, return a Profile. ``cuda`` | ``cpu`` | ``sim`` | ``auto``."""

from __future__ import annotations

import os

import torch

from memprof.choices import EngineName, values
from memprof.engines.base import Engine
from memprof.engines.cpu import CpuEngine
from memprof.engines.sim import SimEngine
from memprof.errors import InputError
from memprof.gpus import GpuPreset

ENGINES = values(EngineName)


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def get_engine(
    name: str,
    *,
    estimate_bytes: int | None = None,
    snapshot: str | None = None,
    gpu: GpuPreset | None = None,
    context_bytes: int | None = None,
) -> Engine:
    """The engine called ``name``; ``auto`` picks one and records why in ``engine.reason``.

    Args:
        name: ``auto``, ``cuda``, ``cpu`` or ``sim``.
        estimate_bytes: a lower bound of the step's memory (parameters, gradients and
            optimizer state), used by ``auto`` to decide whether a CPU run fits in RAM.
        snapshot: path of a CUDA allocator snapshot to write: the caching
            allocator's (cuda engine) or the allocator model's (sim engine).
        gpu: a GPU preset (``--gpu``): the step is projected onto it, so the engine is
            sim (``auto`` picks it; ``cuda`` and ``cpu`` are refused: they measure the
            machine's own device).
        context_bytes: the CUDA context the sim engine reports (None: the preset's
            estimate, or the default assumption).

    Raises:
        InputError: unknown engine name, ``--snapshot`` with the cpu engine, ``--gpu``
            with the cuda or cpu engine.
        EnvironmentProblem: ``cuda`` asked for without a GPU.
    """
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; use one of: {', '.join(ENGINES)}")
    if gpu is not None:
        if name in ("cuda", "cpu"):
            raise InputError(
                f"--gpu {gpu.name} projects the step onto that GPU in the sim engine; --engine {name} measures "
                f"this machine's {'GPU' if name == 'cuda' else 'CPU'} instead: drop --gpu or use --engine sim"
            )
        projected = SimEngine(snapshot_path=snapshot, gpu=gpu, context_bytes=context_bytes)
        projected.reason = f"--gpu {gpu.name}: projected onto it"
        return projected
    if name == "auto":
        if torch.cuda.is_available():
            name, reason = "cuda", "auto: a CUDA GPU is available"
        else:
            ram = available_ram_bytes()
            if estimate_bytes is not None and ram is not None and estimate_bytes > ram // 4:
                name = "sim"
                reason = (
                    f"auto: no GPU, and parameters+gradients+optimizer state alone "
                    f"({estimate_bytes / 2**30:.1f} GiB) exceed a quarter of free RAM, so the step is simulated"
                )
            else:
                name, reason = (
                    "cpu",
                    "auto: no GPU, and the model fits comfortably in RAM, so a real CPU step runs",
                )
    else:
        reason = f"--engine {name}"
    if snapshot and name not in ("cuda", "sim"):
        raise InputError(
            "--snapshot needs the cuda or sim engine (it writes the CUDA caching allocator's history, "
            "measured or modelled)"
        )
    engine: Engine
    if name == "cuda":
        from memprof.engines.cuda import CudaEngine

        engine = CudaEngine(snapshot_path=snapshot)
    elif name == "sim":
        engine = SimEngine(snapshot_path=snapshot, context_bytes=context_bytes)
    else:
        engine = CpuEngine()
    engine.reason = reason
    return engine


__all__ = ["ENGINES", "CpuEngine", "Engine", "SimEngine", "get_engine"]
