"""Caching-allocator snapshots in the format of ``torch.cuda.memory._snapshot()``.

:func:`model_snapshot` replays a trace through the allocator model
(:mod:`memprof.allocator`) and returns the snapshot of its state at the end,
with the device trace of every action it took; :func:`write_snapshot` pickles
it as ``torch.cuda.memory._dump_snapshot`` does, so ``python -m
torch.cuda._memory_viz stats|trace|segments FILE`` and pytorch.org/memory_viz
open it (the sim engine's ``--snapshot``).

The format (PyTorch 2.x), as far as memprof writes it: ``segments``,
a list of ``{device, address, total_size, allocated_size, active_size,
requested_size, stream, segment_type ('small'|'large'), segment_pool_id,
is_expandable, frames, blocks}``, each block ``{address, size, requested_size,
state ('active_allocated'|'active_pending_free'|'inactive'), frames}`` in
address order, covering its segment; ``device_traces``, one list per device of
``{action, addr, size, stream, time_us, frames}`` (``action``: alloc,
free_requested, free_completed, segment_alloc, segment_free, segment_map,
segment_unmap, oom (with ``device_free`` instead of ``addr``), snapshot);
``allocator_settings``. A trace entry's ``size`` is the request, not the
block: the allocator records the size asked for.

What a sim snapshot holds: the model's segments and blocks at the end of the
step (their addresses are the model's, so blocks and segments agree); in the
trace, ``time_us`` is the tracker's op counter (ops dispatched so far; the
event's index for traces without one), not microseconds: a simulation has no
clock; a block's or entry's ``frames`` is one synthetic frame
``{filename: "<memprof sim>", line: 0, name: PHASE}`` naming the phase that
allocated it (forward, backward, ...), or empty for tensors that existed before
the first phase (memory_viz then says "allocated before _record_history was
enabled"); a top-level ``memprof`` entry says it is a model.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memprof.allocator import (
    AllocatorEstimate,
    AllocatorSettings,
    CachingAllocatorModel,
    MiB,
    alloc_conf_string,
)
from memprof.errors import InputError

#: the file name of the one frame a sim snapshot gives each allocation
SIM_FRAME_FILENAME = "<memprof sim>"
#: pickle protocol of the snapshot files: what torch writes, and the newest
#: memory_viz's JavaScript unpickler reads (2 to 4)
PICKLE_PROTOCOL = 4


# ---------------------------------------------------------------- model to snapshot
def model_snapshot(
    events: Iterable[Any],
    settings: AllocatorSettings | Mapping[str, Any] | None = None,
    *,
    capacity_bytes: int | None = None,
    timeline: bool = False,
    max_points: int = 800,
) -> tuple[AllocatorEstimate, dict[str, Any]]:
    """Replay a trace through the allocator model, recording what a CUDA snapshot holds.

    Args:
        events: the trace, as :func:`memprof.allocator.replay` takes it (the
            tracker's :class:`~memprof.tracking.TraceEvent` items: their phase and
            op counter go into the snapshot's frames and ``time_us``).
        settings: the allocator settings (None: PyTorch's defaults).
        capacity_bytes: the memory the allocator may reserve; None: unlimited.
        timeline: also compute ``AllocatorEstimate.timeline``.
        max_points: the timeline's bound.

    Returns:
        The estimate (the same numbers as :func:`~memprof.allocator.replay`) and
        the snapshot (plain data; see the module docstring).

    Raises:
        InputError: invalid settings or capacity.
    """
    evs: Sequence[Any] = events if isinstance(events, Sequence) else list(events)
    s = settings if isinstance(settings, AllocatorSettings) else AllocatorSettings.from_dict(settings)
    model = CachingAllocatorModel(s, capacity_bytes)
    model.history = []
    est = model.replay(evs, timeline=timeline, max_points=max_points)
    return est, _snapshot_of(model, evs)


def _snapshot_of(model: CachingAllocatorModel, events: Sequence[Any]) -> dict[str, Any]:
    no_frames: list[dict[str, Any]] = []
    by_phase: dict[Any, list[dict[str, Any]]] = {}

    def frames(i: int) -> list[dict[str, Any]]:
        ev = events[i]
        phase = ev[3] if len(ev) > 3 else None
        if phase is None:
            return no_frames
        f = by_phase.get(phase)
        if f is None:
            # one list per phase, shared: pickle stores it once
            f = by_phase[phase] = [{"filename": SIM_FRAME_FILENAME, "line": 0, "name": str(phase)}]
        return f

    trace: list[dict[str, Any]] = []
    frames_at: dict[int, list[dict[str, Any]]] = {}
    assert model.history is not None
    for action, addr, size, i in model.history:
        ev = events[i]
        t = ev[4] if len(ev) > 4 else i
        fr = frames(i)
        if action == "oom":
            trace.append(
                {"action": "oom", "device_free": addr, "size": size, "stream": 0, "time_us": t, "frames": fr}
            )
            continue
        trace.append({"action": action, "addr": addr, "size": size, "stream": 0, "time_us": t, "frames": fr})
        if action == "alloc":
            frames_at[addr] = fr
    segments = []
    for seg in model.layout():
        blocks = []
        allocated = requested = 0
        for addr, size, req, is_alloc in seg["blocks"]:
            if is_alloc:
                allocated += size
                requested += req
            blocks.append(
                {
                    "address": addr,
                    "size": size,
                    "requested_size": req,
                    "state": "active_allocated" if is_alloc else "inactive",
                    "frames": frames_at.get(addr, no_frames) if is_alloc else no_frames,
                }
            )
        segments.append(
            {
                "device": 0,
                "address": seg["address"],
                "total_size": seg["size"],
                "allocated_size": allocated,
                "active_size": allocated,  # one stream: no block waits for another
                "requested_size": requested,
                "stream": 0,
                "segment_type": "small" if seg["small"] else "large",
                "segment_pool_id": (0, 0),
                "is_expandable": seg["expandable"],
                "frames": no_frames,
                "blocks": blocks,
            }
        )
    s = model.settings
    return {
        "segments": segments,
        "device_traces": [trace],
        "allocator_settings": {
            "PYTORCH_CUDA_ALLOC_CONF": alloc_conf_string(s),
            # torch writes SIZE_MAX (unset) cast to int64: -1
            "max_split_size": s.max_split_size_mb * MiB if s.max_split_size_mb else -1,
            "garbage_collection_threshold": float(s.garbage_collection_threshold),
            "expandable_segments": s.expandable_segments,
        },
        "external_annotations": [],
        "memprof": {
            "source": "model",
            "note": "memprof's model of the CUDA caching allocator replaying the step's allocations; "
            "time_us holds the op counter",
        },
    }


def write_snapshot(snapshot: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Pickle a snapshot as ``torch.cuda.memory._dump_snapshot`` does, atomically.

    The file is written next to ``path`` under a temporary name and renamed
    over it: readers see the old file or the whole new one, never half.

    Args:
        snapshot: the snapshot dict.
        path: where to write it (its folder is created).

    Raises:
        InputError: the file cannot be written there.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as e:
        raise InputError(f"cannot write the snapshot {target}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(dict(snapshot), f, protocol=PICKLE_PROTOCOL)
        # mkstemp makes a private file: give it a normal file's permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise InputError(f"cannot write the snapshot {target}: {e.strerror or e}") from None
        raise
