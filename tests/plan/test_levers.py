"""The levers memprof plan searches for a step."""

from __future__ import annotations

import importlib

import pytest

from memprof.engines import SimEngine
from memprof.prepare import fake_model, prepare
from memprof.workload import Workload
from tests.conftest import tiny

P = importlib.import_module("memprof.plan")  # the package (memprof.plan is also the function)


def test_world_size_one_has_no_fsdp_lever():
    model = fake_model(*prepare(tiny("llama"), Workload(), SimEngine())[:1], Workload())
    levers, left_out = P.build_levers(model, Workload(batch_size=4, seq_len=64))
    names = [lv.name for lv in levers]
    assert "fsdp" not in names
    assert names[:3] == ["precision", "optimizer", "checkpointing"]
    assert levers[-1].name == "allocator" and levers[-1].derived


def test_an_optimizer_that_reads_values_under_fake_tensors_is_reported_and_a_bug_propagates(monkeypatch):
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException

    import memprof.engines.runner as runner_mod

    def reads_values(*a, **k):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(runner_mod, "make_optimizer", reads_values)
    why = P.optimizer_trace_problem("adamw8bit", torch.float32)
    assert why is not None and why.startswith("DataDependentOutputException: aten._local_scalar_dense")

    def bug(*a, **k):
        raise KeyError("no such optimizer")

    monkeypatch.setattr(runner_mod, "make_optimizer", bug)
    with pytest.raises(KeyError):
        P.optimizer_trace_problem("adamw8bit", torch.float32)


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_pure_bf16_at_least_halves_the_activations_its_prior_says(name):
    """The prior of pure bf16 on the activations (half) is optimistic: measured, they are at least half.

    What keeps its dtype (ids, masks, the loss's float32 upcasts) only adds to half; a prior
    above the measured ratio would skip a combination that fits.
    """
    from memprof.plan.levers import apply_steps
    from memprof.workload import StepSetup

    wl = Workload(batch_size=2, seq_len=64)
    rm, eng = prepare(tiny(name), wl, SimEngine())
    model = fake_model(rm, wl)
    levers, _ = P.build_levers(model, wl)
    precision = levers[[lv.name for lv in levers].index("precision")]
    pure = precision.levels[2]
    assert pure.label == "pure bf16"
    est = P.Estimator(P.Combinations(levers), training=True)
    zero = tuple(0 for _ in levers)
    acts = []
    for steps in ([], pure.steps):
        setup = StepSetup.of(wl)
        assert not apply_steps(steps, model, setup)
        acts.append(est.decompose(P.Measured.of(zero, 1, eng.run(rm, setup))).acts)
    assert acts[0] and acts[1]
    assert acts[1] / acts[0] >= pure.prior["acts"] == 0.5


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw", "paged_adamw8bit"])
def test_a_step_in_backward_holds_the_largest_gradient_and_its_temporaries_at_the_least(optimizer):
    """The floor the plan's estimator takes for an optimizer stepped in backward is under the measured peak.

    Parameters, state, the largest parameter's gradient and its step's temporaries
    (:func:`step_transient`, measured on one fake tensor) are live at once when its hook
    steps it. Tight where the activations are small: Adafactor's float32 copies dominate.
    """
    import math

    import torch

    from memprof.plan.levers import apply_steps, step_transient
    from memprof.units import CUDA_BLOCK_BYTES
    from memprof.workload import StepSetup

    wl = Workload(batch_size=1, seq_len=16)
    rm, eng = prepare(tiny("llama"), wl, SimEngine())
    model = fake_model(rm, wl)
    setup = StepSetup.of(wl)
    steps = [
        {"name": "mixed_precision", "options": {"pure": True}},
        {"name": "optimizer", "options": {"type": optimizer}},
        {"name": "checkpointing", "options": {}},
        {"name": "optimizer_in_backward", "options": {}},
    ]
    assert not apply_steps(steps, model, setup)
    p = eng.run(rm, setup)
    largest = max(model.parameters(), key=lambda q: q.numel())
    transient = step_transient(optimizer, tuple(largest.shape), torch.bfloat16)
    grad = math.ceil(largest.numel() * 2 / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    c = p.categories_at_peak
    floor = c["parameters"] + c["optimizer_state"] + c["buffers"] + c["inputs"] + grad + transient
    assert transient % CUDA_BLOCK_BYTES == 0
    assert floor <= p.peak_bytes
    # what each step allocates beyond its parameter, gradient and state: bitsandbytes' fused 8-bit
    # update nothing; foreach AdamW one temporary the size of the parameter; Adafactor float32
    # copies of the bfloat16 gradient and update (four of them), its floor near the whole peak
    if optimizer == "paged_adamw8bit":
        assert transient == 0
    elif optimizer == "adamw":
        assert transient == grad
    else:
        assert transient > 3 * 2 * grad and floor > 0.9 * p.peak_bytes


def test_an_optimizer_that_cannot_step_on_fake_tensors_adds_no_floor(monkeypatch):
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException

    import memprof.engines.runner as runner_mod
    from memprof.plan.levers import step_transient

    def reads_values(*a, **k):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(runner_mod, "make_optimizer", reads_values)
    assert step_transient("adafactor", (64, 64), torch.bfloat16) == 0
