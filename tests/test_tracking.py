"""The tracker's numbers, checked against sizes computed by hand."""

from __future__ import annotations

import gc

import pytest
import torch

import memprof
from memprof.tracking import CATEGORIES, Tracker


class TwoLayer(torch.nn.Module):
    def __init__(self, d_in=64, d_hidden=256):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(d_hidden, d_in)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _nbytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_forward_peak_matches_hand_count():
    torch.manual_seed(0)
    m = TwoLayer()
    x = torch.randn(32, 64)
    with torch.no_grad(), Tracker(m) as t:
        t.mark_inputs([x])
        out = m(x)
    r = t.result()
    assert r.categories_at_peak["parameters"] == _nbytes(m)
    assert r.categories_at_peak["inputs"] == x.numel() * 4
    assert sum(r.categories_at_peak.values()) == r.peak_bytes
    params, inp = _nbytes(m), x.numel() * 4
    h = 32 * 256 * 4  # fc1 output; relu makes a second buffer of the same size
    # peak: params + input + fc1 out + relu out (fc1 out is freed only after relu returns)
    assert r.peak_bytes == params + inp + 2 * h
    assert out.numel() * 4 <= r.final_bytes - params - inp


def test_training_step_categories():
    torch.manual_seed(0)
    m = TwoLayer()
    opt = torch.optim.AdamW(m.parameters(), foreach=False)
    x = torch.randn(32, 64)

    def step(t=None):
        ph = t.phase if t else (lambda n: __import__("contextlib").nullcontext())
        with ph("forward"):
            loss = m(x).pow(2).mean()
        with ph("backward"):
            loss.backward()
        with ph("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists
    with Tracker(m, opt) as t:
        t.mark_inputs([x])
        step(t)
    r = t.result()
    P = _nbytes(m)
    live = t.live_by_category()
    assert live["optimizer_state"] >= 2 * P  # exp_avg + exp_avg_sq (+ step counters)
    assert live["gradients"] == 0  # set_to_none
    assert [p["name"] for p in r.phases] == ["forward", "backward", "optimizer"]
    phase_peaks = {p["name"]: p["peak_bytes"] for p in r.phases}
    assert r.peak_bytes == max(phase_peaks.values())
    assert sum(r.categories_at_peak.values()) == r.peak_bytes
    # during backward the gradients exist in full, once
    assert phase_peaks["backward"] >= P + 2 * P + P  # params + adam state + grads


def test_activations_are_saved_tensors():
    m = TwoLayer()
    x = torch.randn(32, 64)
    with Tracker(m) as t:
        t.mark_inputs([x])
        loss = m(x).pow(2).mean()
        live = t.live_by_category()
    # saved for backward: relu output (fc2 input), relu's output mask... at least fc1's output
    assert live["activations"] >= 32 * 256 * 4
    del loss


def test_gradients_category_and_module_attribution():
    m = TwoLayer()
    x = torch.randn(32, 64)
    with Tracker(m) as t:
        with t.phase("forward"):
            loss = m(x).pow(2).mean()
        with t.phase("backward"):
            loss.backward()
        live = t.live_by_category()
    assert live["gradients"] == _nbytes(m)
    r = t.result()
    mods = {mm.name: mm for mm in r.modules}
    assert set(mods) == {"<model>", "fc1", "act", "fc2"}
    assert mods["fc1"].bytes_at_peak >= _nbytes(m.fc1)
    assert mods["<model>"].bytes_at_peak >= mods["fc1"].bytes_at_peak + mods["fc2"].bytes_at_peak
    assert mods["fc1"].peak_bytes > 0 and mods["<model>"].peak_bytes >= mods["fc1"].peak_bytes


def test_hooks_removed_and_model_unchanged_on_error():
    m = TwoLayer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooks_before = (len(m._forward_hooks), len(m.fc1._forward_pre_hooks))

    class Boom(Exception):
        pass

    with pytest.raises(Boom), Tracker(m) as t:
        m(torch.randn(2, 64))
        raise Boom()
    assert (len(m._forward_hooks), len(m.fc1._forward_pre_hooks)) == hooks_before
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())
    assert torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert not t._handles


def test_freed_memory_leaves_the_total():
    with Tracker() as t:
        a = torch.empty(1000, dtype=torch.float32)
        assert t.current == 4000
        del a
        gc.collect()
        assert t.current == 0
    assert t.peak == 4000


def test_views_share_storage():
    with Tracker() as t:
        a = torch.empty(1000)
        b = a[10:20]
        c = a.view(10, 100)
        assert t.current == 4000
        del b, c, a


def test_cuda_block_rounding():
    with Tracker(block_rounding=512) as t:
        a = torch.empty(10, dtype=torch.float32)  # 40 bytes -> one 512-byte block
        assert t.current == 512
        del a


