"""memprof analyze --step/--recipe: the step is profiled with the optimizations applied."""

from __future__ import annotations

import json

from memprof.cli import main
from tests.conftest import tiny


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def profile(capsys, *extra):
    code, out, err = run(
        capsys, "analyze", tiny("llama"), "--engine", "sim", "-b", "2", "-s", "64", "--json", "-", *extra
    )
    assert code == 0, err
    return json.loads(out)


def test_steps_are_applied_and_move_the_memory(capsys):
    plain = profile(capsys)
    stepped = profile(capsys, "--step", "checkpointing")
    assert plain["optimizations"] == []
    assert [s["name"] for s in stepped["optimizations"]] == ["checkpointing"]
    # the activations saved for backward were the peak; checkpointed, they are not
    assert plain["peak_phase"] == "backward" and plain["categories_at_peak"]["activations"] > 0
    assert stepped["peak_bytes"] < plain["peak_bytes"]
    assert stepped["categories_at_peak"]["activations"] < plain["categories_at_peak"]["activations"]


def test_applied_line_in_the_report(capsys):
    code, out, err = run(
        capsys,
        "analyze",
        tiny("llama"),
        "-e",
        "sim",
        "-b",
        "1",
        "-s",
        "16",
        "--step",
        "checkpointing:every=2",
    )
    assert code == 0, err
    assert "Applied" in out and "checkpointing(every=2)" in out


def test_a_step_that_does_not_apply_is_an_error(capsys):
    code, out, err = run(
        capsys,
        "analyze",
        tiny("llama"),
        "-e",
        "sim",
        "--mode",
        "infer",
        "-b",
        "1",
        "-s",
        "16",
        "--step",
        "checkpointing",
    )
    assert code == 2
    assert err.startswith("memprof: error: not applied: checkpointing") and err.count("\n") == 1


def test_steps_with_shard_or_budget_are_refused_before_work(capsys):
    for extra in (["--shard", "fsdp", "--world-size", "2"], ["--budget", "8GiB"]):
        code, out, err = run(capsys, "analyze", tiny("llama"), "-e", "sim", "--step", "checkpointing", *extra)
        assert code == 2, err
        assert err.count("\n") == 1


def test_bad_steps_and_recipes_are_refused_before_work(capsys, tmp_path):
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("optimizations: [{name: checkpointing, every: 0}]\n")
    for extra in (
        ["--step", "pruning:amount=2"],
        ["--step", "no_such_step"],
        ["--recipe", str(tmp_path / "missing.yaml")],
        ["--recipe", str(bad_recipe)],
    ):
        code, out, err = run(capsys, "analyze", tiny("llama"), "-e", "sim", *extra)
        assert code == 2, (extra, err)
        assert err.startswith("memprof: error: ") and "Traceback" not in err + out
        assert out == ""
