"""bench/validate.py's core on two tiny workloads: the rows, the error, and the other tools' columns."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO

pytest.importorskip("accelerate")  # the bench's comparison column; in the dev extra


def load_validate() -> ModuleType:
    """bench/validate.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_validate", REPO / "bench" / "validate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def test_validate_rows_on_two_tiny_workloads():
    v = load_validate()
    cases = [
        v.Case(
            name="tiny-llama-train-fp32",
            spec="tests/fixtures/tiny/llama.json",
            family="causal LM, GQA",
            mode="train",
            precision="fp32",
            batch_size=2,
            seq_len=32,
        ),
        v.Case(
            name="tiny-bert-infer-bf16",
            spec="tests/fixtures/tiny/bert.json",
            family="encoder",
            mode="infer",
            precision="bf16",
            batch_size=2,
            seq_len=32,
        ),
    ]
    rows = v.run_zoo(cases, "cpu", log=lambda msg: None)
    assert [r["name"] for r in rows] == [c.name for c in cases]
    for r in rows:
        measured = r["measured_bytes"]
        assert measured > 0 and r["parameters"] > 0, r["runs"]
        for proj, err in (
            ("projected_bytes", "error_pct"),
            ("projected_cpu_semantics_bytes", "error_cpu_semantics_pct"),
            ("accelerate_bytes", "accelerate_error_pct"),
            ("deepspeed_bytes", "deepspeed_error_pct"),
        ):
            assert r[proj] > 0, (r["name"], proj, r["runs"])
            assert r[err] == pytest.approx(100.0 * (r[proj] - measured) / measured)

    train, infer = rows
    n = train["parameters"]
    # DeepSpeed: float32 Adam model states are 16 bytes per parameter; 16-bit training, 20
    assert train["deepspeed_bytes"] == 16 * n == v.DS_FP32_ADAM_BYTES_PER_PARAM * n
    assert v.deepspeed_zero2_gpu_bytes(1000) == 20 * 1000
    assert infer["deepspeed_bytes"] == 2 * infer["parameters"]  # bfloat16 parameters only

    # accelerate: "Training using Adam" in float32 is 4x the float32 "Total Size" of the
    # headless base model (the tiny Llama's untied LM head is not in it)
    acc = train["accelerate"]
    f32 = acc["rows"]["float32"]
    assert acc["figure"] == "Training using Adam, float32 row"
    assert train["accelerate_bytes"] == f32["training_adam_bytes"] == 4 * f32["total_size_bytes"]
    head = 512 * 64  # vocab x hidden of tests/fixtures/tiny/llama.json
    assert 4 * (n - head) <= f32["total_size_bytes"] < 4 * n
    # inference in bfloat16: accelerate's 2-byte row (float16) of "Total Size", half the float32 one
    acc = infer["accelerate"]
    assert acc["figure"] == "Total Size, float16 row"
    assert infer["accelerate_bytes"] == acc["rows"]["float32"]["total_size_bytes"] // 2

    # the fake-tensor trace with CPU semantics follows the real CPU step (no tied weights here)
    assert abs(train["error_cpu_semantics_pct"]) < 1.0

    title, body, verdicts = v.render(rows, "cpu", seconds=1.0)
    assert "NOT a GPU validation" in title and "not a GPU validation" in body
    assert set(verdicts) == {"sim", "sim_cpu_semantics", "accelerate", "deepspeed"}
    json.dumps(rows, default=str)  # --json writes them as plain data
