"""Listing and validating recipes, and bad arguments, answer before torch and transformers load.

Each case runs the console script's entry (``memprof.__main__.run``) in a fresh
interpreter and reports which of torch and transformers it imported; the exit
code and the message are those the commands gave when they imported torch first.
A MODEL spec that names nothing (or a config.json that is not one) is answered so
too, after the checks the library made before it (a line with two errors gets the
message of before, loading torch where the first check needs it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memprof import optimizations
from memprof.model_config import bundled_models

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


#: the list of bundled configs that ends the messages about a MODEL that names nothing
NAMES = ", ".join(bundled_models())
NO_SUCH_MODEL = f"no-such-model: no such file or directory, bundled config or Hub id (bundled: {NAMES})"


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
        (["analyze", "gpt2", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["analyze", "gpt2", "--mode", "distill"], "--mode distill needs --teacher MODEL"),
        # the library's order: --fixes, the workload, then MODEL
        (
            ["analyze", "no-such-model", "--fixes", "-1", "--batch-size", "0"],
            "--fixes must be 0 or more, got -1",
        ),
        (["analyze", "no-such-model", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["analyze", "no-such-model"], NO_SUCH_MODEL),
        (["analyze", "no-such-model", "--mode", "distill", "--teacher", "no-such-teacher"], NO_SUCH_MODEL),
        (
            ["analyze", "./no/such/dir"],
            f"./no/such/dir: no such file or directory (bundled configs: {NAMES})",
        ),
        (["analyze", "no-such.json"], f"no-such.json: no such file or directory (bundled configs: {NAMES})"),
        (["analyze", "README.md"], "README.md: expected a model directory or a config.json, got a .md file"),
        (["analyze", "configs"], "configs: directory has no config.json"),
        (["compare", "no-such-model", "--step", "checkpointing"], NO_SUCH_MODEL),
        (["compare", "no-such-model", "--step", "checkpointing", "--lengths", "garbage"], NO_SUCH_MODEL),
        (
            ["plan", "no-such.json", "--budget", "8GiB"],
            f"no-such.json: no such file or directory (bundled configs: {NAMES})",
        ),
        (
            ["plan", "no-such-model", "--budget", "8GiB", "--context-overhead", "9GiB"],
            "--budget 8.0 GiB leaves nothing after the CUDA context (9.0 GiB, --context-overhead)",
        ),
        (
            ["baseline", "no-such-model", "--output", "no-such-folder/b.json"],
            f"workloads: 1 problem: no-such-model-train-b8-s512: {NO_SUCH_MODEL}",
        ),
    ],
)
def test_bad_arguments_answer_without_torch(args: list[str], message: str):
    code, out, err, loaded = memprof(*args)
    assert (code, loaded) == (2, ""), err
    assert err.startswith("memprof: error: " + message), err
    assert len(err.splitlines()) == 1 and out == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        ("[1]", "expected a JSON object with a model_type"),
        ('{"n_layer": 2}', "no model_type in the config"),
        ('{"model_type": 3}', 'model_type must be a string (e.g. "llama"), got int'),
        (
            '{"model_type": "gpt2", "auto_map": {"AutoConfig": "x.Y"}}',
            "the config asks to run code shipped with the model (auto_map); pass --trust-remote-code if you trust it",
        ),
    ],
)
def test_a_config_file_that_is_none_answers_without_torch(tmp_path: Path, text: str, message: str):
    path = tmp_path / "model.json"
    path.write_text(text)
    code, out, err, loaded = memprof("analyze", str(path))
    assert (code, loaded, out) == (2, "", ""), err
    assert err.splitlines() == [f"memprof: error: {path}: {message}"]


def test_a_folder_whose_config_asks_for_remote_code_answers_without_torch(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "auto_map": {"AutoConfig": "x.Y"}}')
    code, out, err, loaded = memprof("compare", str(tmp_path), "--step", "checkpointing")
    assert (code, loaded, out) == (2, "", ""), err
    assert err.splitlines() == [
        f"memprof: error: {tmp_path}: the config asks to run code shipped with the model (auto_map); "
        "pass --trust-remote-code if you trust it"
    ]


def test_apply_answers_output_then_model_without_torch(tmp_path: Path):
    under_a_file = tmp_path / "notes.txt"
    under_a_file.write_text("hi")
    args = ["--recipe", "low-memory-finetune", "--output"]
    code, out, err, loaded = memprof("apply", "no-such-model", *args, str(under_a_file / "x"))
    assert (code, loaded, out) == (2, "", ""), err
    assert err.splitlines() == [
        f"memprof: error: --output {under_a_file / 'x'}: {under_a_file} is a file, not a folder"
    ]
    code, out, err, loaded = memprof("apply", "no-such-model", *args, str(tmp_path / "new"))
    assert (code, loaded, out) == (2, "", ""), err
    assert err.splitlines() == [f"memprof: error: {NO_SUCH_MODEL}"]


def test_baseline_of_workloads_that_all_name_nothing_answers_without_torch(tmp_path: Path):
    path = tmp_path / "workloads.yaml"
    path.write_text(
        "workloads:\n  - name: a\n    model: no-such-model\n  - name: b\n    model: ./no/such/dir\n"
    )
    code, out, err, loaded = memprof(
        "baseline", "--workloads", str(path), "--output", str(tmp_path / "b.json")
    )
    assert (code, loaded, out) == (2, "", ""), err
    assert err.splitlines()[0] == "memprof: error: workloads: 2 problems"
    assert err.splitlines()[1:] == [
        f"  - a: {NO_SUCH_MODEL}",
        f"  - b: ./no/such/dir: no such file or directory (bundled configs: {NAMES})",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # checked by the library before MODEL, with what needs torch: the message of before
        (
            ["analyze", "no-such-model", "--budget", "8GiB", "--step", "checkpointing"],
            "--budget diagnoses the step as given; for a step with optimizations use memprof plan "
            "(which searches them) or memprof compare",
        ),
        (
            ["plan", "no-such-model", "--budget", "8GiB", "--peft", "lora", "--mode", "infer"],
            "--peft trains adapters: it needs a training step, not --mode infer",
        ),
    ],
)
def test_two_errors_where_the_first_needs_the_library(args: list[str], message: str):
    code, out, err, _ = memprof(*args)
    assert (code, out) == (2, ""), err
    assert err.splitlines() == [f"memprof: error: {message}"]


@pytest.mark.parametrize(
    "command", [["analyze"], ["compare", "--step", "checkpointing"], ["plan", "--budget", "8GiB"]]
)
def test_a_hub_id_not_cached_while_offline_answers_without_torch(
    command: list[str], monkeypatch, tmp_path: Path
):
    # an empty cache, and no download attempted: the config is looked up with huggingface_hub alone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    name, *rest = command
    code, out, err, loaded = memprof(name, "no-such-org/no-such-model", *rest)
    assert (code, loaded, out) == (3, "", ""), err
    assert err.splitlines() == [
        "memprof: error: no-such-org/no-such-model: not in the local Hugging Face cache and HF_HUB_OFFLINE=1, "
        "so no download was attempted (download it on a connected machine, or pass a local directory)"
    ]
