"""Caching-allocator snapshots in the format of ``torch.cuda.memory._snapshot()``.

Two directions:

* **model to snapshot** (sim engine): :func:`model_snapshot` replays a trace
  through the allocator model (:mod:`memprof.allocator_model`) and returns the
  snapshot of its state at the end, with the device trace of every action it
  took; :func:`write_snapshot` pickles it as ``torch.cuda.memory._dump_snapshot``
  does, so ``python -m torch.cuda._memory_viz stats|trace|segments FILE`` and
  pytorch.org/memory_viz open it;
* **snapshot to allocator view** (cuda engine): :func:`cuda_allocator_view`
  reads a real GPU's snapshot, taken with the allocator's history recorded over
  the measured step: allocated and reserved over the step, the state at their
  peaks (fragmentation, largest free block, segments) and whether expandable
  segments would help.

The format (PyTorch 2.x), as far as memprof writes and reads it: ``segments``,
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

import bisect
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from memprof.allocator_model import (
    AllocatorEstimate,
    AllocatorSettings,
    CachingAllocatorModel,
    MiB,
    alloc_conf_string,
    allocator_timeline,
    expandable_segments_hint,
    replay,
    round_size,
    settings_from_conf,
)
from memprof.errors import InputError
from memprof.files import write_atomic

#: the file name of the one frame a sim snapshot gives each allocation
SIM_FRAME_FILENAME = "<memprof sim>"
#: pickle protocol of the snapshot files: what torch writes, and the newest
#: memory_viz's JavaScript unpickler reads (2 to 4)
PICKLE_PROTOCOL = 4

_RESERVE = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}
#: the entries that can follow a segment reserved for a request: more of it, or the request
_SERVES = ("segment_alloc", "segment_map", "alloc")


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
        events: the trace, as :func:`memprof.allocator_model.replay` takes it (the
            tracker's :class:`~memprof.tracking.TraceEvent` items: their phase and
            op counter go into the snapshot's frames and ``time_us``).
        settings: the allocator settings (None: PyTorch's defaults).
        capacity_bytes: the memory the allocator may reserve; None: unlimited.
        timeline: also compute ``AllocatorEstimate.timeline``.
        max_points: the timeline's bound.

    Returns:
        The estimate (the same numbers as :func:`~memprof.allocator_model.replay`) and
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

    Written by :func:`memprof.files.write_atomic`, as every output: next to
    ``path`` under a temporary name and renamed over it, so readers see the old
    file or the whole new one; a link's target is replaced, and a device or pipe
    (``/dev/null``) is written in place, never replaced by a file.

    Args:
        snapshot: the snapshot dict.
        path: where to write it (its folder is created).

    Raises:
        InputError: the file cannot be written there.
    """
    data = pickle.dumps(dict(snapshot), protocol=PICKLE_PROTOCOL)  # one that cannot pickle leaves no file
    try:
        write_atomic(os.fspath(path), data)
    except OSError as e:
        raise InputError(f"cannot write the snapshot {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------- snapshot to allocator view
def device_trace(snapshot: Mapping[str, Any], device: int = 0) -> list[dict[str, Any]]:
    """The allocator history of one device in a snapshot (empty without one)."""
    traces = snapshot.get("device_traces") or []
    return list(traces[device]) if 0 <= device < len(traces) else []


class _Layout:
    """Reserved ranges and occupied blocks of one device, walked back from a snapshot's end."""

    def __init__(self, snapshot: Mapping[str, Any], device: int) -> None:
        #: cudaMalloc'd segments: address -> size
        self.segs: dict[int, int] = {}
        #: mapped ranges of expandable segments, [start, end), sorted, adjacent ones merged
        self.mapped: list[list[int]] = []
        #: blocks not free (allocated or waiting for their free): address -> (size, requested)
        self.blocks: dict[int, tuple[int, int]] = {}
        for seg in snapshot.get("segments") or []:
            if seg.get("device", device) != device:
                continue
            addr, size = int(seg["address"]), int(seg["total_size"])
            if seg.get("is_expandable"):
                self.map(addr, addr + size)
            else:
                self.segs[addr] = size
            baddr = addr
            for b in seg.get("blocks") or []:
                a = int(b.get("address", baddr))
                if b.get("state") in ("active_allocated", "active_pending_free"):
                    self.blocks[a] = (int(b["size"]), int(b.get("requested_size", b["size"])))
                baddr = a + int(b["size"])

    def map(self, start: int, end: int) -> None:
        m = self.mapped
        i = bisect.bisect_left(m, [start, start])
        # merge with a range that ends at or after start, before it
        if i > 0 and m[i - 1][1] >= start:
            i -= 1
            start = m[i][0]
        j = i
        while j < len(m) and m[j][0] <= end:
            end = max(end, m[j][1])
            j += 1
        m[i:j] = [[start, end]]

    def unmap(self, start: int, end: int) -> None:
        out: list[list[int]] = []
        for s, e in self.mapped:
            if e <= start or s >= end:
                out.append([s, e])
                continue
            if s < start:
                out.append([s, start])
            if e > end:
                out.append([end, e])
        self.mapped = out

    def undo(self, e: Mapping[str, Any]) -> None:
        """Step back over trace entry ``e``: the state before it."""
        action = e.get("action")
        if action == "alloc":
            self.blocks.pop(int(e["addr"]), None)
        elif action in ("free_requested", "free_completed"):
            size = int(e["size"])
            # the trace has the request only: the block is at least that, rounded
            self.blocks.setdefault(int(e["addr"]), (round_size(size), size))
        elif action == "segment_alloc":
            self.segs.pop(int(e["addr"]), None)
        elif action == "segment_free":
            self.segs[int(e["addr"])] = int(e["size"])
        elif action == "segment_map":
            self.unmap(int(e["addr"]), int(e["addr"]) + int(e["size"]))
        elif action == "segment_unmap":
            self.map(int(e["addr"]), int(e["addr"]) + int(e["size"]))

    def summary(self) -> tuple[int, int, int]:
        """(reserved bytes, segments, largest free block) of the state now."""
        ranges = sorted([(a, a + n) for a, n in self.segs.items()] + [(s, e) for s, e in self.mapped])
        addrs = sorted(self.blocks)
        largest = 0
        for start, end in ranges:
            cur = start
            i = bisect.bisect_left(addrs, start)
            while i < len(addrs) and addrs[i] < end:
                a = addrs[i]
                largest = max(largest, a - cur)
                cur = max(cur, a + self.blocks[a][0])
                i += 1
            largest = max(largest, end - cur)
        return sum(e - s for s, e in ranges), len(ranges), largest


def _walk_back(
    snapshot: Mapping[str, Any], trace: list[dict[str, Any]], device: int, at: Iterable[int]
) -> dict[int, _Layout | tuple[int, int, int]]:
    """The layout summary after each event in ``at`` (-1: the start, kept as a _Layout)."""
    layout = _Layout(snapshot, device)
    wanted = sorted(set(at), reverse=True)
    out: dict[int, _Layout | tuple[int, int, int]] = {}
    i = len(trace) - 1
    for w in wanted:
        while i > w:
            layout.undo(trace[i])
            i -= 1
        out[w] = layout if w < 0 else layout.summary()
    return out


def _series(trace: list[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """Rows (event index, allocated, reserved), relative to the start, of the entries that change them."""
    xs: list[int] = []
    alloc: list[int] = []
    res: list[int] = []
    a = r = 0
    pending: set[int] = set()
    n = len(trace)
    for i, e in enumerate(trace):
        action = e.get("action")
        if action in ("segment_alloc", "segment_map") and i + 1 < n and trace[i + 1].get("action") in _SERVES:
            # reserved for the request that follows: one row once it is served, so the
            # state at a peak is a settled one (as the model's, taken after each malloc)
            r += int(e["size"])
            continue
        if action == "alloc":
            a += round_size(int(e["size"]))
        elif action == "free_requested":
            # memory_allocated drops here; the block stays active until free_completed
            a -= round_size(int(e["size"]))
            pending.add(int(e["addr"]))
        elif action == "free_completed":
            addr = int(e["addr"])
            if addr in pending:
                pending.discard(addr)
                continue
            a -= round_size(int(e["size"]))  # a trace without free_requested entries
        elif action in _RESERVE:
            r += _RESERVE[action] * int(e["size"])
        else:
            continue
        xs.append(i)
        alloc.append(a)
        res.append(r)
    return xs, alloc, res


def replay_events(snapshot: Mapping[str, Any], device: int = 0) -> list[tuple[int, int, bool]]:
    """A GPU's allocations and frees as :func:`memprof.allocator_model.replay` takes them (keyed by address).

    The blocks live when the history starts come first, allocated in address
    order at their requested sizes (their real order is older than the
    history); then the history's allocations and frees (one free per block).

    Args:
        snapshot: a snapshot with the allocator's history recorded.
        device: the device.

    Returns:
        ``(address, nbytes, alloc)`` events.
    """
    trace = device_trace(snapshot, device)
    start = _walk_back(snapshot, trace, device, [-1])[-1]
    assert isinstance(start, _Layout)
    events: list[tuple[int, int, bool]] = [(a, start.blocks[a][1], True) for a in sorted(start.blocks)]
    pending: set[int] = set()
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            events.append((int(e["addr"]), int(e["size"]), True))
        elif action == "free_requested":
            pending.add(int(e["addr"]))
            events.append((int(e["addr"]), 0, False))
        elif action == "free_completed":
            addr = int(e["addr"])
            if addr in pending:
                pending.discard(addr)
            else:
                events.append((addr, 0, False))
    return events


def cuda_allocator_view(
    snapshot: Mapping[str, Any],
    *,
    device: int = 0,
    start_allocated: int | None = None,
    start_reserved: int | None = None,
    conf: str = "",
    measured_reserved_bytes: int | None = None,
    max_points: int = 800,
) -> dict[str, Any]:
    """Allocated and reserved over a GPU step, the state at their peaks, the expandable hint.

    Args:
        snapshot: ``torch.cuda.memory._snapshot()`` taken at the end of the step,
            with the allocator's history recorded from its start.
        device: the device measured.
        start_allocated: ``torch.cuda.memory_allocated`` when the history
            started (None: derived from the snapshot's end state and the history).
        start_reserved: ``torch.cuda.memory_reserved`` then (None: derived likewise).
        conf: the ``PYTORCH_CUDA_ALLOC_CONF`` in effect (the model replays the
            history with its settings, and with expandable segments).
        measured_reserved_bytes: the step's measured peak reserved (the hint's
            saving is applied to it).
        max_points: the timeline's bound.

    Returns:
        Plain data: ``timeline`` (``x`` is ``"event"``: the index of the entry in
        the allocator's history, since a GPU's allocator does not see the
        tracker's op counter; ``event``, ``allocated``, ``reserved``, ``rows``,
        ``peak_allocated_index``, ``peak_reserved_index``), ``at_peak``
        (``allocated`` and ``reserved``: the state when each first reached its
        peak, keys :data:`memprof.allocator_model.AT_PEAK_KEYS`, ``op`` None),
        ``expandable_segments_hint`` (:func:`memprof.allocator_model.expandable_segments_hint`
        of the model replaying the history; None when expandable segments are
        already on or the settings are not understood) and ``notes``.
    """
    trace = device_trace(snapshot, device)
    xs, rel_alloc, rel_res = _series(trace)
    notes = [
        "allocator view: x is the index of the entry in the allocator's history (a GPU's allocator "
        "does not see the tracker's op counter); allocated counts each block at its request rounded "
        "to 512 bytes (the history records requests), so blocks that keep an unsplit remainder "
        "count a little less than memory_allocated"
    ]
    if start_allocated is None or start_reserved is None:
        end_reserved, _, _ = _Layout(snapshot, device).summary()
        end_allocated = sum(
            int(b["size"])
            for seg in snapshot.get("segments") or []
            if seg.get("device", device) == device
            for b in seg.get("blocks") or []
            if b.get("state") == "active_allocated"
        )
        if start_allocated is None:
            start_allocated = end_allocated - (rel_alloc[-1] if rel_alloc else 0)
        if start_reserved is None:
            start_reserved = end_reserved - (rel_res[-1] if rel_res else 0)
    allocated = [start_allocated + a for a in rel_alloc]
    reserved = [start_reserved + r for r in rel_res]
    timeline = allocator_timeline("event", xs, allocated, reserved, max_points=max_points)
    at_peak: dict[str, dict[str, Any] | None] = {"allocated": None, "reserved": None}
    if xs:
        rows = {"allocated": allocated.index(max(allocated)), "reserved": reserved.index(max(reserved))}
        states = _walk_back(snapshot, trace, device, [xs[k] for k in rows.values()])
        for name, k in rows.items():
            summary = states[xs[k]]
            assert isinstance(summary, tuple)
            _, segments, largest = summary
            at_peak[name] = {
                "event": xs[k],
                "op": None,
                "allocated_bytes": allocated[k],
                "reserved_bytes": reserved[k],
                "fragmentation_bytes": reserved[k] - allocated[k],
                "largest_free_block_bytes": largest,
                "segments": segments,
            }
    hint = None
    try:
        settings, ignored = settings_from_conf(conf)
    except InputError as e:
        settings, ignored = None, []
        notes.append(f"no expandable-segments hint: {e}")
    if ignored:
        notes.append(f"the allocator model ignores {', '.join(ignored)} (not modelled)")
    if settings is not None and not settings.expandable_segments and trace:
        events = replay_events(snapshot, device)
        base = replay(events, settings)
        exp = replay(events, replace(settings, expandable_segments=True))
        hint = expandable_segments_hint(base, exp, measured_reserved_bytes=measured_reserved_bytes)
    return {"timeline": timeline, "at_peak": at_peak, "expandable_segments_hint": hint, "notes": notes}
