"""Hostile input: one clear line on stderr, exit 2, no traceback, refused before any work starts.

Each case is an input that once ended in a traceback (exit 70) or ran for minutes. The
bounds' refusals are asserted by their message, not timed: a refusal comes before any
model is built or traced (memprof.bounds), so each of these tests takes seconds.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from memprof import bounds
from memprof.cli import main
from tests.conftest import tiny

LLAMA: dict[str, Any] = json.loads(Path(tiny("llama")).read_text())
TRAIN = ["-e", "sim", "-b", "1", "-s", "8"]


def refused(capsys: Any, *args: str, code: int = 2) -> str:
    """Run memprof; assert the exit code, one stderr line, no traceback; return that line."""
    got = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert got == code, err
    assert len(lines) == 1, err
    assert len(lines[0]) <= bounds.MAX_MESSAGE_CHARS + len("memprof: error: ")
    return lines[0]


def config(tmp_path: Path, name: str = "bad", **changes: Any) -> str:
    """The tiny llama config with ``changes``, as a file."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**LLAMA, **changes}))
    return str(path)


# ------------------------------------------------------------------ config files
def test_model_type_a_list(tmp_path, capsys):
    line = refused(capsys, "analyze", config(tmp_path, model_type=["llama"]), *TRAIN)
    assert "model_type must be a string" in line


def test_random_bytes(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(os.urandom(64) + b"\x80\xff")
    line = refused(capsys, "analyze", str(path), *TRAIN)
    assert "not a text file" in line


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"hidden_size": -64}, "hidden_size must be at least 1, got -64"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_attention_heads": 0, "num_key_value_heads": 0}, "num_attention_heads must be at least 1"),
        (
            {"num_attention_heads": 5, "num_key_value_heads": 5},
            "not a multiple of the number of attention heads",
        ),
        ({"vocab_size": 0}, "vocab_size must be at least 1"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a whole number"),
        ({"architectures": [5]}, "architectures must be a list of class names"),
        ({"torch_dtype": "no-such-dtype"}, "invalid llama config"),
        ({"rope_scaling": {"type": "linear"}}, "invalid llama config"),
        (
            {"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 5},
            "num_experts_per_tok 5 is more than the 2 experts",
        ),
    ],
)
def test_bad_sizes(tmp_path, capsys, changes, says):
    assert says in refused(capsys, "analyze", config(tmp_path, **changes), *TRAIN)


def test_remote_code_config_file_needs_trust(tmp_path, capsys):
    path = config(tmp_path, auto_map={"AutoConfig": "modeling.Config"})
    line = refused(capsys, "analyze", path, *TRAIN)
    assert "auto_map" in line and "--trust-remote-code" in line


# --------------------------------------------------------------------- factories
FACTORIES = """
import torch

def raises():
    raise RuntimeError("no model today")

def builder_not_callable():
    return torch.nn.Linear(8, 8), 5

def builder_returns_int():
    return torch.nn.Linear(8, 8), lambda b, s: 42

def builder_raises():
    def build(b, s):
        raise ValueError("no inputs")
    return torch.nn.Linear(8, 8), build
"""


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("raises", "the factory raised RuntimeError: no model today"),
        ("builder_not_callable", "no input builder"),
        ("builder_returns_int", "the input builder must return a dict of tensors"),
        ("builder_raises", "the input builder raised ValueError: no inputs"),
    ],
)
def test_bad_factory(tmp_path, capsys, monkeypatch, factory, says):
    (tmp_path / "hostile_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert says in refused(capsys, "analyze", f"hostile_factories:{factory}", *TRAIN)


# ---------------------------------------------------------------- recipes, --step
def test_recipe_complex_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("? [a, b]\n: 1\noptimizations:\n  - name: checkpointing\n")
    line = refused(capsys, "analyze", tiny("llama"), *TRAIN, "-r", str(recipe))
    assert "a key must be a name, got a list" in line


def test_step_value_not_yaml(capsys):
    line = refused(capsys, "analyze", tiny("llama"), *TRAIN, "--step", "checkpointing:every=[")
    assert "checkpointing:every=[" in line and "not a valid value" in line


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


def test_billion_laughs_recipe(tmp_path, capsys):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS + "optimizations: *i\n")
    assert len(recipe.read_bytes()) < 600
    line = refused(capsys, "analyze", tiny("llama"), *TRAIN, "-r", str(recipe))
    assert "anchors and aliases" in line