def test_public_track_api_profile():
    m = TwoLayer()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 64)
    with memprof.track(m, opt) as t:
        t.mark_inputs(x)
        with t.phase("forward"):
            loss = m(x).sum()
        with t.phase("backward"):
            loss.backward()
        with t.phase("optimizer"):
            opt.step()
    p = t.profile()
    assert p.engine == "track"
    assert set(p.categories_at_peak) == set(CATEGORIES)
    assert sum(p.categories_at_peak.values()) == p.peak_bytes
    assert p.model["parameters"] == sum(q.numel() for q in m.parameters())
    assert p.categories_at_peak["parameters"] == _nbytes(m)


def test_module_totals_at_peak_include_the_freed_tensor_and_tracker_is_released():
    import weakref

    m = TwoLayer()
    x = torch.randn(16, 64)
    refs = []
    for _ in range(3):
        with Tracker(m) as t:
            t.mark_inputs([x])
            loss = m(x).pow(2).mean()
            loss.backward()
            del loss
        r = t.result()
        root = next(mm for mm in r.modules if mm.name == "<model>")
        # the model owns its parameters and gradients at the peak (the loss's own
        # backward ops run outside any module and stay unowned)
        c = r.categories_at_peak
        assert root.bytes_at_peak >= c["parameters"] + c["gradients"]
        refs.append(weakref.ref(t))
        del t
        m.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in refs)  # no hook keeps a finished tracker alive


def test_running_module_totals_match_the_live_records():
    # The per-module totals are kept incrementally (add, free, retag, new owner):
    # after a whole training step they must equal a walk over the live records.
    torch.manual_seed(0)
    m = TwoLayer()
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randn(16, 64)
    t = Tracker(m, opt)
    with t:
        for _ in range(2):
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
        kept = m(x)  # live activations owned by modules
        n = len(t._mod_tot)
        tot, act = [0] * n, [0] * n
        for nbytes, cat, owner in t._records.values():
            if owner >= 0:
                tot[owner] += nbytes
                act[owner] += nbytes if cat == CATEGORIES.index("activations") else 0
        assert t._mod_tot == tot
        assert t._mod_act == act
        assert sum(act) > 0 and all(v >= 0 for v in tot)
    del kept


def _train_step(m, opt, x, t):
    with t.phase("forward"):
        loss = m(x).pow(2).mean()
    with t.phase("backward"):
        loss.backward()
    with t.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_timeline_sums_to_the_live_total_and_keeps_the_peak_when_downsampled():
    torch.manual_seed(0)
    m = TwoLayer()
    opt = torch.optim.AdamW(m.parameters(), foreach=False)
    x = torch.randn(32, 64)
    with Tracker(m, opt, record_timeline=True) as t:
        t.mark_inputs([x])
        _train_step(m, opt, x, t)
    r = t.result()
    full = t.timeline(max_points=10**9)
    small = t.timeline(max_points=8)
    assert Tracker(m).timeline() is None  # off by default
    for tl in (full, small):
        totals = [sum(col[i] for col in tl["categories"].values()) for i in range(len(tl["op"]))]
        assert set(tl["categories"]) == set(CATEGORIES)
        assert max(totals) == r.peak_bytes == totals[tl["peak_index"]]
        assert tl["op"] == sorted(tl["op"])  # in order
        assert len(tl["module"]) == len(tl["op"])
        assert [p["name"] for p in tl["phases"]] == ["forward", "backward", "optimizer"]
        assert all(a["end"] == b["start"] for a, b in zip(tl["phases"], tl["phases"][1:]))
        assert tl["phases"][-1]["end"] == tl["ops"] == t.ops > 0
    assert len(full["op"]) == full["rows"] > len(small["op"])
    assert len(small["op"]) <= 8
    # the last point is the live set at the end: parameters and optimizer state, no gradients
    assert full["categories"]["gradients"][-1] == 0
    assert full["categories"]["optimizer_state"][-1] == t.live_by_category()["optimizer_state"]
    # modules named at points include the layers that ran
    assert {"fc1", "fc2"} <= set(full["modules"])


def test_budget_crossing_names_the_moment_the_live_total_first_rose_above_it():
    torch.manual_seed(0)
    m = TwoLayer()
    x = torch.randn(32, 64)
    params, inp, h = _nbytes(m), x.numel() * 4, 32 * 256 * 4
    # params + input + fc1's output fit; the relu's output crosses
    budget = params + inp + h + 1
    with torch.no_grad(), Tracker(m, budget=budget) as t:
        t.mark_inputs([x])
        with t.phase("forward"):
            m(x)
    c = t.crossing
    assert c is not None and c["phase"] == "forward" and c["module"] == "act"
    assert c["live_bytes"] == params + inp + 2 * h > budget
    assert sum(c["categories"].values()) == c["live_bytes"]
    assert c["categories"]["parameters"] == params
    assert c["modules"]["act"] == h and c["modules"]["fc1"] >= h
    with torch.no_grad(), Tracker(m, budget=10 * (params + inp + 2 * h)) as t2:
        m(x)
    assert t2.crossing is None
