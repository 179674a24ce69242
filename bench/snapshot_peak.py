"""What was live at the allocator's peak in a CUDA memory snapshot, by the op that allocated it.

A snapshot written by ``memprof analyze --engine cuda --snapshot PATH`` (or by
``torch.cuda.memory._dump_snapshot``) holds the allocator's history of the measured
step with the C++ and Python frames of each allocation. This replays the history,
finds the moment the allocated bytes peaked, and groups the blocks live then by the
innermost ATen op in their frames (``at::_ops::NAME``, or ``at::native::NAME``), the
largest first. Blocks allocated before the history began (the weights, the optimizer
state, the cuBLAS workspaces of earlier steps) are not in the history: the total says
how many bytes the history explains.

It is how the first GPU validation found ``_safe_softmax``'s scratch (docs/validation.md):
what the cuda engine reports as ``untracked_at_peak_bytes`` shows up here under the op
that allocated it. ``bash bench/gpu_checks.sh`` writes such snapshots.

Usage::

    .venv/bin/python bench/snapshot_peak.py SNAPSHOT.pickle [--top 15] [--device 0]
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_OP = re.compile(r"at::(?:_ops|native)::(\w+)")


def op_of(frames: Sequence[dict[str, Any]]) -> str:
    """The innermost ATen op in an allocation's frames (the caller of the allocator), else a Python frame."""
    for f in frames:
        m = _OP.search(str(f.get("name", "")))
        if m and m.group(1) not in (
            "empty",
            "empty_strided",
            "empty_generic",
            "empty_cuda",
            "call",
            "redispatch",
        ):
            return m.group(1)
    for f in frames:
        if str(f.get("filename", "")).endswith(".py"):
            return f"{Path(f['filename']).name}:{f.get('line')} {f.get('name')}"
    return "(no frame)"


def peak_blocks(trace: Sequence[dict[str, Any]]) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(the peak's bytes, its index in the trace, the blocks live then: address -> (size, index))."""
    live: dict[int, tuple[int, int]] = {}
    cur = peak = 0
    at = -1
    for i, e in enumerate(trace):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], i)
            cur += e["size"]
            if cur > peak:
                peak, at = cur, i
        elif action == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    live = {}
    for i, e in enumerate(trace[: at + 1]):
        if e.get("action") == "alloc":
            live[e["addr"]] = (e["size"], i)
        elif e.get("action") == "free_completed":
            live.pop(e["addr"], None)
    return peak, at, live


def report(snapshot: dict[str, Any], device: int = 0, top: int = 15) -> str:
    traces = snapshot.get("device_traces") or []
    if device >= len(traces) or not traces[device]:
        return f"no allocator history for device {device} in this snapshot"
    trace = traces[device]
    peak, at, live = peak_blocks(trace)
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, i in live.values():
        key = op_of(trace[i].get("frames") or [])
        by_op[key][0] += size
        by_op[key][1] += 1
    held = sum(s["total_size"] for s in snapshot.get("segments", []))
    lines = [
        f"history: {len(trace)} events; the allocated bytes it explains peak at event {at}: "
        f"{peak:,} bytes ({peak / 2**20:,.1f} MiB) in {len(live)} blocks",
        f"segments at the dump: {held:,} bytes reserved ({held / 2**20:,.1f} MiB)",
        "",
        f"{'op that allocated it':<48} {'MiB':>12} {'blocks':>7}",
    ]
    for key, (size, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{key[:48]:<48} {size / 2**20:>12,.2f} {n:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("snapshot", help="a CUDA memory snapshot pickle")
    ap.add_argument("--top", type=int, default=15, help="ops shown (default 15)")
    ap.add_argument("--device", type=int, default=0, help="the device's history (default 0)")
    args = ap.parse_args(argv)
    try:
        with open(args.snapshot, "rb") as f:
            snapshot = pickle.load(f)  # a file you wrote: a pickle runs code, do not open others'
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        print(f"snapshot_peak: cannot read {args.snapshot}: {e}", file=sys.stderr)
        return 2
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("device_traces", []), list):
        print(
            f"snapshot_peak: {args.snapshot} is not a CUDA memory snapshot (a dict with device_traces)",
            file=sys.stderr,
        )
        return 2
    print(report(snapshot, args.device, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
