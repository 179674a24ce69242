"""The warm-up without a second step: the measured profile is the whole warm-up step's, byte for byte.

The driver creates what a training step leaves behind (optimizer state, the loss
scaler's) without a forward and backward (``StepRunner.warm_up_state``) where that
is exact, and runs a whole warm-up step where something else persists or is wanted
(``Engine.full_warm_up_reason``). Each case here measures the same setup both ways.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Engine, Measure
from memprof.models import resolve
from memprof.profile import Profile
from memprof.workload import Workload
from tests.conftest import setup_with, tiny

WL = Workload(batch_size=2, seq_len=16)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")

#: (id, steps, engines): each setup on the engines it applies to
CASES: list[Any] = [
    ("adamw-foreach", [("optimizer", {"type": "adamw", "impl": "foreach"})], ("sim", "cpu")),
    ("adamw-fused", [("optimizer", {"type": "adamw", "impl": "fused"})], ("sim", "cpu")),
    ("sgd", [("optimizer", {"type": "sgd"})], ("sim", "cpu")),
    ("adafactor", [("optimizer", {"type": "adafactor"})], ("sim", "cpu")),
    pytest.param("adamw8bit", [("optimizer", {"type": "adamw8bit"})], ("sim", "cpu"), marks=needs_bnb),
    pytest.param(
        "paged_adamw8bit", [("optimizer", {"type": "paged_adamw8bit"})], ("sim", "cpu"), marks=needs_bnb
    ),
    ("optimizer_in_backward", [("optimizer_in_backward", {})], ("sim", "cpu")),
    pytest.param(
        "optimizer_in_backward-paged_adamw8bit",
        [("optimizer", {"type": "paged_adamw8bit"}), ("optimizer_in_backward", {})],
        ("sim", "cpu"),
        marks=needs_bnb,
    ),
    (
        "optimizer_in_backward-adafactor",
        [("optimizer", {"type": "adafactor"}), ("optimizer_in_backward", {})],
        ("sim",),
    ),
    ("optimizer_offload", [("optimizer_offload", {})], ("sim", "cpu")),
    ("optimizer_offload-gradients", [("optimizer_offload", {"gradients": True})], ("sim", "cpu")),
    (
        "optimizer_offload-adafactor",
        [("optimizer", {"type": "adafactor"}), ("optimizer_offload", {"gradients": True})],
        ("sim", "cpu"),
    ),
    ("grad_accumulation", [("grad_accumulation", {"steps": 2})], ("sim", "cpu")),
    ("autocast-bf16", [("mixed_precision", {})], ("sim", "cpu")),
    ("autocast-fp16-scaler", [("mixed_precision", {"dtype": "float16"})], ("sim",)),
    ("pure-bf16", [("mixed_precision", {"pure": True})], ("sim", "cpu")),
    ("lora", [("lora", {})], ("sim", "cpu")),
    pytest.param("qlora", [("qlora", {})], ("sim", "cpu"), marks=needs_bnb),
    (
        "lora-checkpointing-accumulation",
        [("lora", {}), ("checkpointing", {}), ("grad_accumulation", {})],
        ("sim",),
    ),
]


pytestmark = pytest.mark.usefixtures("no_automatic_collections")


def engine(name: str) -> Engine:
    return SimEngine() if name == "sim" else CpuEngine()


def measured(eng: Engine, spec: str, setup: Any, full: bool) -> Profile:
    return eng.run_detailed(resolve(spec), setup, measure=Measure(full_warm_up=full)).profile


def steady(p: Profile) -> dict[str, Any]:
    """What the warm-up must not move: the whole profile (peak, categories, phases, modules,
    timeline, allocator, host...) but its notes, which say how the warm-up ran."""
    d = p.to_dict()
    del d["notes"]
    return d


def fast_note(p: Profile) -> bool:
    return any("no warm-up forward" in n for n in p.notes)


def pairs() -> list[Any]:
    out = []
    for case in CASES:
        values, marks = (case.values, case.marks) if hasattr(case, "values") else (case, ())
        name, steps, engines = values
        out += [pytest.param(steps, e, id=f"{name}-{e}", marks=marks) for e in engines]
    return out


@pytest.mark.parametrize("steps,eng", pairs())
def test_warm_up_without_a_step_measures_as_the_whole_warm_up_step(steps, eng):
    setup = setup_with(WL, *steps)
    fast = measured(engine(eng), tiny("llama"), setup, full=False)
    full = measured(engine(eng), tiny("llama"), setup, full=True)
    assert fast_note(fast) and not fast_note(full)
    assert steady(fast) == steady(full)
    assert fast.categories_at_peak["optimizer_state"] > 0 or steps[0][0] == "optimizer_in_backward"


@pytest.mark.parametrize("model", ["gpt2", "bert", "bert-cls", "t5", "mistral", "vit", "whisper"])
def test_other_architectures_warm_up_without_a_step_as_with_one(model):
    setup = setup_with(WL)
    fast = measured(SimEngine(), tiny(model), setup, full=False)
    full = measured(SimEngine(), tiny(model), setup, full=True)
    assert fast_note(fast)
    assert steady(fast) == steady(full)


def test_fsdp_keeps_the_whole_warm_up_step():
    wl = Workload(batch_size=2, seq_len=16, world_size=2)
    p = measured(SimEngine(), tiny("llama"), setup_with(wl, ("fsdp", {})), full=False)
    assert not fast_note(p)
    assert any("FSDP2 initialises lazily" in n for n in p.notes)


def test_a_parameter_without_a_gradient_is_measured_after_a_whole_step(tmp_path: Path, monkeypatch):
    """An unused trainable head gets no optimizer state from a whole step: the driver measures again."""
    spec = _unused_head_model(tmp_path, monkeypatch)
    fast = measured(CpuEngine(), spec, setup_with(WL), full=False)
    full = measured(CpuEngine(), spec, setup_with(WL), full=True)
    assert steady(fast) == steady(full)
    assert any("a trainable parameter gets no gradient" in n for n in fast.notes)


def _unused_head_model(tmp_path: Path, monkeypatch: Any) -> str:
    (tmp_path / "unused_head.py").write_text(
        "import torch\n"
        "class Model(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.used = torch.nn.Linear(8, 8)\n"
        "        self.unused = torch.nn.Linear(8, 64)\n"
        "    def forward(self, x):\n"
        "        return self.used(x)\n"
        "def make():\n"
        "    return Model(), lambda b, s: (torch.randn(b, 8),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "unused_head:make"


def test_adamw_state_is_created_without_its_update(monkeypatch):
    """torch's AdamW: the warm-up creates its state as its first step does, without running the step."""
    import torch

    steps = []
    real = torch.optim.AdamW.step

    def counted(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    setup = setup_with(WL)
    fast = measured(SimEngine(), tiny("llama"), setup, full=False)
    assert len(steps) == 1  # the measured step's only
    full = measured(SimEngine(), tiny("llama"), setup, full=True)
    assert steady(fast) == steady(full)
