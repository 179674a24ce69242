"""optimizer_offload: the state leaves the device for the host, the update stays the same, conflicts are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from rich.console import Console

from memprof import optimizations
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.engines.sim import cpu_semantics_sim
from memprof.errors import EnvironmentProblem, InputError
from memprof.models import resolve
from memprof.optimizations import optimizer_offload as oo
from memprof.optimizations.registry import check_setup
from memprof.profile import Profile
from memprof.report.terminal import summary_table
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

WL = Workload(batch_size=1, seq_len=16)


def run(engine, setup, spec=None, measure=None):
    return engine.run_detailed(resolve(spec or tiny("llama")), setup, measure=measure or Measure()).profile


@pytest.fixture(scope="module")
def exact():
    """Baseline, offload and offload with gradients on the sim with exact bytes (cpu semantics)."""
    eng = cpu_semantics_sim()
    return {
        "base": run(eng, StepSetup.of(WL)),
        "state": run(eng, setup_with(WL, ("optimizer_offload", {}))),
        "grads": run(eng, setup_with(WL, ("optimizer_offload", {"gradients": True}))),
    }


def big_param_bytes(minimal_size=4096):
    from memprof.models import build_model

    model, _ = build_model(resolve(tiny("llama")), dtype="float32", load_weights=False, init_weights=False)
    return sum(p.numel() * 4 for p in model.parameters() if p.numel() >= minimal_size)


def test_the_state_leaves_the_device_for_the_host_in_sim(exact):
    base, off = exact["base"], exact["state"]
    host = off.host
    state = host["by_kind"]["optimizer_state"]
    # the device keeps the state of the small parameters only; the rest is on the host, byte for byte
    assert off.categories_at_peak["optimizer_state"] + state == base.categories_at_peak["optimizer_state"]
    assert state > 0.9 * base.categories_at_peak["optimizer_state"]
    assert base.peak_bytes - off.peak_bytes >= state
    # the host holds the state, a copy of the offloaded parameters and of their gradients
    p = big_param_bytes()
    assert host["by_kind"]["parameters"] == host["by_kind"]["gradients"] == p
    assert host["bytes"] == sum(host["by_kind"].values()) == state + 2 * p
    assert host["pcie_bytes_per_step"] == 2 * p  # gradients out, parameters back
    assert host["paged_bytes"] == 0


def test_offloaded_gradients_are_freed_after_their_copy(exact):
    keep, free = exact["state"], exact["grads"]
    assert keep.categories_at_peak["gradients"] == exact["base"].categories_at_peak["gradients"]
    assert free.categories_at_peak["gradients"] < 0.1 * keep.categories_at_peak["gradients"]
    assert free.peak_bytes < keep.peak_bytes
    assert free.host == keep.host  # the host side is the same: torchao always keeps host gradients


def test_the_cuda_semantics_sim_projects_the_same_host_side(exact):
    off = run(SimEngine(), setup_with(WL, ("optimizer_offload", {})))
    base = run(SimEngine(), StepSetup.of(WL))
    assert off.host == exact["state"].host  # host tensors are not allocator blocks: no rounding
    assert off.peak_bytes < base.peak_bytes - off.host["by_kind"]["optimizer_state"]
    back = Profile.from_json(off.to_json())  # JSON carries it
    assert back.host == off.host
    console = Console(record=True, width=200)
    console.print(summary_table(back))
    line = next(ln for ln in console.export_text().splitlines() if "Host memory" in ln)
    assert "optimizer state 1.0 MiB" in line and "PCIe 1.0 MiB per step" in line


def test_the_cpu_engine_moves_nothing_and_reports_the_host_bytes(exact):
    base = run(CpuEngine(), StepSetup.of(WL))
    off = run(CpuEngine(), setup_with(WL, ("optimizer_offload", {"gradients": True})))
    assert off.peak_bytes == base.peak_bytes  # host memory is the cpu's device memory
    assert off.host == exact["grads"].host  # the same tensors, measured on real ones
    assert any("cpu engine: device memory is host memory" in n for n in off.notes)


def test_accumulation_copies_the_gradients_once_per_micro_batch():
    wl = Workload(batch_size=2, seq_len=16)
    off = run(
        cpu_semantics_sim(), setup_with(wl, ("grad_accumulation", {"steps": 2}), ("optimizer_offload", {}))
    )
    p = big_param_bytes()
    assert off.host["pcie_bytes_per_step"] == 2 * p + p


def test_host_offload_steps_the_host_copy_as_the_plain_optimizer_steps_the_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 4))  # 6144, 96, 384, 4 elements
    twin = copy.deepcopy(model)
    x = torch.randn(8, 64)

    def make(ps):
        return torch.optim.AdamW(ps, lr=1e-2)

    params = list(model.parameters())
    off = oo.OffloadedOptimizer(
        oo.HostOffloadOptimizer(
            make, make, params, offload_gradients=True, minimal_size=4096, host_device="cpu"
        )
    )
    plain = make(list(twin.parameters()))
    assert list(off.inner.param_d2h_map) == [params[0]]  # only the large weight is offloaded
    for _ in range(3):
        model(x).square().mean().backward()
        assert params[0].grad is None  # freed once copied to the host
        off.step()
        off.zero_grad()
        twin(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    host = off.host_memory()
    assert host["by_kind"]["parameters"] == host["by_kind"]["gradients"] == 6144 * 4
    assert host["by_kind"]["optimizer_state"] == 2 * 6144 * 4 + 4  # two moments and the step counter
    assert host["pcie_bytes_per_step"] == 2 * 6144 * 4
    off.remove()


def test_bad_options_are_all_listed():
    with pytest.raises(InputError) as e:
        optimizations.make("optimizer_offload", {"gradients": "yes", "minimal_size": -1, "grads": True})
    msg = str(e.value)
    assert "'gradients' must be a boolean" in msg
    assert "'minimal_size' must be at least 0" in msg
    assert "unknown option 'grads' (did you mean 'gradients'?)" in msg


@pytest.mark.parametrize(
    "steps,needle",
    [
        ((("grad_accumulation", {"steps": 2}),), "cannot accumulate over micro-batches"),
        ((("optimizer_in_backward", {}),), "not with optimizer_in_backward"),
        ((("optimizer", {"type": "adamw8bit"}),), "not with optimizer adamw8bit"),
        ((("optimizer", {"type": "paged_adamw8bit"}),), "not with optimizer paged_adamw8bit"),
        ((("optimizer", {"set_to_none": False}),), "not with set_to_none false"),
    ],
)
def test_what_it_refuses_and_why(steps, needle):
    wl = Workload(batch_size=2, seq_len=16)
    opt = optimizations.make("optimizer_offload", {"gradients": True})
    assert needle in opt.applies_to(None, setup_with(wl, *steps))


def test_every_conflict_in_a_setup_is_listed():
    setup = setup_with(
        Workload(batch_size=2, seq_len=16),
        ("grad_accumulation", {"steps": 2}),
        ("optimizer", {"type": "adamw8bit"}),
    )
    setup.steps.append({"name": "optimizer_offload", "options": {"gradients": True, "minimal_size": 4096}})
    setup.steps.append({"name": "optimizer_in_backward", "options": {}})
    with pytest.raises(InputError) as e:
        check_setup(setup)
    msg = str(e.value)
    for needle in ("adamw8bit", "micro-batches", "optimizer_in_backward"):
        assert needle in msg


def test_without_torchao_the_cuda_offload_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    with pytest.raises(EnvironmentProblem, match="pip install torchao"):
        oo._torchao_offload(None, None, [], False, 4096)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_the_sim_updates_the_meta_host_copies_only_where_their_state_needs_it(monkeypatch, optimizer):
    """The sim's host copies are meta tensors: an update there moves nothing the sim measures.

    The warm-up creates AdamW's host state without an update (Adafactor, transformers'
    class, is stepped once for it); the measured step updates none of them. The host
    state is still there, byte for byte, and the profile is the one after a whole
    warm-up step (tests/engines/test_warm_up.py).
    """
    from transformers.optimization import Adafactor

    updates = []
    cls = Adafactor if optimizer == "adafactor" else torch.optim.AdamW
    step = cls.step

    def counted(self, *a, **k):
        updates.extend(p.device.type for g in self.param_groups for p in g["params"])
        return step(self, *a, **k)

    monkeypatch.setattr(cls, "step", counted)
    setup = setup_with(WL, ("optimizer", {"type": optimizer}), ("optimizer_offload", {"minimal_size": 1}))
    off = run(SimEngine(), setup)
    host = updates.count("meta")
    offloaded = len(list(build_tiny().parameters()))
    assert host == (offloaded if optimizer == "adafactor" else 0)  # the warm-up's, for Adafactor only
    assert "cpu" not in updates  # minimal_size 1: nothing stays on the device
    assert off.host["by_kind"]["optimizer_state"] > 0
    assert off.categories_at_peak["optimizer_state"] == 0


def build_tiny():
    from memprof.models import build_model

    model, _ = build_model(resolve(tiny("llama")), dtype="float32", load_weights=False, init_weights=False)
    return model
