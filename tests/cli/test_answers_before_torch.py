"""Listing and validating recipes, and bad arguments, answer before torch and transformers load.

Each case runs the console script's entry (``memprof.__main__.run``) in a fresh
interpreter and reports which of torch and transformers it imported; the exit
code and the message are those the commands gave when they imported torch first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memprof import optimizations

REPO = Path(__file__).resolve().parents[2]

#: runs the entry with the arguments after ``-c CODE``, then prints the heavy modules it loaded
CODE = (
    "import sys\n"
    "sys.argv = ['memprof', *sys.argv[1:]]\n"
    "from memprof.__main__ import run\n"
    "try:\n"
    "    run()\n"
    "finally:\n"
    "    sys.stderr.write('\\nloaded: ' + ' '.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
)

BAD_RECIPE = """\
description: bad
optimizations:
  - name: checkpointng
  - name: lora
    rank: -3
    bogus: 1
  - name: mixed_precision
    dtype: float7
"""


def memprof(*args: str) -> tuple[int, str, str, str]:
    """(exit code, stdout, stderr, heavy modules loaded) of ``memprof ARGS``."""
    p = subprocess.run(
        [sys.executable, "-c", CODE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**__import__("os").environ, "COLUMNS": "120", "NO_COLOR": "1"},
    )
    err, _, loaded = p.stderr.rpartition("\nloaded: ")
    return p.returncode, p.stdout, err, loaded.strip()


@pytest.fixture
def bad_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RECIPE)
    return path


def test_recipes_list_without_torch():
    code, out, err, loaded = memprof("recipes")
    assert (code, loaded) == (0, ""), err
    for name in optimizations.names():
        assert name in out
    assert "Shipped recipes" in out and "invalid" not in out


def test_recipes_options_without_torch():
    code, out, err, loaded = memprof("recipes", "--options")
    assert (code, loaded) == (0, ""), err
    assert "rank: an integer = 16" in out or "rank:" in out


def test_validate_a_shipped_recipe_without_torch():
    code, out, err, loaded = memprof("recipes", "validate", "configs/recipes/low-memory-finetune.yaml")
    assert (code, loaded) == (0, ""), err
    assert out.startswith("ok  configs/recipes/low-memory-finetune.yaml: ")


def test_validate_a_bad_recipe_without_torch(bad_recipe: Path):
    code, out, err, loaded = memprof("recipes", "validate", str(bad_recipe))
    assert (code, loaded) == (2, "")
    assert err.splitlines() == [
        f"memprof: error: {bad_recipe}: 4 problems",
        "  - optimizations[1] (checkpointng): unknown optimization 'checkpointng' (did you mean 'checkpointing'?); "
        "known: " + ", ".join(optimizations.names()),
        "  - optimizations[2] (lora): unknown option 'bogus'; options: "
        + ", ".join(n for n, *_ in optimizations.option_help(optimizations.get("lora").Config)),
        "  - optimizations[2] (lora): option 'rank' must be at least 1, got -3",
        "  - optimizations[3] (mixed_precision): option 'dtype' must be one of bfloat16, float16, got 'float7'",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipes", "validate", "no-such-recipe"], "no-such-recipe: no such recipe file or shipped recipe"),
        (
            ["analyze", "gpt2", "--budget", "lots"],
            "--budget: not a size: 'lots' (expected e.g. 24GiB, 512MiB, 4096)",
        ),
        (["analyze", "gpt2", "--json", "README.md/out.json"], "--json README.md/out.json: "),
        (
            ["analyze", "gpt2", "--step", "nosuch"],
            "--step: 1 problem: optimizations[1] (nosuch): unknown optimization",
        ),
        (
            ["analyze", "gpt2", "--recipe", "no-such-recipe"],
            "no-such-recipe: no such recipe file or shipped recipe",
        ),
        (
            ["compare", "gpt2", "--step", "checkpointing", "--batch-size", "0"],
            "--batch-size must be at least 1, got 0",
        ),
        (["plan", "gpt2", "--budget", "0"], "--budget: must be more than 0, got '0'"),
        (
            ["check", "--baseline", "no-such.json", "--tolerance", "garbage"],
            "--tolerance 'garbage': give a percentage (2%) or a size (50MiB), not negative, finite",
        ),
    ],
)
def test_bad_arguments_answer_without_torch(args: list[str], message: str):
    code, out, err, loaded = memprof(*args)
    assert (code, loaded) == (2, ""), err
    assert err.startswith("memprof: error: " + message), err
    assert len(err.splitlines()) == 1 and out == ""