def test_billion_laughs_workloads(tmp_path, capsys):
    workloads = tmp_path / "workloads.yaml"
    workloads.write_text(LAUGHS + "workloads: *i\n")
    line = refused(capsys, "baseline", "--workloads", str(workloads), "-o", str(tmp_path / "b.json"))
    assert "anchors and aliases" in line
    assert not (tmp_path / "b.json").exists()


def test_recipe_too_large(tmp_path, capsys):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("optimizations:\n  - name: checkpointing\n" + "#" * bounds.MAX_YAML_BYTES + "\n")
    assert "more than memprof reads" in refused(capsys, "analyze", tiny("llama"), *TRAIN, "-r", str(recipe))


def test_huge_problem_is_cut(tmp_path, capsys):
    recipe = tmp_path / "long.yaml"
    recipe.write_text("optimizations:\n  - " + json.dumps(["lol"] * 50_000) + "\n")
    line = refused(capsys, "analyze", tiny("llama"), *TRAIN, "-r", str(recipe))
    assert "characters in all" in line


# ------------------------------------------------------------------------ bounds
def test_bound_parameters(tmp_path, capsys):
    line = refused(capsys, "analyze", config(tmp_path, hidden_size=1_000_000_000), *TRAIN)
    assert "parameters, more than memprof projects" in line


def test_bound_positions(tmp_path, capsys):
    line = refused(capsys, "analyze", config(tmp_path, max_position_embeddings=10**15), *TRAIN)
    assert (
        f"max_position_embeddings 1000000000000000 is more than memprof models ({bounds.MAX_POSITIONS}"
        in line
    )


def test_bound_layers(tmp_path, capsys):
    line = refused(capsys, "analyze", config(tmp_path, num_hidden_layers=100_000_000), *TRAIN)
    assert f"more than memprof traces ({bounds.MAX_LAYERS}" in line


def test_bound_batch(capsys):
    line = refused(capsys, "analyze", tiny("llama"), "-e", "sim", "-b", "1000000000000", "-s", "8")
    assert "--batch-size 1000000000000 is more than memprof measures" in line


def test_bound_tokens(capsys):
    line = refused(capsys, "analyze", tiny("llama"), "-e", "sim", "-b", "65536", "-s", "4096")
    assert "tokens, more than memprof measures in one step" in line


def test_bound_decode_tokens(capsys):
    args = ["analyze", tiny("llama"), *TRAIN, "--mode", "infer", "--decode-tokens", "100000000"]
    assert f"more than memprof traces ({bounds.MAX_DECODE_TOKENS}" in refused(capsys, *args)


def test_decode_past_position_limit(capsys):
    # the tiny llama has 256 positions: 8 prompt tokens + 300 new ones do not fit
    args = ["analyze", tiny("llama"), *TRAIN, "--mode", "infer", "--decode-tokens", "300"]
    line = refused(capsys, *args)
    assert "position limit of 256" in line and "decode at most 248 tokens" in line


def test_bound_world_size(capsys):
    args = ["analyze", tiny("llama"), *TRAIN, "--world-size", "1000000", "--shard", "fsdp"]
    line = refused(capsys, *args)
    assert f"more than memprof projects ({bounds.MAX_WORLD_SIZE})" in line and "fake process group" in line


