"""The caching-allocator model against hand-worked traces, the sim engine's estimate, the optimization."""

from __future__ import annotations

import json

import pytest
import torch

from memprof import optimizations
from memprof.allocator_model import (
    ENV_VAR,
    GENERIC_ENV_VAR,
    AllocatorSettings,
    CachingAllocatorModel,
    MiB,
    alloc_conf_string,
    replay,
    round_size,
    segment_size,
)
from memprof.apply import environment, readme
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.child import _raise_from_child, apply_env_updates, child_env_updates, run_in_child
from memprof.errors import InputError, MemprofError, OutOfMemory
from memprof.models import resolve
from memprof.profile import Profile
from memprof.recipes import from_names
from memprof.tracking import Tracker
from memprof.workload import StepSetup, Workload
from tests.conftest import gpu_test, tiny


def trace(*ops: tuple[str, int] | tuple[str, int, int]) -> list[tuple[int, int, bool]]:
    """("a", key, nbytes) allocates, ("f", key) frees."""
    out = []
    for op in ops:
        if op[0] == "a":
            out.append((op[1], op[2], True))  # type: ignore[misc]
        else:
            out.append((op[1], 0, False))
    return out


def growing(n: int = 30, start_mb: float = 11, step_mb: float = 1 / 3) -> list[tuple[int, int, bool]]:
    """A tensor that grows a little each step, the previous one freed after the next exists.

    Each size needs its own segment (>= 10 MiB) and the freed ones are a little
    too small for the next: the caching allocator's classic fragmentation.
    """
    ev: list[tuple[int, int, bool]] = []
    for i in range(n):
        ev.append((i, int((start_mb + i * step_mb) * MiB), True))
        if i:
            ev.append((i - 1, 0, False))
    return ev


# ------------------------------------------------------------ the basic rules
def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(MiB) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == 20 * MiB  # large, below 10 MiB: 20 MiB segments
    assert segment_size(10 * MiB) == 10 * MiB  # from 10 MiB: own segment, 2 MiB multiple
    assert segment_size(11 * MiB) == 12 * MiB


def test_small_allocations_pack_into_one_2mib_segment():
    n = 2 * MiB // round_size(100_000)  # 20 blocks of 98 KiB fit in 2 MiB
    est = replay([(i, 100_000, True) for i in range(n)])
    assert (est.segments, est.peak_reserved_bytes) == (1, 2 * MiB)
    assert est.peak_allocated_bytes == est.peak_requested_bytes == n * round_size(100_000)
    est = replay([(i, 100_000, True) for i in range(n + 1)])
    assert (est.segments, est.peak_reserved_bytes) == (2, 4 * MiB)


def test_a_freed_block_is_reused_and_split():
    # 3 MiB, freed, then 4 MiB: the cached 20 MiB segment serves it, split
    est = replay(trace(("a", 1, 3 * MiB), ("f", 1), ("a", 2, 4 * MiB)))
    assert (est.segments, est.peak_reserved_bytes) == (1, 20 * MiB)
    assert est.peak_allocated_bytes == 4 * MiB  # split: the block is the request
    # three 7 MiB requests: two fit in one 20 MiB segment, the third needs another
    est = replay(trace(("a", 1, 7 * MiB), ("a", 2, 7 * MiB), ("a", 3, 7 * MiB)))
    assert (est.segments, est.peak_reserved_bytes) == (2, 40 * MiB)


