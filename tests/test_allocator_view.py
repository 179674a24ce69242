"""The allocator view: allocated and reserved over a step, the state at the peaks, the
expandable-segments hint, snapshots in torch's format (written by the model, read from a GPU)."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import pytest
from torch.cuda import _memory_viz

from memprof.allocator_model import (
    AT_PEAK_KEYS,
    HINT_MIN_BYTES,
    AllocatorEstimate,
    MiB,
    allocator_timeline,
    expandable_segments_hint,
    replay,
    settings_from_conf,
)
from memprof.engines import get_engine
from memprof.engines.sim import SimEngine
from memprof.errors import InputError
from memprof.snapshot import (
    SIM_FRAME_FILENAME,
    cuda_allocator_view,
    model_snapshot,
    replay_events,
    write_snapshot,
)
from memprof.units import format_bytes
from tests.conftest import gpu_test, tiny


def hand_trace() -> list[tuple[int, int, bool, str, int]]:
    """Worked by hand from the rules in memprof.allocator_model's docstring (ops are 10 x the index).

    0-2: three 8 MiB requests (large pool, below 10 MiB: 20 MiB segments). The
    first takes a new segment S1 and is split off (12 MiB left, more than 1 MiB);
    the second takes 8 of those 12 (4 MiB left); the third fits in no cached block:
    a new segment S2, split (12 MiB left). Allocated 24 MiB, reserved 40 MiB,
    largest free block 12 MiB, 2 segments: the peak allocated.
    3-5: all freed; each merges with its free neighbours: S1 and S2 whole and free.
    6: 21 MiB: no cached block is that large: its own segment, rounded to 22 MiB,
    not split (1 MiB left, not more than 1 MiB). Allocated 22 MiB, reserved 62 MiB,
    largest free 20 MiB (S1 or S2), 3 segments: the peak reserved.
    """
    rows = [("a", 1, 8), ("a", 2, 8), ("a", 3, 8), ("f", 2, 0), ("f", 1, 0), ("f", 3, 0), ("a", 4, 21)]
    return [
        (k, n * MiB, a == "a", "forward" if i < 3 else "backward", 10 * i) for i, (a, k, n) in enumerate(rows)
    ]


def growing(n: int = 30) -> list[tuple[int, int, bool]]:
    """A tensor growing by 1/3 MiB a step, the old one freed after: each needs a new segment."""
    ev: list[tuple[int, int, bool]] = []
    for i in range(n):
        ev.append((i, int((11 + i / 3) * MiB), True))
        if i:
            ev.append((i - 1, 0, False))
    return ev


def state(event, op, allocated, reserved, largest, segments):
    return dict(zip(AT_PEAK_KEYS, (event, op, allocated, reserved, reserved - allocated, largest, segments)))


# ------------------------------------------------------------ the model's series and peaks
def test_state_at_the_peaks_of_a_hand_worked_trace():
    est = replay(hand_trace(), timeline=True)
    assert (est.peak_allocated_bytes, est.peak_reserved_bytes) == (24 * MiB, 62 * MiB)
    assert est.at_peak["allocated"] == state(2, 20, 24 * MiB, 40 * MiB, 12 * MiB, 2)
    assert est.at_peak["reserved"] == state(6, 60, 22 * MiB, 62 * MiB, 20 * MiB, 3)
    tl = est.timeline
    assert tl["x"] == "op" and tl["op"] == [0, 10, 20, 30, 40, 50, 60] and tl["rows"] == 7
    assert [a // MiB for a in tl["allocated"]] == [8, 16, 24, 16, 8, 0, 22]
    assert [r // MiB for r in tl["reserved"]] == [20, 20, 40, 40, 40, 40, 62]
    assert (tl["peak_allocated_index"], tl["peak_reserved_index"]) == (2, 6)
    # without the op field the x axis is the event's index; without a timeline, none
    plain = replay([ev[:3] for ev in hand_trace()], timeline=True)
    assert plain.timeline["op"] == list(range(7)) and plain.at_peak["reserved"]["op"] == 6
    off = replay(hand_trace())
    assert off.timeline is None and off.at_peak == est.at_peak
    assert replay([]).at_peak == {"allocated": None, "reserved": None}


def test_expandable_segments_count_mapped_ranges():
    est = replay(hand_trace(), {"expandable_segments": True})
    # one large-pool segment grows in 20 MiB pages: 8+8 fit in the first page, the
    # third 8 maps a second; the frees merge back; 21 MiB reuses the 40 MiB mapped
    assert est.at_peak["allocated"] == state(2, 20, 24 * MiB, 40 * MiB, 16 * MiB, 1)
    assert est.peak_reserved_bytes == 40 * MiB and est.segments == 2  # two page mappings


@pytest.mark.parametrize(
    "settings,capacity",
    [
        ({}, None),
        ({"expandable_segments": True}, None),
        ({"max_split_size_mb": 64}, 600 * MiB),
        ({"garbage_collection_threshold": 0.5}, 400 * MiB),
        ({"expandable_segments": True}, 300 * MiB),
    ],
)
def test_segments_and_layout_stay_consistent(settings, capacity):
    # a random mix of sizes and lifetimes, with releases (capacity, GC) and unmapping
    import random

    from memprof.allocator_model import AllocatorSettings, CachingAllocatorModel

    rnd = random.Random(7)
    live: list[int] = []
    ev = []
    for key in range(3000):
        if live and rnd.random() < 0.45:
            ev.append((live.pop(rnd.randrange(len(live))), 0, False))
        else:
            size = rnd.choice([700, 300_000, 3 * MiB, 9 * MiB, 15 * MiB, 70 * MiB]) + rnd.randrange(4096)
            ev.append((key, size, True))
            live.append(key)
    model = CachingAllocatorModel(AllocatorSettings.from_dict(settings), capacity)
    est = model.replay(ev, timeline=True)
    layout = model.layout()
    assert len(layout) == model.live_segments
    assert sum(s["size"] for s in layout) == model.reserved == est.reserved_at_end_bytes
    assert sum(b[1] for s in layout for b in s["blocks"] if b[3]) == model.allocated
    free = [b[1] for s in layout for b in s["blocks"] if not b[3]]
    assert model.largest_free_block() == max(free, default=0)
    for st in est.at_peak.values():
        assert st["largest_free_block_bytes"] <= st["fragmentation_bytes"]


def test_a_long_timeline_is_downsampled_and_keeps_the_peaks():
    ev = growing(600)  # 1199 rows
    est = replay(ev, timeline=True)
    tl = est.timeline
    assert tl["rows"] == len(ev) and len(tl["op"]) <= 800
    assert tl["op"] == sorted(tl["op"]) and tl["op"][0] == 0 and tl["op"][-1] == len(ev) - 1
    assert max(tl["allocated"]) == tl["allocated"][tl["peak_allocated_index"]] == est.peak_allocated_bytes
    assert max(tl["reserved"]) == tl["reserved"][tl["peak_reserved_index"]] == est.peak_reserved_bytes
    assert tl["op"][tl["peak_reserved_index"]] == est.at_peak["reserved"]["op"]
    assert (
        tl["allocated"][-1] == est.allocated_at_end_bytes and tl["reserved"][-1] == est.reserved_at_end_bytes
    )


def test_timeline_function_checks_its_input():
    assert allocator_timeline("op", [], [], [])["peak_allocated_index"] == -1
    with pytest.raises(InputError, match="differ in length"):
        allocator_timeline("op", [1], [], [])
    with pytest.raises(InputError, match="at least 8"):
        allocator_timeline("op", [1], [1], [1], max_points=2)


# ------------------------------------------------------------ the expandable-segments hint
def test_hint_when_expandable_segments_save_memory_and_not_otherwise():
    ev = growing()
    base = replay(ev)
    hint = expandable_segments_hint(base, replay(ev, {"expandable_segments": True}))
    assert hint["saved_bytes"] == hint["baseline_peak_reserved_bytes"] - hint["peak_reserved_bytes"] > 0
    assert hint["saved_bytes"] >= HINT_MIN_BYTES
    assert hint["message"].startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would reserve ")
    assert "the allocator model replays the same allocations" in hint["message"]
    small = [(i, 100_000, True) for i in range(20)]  # one 2 MiB segment either way
    none = expandable_segments_hint(replay(small), replay(small, {"expandable_segments": True}))
    assert none["saved_bytes"] == 0 and none["message"] is None
    # measured on a GPU: the saving applies to what was measured, and 2% of it is the bar
    measured = expandable_segments_hint(
        base, replay(ev, {"expandable_segments": True}), measured_reserved_bytes=10**12
    )
    assert measured["message"] is None  # a few hundred MiB of a terabyte


def test_hint_thresholds():
    def est(reserved: int) -> AllocatorEstimate:
        return AllocatorEstimate(
            settings={}, conf="expandable_segments:True", capacity_bytes=None, peak_reserved_bytes=reserved
        )

    gib = 1024 * MiB
    assert expandable_segments_hint(est(10 * gib), est(10 * gib - 63 * MiB))["message"] is None  # < 64 MiB
    assert expandable_segments_hint(est(10 * gib), est(10 * gib - 64 * MiB))["message"] is None  # < 2%
    assert expandable_segments_hint(est(10 * gib), est(9 * gib))["message"] == (
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would reserve 9.0 GiB instead of 10.0 GiB "
        "(-1.0 GiB): the allocator model replays the same allocations"
    )


def test_conf_strings_are_parsed():
    s, ignored = settings_from_conf(
        "expandable_segments:True, max_split_size_mb:128,roundup_power2_divisions:4"
    )
    assert (s.expandable_segments, s.max_split_size_mb, ignored) == (True, 128, ["roundup_power2_divisions"])
    assert settings_from_conf("")[0].is_default
    with pytest.raises(InputError):
        settings_from_conf("max_split_size_mb:big")
    with pytest.raises(InputError):
        settings_from_conf("max_split_size_mb:10")  # PyTorch requires more than 20


# ------------------------------------------------------------ the model's snapshot
def _check_consistent(snap: dict, est: AllocatorEstimate) -> None:
    segs = snap["segments"]
    assert sum(s["total_size"] for s in segs) == est.reserved_at_end_bytes
    assert sum(s["allocated_size"] for s in segs) == est.allocated_at_end_bytes
    for s in segs:
        addr = s["address"]
        for b in s["blocks"]:
            assert b["address"] == addr  # blocks tile their segment, in order
            addr += b["size"]
        assert addr == s["address"] + s["total_size"]
    # memory_viz's own accounting check (it raises on a mismatch)
    _memory_viz.segsum(snap)


def test_model_snapshot_of_a_hand_worked_trace():
    est, snap = model_snapshot(hand_trace(), timeline=True)
    assert est.to_dict() == replay(hand_trace(), timeline=True).to_dict()  # recording changes nothing
    _check_consistent(snap, est)
    trace = snap["device_traces"][0]
    assert [e["action"] for e in trace] == [
        "segment_alloc", "alloc", "alloc", "segment_alloc", "alloc",
        "free_requested", "free_completed", "free_requested", "free_completed",
        "free_requested", "free_completed", "segment_alloc", "alloc",
    ]  # fmt: skip
    assert [e["time_us"] for e in trace if e["action"] == "alloc"] == [0, 10, 20, 60]  # the op counter
    assert trace[1]["frames"] == [{"filename": SIM_FRAME_FILENAME, "line": 0, "name": "forward"}]
    s1, s2 = trace[0]["addr"], trace[3]["addr"]
    assert [(e["addr"] - s1, e["size"]) for e in trace[1:3]] == [(0, 8 * MiB), (8 * MiB, 8 * MiB)]
    assert trace[4]["addr"] == s2
    # at the end: S1 and S2 free, the 22 MiB segment holding the 21 MiB request
    assert [(s["total_size"] // MiB, s["allocated_size"] // MiB) for s in snap["segments"]] == [
        (20, 0),
        (20, 0),
        (22, 22),
    ]
    last = snap["segments"][-1]["blocks"]
    assert [(b["state"], b["requested_size"]) for b in last] == [("active_allocated", 21 * MiB)]
    assert last[0]["frames"][0]["name"] == "backward"


def test_model_snapshot_with_expandable_segments_and_out_of_memory():
    settings = {"expandable_segments": True}
    est, snap = model_snapshot(growing(), settings)
    _check_consistent(snap, est)
    actions = {e["action"] for e in snap["device_traces"][0]}
    assert "segment_map" in actions and "segment_alloc" not in actions
    assert all(s["is_expandable"] for s in snap["segments"]) and len(snap["segments"]) == 1
    # a capacity too small: the out-of-memory is in the trace (and the allocation goes on)
    est, snap = model_snapshot(growing(), capacity_bytes=20 * MiB)
    assert est.ooms > 0
    ooms = [e for e in snap["device_traces"][0] if e["action"] == "oom"]
    assert len(ooms) == est.ooms and all("device_free" in e and "addr" not in e for e in ooms)
    assert "raise OutOfMemoryError" in _memory_viz.trace(snap)
    _check_consistent(snap, est)


def test_memory_viz_reads_the_written_snapshot(tmp_path):
    est, snap = model_snapshot(growing())
    path = tmp_path / "sub" / "sim.pickle"
    write_snapshot(snap, path)
    assert [p.name for p in path.parent.iterdir()] == ["sim.pickle"]  # no temporary left
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x04"  # protocol 4: memory_viz's JavaScript reads 2 to 4
    # the command line on the file (one subprocess: each imports torch, seconds), and the
    # trace command's function on what pickle reads back
    r = subprocess.run(
        [sys.executable, "-m", "torch.cuda._memory_viz", "stats", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    with open(path, "rb") as f:
        out = {"stats": r.stdout, "trace": _memory_viz.trace(pickle.load(f))}
    fmt = _memory_viz._format_size
    assert f"segments: {len(snap['segments'])}\n" in out["stats"]
    assert f"total_reserved: {fmt(est.reserved_at_end_bytes)}\n" in out["stats"]
    assert f"total_allocated: {fmt(est.allocated_at_end_bytes)}\n" in out["stats"]
    trace = snap["device_traces"][0]
    assert f"\n{len(trace)} entries\n" in out["trace"]
    assert out["trace"].count("= cudaMalloc(") == est.segments
    assert len(re.findall(r"^del ", out["trace"], flags=re.M)) == sum(
        e["action"] == "free_requested" for e in trace
    )


def test_snapshot_writes_are_atomic(tmp_path):
    path = tmp_path / "snap.pickle"
    path.write_bytes(b"old")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        write_snapshot({"segments": [], "bad": Unpicklable()}, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["snap.pickle"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write the snapshot"):
        write_snapshot({}, blocker / "snap.pickle")


# ------------------------------------------------------------ the sim engine
def test_sim_run_writes_a_snapshot_and_the_allocator_view(tmp_path):
    import memprof

    path = tmp_path / "llama.pickle"
    p = memprof.api.analyze(tiny("llama"), engine="sim", batch_size=2, seq_len=64, snapshot=str(path))
    a = p.allocator
    with open(path, "rb") as f:
        snap = pickle.load(f)
    fmt = _memory_viz._format_size
    stats = _memory_viz.segsum(snap)
    assert f"total_reserved: {fmt(a['reserved_at_end_bytes'])}\n" in stats
    assert f"total_allocated: {fmt(a['allocated_at_end_bytes'])}\n" in stats
    assert sum(s["total_size"] for s in snap["segments"]) == a["reserved_at_end_bytes"]
    tl = a["timeline"]
    assert tl["x"] == "op" and max(tl["reserved"]) == a["peak_reserved_bytes"] == p.peak_reserved_bytes
    assert max(tl["allocated"]) == a["peak_allocated_bytes"]
    assert 0 < tl["op"][-1] <= p.timeline["ops"]  # the tracker's op counter
    for name in ("allocated", "reserved"):
        st = a["at_peak"][name]
        assert set(st) == set(AT_PEAK_KEYS)
        assert (
            st["fragmentation_bytes"]
            == st["reserved_bytes"] - st["allocated_bytes"]
            >= st["largest_free_block_bytes"]
        )
    assert a["at_peak"]["allocated"]["allocated_bytes"] == a["peak_allocated_bytes"]
    assert a["at_peak"]["reserved"]["reserved_bytes"] == a["peak_reserved_bytes"]
    hint = a["expandable_segments_hint"]
    assert hint["conf"] == "expandable_segments:True" and hint["message"] is None  # a few MiB: no hint
    assert any("allocator snapshot of the model written to" in n for n in p.notes)
    assert {e["time_us"] for e in snap["device_traces"][0]} <= set(range(p.timeline["ops"] + 1))


def test_sim_engine_reports_the_allocator_view():
    from memprof.models import resolve
    from memprof.profile import Profile
    from memprof.workload import StepSetup, Workload

    eng = SimEngine()
    p = eng.run(resolve(tiny("llama")), StepSetup.of(Workload(batch_size=2, seq_len=16)))
    a = p.allocator
    tl = a["timeline"]
    assert tl["x"] == "op" and max(tl["reserved"]) == a["peak_reserved_bytes"] == p.peak_reserved_bytes
    assert tl["op"][tl["peak_allocated_index"]] == a["at_peak"]["allocated"]["op"]
    hint = a["expandable_segments_hint"]
    assert hint["conf"] == "expandable_segments:True" and hint["message"] is None  # a few MiB: no hint
    assert hint["baseline_peak_reserved_bytes"] == a["peak_reserved_bytes"]
    assert hint["peak_reserved_bytes"] == eng.expandable_estimate.peak_reserved_bytes
    assert Profile.from_json(p.to_json()).allocator == a  # plain data


def test_sim_hint_is_none_when_expandable_segments_are_on():
    from memprof import optimizations
    from memprof.models import resolve
    from memprof.workload import StepSetup, Workload

    setup = StepSetup.of(Workload(mode="infer", batch_size=1, seq_len=8))
    optimizations.make("allocator").apply(setup)
    eng = SimEngine()
    p = eng.run(resolve(tiny("llama")), setup)
    assert p.allocator["expandable_segments_hint"] is None
    assert eng.expandable_estimate is not None
    assert eng.expandable_estimate.peak_reserved_bytes == p.allocator["peak_reserved_bytes"]


def test_get_engine_snapshot_for_sim_and_cuda_only(tmp_path):
    eng = get_engine("sim", snapshot=str(tmp_path / "s.pickle"))
    assert isinstance(eng, SimEngine) and eng.snapshot_path == str(tmp_path / "s.pickle")
    with pytest.raises(InputError, match="--snapshot needs the cuda or sim engine"):
        get_engine("cpu", snapshot="x.pickle")


# ------------------------------------------------------------ a GPU's snapshot
A, B = 0x7F0000000000, 0x7F0002000000  # two segments' addresses


def cuda_snapshot() -> dict:
    """A GPU's snapshot, made by hand (the allocator's rules followed, one stream).

    Before the history: segment A (20 MiB) holds a 4 MiB parameter P.
    0: X (8 MiB, requested 100 bytes less) is split off A's free 16 MiB;
    1-2: Y (9 MiB) fits no cached block: a new segment B, Y split off it;
    3-4: X freed (requested, then completed): A has 16 MiB free after P;
    5: Z (12 MiB) takes A's free 16 MiB (best fit), split: allocated 4+9+12 = 25 MiB,
       reserved 40 MiB, largest free block B's 11 MiB: the peak allocated;
    6-7: Y freed; 8: B released (empty_cache). At the end: A with P, Z and 4 MiB free.
    The peak reserved is first reached when Y is served (2): allocated 21 MiB,
    largest free block B's 11 MiB.
    """

    def e(action, addr, size):
        return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0, "frames": []}

    trace = [
        e("alloc", A + 4 * MiB, 8 * MiB - 100),
        e("segment_alloc", B, 20 * MiB),
        e("alloc", B, 9 * MiB),
        e("free_requested", A + 4 * MiB, 8 * MiB - 100),
        e("free_completed", A + 4 * MiB, 8 * MiB - 100),
        e("alloc", A + 4 * MiB, 12 * MiB),
        e("free_requested", B, 9 * MiB),
        e("free_completed", B, 9 * MiB),
        e("segment_free", B, 20 * MiB),
        {"action": "snapshot", "addr": 0, "size": 0, "stream": 0, "time_us": 0, "frames": []},
    ]

    def block(addr, size, state):
        return {
            "address": addr,
            "size": size,
            "requested_size": size if state != "inactive" else 0,
            "state": state,
            "frames": [],
        }

    seg = {
        "device": 0, "address": A, "total_size": 20 * MiB, "allocated_size": 16 * MiB, "active_size": 16 * MiB,
        "requested_size": 16 * MiB, "stream": 0, "segment_type": "large", "segment_pool_id": (0, 0),
        "is_expandable": False, "frames": [],
        "blocks": [block(A, 4 * MiB, "active_allocated"), block(A + 4 * MiB, 12 * MiB, "active_allocated"),
                   block(A + 16 * MiB, 4 * MiB, "inactive")],
    }  # fmt: skip
    return {"segments": [seg], "device_traces": [trace], "allocator_settings": {}}


def test_cuda_view_of_a_hand_made_snapshot():
    snap = cuda_snapshot()
    view = cuda_allocator_view(snap, start_allocated=4 * MiB, start_reserved=20 * MiB)
    tl = view["timeline"]
    # a segment and the request it is for are one row; free_completed after free_requested changes nothing
    assert tl["x"] == "event" and tl["event"] == [0, 2, 3, 5, 6, 8]
    assert [a // MiB for a in tl["allocated"]] == [12, 21, 13, 25, 16, 16]
    assert [r // MiB for r in tl["reserved"]] == [20, 40, 40, 40, 40, 20]
    assert view["at_peak"]["allocated"] == state(5, None, 25 * MiB, 40 * MiB, 11 * MiB, 2)
    assert view["at_peak"]["reserved"] == state(2, None, 21 * MiB, 40 * MiB, 11 * MiB, 2)
    # the start derived from the end and the history: the same
    derived = cuda_allocator_view(snap)
    assert derived["timeline"] == tl and derived["at_peak"] == view["at_peak"]
    # the model replays what lived before the history first, then the history
    assert replay_events(snap) == [
        (A, 4 * MiB, True), (A + 4 * MiB, 8 * MiB - 100, True), (B, 9 * MiB, True), (A + 4 * MiB, 0, False),
        (A + 4 * MiB, 12 * MiB, True), (B, 0, False),
    ]  # fmt: skip
    hint = view["expandable_segments_hint"]
    assert hint["baseline_peak_reserved_bytes"] == 40 * MiB and hint["message"] is None
    assert "x is the index of the entry" in view["notes"][0]
    # already on, or settings not understood: no hint
    assert cuda_allocator_view(snap, conf="expandable_segments:True")["expandable_segments_hint"] is None
    bad = cuda_allocator_view(snap, conf="max_split_size_mb:x")
    assert bad["expandable_segments_hint"] is None and "no expandable-segments hint" in bad["notes"][-1]


def test_cuda_view_of_expandable_segments():
    E = 0x7E0000000000

    def e(action, addr, size):
        return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0, "frames": []}

    trace = [
        e("segment_map", E, 20 * MiB),
        e("alloc", E, 15 * MiB),
        e("segment_map", E + 20 * MiB, 20 * MiB),
        e("alloc", E + 15 * MiB, 18 * MiB),
        e("free_requested", E, 15 * MiB),
        e("free_completed", E, 15 * MiB),
    ]
    blocks = [(E, 15, "inactive"), (E + 15 * MiB, 18, "active_allocated"), (E + 33 * MiB, 7, "inactive")]
    seg = {
        "device": 0, "address": E, "total_size": 40 * MiB, "is_expandable": True, "stream": 0,
        "blocks": [{"address": a, "size": n * MiB, "requested_size": n * MiB, "state": s} for a, n, s in blocks],
    }  # fmt: skip
    view = cuda_allocator_view({"segments": [seg], "device_traces": [trace]})
    # the two mappings are one range: one segment
    assert view["at_peak"]["allocated"] == state(3, None, 33 * MiB, 40 * MiB, 7 * MiB, 1)
    assert view["at_peak"]["reserved"] == state(3, None, 33 * MiB, 40 * MiB, 7 * MiB, 1)
    assert view["timeline"]["reserved"][0] == 20 * MiB  # derived: nothing reserved before


def test_cuda_view_agrees_with_the_model_on_its_own_snapshot():
    # the model's snapshot read back as a GPU's: the same peaks and states
    est, snap = model_snapshot(hand_trace())
    view = cuda_allocator_view(snap, start_allocated=0, start_reserved=0)
    for name in ("allocated", "reserved"):
        got, want = dict(view["at_peak"][name]), dict(est.at_peak[name])
        for k in ("event", "op"):
            del got[k], want[k]
        if name == "reserved":
            # the 21 MiB request keeps its 22 MiB segment whole; a GPU's history records
            # the request only: the view counts the block 1 MiB short (documented)
            assert got["allocated_bytes"] == want["allocated_bytes"] - MiB
            got["allocated_bytes"] += MiB
            got["fragmentation_bytes"] -= MiB
        assert got == want
    assert max(view["timeline"]["reserved"]) == est.peak_reserved_bytes
    # replayed from the snapshot (keyed by address), the model finds the same again
    assert replay(replay_events(snap)).peak_reserved_bytes == est.peak_reserved_bytes


def test_cuda_view_hint_applies_the_saving_to_the_measured_peak():
    # growing tensors on a "GPU" (the model's snapshot): expandable segments would save a lot
    est, snap = model_snapshot(growing())
    measured = est.peak_reserved_bytes + 10 * MiB  # say the GPU reserved a little more
    hint = cuda_allocator_view(snap, measured_reserved_bytes=measured)["expandable_segments_hint"]
    exp = replay(growing(), {"expandable_segments": True})
    assert hint["baseline_peak_reserved_bytes"] == est.peak_reserved_bytes
    assert hint["peak_reserved_bytes"] == exp.peak_reserved_bytes
    saved = est.peak_reserved_bytes - exp.peak_reserved_bytes
    assert hint["message"].startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would reserve about ")
    assert (
        f"(-{format_bytes(saved)})" in hint["message"]
        and f"{format_bytes(measured)} measured" in hint["message"]
    )


@pytest.mark.parametrize("snapshot", [False, True])
def test_cuda_engine_plumbing_without_a_gpu(monkeypatch, tmp_path, snapshot):
    # the cuda engine's calls around the measured step, with torch.cuda faked (no GPU here)
    import torch

    from memprof.engines import cuda as cuda_mod

    snap = cuda_snapshot()
    calls: list[dict] = []

    def record(**kwargs):
        if "clear_history" in kwargs and len(calls) == 0:
            calls.append({"refused": kwargs})
            raise TypeError("older PyTorch: no clear_history")
        calls.append(kwargs)

    fake = {
        "is_available": lambda: True,
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 4 * MiB,
        "memory_reserved": lambda *a: 20 * MiB,
        "max_memory_allocated": lambda *a: 25 * MiB,
        "max_memory_reserved": lambda *a: 40 * MiB,
        "memory_stats": lambda *a: {},
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a, **k: snap)
    monkeypatch.setattr(cuda_mod, "nvml_snapshot", lambda index: None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    path = tmp_path / "gpu.pickle"
    eng = cuda_mod.CudaEngine(index=0, snapshot_path=str(path) if snapshot else None)
    eng.before_measure()
    extra: dict = {}
    eng.after_measure(extra)
    # no clear_history on this "PyTorch": asked again without it; stacks only for --snapshot
    assert "refused" in calls[0] and "clear_history" not in calls[1]
    assert calls[1]["enabled"] == "all" and ("context" not in calls[1]) == snapshot
    assert calls[1]["max_entries"] == (
        cuda_mod.SNAPSHOT_HISTORY_ENTRIES if snapshot else cuda_mod.HISTORY_ENTRIES
    )
    assert calls[-1] == {"enabled": None}  # recording stopped after the snapshot
    a = extra["allocator"]
    assert a["source"] == "measured" and a["peak_reserved_bytes"] == 40 * MiB
    assert a["timeline"]["x"] == "event" and [r // MiB for r in a["timeline"]["reserved"]] == [
        20,
        40,
        40,
        40,
        40,
        20,
    ]
    assert a["at_peak"]["allocated"] == state(5, None, 25 * MiB, 40 * MiB, 11 * MiB, 2)
    assert a["expandable_segments_hint"]["baseline_peak_reserved_bytes"] == 40 * MiB
    assert path.exists() == snapshot
    if snapshot:
        with open(path, "rb") as f:
            assert pickle.load(f) == snap


@gpu_test()
def test_cuda_engine_reports_the_allocator_view(tmp_path):
    from memprof.engines.cuda import CudaEngine
    from memprof.models import resolve
    from memprof.workload import StepSetup, Workload

    path = tmp_path / "gpu.pickle"
    wl = Workload(batch_size=4, seq_len=64)
    for eng in (CudaEngine(), CudaEngine(snapshot_path=str(path))):
        p = eng.run(resolve(tiny("llama")), StepSetup.of(wl))
        a = p.allocator
        tl = a["timeline"]
        assert tl["x"] == "event" and tl["rows"] > 0
        # reserved is exact (segment events); allocated counts requests rounded to 512 bytes
        assert max(tl["reserved"]) == a["peak_reserved_bytes"]
        assert 0.9 * a["peak_allocated_bytes"] <= max(tl["allocated"]) <= a["peak_allocated_bytes"]
        for name in ("allocated", "reserved"):
            st = a["at_peak"][name]
            assert st["fragmentation_bytes"] == st["reserved_bytes"] - st["allocated_bytes"]
            assert st["segments"] >= 1 and 0 <= st["largest_free_block_bytes"] <= st["reserved_bytes"]
        hint = a["expandable_segments_hint"]
        assert hint is not None and hint["conf"] == "expandable_segments:True"
    with open(path, "rb") as f:
        snap = pickle.load(f)
    _memory_viz.segsum(snap)
    assert any(e["frames"] for e in snap["device_traces"][0])  # --snapshot keeps the stacks
