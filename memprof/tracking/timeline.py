"""The tracker's memory timeline: rows recorded per change of the live set, downsampled for display."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memprof.tracking.results import CATEGORIES


def downsample(
    tl: list[int],
    spans: Sequence[Sequence[Any]],
    mod_names: Sequence[str],
    track_modules: bool,
    ops: int,
    max_points: int = 800,
) -> dict[str, Any]:
    """The recorded rows as :meth:`memprof.tracking.Tracker.timeline` returns them.

    Args:
        tl: the flat rows: op counter, running module (index into ``mod_names``,
            -1: none), the bytes of each category.
        spans: the phase spans, ``[name, start op, end op]`` each, in order.
        mod_names: the tracker's module names, by index.
        track_modules: whether the modules were tracked (else ``module`` is -1 throughout).
        ops: ops dispatched in the region.
        max_points: the bound past which rows are bucketed (see the method).
    """
    width = 9
    n = len(tl) // width
    totals = [sum(tl[i * width + 2 : i * width + width]) for i in range(n)]
    if n <= max_points:
        keep = list(range(n))
    else:
        buckets = max(1, max_points // 2)
        keep = []
        for b in range(buckets):
            lo, hi = b * n // buckets, (b + 1) * n // buckets
            if lo >= hi:
                continue
            seg = range(lo, hi)
            i_min = min(seg, key=totals.__getitem__)
            i_max = max(seg, key=totals.__getitem__)
            keep.extend(sorted({i_min, i_max}))
    used: dict[int, int] = {}
    mods: list[int] = []
    for i in keep:
        m = tl[i * width + 1]
        if m >= 0 and track_modules and m < len(mod_names):
            mods.append(used.setdefault(m, len(used)))
        else:
            mods.append(-1)
    peak_index = max(range(len(keep)), key=lambda k: totals[keep[k]]) if keep else -1
    return {
        "x": "op",
        "op": [tl[i * width] for i in keep],
        "categories": {c: [tl[i * width + 2 + j] for i in keep] for j, c in enumerate(CATEGORIES)},
        "module": mods,
        "modules": [mod_names[m] for m in used],
        "phases": [{"name": nm, "start": a, "end": b} for nm, a, b in spans],
        "ops": ops,
        "rows": n,
        "peak_index": peak_index,
    }
