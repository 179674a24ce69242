"""A GPU memory budget: what it must hold besides the step's tensors, and what is left for them.

One place for the budget arithmetic and its checks (``memprof analyze --budget``, its
diagnosis, and ``memprof plan``): the budget less the CUDA context (an assumption
without a GPU, ``--context-overhead``) less the cuBLAS workspace (from the sim
profile) is what the caching allocator's reserved memory may use; a step needs its
reserved memory plus the same overheads.

The bytes a step needs that are not its tensors (:func:`non_tensor`), each from a
stated assumption: the cuBLAS workspace per handle and stream (one compute stream;
two handles in training), a cuDNN workspace when the step runs convolutions, NCCL's buffers when ranks
communicate (world size above 1), and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.errors import InputError
from memprof.units import format_bytes

MiB = 2**20
#: the CUDA context assumed per process when no GPU measures it (``--context-overhead``)
DEFAULT_CONTEXT_BYTES = 512 * MiB

#: streams with a cuBLAS workspace: one compute stream (PyTorch keeps one workspace per
#: handle and stream; a step on side streams would add one each)
CUBLAS_STREAMS = 1


def cublas_handles(training: bool) -> int:
    """cuBLAS handles that hold a workspace in a step: one per thread that runs matmuls.

    PyTorch's handles come from a per-thread pool, and its workspaces are kept per
    handle and stream: the forward runs on the caller's thread, and autograd runs a
    CUDA backward on its own device thread. Measured on an H200 (torch 2.11, fresh
    processes, docs/validation.md): a training step's allocator held 64 MiB beyond
    its tensors, an inference step's 32 MiB (one workspace of 32 MiB on sm 9.0).
    """
    return 2 if training else 1


#: the cuDNN workspace assumed for a step that runs convolutions: PyTorch allocates it
#: through the caching allocator for the call's duration, sized by the algorithm cuDNN's
#: heuristics pick; an assumption (no GPU here to ask cuDNN), counted as if at the peak
CUDNN_WORKSPACE_BYTES = 64 * MiB
#: NCCL's defaults (NCCL source, src/include/device.h and the NCCL_BUFFSIZE docs): per
#: channel and peer connection, the SIMPLE protocol's NCCL_BUFFSIZE (4 MiB), LL
#: (8 lines x 512 threads x 8 steps x 16 B = 512 KiB) and LL128 (120 x 640 threads x
#: 8 steps x 8 B = 4.6875 MiB)
NCCL_BUFFSIZE = 4 * MiB
NCCL_LL_BYTES = 8 * 512 * 8 * 16
NCCL_LL128_BYTES = 120 * 640 * 8 * 8
#: channels assumed: 2, NCCL's count on a PCIe ring; NVLink systems open more
#: (NCCL_MAX_NCHANNELS caps them)
NCCL_CHANNELS = 2


def nccl_buffers(world_size: int) -> dict[str, Any]:
    """NCCL's buffers on one rank of ``world_size`` (0 bytes for one rank), with the assumption spelled out."""
    if world_size <= 1:
        return {"bytes": 0, "channels": 0, "peers": 0, "per_connection_bytes": 0}
    # a ring: each rank connects to its previous and next rank (one peer when there are two)
    peers = min(world_size - 1, 2)
    per = NCCL_BUFFSIZE + NCCL_LL_BYTES + NCCL_LL128_BYTES
    return {
        "bytes": per * NCCL_CHANNELS * peers,
        "channels": NCCL_CHANNELS,
        "peers": peers,
        "per_connection_bytes": per,
        "assumption": (
            f"NCCL defaults: NCCL_BUFFSIZE 4 MiB + LL 512 KiB + LL128 4.7 MiB per channel and peer, "
            f"{NCCL_CHANNELS} channels (a PCIe ring; NVLink opens more), {peers} peer(s) (ring neighbours)"
        ),
    }


