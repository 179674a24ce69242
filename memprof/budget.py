"""A GPU memory budget: what it must hold besides the step's tensors, and what is left for them.

One place for the budget arithmetic and its checks (``memprof analyze --budget``, its
diagnosis, and ``memprof plan``): the budget less the CUDA context (an assumption
without a GPU, ``--context-overhead``) less the cuBLAS workspace (from the sim
profile) is what the caching allocator's reserved memory may use; a step needs its
reserved memory plus the same overheads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.errors import InputError
from memprof.units import format_bytes

MiB = 2**20
#: the CUDA context assumed per process when no GPU measures it (``--context-overhead``)
DEFAULT_CONTEXT_BYTES = 512 * MiB


def check(budget_bytes: int, context_bytes: int, workspace_bytes: int = 0) -> int:
    """The bytes a budget leaves for the step (the allocator's reserved memory).

    Raises:
        InputError: a budget of 0 or less, a negative context, or nothing left after
            the context and the workspace.
    """
    if budget_bytes <= 0:
        raise InputError(f"--budget must be more than 0, got {budget_bytes}")
    if context_bytes < 0:
        raise InputError("--context-overhead must be 0 or more")
    usable = budget_bytes - context_bytes - workspace_bytes
    if usable <= 0:
        workspace = f" and the cuBLAS workspace ({format_bytes(workspace_bytes)})" if workspace_bytes else ""
        raise InputError(
            f"--budget {format_bytes(budget_bytes)} leaves nothing after the CUDA context "
            f"({format_bytes(context_bytes)}, --context-overhead){workspace}"
        )
    return usable


@dataclass
class Budget:
    """What the budget must hold besides the step's tensors, and what is left for them."""

    budget_bytes: int
    #: the CUDA context: an assumption (no GPU to measure it), ``--context-overhead``
    context_bytes: int
    #: cuBLAS workspace, from the sim profile (allocated on the first matmul, outside the peak)
    cublas_workspace_bytes: int
    world_size: int = 1

    @property
    def usable_bytes(self) -> int:
        """What is left for the caching allocator's reserved memory."""
        return self.budget_bytes - self.context_bytes - self.cublas_workspace_bytes

    def need(self, reserved: float) -> int:
        """What a step with ``reserved`` bytes reserved needs of the budget (with the overheads)."""
        return int(reserved) + self.context_bytes + self.cublas_workspace_bytes

    def fits(self, reserved: float) -> bool:
        return self.need(reserved) <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "context_bytes": self.context_bytes,
            "context_source": "assumed (--context-overhead); measure it with memprof analyze --engine cuda",
            "cublas_workspace_bytes": self.cublas_workspace_bytes,
            "usable_bytes": self.usable_bytes,
            "fragmentation": "peak reserved of the sim's caching-allocator model (replaying the step)",
            "per_rank": self.world_size > 1,
            "world_size": self.world_size,
        }
