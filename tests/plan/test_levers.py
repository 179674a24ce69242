"""The levers memprof plan searches for a step."""

from __future__ import annotations

import importlib

from memprof.api import fake_model, prepare
from memprof.engines import SimEngine
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
