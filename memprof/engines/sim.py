"""The sim engine: the step under fake tensors, projected to a CUDA GPU.

No weights are loaded and no real memory is used, so any size of model can be
profiled on a laptop. The step runs on CPU fake tensors (fake tensors on
"cuda" crash in backward on CPU-only builds) and :mod:`cuda_semantics` applies
what CUDA does differently: the SDPA kernel choice, the allocator's 512-byte
blocks, the multi-tensor (foreach) optimizer that CUDA defaults to, and the
cuBLAS workspace reported beside the peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from memprof.engines.base import Engine
from memprof.engines.cuda_semantics import CUDA_BLOCK_ROUNDING, CudaSDPA, cublas_workspace_bytes


class SimEngine(Engine):
    """Fake-tensor step projected to CUDA (default target: a Hopper-class GPU, sm 9.x)."""

    name = "sim"
    block_rounding = CUDA_BLOCK_ROUNDING
    load_weights = False
    init_weights = False  # fake tensors have no values to initialise
    foreach = True  # torch's default for CUDA tensors

    def __init__(self, sm_major: int = 9) -> None:
        super().__init__()
        self.sm_major = sm_major
        self._sdpa: CudaSDPA | None = None

    def device_name(self) -> str:
        return f"simulated CUDA GPU (sm {self.sm_major}.x semantics, CPU fake tensors)"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self._sdpa = CudaSDPA(self.sm_major)
        with FakeTensorMode(allow_non_fake_inputs=True), self._sdpa:
            yield

    def recompute_context(self) -> Callable[[], Any] | None:
        # Torch function modes are not active while autograd runs backward, where
        # checkpointing recomputes: re-enter the SDPA routing there.
        sdpa = self._sdpa
        return (lambda: sdpa) if sdpa is not None else None

    def before_measure(self) -> None:
        super().before_measure()
        if self._sdpa is not None:
            self._sdpa.kernels.clear()  # count the measured step's kernels only

    def after_measure(self, extra: dict[str, Any]) -> None:
        extra["overheads"] = {
            "cublas_workspace_bytes": cublas_workspace_bytes(self.sm_major),
            "cuda_context_bytes": None,
            "included_in_peak": False,
            "sdpa_kernels": dict(self._sdpa.kernels) if self._sdpa else {},
        }

    def notes(self) -> list[str]:
        ws = cublas_workspace_bytes(self.sm_major) / 2**20
        kernels = dict(self._sdpa.kernels) if self._sdpa else {}
        out = [
            "sim engine: fake tensors, no weights; CUDA semantics applied (512-byte allocator blocks, "
            "CUDA's SDPA kernel choice, foreach optimizer)",
            f"not in the peak: the cuBLAS workspace ({ws:.1f} MiB per stream, allocated on the first matmul) "
            "and the CUDA context (driver-dependent; measure it with --engine cuda)",
        ]
        if kernels:
            out.append(
                "SDPA kernel calls projected: " + ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items()))
            )
        return out
