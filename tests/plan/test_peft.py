"""memprof plan --peft: LoRA and QLoRA searched when asked (one search each), the full fine-tune first."""

from __future__ import annotations

import importlib
import json

import pytest
from transformers import LlamaConfig

from memprof.errors import EnvironmentProblem, InputError, NoPlanFits
from memprof.workload import Workload
from tests.plan.helpers import WORKSPACE, MiB, run

P = importlib.import_module("memprof.plan")  # the package (memprof.plan is also the function)

# wide layers, a small vocabulary, few tokens: the weights are most of the memory
WL = Workload(batch_size=1, seq_len=8, dtype="bfloat16")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "config.json"
    LlamaConfig(
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=256,
        architectures=["LlamaForCausalLM"],
    ).to_json_file(path)
    return str(path)


def test_peft_is_never_searched_by_default(wide):
    with pytest.raises(NoPlanFits) as e:
        P.plan(wide, WL, WORKSPACE + 24 * MiB, context_overhead=0, max_runs=4)
    r = e.value.result
    assert r.peft == []
    assert not any(s["name"] in ("lora", "qlora") for c in r.candidates for s in c.steps)
    assert any(n.startswith("lora:") for n in r.not_searched)


def test_when_no_full_fine_tune_fits_the_first_adapter_kind_that_fits_is_the_plan(wide):
    # 21 M parameters in the Linear layers: 42 MB in bf16, a quarter of it in 4 bits; the budget
    # sits between QLoRA's need (68 MiB with the workspace, measured) and LoRA's (76 MiB)
    r = P.plan(wide, WL, WORKSPACE + 40 * MiB, context_overhead=0, max_runs=4, peft="any")
    kinds = {o["trains"]: o for o in r.peft}
    assert list(kinds) == ["full", "lora", "qlora"]
    assert not kinds["full"]["fits"] and not kinds["lora"]["fits"]
    assert kinds["qlora"]["fits"]
    # the answer is QLoRA's cheapest plan, its recipe starts with the qlora step
    assert r.chosen is not None and r.chosen.steps[0]["name"] == "qlora"
    assert r.recipe and "name: qlora" in r.recipe
    assert kinds["qlora"]["peak_bytes"] < kinds["lora"]["peak_bytes"] < kinds["full"]["peak_bytes"]
    # LoRA's closest keeps the bf16 weights: at least their 42 MB
    assert kinds["lora"]["peak_bytes"] > 40 * 10**6


def test_a_full_fine_tune_that_fits_stays_the_answer(wide, capsys):
    code, out, err = run(
        capsys,
        "plan",
        wide,
        "--budget",
        f"{(WORKSPACE + 512 * MiB) // MiB}MiB",
        "-b",
        "1",
        "-s",
        "8",
        "--dtype",
        "bfloat16",
        "--context-overhead",
        "0",
        "--peft",
        "lora",
        "--json",
        "-",
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["chosen"]["steps"] == []  # fits as it is
    assert [o["trains"] for o in d["peft"]] == ["full", "lora"]
    assert d["peft"][1]["fits"] and d["peft"][1]["steps"][0]["name"] == "lora"


def test_peft_needs_a_training_step_and_its_library(wide, monkeypatch):
    with pytest.raises(InputError, match="--peft"):
        P.plan(wide, Workload(mode="infer", batch_size=1, seq_len=8), 10**12, peft="lora")
    with pytest.raises(InputError, match="--peft must be one of"):
        P.plan(wide, WL, 10**12, peft="dora")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "peft" else real(n, *a))
    with pytest.raises(EnvironmentProblem, match="pip install"):
        P.plan(wide, WL, 10**12, peft="lora")


def test_any_leaves_out_a_kind_the_model_cannot_train_and_searches_the_others():
    """GPT-2's projections are Conv1D, not Linear: QLoRA has nothing to quantize. --peft any
    says so in QLoRA's row and plans with the others (it refused the whole plan, exit 2);
    --peft qlora, asked for by name, still refuses."""
    from tests.conftest import tiny

    wl = Workload(batch_size=2, seq_len=16)
    r = P.plan(tiny("gpt2"), wl, WORKSPACE + 2 * MiB, context_overhead=0, max_runs=4, peft="any")
    kinds = {o["trains"]: o for o in r.peft}
    assert list(kinds) == ["full", "lora", "qlora"]
    assert "no Linear layers to quantize" in kinds["qlora"]["not_applicable"]
    assert kinds["lora"]["runs"] > 0 and "not_applicable" not in kinds["lora"]
    with pytest.raises(InputError, match="--peft qlora: GPT2LMHeadModel has no Linear layers"):
        P.plan(tiny("gpt2"), wl, WORKSPACE + 2 * MiB, context_overhead=0, max_runs=4, peft="qlora")
