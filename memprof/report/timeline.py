"""Reading a profile's memory timeline (``Profile.timeline``): totals, columns, phases.

Shared by the terminal sparkline and the HTML charts, so both show the same
numbers. Display only: no measurement.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from memprof.tracking import CATEGORIES
from memprof.units import format_bytes


def totals(tl: dict[str, Any]) -> list[int]:
    """The live total at each point (the categories summed)."""
    cols = [tl["categories"].get(c, []) for c in CATEGORIES]
    n = len(tl.get("op", []))
    return [sum(col[i] for col in cols if i < len(col)) for i in range(n)]


def phase_at(tl: dict[str, Any], op: float) -> str | None:
    """The phase running at ``op`` (the last span that started at or before it)."""
    name = None
    for ph in tl.get("phases", []):
        if ph["start"] <= op and (op < ph["end"] or ph["start"] == ph["end"]):
            name = ph["name"]
        elif ph["start"] > op:
            break
    return name


@dataclass
class Columns:
    """The timeline cut into ``width`` equal spans of ops: the highest total in each."""

    highs: list[int]
    #: the phase at the middle of each column (None: before the first phase)
    phases: list[str | None]
    #: the column holding the peak
    peak_column: int
    ops: int


def columns(tl: dict[str, Any], width: int) -> Columns | None:
    """Resample the timeline to ``width`` columns of equal op spans.

    The memory between two points is the earlier point's (a step function), so
    a column with no point of its own takes the value carried into it.

    Returns:
        None when the timeline is empty or ``width`` is below 1.
    """
    ops_x = tl.get("op") or []
    tot = totals(tl)
    if not ops_x or width < 1:
        return None
    last_op = max(int(tl.get("ops") or 0), ops_x[-1], 1)
    highs: list[int] = []
    phases: list[str | None] = []
    for c in range(width):
        lo = c * last_op / width
        hi = (c + 1) * last_op / width
        i = bisect.bisect_left(ops_x, lo)
        j = bisect.bisect_left(ops_x, hi) if c < width - 1 else len(ops_x)
        # the value carried in from before the column, then every point inside it
        carried = tot[i - 1] if i > 0 else (tot[0] if i < len(tot) else 0)
        inside = tot[i:j]
        highs.append(max([carried, *inside]))
        phases.append(phase_at(tl, (lo + hi) / 2))
    peak_index = tl.get("peak_index", -1)
    if 0 <= peak_index < len(ops_x):
        peak_col = min(width - 1, int(ops_x[peak_index] * width / last_op))
    else:
        peak_col = max(range(width), key=highs.__getitem__)
    return Columns(highs=highs, phases=phases, peak_column=peak_col, ops=last_op)


def fragmentation_line(allocator: dict[str, Any] | None) -> str | None:
    """The allocator's state at the allocated peak, in words (None: not known).

    ``allocator`` is ``Profile.allocator``; its ``at_peak["allocated"]`` is the state
    when the allocated memory first peaked (the sim's allocator model, or the
    cuda engine's allocator history).
    """

    at = ((allocator or {}).get("at_peak") or {}).get("allocated") or {}
    if not at or at.get("reserved_bytes") is None:
        return None
    line = (
        f"{format_bytes(at['fragmentation_bytes'])} reserved beyond the "
        f"{format_bytes(at['allocated_bytes'])} allocated"
    )
    if at.get("largest_free_block_bytes") is not None:
        line += f"; largest free block {format_bytes(at['largest_free_block_bytes'])}"
    if at.get("segments") is not None:
        line += f"; {at['segments']} segments"
    return line


#: how the host line names each kind of host memory
_HOST_KINDS = {
    "optimizer_state": "optimizer state",
    "gradients": "gradients",
    "parameters": "parameters",
    "activations": "activations",
}


def host_line(host: dict[str, Any] | None) -> str | None:
    """The profile's host memory in words (``Profile.host``), or None when the step keeps none.

    ``Host memory`` is never part of the peak: ``48.2 GiB (optimizer state 44.9 GiB,
    ...) · PCIe 30.0 GiB per step``, then the paged (unified-memory) bytes apart.
    """
    if not host:
        return None
    parts = []
    kinds = [
        f"{name} {format_bytes(host['by_kind'][k])}"
        for k, name in _HOST_KINDS.items()
        if host.get("by_kind", {}).get(k)
    ]
    if host.get("bytes"):
        parts.append(format_bytes(host["bytes"], 1) + (f" ({', '.join(kinds)})" if kinds else ""))
    if host.get("pcie_bytes_per_step"):
        parts.append(f"PCIe {format_bytes(host['pcie_bytes_per_step'], 1)} per step")
    if host.get("paged_bytes"):
        parts.append(
            f"paged optimizer state {format_bytes(host['paged_bytes'], 1)} in unified memory "
            "(outside the caching allocator; on the host under memory pressure)"
        )
    return " · ".join(parts) if parts else None


def outside_allocator_line(allocator: dict[str, Any] | None) -> str | None:
    """Memory the step uses outside the caching allocator (paged optimizer state), in words."""
    n = (allocator or {}).get("outside_allocator_bytes")
    if not n:
        return None
    return (
        f"{format_bytes(n, 1)} of paged optimizer state in CUDA unified memory (cudaMallocManaged) is outside "
        "the caching allocator: neither allocated nor reserved counts it"
    )


def non_tensor_line(named: dict[str, Any]) -> str:
    """Every non-tensor byte beside the peak, each named with its assumption."""
    parts = [
        f"cuBLAS workspace {format_bytes(named['cublas_workspace_bytes'])} "
        f"({named.get('cublas_handles', 1)} handle(s) x {named.get('cublas_streams', 1)} compute stream)"
    ]
    if named.get("cudnn_workspace_bytes"):
        parts.append(
            f"cuDNN workspace {format_bytes(named['cudnn_workspace_bytes'])} "
            f"(assumed: {named.get('convolutions', 0)} convolution module(s))"
        )
    if named.get("nccl_buffers_bytes"):
        n = named.get("nccl") or {}
        parts.append(
            f"NCCL buffers {format_bytes(named['nccl_buffers_bytes'])} (assumed: NCCL defaults, "
            f"{n.get('channels')} channels x {n.get('peers')} peer(s))"
        )
    source = str(named.get("cuda_context_source") or "")
    kind = next((k for k in ("estimate", "measured", "given") if source.startswith(k)), "assumed")
    parts.append(f"CUDA context {format_bytes(named['cuda_context_bytes'])} ({kind})")
    return " + ".join(parts) + f" = {format_bytes(named['total_bytes'])}"
