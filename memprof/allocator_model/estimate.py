"""What a replay finds (:class:`AllocatorEstimate`), the state at the peaks, and the downsampled timeline."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.errors import InputError


@dataclass
class AllocatorEstimate:
    """What the allocator model found for a trace (plain data; bytes are integers)."""

    settings: dict[str, Any]
    #: the PYTORCH_CUDA_ALLOC_CONF value of the settings
    conf: str
    #: the memory the allocator could use (None: unlimited; no GC, no OOM retries)
    capacity_bytes: int | None
    #: highest reserved memory (torch.cuda.max_memory_reserved)
    peak_reserved_bytes: int = 0
    #: highest allocated memory, whole blocks (torch.cuda.max_memory_allocated)
    peak_allocated_bytes: int = 0
    #: highest sum of the requests, each rounded to 512 bytes (the tracker's peak)
    peak_requested_bytes: int = 0
    #: peak reserved minus peak allocated: what the cache holds beyond the tensors
    fragmentation_bytes: int = 0
    #: segments allocated (cudaMalloc calls; page mappings with expandable segments)
    segments: int = 0
    #: segments released (cudaFree or unmap calls: garbage collection, OOM retries)
    segments_released: int = 0
    reserved_at_end_bytes: int = 0
    allocated_at_end_bytes: int = 0
    #: allocations retried after releasing the whole cache (num_alloc_retries)
    alloc_retries: int = 0
    #: allocations that did not fit in the capacity even after the retries
    ooms: int = 0
    notes: list[str] = field(default_factory=list)
    #: allocated and reserved over the trace, downsampled (:func:`allocator_timeline`;
    #: ``x`` is ``"op"``); None unless the replay was asked for it
    timeline: dict[str, Any] | None = None
    #: the allocator's state when allocated first reached its peak (``"allocated"``) and
    #: when reserved did (``"reserved"``): see :data:`AT_PEAK_KEYS`; None: nothing allocated
    at_peak: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: {"allocated": None, "reserved": None}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the keys of each state in ``AllocatorEstimate.at_peak``
AT_PEAK_KEYS = (
    # the event's index in the trace, and its op counter (None where there is none)
    "event",
    "op",
    "allocated_bytes",
    "reserved_bytes",
    # reserved minus allocated at that moment: what the cache holds beyond the blocks
    "fragmentation_bytes",
    # the largest cached free block: the largest request the cache could serve
    # without reserving more (in a segment of the right pool)
    "largest_free_block_bytes",
    # segments reserved (expandable segments: contiguous mapped ranges)
    "segments",
)


def _state_dict(state: tuple[int, ...] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    event, op, allocated, reserved, largest, segments = state
    return dict(zip(AT_PEAK_KEYS, (event, op, allocated, reserved, reserved - allocated, largest, segments)))


def allocator_timeline(
    x_name: str, x: list[int], allocated: list[int], reserved: list[int], *, max_points: int = 800
) -> dict[str, Any]:
    """Allocated and reserved bytes over a trace, downsampled so that the peaks survive.

    As :meth:`memprof.tracking.Tracker.timeline`: past ``max_points`` rows, the
    rows are cut into buckets of consecutive rows and each bucket keeps the rows
    of its lowest and highest allocated and of its lowest and highest reserved
    (the first of equal ones), in order; the first and last rows are kept too.

    Args:
        x_name: what ``x`` counts (``"op"``: the tracker's op counter; ``"event"``:
            the index of the event in a CUDA snapshot's trace).
        x: the x value of each row.
        allocated: allocated bytes after each row's event.
        reserved: reserved bytes after each row's event.
        max_points: at most this many points are kept.

    Returns:
        Plain data: ``x`` (``x_name``), ``x_name`` (the x values kept),
        ``allocated``, ``reserved``, ``rows`` (before downsampling),
        ``peak_allocated_index`` and ``peak_reserved_index`` (the points of the
        first highest values; -1 without rows).

    Raises:
        InputError: the lists differ in length, or ``max_points`` is below 8.
    """
    n = len(x)
    if len(allocated) != n or len(reserved) != n:
        raise InputError(f"timeline lists differ in length: {n}, {len(allocated)}, {len(reserved)}")
    if max_points < 8:
        raise InputError(f"a timeline needs at least 8 points, got max_points={max_points}")
    # the first row of each peak: found from the buckets' own maxima (no extra pass)
    peak_a = peak_r = -1
    if n <= max_points:
        keep = list(range(n))
        if n:
            peak_a, peak_r = allocated.index(max(allocated)), reserved.index(max(reserved))
    else:
        buckets = (max_points - 2) // 4
        picked = {0, n - 1}
        best_a = best_r = -1
        for b in range(buckets):
            lo, hi = b * n // buckets, (b + 1) * n // buckets
            if lo >= hi:
                continue
            # slices, min, max and index run in C: a 100k-row trace takes milliseconds
            a, r = allocated[lo:hi], reserved[lo:hi]
            a_max, r_max = max(a), max(r)
            i_a, i_r = lo + a.index(a_max), lo + r.index(r_max)
            picked.update((lo + a.index(min(a)), i_a, lo + r.index(min(r)), i_r))
            if a_max > best_a:
                best_a, peak_a = a_max, i_a
            if r_max > best_r:
                best_r, peak_r = r_max, i_r
        keep = sorted(picked)
    return {
        "x": x_name,
        x_name: [x[i] for i in keep],
        "allocated": [allocated[i] for i in keep],
        "reserved": [reserved[i] for i in keep],
        "rows": n,
        "peak_allocated_index": bisect.bisect_left(keep, peak_a) if n else -1,
        "peak_reserved_index": bisect.bisect_left(keep, peak_r) if n else -1,
    }


#: expandable segments are suggested when they would save at least this fraction of
