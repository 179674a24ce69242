"""memprof compare: the ladder on a bundled config in sim, a tiny LM and MiniLM in cpu mode."""

from __future__ import annotations

import json

import pytest

from memprof import recipes
from memprof.cli import main
from memprof.compare import SCHEMA, compare
from memprof.profile import Profile
from memprof.workload import Workload
from tests.conftest import tiny


def test_compare_tiny_lm_on_cpu_measures_every_row():
    r = recipes.from_names(["checkpointing", "inference_mode", "mixed_precision:pure=true"])
    c = compare(tiny("llama"), r, Workload(batch_size=4, seq_len=32), engine="cpu", timing_steps=1)
    assert c.baseline_seconds and c.baseline_flops and c.baseline_quality
    ck, skipped, pure = c.steps
    assert skipped.skipped and "infer" in skipped.skipped and skipped.profile is None
    assert ck.profile.peak_bytes < c.baseline.peak_bytes
    assert ck.flops > c.baseline_flops  # recomputation is counted
    assert ck.quality["output_max_abs_diff"] == 0.0 and ck.quality["loss_abs_diff"] == 0.0
    assert pure.profile.peak_bytes < ck.profile.peak_bytes
    assert pure.quality["output_max_rel_diff"] > 0  # bf16 changes the numbers a little
    assert pure.profile.optimizations == [
        {"name": "checkpointing", "options": {"every": 1}},
        {"name": "mixed_precision", "options": {"dtype": "bfloat16", "pure": True}},
    ]
    assert c.final is pure.profile


def test_compare_separate_measures_each_step_alone():
    r = recipes.from_names(["checkpointing", "mixed_precision:pure=true"])
    c = compare(tiny("llama"), r, Workload(batch_size=2, seq_len=16), engine="sim", cumulative=False)
    assert [len(s.profile.optimizations) for s in c.steps] == [1, 1]
    assert c.baseline_seconds is None and c.steps[0].seconds is None and c.steps[0].quality is None


def test_cli_compare_bundled_config_in_sim_json(capsys, tmp_path):
    page = tmp_path / "compare.html"
    code = main(
        [
            "compare",
            "gpt2",
            "--recipe",
            "low-memory-finetune",
            "-b",
            "1",
            "-s",
            "64",
            "-e",
            "sim",
            "--json",
            "-",
            "--html",
            str(page),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    # the page: a waterfall of the steps and the two timelines (baseline, after every step)
    text = page.read_text()
    assert "data-expected-charts=3" in text and '"type":"waterfall"' in text
    d = json.loads(out)
    assert d["schema"] == SCHEMA
    Profile.from_dict(d["baseline"])
    assert len(d["steps"]) == 5
    for s in d["steps"]:
        assert set(s) >= {"name", "options", "profile", "flops", "seconds", "quality"}
        assert s["seconds"] is None and s["quality"] is None  # sim
    first, *_, last = d["steps"]
    assert first["skipped"]  # gpt2 already runs sdpa
    assert last["profile"]["peak_bytes"] < d["baseline"]["peak_bytes"] / 2


def test_cli_compare_minilm_on_cpu(minilm_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code = main(
        [
            "compare",
            str(minilm_dir),
            "--step",
            "checkpointing",
            "--step",
            "mixed_precision:dtype=bfloat16",
            "-b",
            "2",
            "-s",
            "32",
            "-e",
            "cpu",
            "--timing-steps",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Savings ladder" in out and "checkpointing" in out and "At the peak, by category" in out
    assert "Δ quality" in out


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["compare", "gpt2"], 2, "give a recipe"),
        (["compare", "gpt2", "--recipe", "nope"], 2, "no such recipe"),
        (["compare", "gpt2", "--step", "checkpointing:every=0"], 2, "at least 1"),
        (["compare", "gpt2", "--step", "x", "--step", "y"], 2, "2 problems"),
        (["compare", "gpt2", "--step", "checkpointing", "-b", "0"], 2, "--batch-size must be at least 1"),
    ],
)
def test_cli_compare_errors(capsys, args, code, message):
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_surgery_in_one_row_does_not_leak_into_the_next():
    # pruning rewrites model.config; the rows after it must build the original model
    c = compare(
        tiny("llama"),
        recipes.from_names(
            ["pruning:amount=0.5", "pruning:method=heads,amount=0.5", "optimizer:type=sgd"],
            allow_repeats=True,
        ),
        Workload(batch_size=2, seq_len=32),
        engine="cpu",
        timing_steps=0,
        cumulative=False,
    )
    base = c.baseline.model["parameters"]
    ffn, heads, sgd = (s.profile.model["parameters"] for s in c.steps)
    assert sgd == base and ffn < base and heads < base and ffn != heads


def test_the_sim_traces_8bit_adamw_in_a_comparison(tmp_path):
    """8-bit AdamW (bitsandbytes, its quantization maps built outside fake mode) is a measured row."""
    out = tmp_path / "c.json"
    argv = [
        "compare",
        tiny("llama"),
        "-e",
        "sim",
        "--step",
        "optimizer:type=adamw8bit",
        "-b",
        "2",
        "-s",
        "16",
    ]
    assert main([*argv, "--json", str(out)]) == 0
    c = json.loads(out.read_text())
    row = c["steps"][0]
    assert row["error"] is None and row["profile"] is not None
    state = row["profile"]["categories_at_peak"]["optimizer_state"]
    assert state < 0.4 * c["baseline"]["categories_at_peak"]["optimizer_state"]
