"""Recipes: every shipped one validates; a bad one gets every problem listed."""

from __future__ import annotations

import re

import pytest

from memprof import recipes
from memprof.cli import main
from memprof.errors import InputError
from memprof.recipes import RecipeError

SHIPPED = recipes.shipped_recipes()


def test_there_are_shipped_recipes():
    names = {p.stem for p in SHIPPED}
    assert {"low-memory-finetune", "fastest-fit", "small-gpu-inference", "minimal-memory"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_documents_its_command(path):
    r = recipes.load(path)
    assert r.steps and r.description
    assert any(line.startswith("memprof compare") for line in r.header), (
        "header comment must give the command"
    )
    # by name as well as by path
    assert recipes.load(path.stem).to_dict() == r.to_dict()


def test_bad_recipe_lists_every_problem():
    text = """
description: 3
colour: blue
optimizations:
  - name: checkpointing
    every: 0
  - name: mixed_precison
  - name: grad_accumulation
    steps: "two"
  - just a string
  - name: optimizer
    type: adamw
    type: sgd
"""
    with pytest.raises(RecipeError) as e:
        recipes.parse(text, "bad.yaml")
    probs = e.value.problems
    joined = "\n".join(probs)
    assert "key 'type' appears twice" in joined
    assert "unknown key 'colour'" in joined
    assert "'description' must be a string" in joined
    assert "option 'every' must be at least 1, got 0" in joined
    assert "unknown optimization 'mixed_precison' (did you mean 'mixed_precision'?)" in joined
    assert "option 'steps' must be an integer, got 'two'" in joined
    assert "must be a mapping with a 'name'" in joined
    assert len(probs) == 7


@pytest.mark.parametrize(
    "text,message",
    [
        ("optimizations: [name: x", "not valid YAML at line 1"),
        ("", "got empty"),
        ("- name: checkpointing", "a recipe is a mapping"),
        ("description: x", "missing 'optimizations'"),
        ("optimizations: []", "'optimizations' is empty"),
        ("optimizations:\n  - name: checkpointing\n  - name: checkpointing", "appears 2 times"),
        ("optimizations:\n  - name: os.system", "unknown optimization 'os.system'"),
    ],
)
def test_malformed_recipes(text, message):
    with pytest.raises(RecipeError, match=message):
        recipes.parse(text)


@pytest.mark.parametrize(
    ("entry", "option", "shown"),
    [
        ("{name: pruning, amount: .nan}", "amount", "nan"),
        ("{name: lora, alpha: .inf, rank: 8}", "alpha", "inf"),
        ("{name: lora, dropout: -.inf}", "dropout", "-inf"),
        ("{name: allocator, garbage_collection_threshold: .nan}", "garbage_collection_threshold", "nan"),
    ],
)
def test_a_non_finite_float_option_is_refused(entry, option, shown):
    # was: "ok", then ValueError: cannot convert float NaN to integer (exit 70) when run
    with pytest.raises(RecipeError) as e:
        recipes.parse(f"optimizations:\n  - {entry}\n", "r.yaml")
    assert e.value.problems[-1].endswith(f"option {option!r} must be a finite number, got {shown}")
    # the same check for a --step value
    with pytest.raises(RecipeError, match="must be a finite number"):
        recipes.from_names([f"pruning:amount={'.nan' if shown == 'nan' else '.inf'}"])


def test_recipe_never_runs_code(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("optimizations:\n  - !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipes.load(f)


def test_missing_recipe_names_the_shipped_ones():
    with pytest.raises(InputError, match="shipped: .*low-memory-finetune"):
        recipes.load("no-such-recipe")


def test_step_items_make_a_recipe():
    r = recipes.from_names(["checkpointing:every=2", "mixed_precision:dtype=bfloat16,pure=true"])
    assert [s.describe() for s in r.steps] == ["checkpointing(every=2)", "mixed_precision(pure=True)"]


def test_cli_validate(tmp_path, capsys):
    good = SHIPPED[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizations:\n  - name: nope\n  - name: checkpointing\n    every: -1\n")
    assert main(["recipes", "validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    code = main(["recipes", "validate", str(good), str(bad)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "2 problems" in err and "unknown optimization 'nope'" in err and "at least 1" in err
    assert "Traceback" not in err


def test_cli_lists_optimizations_and_recipes(capsys):
    assert main(["recipes", "--options"]) == 0
    out = capsys.readouterr().out
    for name in ("checkpointing", "mixed_precision", "optimizer_in_backward", "low-memory-finetune", "every"):
        assert name in out


def test_a_recipe_path_that_is_no_file_says_what_it_is(tmp_path):
    import os

    from memprof.recipes import resolve_path

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path, says in ((fifo, "is a named pipe (FIFO), not a recipe file"), (tmp_path, "is a directory")):
        with pytest.raises(InputError, match=re.escape(says)):
            resolve_path(path)