@pytest.mark.parametrize("command", ["compare", "plan", "apply"])
def test_bounds_hold_for_every_command(tmp_path, capsys, command):
    out = tmp_path / "out"
    extra = {
        "compare": [*TRAIN, "--step", "checkpointing"],
        "plan": ["-b", "1", "-s", "8", "--budget", "8GiB"],
        "apply": ["-b", "1", "-s", "8", "--step", "checkpointing", "-o", str(out)],
    }[command]
    line = refused(capsys, command, config(tmp_path, num_hidden_layers=100_000_000), *extra)
    assert "layers, more than memprof traces" in line
    assert not out.exists()


def test_allocator_model_refuses_past_its_address_space():
    from memprof.allocator_model.model import CachingAllocatorModel
    from memprof.errors import InputError

    with pytest.raises(InputError, match="64 TiB address space"):
        CachingAllocatorModel().malloc(2**47)


def test_cut_is_one_short_line():
    assert bounds.cut("a\n b") == "a b"
    long = bounds.cut("x" * 10_000)
    assert len(long) == bounds.MAX_MESSAGE_CHARS and long.endswith("(10000 characters in all)")


def test_lower_bound_of_parameters_is_below_the_real_count():
    from memprof.models import bundled_models, resolve

    for name in ("llama-3-8b", "qwen3-30b-a3b", "mixtral-8x7b", "t5-small"):
        assert name in bundled_models()
        rm = resolve(name)
        assert (
            0
            < bounds.min_parameters(rm.config)
            < {
                "llama-3-8b": 8.0e9,
                "qwen3-30b-a3b": 30.5e9,
                "mixtral-8x7b": 46.7e9,
                "t5-small": 60.5e6,
            }[name]
        )


def test_baseline_checks_every_workload_before_running_one(tmp_path, capsys):
    workloads = tmp_path / "workloads.yaml"
    bad = config(tmp_path, num_hidden_layers=100_000_000)
    workloads.write_text(
        f"workloads:\n  - name: fine\n    model: {tiny('llama')}\n    batch_size: 1\n    seq_len: 8\n"
        f"  - name: deep\n    model: {bad}\n    batch_size: 1\n    seq_len: 8\n"
    )
    line = refused(capsys, "baseline", "--workloads", str(workloads), "-o", str(tmp_path / "b.json"))
    assert "deep: " in line and "layers, more than memprof traces" in line
    assert not (tmp_path / "b.json").exists()


def test_bound_timing_steps(capsys):
    args = ["compare", tiny("llama"), "-e", "cpu", "-b", "1", "-s", "8", "--step", "checkpointing"]
    line = refused(capsys, *args, "--timing-steps", "99999999")  # was: no bound
    assert "--timing-steps" in line and "99999999 is more than memprof times (100)" in line


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", tiny("llama"), *TRAIN, "--budget", "99999999999999999999999999999TiB"],
        ["plan", tiny("llama"), "-b", "1", "-s", "8", "--budget", "1048577TiB"],
        [
            "plan",
            tiny("llama"),
            "-b",
            "1",
            "-s",
            "8",
            "--budget",
            "24GiB",
            "--context-overhead",
            "2000000TiB",
        ],
    ],
)
def test_bound_sizes(capsys, args):
    # was: a profile with budget_bytes ~1e41, past the 2**63-1 a baseline may hold
    line = refused(capsys, *args)
    assert "is too large: memprof reads sizes up to 1 EiB (2**60 bytes)" in line


def test_lengths_not_finite(capsys):
    args = ["compare", tiny("llama"), *TRAIN, "--step", "dynamic_padding", "--lengths", "normal(1e400,1)"]
    assert "the parameters must be finite numbers" in refused(capsys, *args)  # was: OverflowError, exit 70


def test_bound_samples(capsys):
    args = ["compare", tiny("llama"), *TRAIN, "--step", "dynamic_padding", "--lengths", "uniform(1,8)"]
    line = refused(capsys, *args, "--samples", "1000000000000")
    assert f"more than memprof draws ({bounds.MAX_SAMPLES})" in line