def non_tensor(
    *,
    cublas_workspace_bytes: int,
    convolutions: int,
    world_size: int,
    context_bytes: int,
    context_source: str,
    handles: int = 1,
) -> dict[str, Any]:
    """Every byte a step needs beyond the allocator's reserved memory, each named, as plain data.

    Args:
        cublas_workspace_bytes: one stream's cuBLAS workspace (the compute capability's default).
        convolutions: convolution modules the step runs (a cuDNN workspace when above 0).
        world_size: ranks communicating (NCCL buffers when above 1).
        context_bytes: the CUDA context.
        context_source: where ``context_bytes`` comes from ("estimate: ...", "assumed: ...").
        handles: cuBLAS handles with a workspace (:func:`cublas_handles`: 2 in training).
    """
    nccl = nccl_buffers(world_size)
    cudnn = CUDNN_WORKSPACE_BYTES if convolutions > 0 else 0
    items = {
        "cublas_workspace_bytes": cublas_workspace_bytes * CUBLAS_STREAMS * handles,
        "cudnn_workspace_bytes": cudnn,
        "nccl_buffers_bytes": nccl["bytes"],
        "cuda_context_bytes": context_bytes,
    }
    assumptions = [
        f"cuBLAS workspace: {format_bytes(cublas_workspace_bytes)} per handle and stream, {CUBLAS_STREAMS} "
        f"compute stream, {handles} handle(s) ({'the forward and autograd threads' if handles > 1 else 'one thread'}; "
        "PyTorch's default CUBLAS_WORKSPACE_CONFIG for the compute capability)",
        f"CUDA context: {format_bytes(context_bytes)}, {context_source}",
    ]
    if cudnn:
        assumptions.append(
            f"cuDNN workspace: {format_bytes(cudnn)} assumed for the step's {convolutions} convolution "
            "module(s), counted as if at the peak (the algorithm cuDNN picks sets the real size)"
        )
    if nccl["bytes"]:
        assumptions.append(f"NCCL buffers: {format_bytes(nccl['bytes'])}, {nccl['assumption']}")
    return {
        **items,
        "total_bytes": sum(items.values()),
        "cublas_streams": CUBLAS_STREAMS,
        "cublas_handles": handles,
        "convolutions": convolutions,
        "nccl": nccl,
        "cuda_context_source": context_source,
        "assumptions": assumptions,
    }


def fit(
    reserved_bytes: int, non_tensor_bytes: dict[str, Any], memory_bytes: int, against: str
) -> dict[str, Any]:
    """Will the step fit: reserved + every non-tensor byte against a GPU's memory (or a budget)."""
    need = int(reserved_bytes) + int(non_tensor_bytes["total_bytes"])
    return {
        "against": against,
        "memory_bytes": memory_bytes,
        "reserved_bytes": int(reserved_bytes),
        "non_tensor_bytes": int(non_tensor_bytes["total_bytes"]),
        "need_bytes": need,
        "headroom_bytes": memory_bytes - need,
        "fits": need <= memory_bytes,
    }


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
    #: a cuDNN workspace, when the step runs convolutions (:data:`CUDNN_WORKSPACE_BYTES`)
    cudnn_workspace_bytes: int = 0
    #: where the context figure comes from
    context_source: str = "assumed (--context-overhead); measure it with memprof analyze --engine cuda"
    #: the GPU preset the budget comes from (``--gpu``), or None
    gpu: str | None = None

    @property
    def nccl_buffers_bytes(self) -> int:
        """NCCL's buffers on each rank when ranks communicate (:func:`nccl_buffers`)."""
        return int(nccl_buffers(self.world_size)["bytes"])

    @property
    def overhead_bytes(self) -> int:
        """Every non-tensor byte: the context, the cuBLAS and cuDNN workspaces, NCCL's buffers."""
        return (
            self.context_bytes
            + self.cublas_workspace_bytes
            + self.cudnn_workspace_bytes
            + self.nccl_buffers_bytes
        )

    @property
    def usable_bytes(self) -> int:
        """What is left for the caching allocator's reserved memory."""
        return self.budget_bytes - self.overhead_bytes

    def need(self, reserved: float) -> int:
        """What a step with ``reserved`` bytes reserved needs of the budget (with the overheads)."""
        return int(reserved) + self.overhead_bytes

    def fits(self, reserved: float) -> bool:
        return self.need(reserved) <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "context_bytes": self.context_bytes,
            "context_source": self.context_source,
            "cublas_workspace_bytes": self.cublas_workspace_bytes,
            "cudnn_workspace_bytes": self.cudnn_workspace_bytes,
            "nccl_buffers_bytes": self.nccl_buffers_bytes,
            "gpu": self.gpu,
            "usable_bytes": self.usable_bytes,
            "fragmentation": "peak reserved of the sim's caching-allocator model (replaying the step)",
            "per_rank": self.world_size > 1,
            "world_size": self.world_size,
        }