def test_large_pool_keeps_remainders_of_1mib_or_less_in_the_block():
    est = replay(trace(("a", 1, 19 * MiB + MiB // 2)))
    assert est.peak_reserved_bytes == 20 * MiB
    assert est.peak_allocated_bytes == 20 * MiB  # the 0.5 MiB rest is not split off
    assert est.peak_requested_bytes == 19 * MiB + MiB // 2
    assert est.fragmentation_bytes == 0


def test_freed_neighbours_merge():
    fill = [("a", i, 4 * MiB) for i in range(5)]  # five 4 MiB blocks fill a 20 MiB segment
    est = replay(trace(*fill, ("f", 0), ("f", 1), ("a", 9, 7 * MiB)))
    assert est.segments == 1  # the two freed neighbours merged into 8 MiB
    est = replay(trace(*fill, ("f", 0), ("f", 2), ("a", 9, 7 * MiB)))
    assert est.segments == 2  # not neighbours: two 4 MiB holes, a new segment


def test_model_api_free_and_empty_cache():
    m = CachingAllocatorModel()
    b = m.malloc(30 * MiB)
    assert m.reserved == 30 * MiB and m.allocated == 30 * MiB
    m.free(b)
    assert m.reserved == 30 * MiB and m.allocated == 0  # cached, still reserved
    m.empty_cache()
    assert m.reserved == 0 and m.estimate().segments_released == 1


# -------------------------------------------- each setting on a fragmenting trace
def test_expandable_segments_cut_fragmentation_of_growing_tensors():
    ev = growing()
    default = replay(ev)
    exp = replay(ev, {"expandable_segments": True})
    assert exp.peak_allocated_bytes == default.peak_allocated_bytes  # the same blocks live
    assert default.fragmentation_bytes > 100 * MiB  # stale segments of every size
    assert exp.peak_reserved_bytes < 0.5 * default.peak_reserved_bytes
    # what is left: holes between the live tensors, about two of them
    assert exp.fragmentation_bytes < 0.25 * default.fragmentation_bytes
    assert exp.peak_reserved_bytes % (20 * MiB) == 0  # large-pool pages


def test_expandable_segments_grow_into_the_free_tail_in_20mib_pages():
    # 12 MiB live in the first 20 MiB page: 6 MiB more fits in the free tail
    ev = trace(("a", 1, 12 * MiB), ("a", 2, 6 * MiB))
    assert replay(ev, {"expandable_segments": True}).peak_reserved_bytes == 20 * MiB
    assert replay(ev).peak_reserved_bytes == 32 * MiB  # default: 12 MiB, plus a 20 MiB segment
    # 10 MiB more: the 8 MiB tail and 2 MiB of one more page (a block across the
    # page boundary); large-pool pages are 20 MiB, so a small step can reserve more
    # than with its own 10 MiB segment
    ev = trace(("a", 1, 12 * MiB), ("a", 2, 10 * MiB))
    exp = replay(ev, {"expandable_segments": True})
    assert (exp.peak_reserved_bytes, exp.segments, exp.peak_allocated_bytes) == (40 * MiB, 2, 22 * MiB)
    assert replay(ev).peak_reserved_bytes == 22 * MiB


def test_max_split_size_keeps_large_blocks_whole_for_large_requests():
    # a big buffer is freed, a small request comes, then the big one again
    ev = trace(("a", 1, 100 * MiB), ("f", 1), ("a", 2, 5 * MiB), ("a", 3, 100 * MiB))
    default = replay(ev)
    limited = replay(ev, {"max_split_size_mb": 64})
    assert default.peak_reserved_bytes == 200 * MiB  # the 5 MiB split the cached 100 MiB block
    assert limited.peak_reserved_bytes == 120 * MiB  # it got its own 20 MiB segment instead
    assert limited.fragmentation_bytes < default.fragmentation_bytes


def test_max_split_size_oversize_reuse_is_bounded_by_20mib():
    cached = [("a", 1, 100 * MiB), ("f", 1)]
    near = replay(trace(*cached, ("a", 2, 85 * MiB)), {"max_split_size_mb": 64})
    assert near.segments == 1 and near.peak_allocated_bytes == 100 * MiB  # reused whole, not split
    far = replay(trace(*cached, ("a", 2, 70 * MiB)), {"max_split_size_mb": 64})
    assert far.segments == 2  # 100 MiB is 20 MiB or more above 70: not reused
    assert replay(trace(*cached, ("a", 2, 70 * MiB))).segments == 1  # default: split and reused


def test_garbage_collection_releases_old_segments_above_the_threshold():
    ev = growing(n=40)
    gib = 2**30
    default = replay(ev, capacity_bytes=gib)
    gc = replay(ev, {"garbage_collection_threshold": 0.1}, capacity_bytes=gib)
    assert default.segments_released == 0
    assert gc.segments_released > 0
    assert gc.peak_reserved_bytes < default.peak_reserved_bytes
    assert gc.peak_reserved_bytes <= 0.1 * gib + 2 * 25 * MiB  # threshold, plus what one step allocates
    # without a capacity (no memory fraction) PyTorch never collects: neither does the model
    assert (
        replay(ev, {"garbage_collection_threshold": 0.1}).peak_reserved_bytes
        == replay(ev).peak_reserved_bytes
    )


def test_capacity_frees_the_cache_and_retries_before_out_of_memory():
    ev = growing(n=40)
    unlimited = replay(ev)
    tight = replay(ev, capacity_bytes=150 * MiB)
    assert unlimited.peak_reserved_bytes > 150 * MiB
    assert tight.peak_reserved_bytes <= 150 * MiB
    assert tight.alloc_retries > 0 and tight.ooms == 0
    oom = replay(trace(("a", 1, 30 * MiB)), capacity_bytes=20 * MiB)
    assert oom.ooms == 1 and oom.peak_reserved_bytes == 30 * MiB  # counted, and the replay goes on


# ------------------------------------------------------------- settings as data
def test_conf_string_and_validation():
    assert alloc_conf_string({}) == ""
    assert alloc_conf_string(AllocatorSettings(expandable_segments=True)) == "expandable_segments:True"
    assert (
        alloc_conf_string(
            {"expandable_segments": True, "max_split_size_mb": 128, "garbage_collection_threshold": 0.6}
        )
        == "expandable_segments:True,max_split_size_mb:128,garbage_collection_threshold:0.6"
    )
    with pytest.raises(InputError, match="more than 20"):
        AllocatorSettings.from_dict({"max_split_size_mb": 20})
    with pytest.raises(InputError, match="between 0 and 1"):
        AllocatorSettings.from_dict({"garbage_collection_threshold": 1.0})
    with pytest.raises(InputError, match="unknown allocator settings"):
        AllocatorSettings.from_dict({"roundup_power2_divisions": 4})


def test_optimization_options_are_validated():
    with pytest.raises(InputError, match="more than 20"):
        optimizations.make("allocator", {"max_split_size_mb": 10})
    with pytest.raises(InputError, match="below 1"):
        optimizations.make("allocator", {"garbage_collection_threshold": 1.0})
    with pytest.raises(InputError, match="at least 0"):
        optimizations.make("allocator", {"garbage_collection_threshold": -0.5})
    with pytest.raises(InputError, match="must be a boolean"):
        optimizations.make("allocator", {"expandable_segments": "yes"})
    opt = optimizations.make("allocator", {"max_split_size_mb": 128})
    assert optimizations.make("allocator", opt.options).options == opt.options


def test_optimization_stores_settings_in_the_setup():
    for mode in ("train", "infer"):
        setup = StepSetup.of(Workload(mode=mode))
        opt = optimizations.make("allocator", {"max_split_size_mb": 128})
        assert opt.applies_to(None, setup) is None
        opt.apply(setup)
        assert setup.alloc_conf == {"expandable_segments": True, "max_split_size_mb": 128}
        assert any(f"{ENV_VAR}=expandable_segments:True,max_split_size_mb:128" in n for n in setup.notes)
        copy = setup.copy()
        copy.alloc_conf["max_split_size_mb"] = 256
        assert setup.alloc_conf["max_split_size_mb"] == 128  # the copy is deep enough
        assert "already in effect" in opt.applies_to(None, setup)
    defaults = optimizations.make("allocator", {"expandable_segments": False})
    assert "already in effect" in defaults.applies_to(None, StepSetup.of(Workload()))
    bad = StepSetup.of(Workload())
    bad.alloc_conf = {"max_split_size_mb": 5}
    with pytest.raises(InputError, match="more than 20"):
        bad.validate()


def test_apply_writes_the_environment_variable():
    setup = StepSetup.of(Workload())
    optimizations.make("allocator").apply(setup)
    setup.steps.append({"name": "allocator", "options": {}})
    assert environment(setup) == {ENV_VAR: "expandable_segments:True"}
    assert environment(StepSetup.of(Workload())) == {}
    text = readme("tiny", from_names(["allocator"]), setup, [], None, None, None, [])
    assert f"export {ENV_VAR}=expandable_segments:True" in text


# ------------------------------------------------------------- tracker trace
def test_tracker_records_the_trace_only_when_asked():
    with Tracker(block_rounding=512, record_trace=True) as t:
        with t.phase("forward"):
            a = torch.empty(1000)
            b = torch.empty(3000)
            del a
        peak = t.peak
    assert [(e.nbytes, e.alloc, e.phase) for e in t.trace] == [
        (4096, True, "forward"),
        (12288, True, "forward"),
        (4096, False, "forward"),
    ]
    assert t.trace[0].storage == t.trace[2].storage != t.trace[1].storage
    assert replay(t.trace).peak_requested_bytes == peak
    del b
    with Tracker() as off:
        torch.empty(10)
    assert off.trace is None


# ------------------------------------------------------------- engines
def test_sim_engine_reports_the_modelled_reserved_memory():
    wl = Workload(batch_size=2, seq_len=32)
    p = SimEngine().run(resolve(tiny("llama")), StepSetup.of(wl))
    a = p.allocator
    assert a["source"] == "model" and a["conf"] == ""
    assert p.peak_reserved_bytes == a["peak_reserved_bytes"] >= a["peak_allocated_bytes"] >= p.peak_bytes
    assert a["peak_requested_bytes"] == p.peak_bytes  # the replayed trace is the tracked step
    assert a["peak_reserved_bytes"] % (2 * MiB) == 0  # whole segments
    assert any("estimate, not a measurement" in n for n in p.notes)
    back = Profile.from_json(p.to_json())
    assert back.allocator == a and back.peak_reserved_bytes == p.peak_reserved_bytes
    # profiles written before the field still read
    old = p.to_dict()
    del old["allocator"]
    assert Profile.from_dict(old).allocator is None
    assert CpuEngine().run(resolve(tiny("llama")), StepSetup.of(wl)).allocator is None


def test_allocator_optimization_moves_the_estimate_on_a_tiny_model():
    # batch 16 x 256 tokens: logits, MLP and attention buffers of 2-16 MiB that
    # come and go in a pattern that strands cached segments by default
    wl = Workload(batch_size=16, seq_len=256)
    rm = resolve(tiny("llama"))
    base = SimEngine().run(rm, StepSetup.of(wl))
    setup = StepSetup.of(wl)
    optimizations.make("allocator").apply(setup)
    exp = SimEngine().run(rm, setup)
    assert exp.allocator["conf"] == "expandable_segments:True"
    assert exp.peak_bytes == base.peak_bytes  # the tensors are the same
    assert exp.peak_reserved_bytes < base.peak_reserved_bytes
    assert exp.allocator["fragmentation_bytes"] < base.allocator["fragmentation_bytes"]


def test_sim_engine_with_device_memory_collects_garbage():
    wl = Workload(batch_size=16, seq_len=256)
    rm = resolve(tiny("llama"))
    setup = StepSetup.of(wl)
    optimizations.make(
        "allocator", {"expandable_segments": False, "garbage_collection_threshold": 0.05}
    ).apply(setup)
    unlimited = SimEngine().run(rm, setup).allocator
    capped = SimEngine(device_memory_bytes=1024 * MiB).run(rm, setup).allocator
    assert unlimited["segments_released"] == 0  # no capacity: no garbage collection
    assert capped["capacity_bytes"] == 1024 * MiB
    assert capped["segments_released"] > 0
    assert capped["peak_reserved_bytes"] < unlimited["peak_reserved_bytes"]


# ------------------------------------------------------------- the cuda engine's child process
def test_child_environment_updates():
    # defaults: both variables unset, whatever the shell had (PyTorch 2.8+ reads PYTORCH_ALLOC_CONF first)
    assert child_env_updates({}) == {ENV_VAR: None, GENERIC_ENV_VAR: None}
    exp = "expandable_segments:True"
    assert child_env_updates({"expandable_segments": True}) == {ENV_VAR: exp, GENERIC_ENV_VAR: exp}
    env = {ENV_VAR: "max_split_size_mb:64", GENERIC_ENV_VAR: "max_split_size_mb:64", "OTHER": "1"}
    apply_env_updates(child_env_updates({}), env)
    assert env == {"OTHER": "1"}
    apply_env_updates(child_env_updates({"max_split_size_mb": 128}), env)
    assert env == {"OTHER": "1", ENV_VAR: "max_split_size_mb:128", GENERIC_ENV_VAR: "max_split_size_mb:128"}


@pytest.mark.slow
def test_child_process_runs_an_engine_with_its_environment():
    # the plumbing of the cuda engine, on the cpu engine: environment set in the
    # child, profile and quality numbers back as plain data
    rm = resolve(tiny("llama"))
    setup = StepSetup.of(Workload(mode="infer", batch_size=2, seq_len=16))
    here = CpuEngine().run(rm, setup)
    seen: list[str] = []
    out = run_in_child(CpuEngine, {ENV_VAR: "expandable_segments:True"}, rm, setup, progress=seen.append)
    assert out["env"] == {ENV_VAR: "expandable_segments:True"}
    assert out["profile"].peak_bytes == here.peak_bytes
    assert json.loads(out["profile"].to_json())["schema"] == here.schema
    assert any("Measured step" in m for m in seen)


def test_child_errors_come_back_typed():
    p = SimEngine().run(resolve(tiny("llama")), StepSetup.of(Workload(mode="infer", batch_size=1, seq_len=8)))
    with pytest.raises(OutOfMemory) as e:
        _raise_from_child("OutOfMemory", "out of memory in the forward phase", p.to_dict())
    assert e.value.profile.peak_bytes == p.peak_bytes
    with pytest.raises(InputError, match="seq-len"):
        _raise_from_child("InputError", "--seq-len too long", None)
    with pytest.raises(MemprofError, match="child process failed: RuntimeError"):
        _raise_from_child("internal", "RuntimeError: boom", None)


@gpu_test()
def test_cuda_engine_measures_allocator_settings_in_a_child_process():
    from memprof.engines.cuda import CudaEngine

    wl = Workload(batch_size=16, seq_len=256)
    rm = resolve(tiny("llama"))
    base = CudaEngine().run(rm, StepSetup.of(wl))
    setup = StepSetup.of(wl)
    optimizations.make("allocator").apply(setup)
    exp = CudaEngine().run(rm, setup)
    assert base.allocator["source"] == exp.allocator["source"] == "measured"
    assert exp.allocator["conf"] == "expandable_segments:True"
    if "settings_in_effect" in exp.allocator:  # PyTorch 2.8+: what the allocator parsed
        assert "expandable_segments:True" in exp.allocator["settings_in_effect"]
    assert any("child process" in n for n in exp.notes)
    for p in (base, exp):
        a = p.allocator
        assert a["fragmentation_bytes"] == a["peak_reserved_bytes"] - a["peak_allocated_bytes"] >= 0


def test_cli_compare_shows_the_reserved_memory_the_step_moves(capsys, monkeypatch):
    from memprof.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    args = ["compare", tiny("llama"), "-e", "sim", "-b", "16", "-s", "256", "--step", "allocator"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "reserved" in out and "caching-allocator model's estimate" in out
    code = main([*args, "--json", "-"])
    d = json.loads(capsys.readouterr().out)
    base, step = d["baseline"], d["steps"][0]["profile"]
    assert step["peak_bytes"] == base["peak_bytes"]
    assert step["peak_reserved_bytes"] < base["peak_reserved_bytes"]


@pytest.mark.parametrize(
    "settings,capacity",
    [
        ({}, None),
        ({"expandable_segments": True}, None),
        ({"garbage_collection_threshold": 0.5, "max_split_size_mb": 64}, 600 * MiB),
    ],
)
def test_a_burst_of_frees_leaves_the_same_allocator_whatever_its_order(settings, capacity):
    """What lets the depth extension compare a burst of frees at one op as a set (depth_trace.same_trace):
    every figure and the segments' layout after the trace are the same with each burst reversed
    or shuffled (each free merges its block with its free neighbours; a merged block's age, for
    the garbage collection, restarts at the burst)."""
    import random

    rng = random.Random(0)
    sizes = [512, 4096, 600_000, 2 * MiB, 3 * MiB + 512, 21 * MiB, 90 * MiB]
    events, live, key = [], [], 0
    for op in range(400):
        for _ in range(rng.randint(1, 4)):
            key += 1
            events.append((key, rng.choice(sizes), True, None, op))
            live.append(key)
        if rng.random() < 0.6 and live:  # a burst: frees one after another at one op
            rng.shuffle(live)
            n = rng.randint(1, len(live))
            burst, live = live[:n], live[n:]
            events += [(k, 0, False, None, op) for k in burst]

    def bursts(order):
        out, i = [], 0
        while i < len(events):
            j = i
            while j < len(events) and not events[j][2] and events[j][4] == events[i][4]:
                j += 1
            if j > i:
                out += order(events[i:j])
                i = j
            else:
                out.append(events[i])
                i += 1
        return out

    def shuffled(b):
        return rng.sample(b, len(b))

    runs = []
    for order in (list, lambda b: b[::-1], shuffled):
        model = CachingAllocatorModel(AllocatorSettings.from_dict(settings), capacity)
        est = model.replay(bursts(order))
        runs.append((vars(est), model.layout()))
    first = runs[0][0]
    assert sum(1 for e in events if not e[2]) > 300 and first["peak_reserved_bytes"] > 0
    assert capacity is None or first["segments_released"] > 0  # the garbage collection ran
    assert runs[0] == runs[1] == runs[2]
