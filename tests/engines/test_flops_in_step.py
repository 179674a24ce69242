"""FLOPs counted on the measured step: the same count as a whole step under ``FlopCounterMode``.

``memprof compare`` and ``memprof plan`` count each run's FLOPs. They used to be counted
on a whole warm-up step run under torch's ``FlopCounterMode`` for that alone; the
tracker now applies the same formulas to the ops of the measured step, so the warm-up
can be the one that only creates the optimizer state. Each case counts both ways (a
whole warm-up step is forced with ``Measure(full_warm_up=True)``: it counts under
``FlopCounterMode`` as before) and the memory profile must not move either.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.models import resolve
from memprof.workload import Workload
from tests.conftest import setup_with, tiny
from tests.engines.test_warm_up import steady

WL = Workload(batch_size=2, seq_len=16)
INFER = Workload(mode="infer", batch_size=2, seq_len=16)
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")

CASES: list[Any] = [
    ("llama", WL, []),
    ("llama", WL, [("checkpointing", {})]),
    ("llama", WL, [("chunking", {"size": 8})]),
    ("llama", WL, [("mixed_precision", {}), ("checkpointing", {"every": 2})]),
    ("llama", WL, [("optimizer", {"type": "adafactor"}), ("optimizer_in_backward", {})]),
    ("llama", WL, [("activation_offload", {})]),
    ("llama", WL, [("lora", {}), ("checkpointing", {})]),
    pytest.param("llama", WL, [("qlora", {})], marks=needs_bnb),
    ("llama", INFER, []),
    ("gpt2", WL, []),
    ("bert", WL, []),
    ("t5", WL, []),
    ("vit", WL, []),
    ("whisper", WL, []),
]


pytestmark = pytest.mark.usefixtures("no_automatic_collections")


@pytest.mark.parametrize("model,wl,steps", CASES)
def test_flops_of_the_measured_step_are_flop_counter_modes(model, wl, steps):
    setup = setup_with(wl, *steps)
    fast = SimEngine().run_detailed(resolve(tiny(model)), setup, measure=Measure(flops=True))
    full = SimEngine().run_detailed(
        resolve(tiny(model)), setup, measure=Measure(flops=True, full_warm_up=True)
    )
    assert fast.flops and fast.flops > 0
    assert fast.flops == full.flops
    if wl.training:
        assert any("no warm-up forward" in n for n in fast.profile.notes)  # no step of its own
        a, b = steady(fast.profile), steady(full.profile)
        if any(name == "mixed_precision" for name, _ in steps):
            # autocast's cache of cast weights is freed in one op, in the order of its hash
            # map (addresses): the timeline and the allocator replay see those frees in an
            # order that varies from run to run; the rest must not move
            for key in ("timeline", "allocator"):
                a.pop(key), b.pop(key)
        assert a == b


def test_the_cpu_engine_counts_on_the_measured_step_too():
    setup = setup_with(WL, ("checkpointing", {}))
    fast = CpuEngine().run_detailed(resolve(tiny("llama")), setup, measure=Measure(flops=True))
    full = CpuEngine().run_detailed(
        resolve(tiny("llama")), setup, measure=Measure(flops=True, full_warm_up=True)
    )
    assert any("no warm-up forward" in n for n in fast.profile.notes)
    assert fast.flops == full.flops > 0


def test_an_op_without_a_formula_counts_as_flop_counter_mode_decomposes_it(monkeypatch):
    """silu_backward has no formula: FlopCounterMode decomposes it and counts the parts.

    Proven on a formula taken away: without mm's formula the tracker must count mm
    through its decomposition as FlopCounterMode would (none: mm has no CompositeImplicit
    kernel, so both count 0 for it), and silu_backward's decomposition is run (not the
    tracked step's op) so the profile does not move.
    """
    import torch
    from torch.utils import flop_counter as fc

    from memprof.tracking import tracker

    calls = []
    orig = tracker._decomposable

    def spy(func: Any) -> bool:
        out = orig(func)
        if out:
            calls.append(str(func))
        return out

    monkeypatch.setattr(tracker, "_decomposable", spy)
    setup = setup_with(WL)
    fast = SimEngine().run_detailed(resolve(tiny("llama")), setup, measure=Measure(flops=True))
    full = SimEngine().run_detailed(
        resolve(tiny("llama")), setup, measure=Measure(flops=True, full_warm_up=True)
    )
    assert "aten.silu_backward.default" in calls  # the case is exercised
    assert fast.flops == full.flops
    assert steady(fast.profile) == steady(full.profile)
    assert torch.ops.aten.mm in fc.flop_registry
