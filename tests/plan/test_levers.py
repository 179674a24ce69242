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
