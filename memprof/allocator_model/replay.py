"""Replaying a trace through the allocator model, and the ``expandable_segments`` hint read from two replays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from memprof.allocator_model.estimate import AllocatorEstimate
from memprof.allocator_model.model import CachingAllocatorModel
from memprof.allocator_model.settings import ENV_VAR, AllocatorSettings, MiB
from memprof.units import format_bytes


def replay(
    events: Iterable[Any],
    settings: AllocatorSettings | Mapping[str, Any] | None = None,
    *,
    capacity_bytes: int | None = None,
    timeline: bool = False,
    max_points: int = 800,
) -> AllocatorEstimate:
    """Replay an allocation trace through the allocator model.

    Args:
        events: ``(storage, nbytes, alloc)`` items in order (the tracker's
            :class:`~memprof.tracking.TraceEvent` fits): ``alloc`` True allocates
            ``nbytes`` for ``storage``, False frees what ``storage`` holds.
            Zero-byte allocations take no memory (as on CUDA) and are skipped.
            A 5th field is the event's op counter (the timeline's x axis and the
            peaks' ``op``); without it, the event's index.
        settings: the allocator settings (None: PyTorch's defaults).
        capacity_bytes: the memory the allocator may reserve; None: unlimited.
        timeline: also return allocated and reserved over the events
            (``AllocatorEstimate.timeline``); it adds about a sixth to the replay's time.
        max_points: the timeline's bound (see :func:`allocator_timeline`).

    Returns:
        The estimate: peak reserved, peak allocated, fragmentation, segments, the
        state at the peaks, and the timeline when asked.

    Raises:
        InputError: invalid settings or capacity.
    """
    s = settings if isinstance(settings, AllocatorSettings) else AllocatorSettings.from_dict(settings)
    return CachingAllocatorModel(s, capacity_bytes).replay(events, timeline=timeline, max_points=max_points)


#: the reserved peak ...
HINT_MIN_FRACTION = 0.02
#: ... and at least these bytes (below both, the model's error is of the same order)
HINT_MIN_BYTES = 64 * MiB


def expandable_segments_hint(
    baseline: AllocatorEstimate,
    expandable: AllocatorEstimate,
    *,
    measured_reserved_bytes: int | None = None,
) -> dict[str, Any]:
    """Whether ``expandable_segments:True`` would cut the reserved peak of a trace.

    Args:
        baseline: the replay with the settings in effect (without expandable segments).
        expandable: the replay of the same trace with expandable segments on.
        measured_reserved_bytes: the peak reserved a GPU measured for the step (cuda
            engine): the saving is then applied to it and the thresholds compare with it.

    Returns:
        Plain data: ``conf`` (the ``PYTORCH_CUDA_ALLOC_CONF`` value with expandable
        segments), ``peak_reserved_bytes`` (the model's peak with it),
        ``baseline_peak_reserved_bytes`` (the model's peak without it),
        ``saved_bytes`` (their difference; negative: it would reserve more) and
        ``message``: one line when it saves at least :data:`HINT_MIN_FRACTION` of
        the reserved peak and at least :data:`HINT_MIN_BYTES`, else None.
    """

    conf = expandable.conf
    saved = baseline.peak_reserved_bytes - expandable.peak_reserved_bytes
    reference = (
        measured_reserved_bytes if measured_reserved_bytes is not None else baseline.peak_reserved_bytes
    )
    message = None
    if saved >= HINT_MIN_BYTES and saved >= HINT_MIN_FRACTION * reference:
        if measured_reserved_bytes is None:
            message = (
                f"{ENV_VAR}={conf} would reserve {format_bytes(expandable.peak_reserved_bytes)} instead of "
                f"{format_bytes(baseline.peak_reserved_bytes)} (-{format_bytes(saved)}): "
                "the allocator model replays the same allocations"
            )
        else:
            message = (
                f"{ENV_VAR}={conf} would reserve about {format_bytes(reference - saved)} instead of the "
                f"{format_bytes(reference)} measured (-{format_bytes(saved)}): the allocator model "
                "replays this step's allocations with and without it"
            )
    return {
        "conf": conf,
        "peak_reserved_bytes": expandable.peak_reserved_bytes,
        "baseline_peak_reserved_bytes": baseline.peak_reserved_bytes,
        "saved_bytes": saved,
        "message": message,
    }
