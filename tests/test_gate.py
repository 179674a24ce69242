"""The memory-regression gate: baseline, check, formats, bad input, determinism."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from memprof import gate
from memprof.cli import main
from memprof.errors import InputError
from tests.conftest import tiny

MODEL = "tests.gate_model:build"


@pytest.fixture
def base_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMPROF_TEST_GROW", raising=False)
    f = tmp_path / "memprof-baseline.json"
    assert main(["baseline", MODEL, "-b", "4", "-s", "64", "--name", "net", "-o", str(f)]) == 0
    return f


def test_the_same_run_twice_is_identical(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for f in (a, b):
        assert main(["baseline", tiny("llama"), "-b", "2", "-s", "32", "-o", str(f)]) == 0
    pa, pb = (json.loads(f.read_text())["workloads"][0]["profile"] for f in (a, b))
    assert pa == pb  # sim: bit-identical, modules and phases included
    # a baseline keeps no curves: its diffs show peaks, categories and modules
    assert pa["timeline"] is None and "timeline" not in pa["allocator"]


def test_unchanged_code_passes(base_file, capsys, tmp_path):
    page = tmp_path / "check.html"
    assert main(["check", "--baseline", str(base_file), "--html", str(page)]) == 0
    assert "passed: 1 workload(s)" in capsys.readouterr().out
    text = page.read_text()
    assert "memprof check: passed" in text and "data-expected-charts=2" in text  # peaks, and the timeline


def test_a_change_that_adds_memory_fails_and_names_the_module(base_file, monkeypatch, capsys):
    monkeypatch.setenv("MEMPROF_TEST_GROW", "1")  # block 1 becomes four times wider
    assert main(["check", "--baseline", str(base_file), "--format", "json"]) == 5
    rep = json.loads(capsys.readouterr().out)
    (w,) = rep["workloads"]
    assert not rep["passed"] and w["status"] == "regression" and w["delta_bytes"] > w["allowed_bytes"]
    # the innermost module that grew most is named (not the root, not the ModuleList around it)
    assert w["modules"][0]["module"] in ("blocks.1.up", "blocks.1.down")
    grew = {c["category"] for c in w["categories"] if c["bytes"] > c["baseline_bytes"]}
    assert "parameters" in grew
    # a tolerance above the growth lets it through
    assert main(["check", "--baseline", str(base_file), "--tolerance", "500%"]) == 0


def test_text_report_names_what_grew(base_file, monkeypatch, capsys):
    monkeypatch.setenv("MEMPROF_TEST_GROW", "1")
    assert main(["check", "--baseline", str(base_file)]) == 5
    out = capsys.readouterr().out
    assert "regression" in out and "blocks.1" in out and "FAILED: 1 regression" in out


def test_an_improvement_says_to_refresh_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMPROF_TEST_GROW", "1")
    f = tmp_path / "b.json"
    assert main(["baseline", MODEL, "-b", "4", "-s", "64", "-o", str(f)]) == 0
    monkeypatch.delenv("MEMPROF_TEST_GROW")
    assert main(["check", "--baseline", str(f)]) == 0
    out = capsys.readouterr().out
    assert "improvement" in out and "memprof baseline --update" in out
    assert main(["baseline", "--update", "-o", str(f)]) == 0
    assert main(["check", "--baseline", str(f), "--tolerance", "0"]) == 0
    assert "passed" in capsys.readouterr().out


def test_junit_and_github_formats(base_file, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEMPROF_TEST_GROW", "1")
    xml = tmp_path / "report.xml"
    assert main(["check", "--baseline", str(base_file), "--format", "junit", "-o", str(xml)]) == 5
    suite = ET.parse(xml).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "1" and suite.get("failures") == "1"
    case = suite.find("testcase")
    assert case is not None and case.get("name") == "net" and case.find("failure") is not None
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    capsys.readouterr()
    xml2 = tmp_path / "also.xml"
    assert main(["check", "--baseline", str(base_file), "--format", "github", "--junit", str(xml2)]) == 5
    assert ET.parse(xml2).getroot().get("failures") == "1"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("::error title=memprof: memory regression::net: peak")
    assert "| net |" in summary.read_text() and "regression" in summary.read_text()


def test_workloads_file_yaml_and_pyproject(tmp_path):
    y = tmp_path / "w.yaml"
    y.write_text(
        f"workloads:\n  - model: {tiny('llama')}\n    batch_size: 2\n    seq_len: 32\n"
        f"  - model: {tiny('llama')}\n    name: infer\n    mode: infer\n    batch_size: 2\n    seq_len: 32\n"
        "    steps: [inference_mode]\n"
    )
    ws = gate.read_workloads(y)
    assert [w.name for w in ws] == ["llama-train-b2-s32", "infer"] and ws[1].steps == ["inference_mode"]
    t = tmp_path / "pyproject.toml"
    t.write_text(f'[tool.memprof]\nworkloads = [{{ model = "{tiny("llama")}", seq_len = 32 }}]\n')
    assert gate.read_workloads(t)[0].workload.seq_len == 32
    out = tmp_path / "b.json"
    assert main(["baseline", "--workloads", str(y), "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["workloads"]) == 2


def test_workloads_file_problems_all_at_once(tmp_path, capsys):
    y = tmp_path / "w.yaml"
    y.write_text("workloads:\n  - batch_size: 0\n    colour: red\n  - model: gpt2\n    engine: tpu\n")
    assert main(["baseline", "--workloads", str(y), "-o", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "problems" in err and "colour" in err and "missing 'model'" in err and "tpu" in err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such baseline file"),
        ("{not json", "not valid JSON"),
        ('{"schema": "memprof.profile/1"}', "not a memprof baseline"),
        ('{"schema": "memprof.baseline/9", "workloads": []}', "newer than this memprof reads"),
        ('{"schema": "memprof.baseline/1", "workloads": [{"workload": {}}]}', "malformed"),
    ],
)
def test_a_bad_baseline_never_passes(tmp_path, capsys, content, message):
    f = tmp_path / "b.json"
    if content is not None:
        f.write_text(content)
    assert main(["check", "--baseline", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[0]


def test_a_corrupt_profile_in_the_baseline_is_an_error(base_file, capsys):
    d = json.loads(base_file.read_text())
    d["workloads"][0]["profile"]["phases"] = [{"nonsense": 1}]
    base_file.write_text(json.dumps(d))
    assert main(["check", "--baseline", str(base_file)]) == 2
    assert "malformed" in capsys.readouterr().err


def test_a_workload_that_no_longer_resolves(base_file, capsys):
    d = json.loads(base_file.read_text())
    d["workloads"][0]["model"] = "no_such_package.nowhere:build"
    base_file.write_text(json.dumps(d))
    assert main(["check", "--baseline", str(base_file)]) == 2
    assert "no_such_package" in capsys.readouterr().err


def test_tolerance_parsing(capsys, base_file):
    assert gate.Tolerance.parse("2%").allowed(1000) == 20
    assert gate.Tolerance.parse("50MiB").allowed(1) == 50 * 2**20
    for bad in ("abc", "-3%", "5 parsecs"):
        with pytest.raises(InputError, match="--tolerance"):
            gate.Tolerance.parse(bad)
    assert main(["check", "--baseline", str(base_file), "--tolerance", "lots"]) == 2


def test_version_changes_are_said_and_can_fail(base_file, capsys):
    d = json.loads(base_file.read_text())
    d["versions"]["torch"] = "1.0.0"
    base_file.write_text(json.dumps(d))
    assert main(["check", "--baseline", str(base_file)]) == 0
    assert "torch differs from the baseline's (1.0.0" in capsys.readouterr().out
    assert main(["check", "--baseline", str(base_file), "--strict-versions"]) == 3
    assert "versions differ" in capsys.readouterr().err


def test_the_example_workflow_is_valid_and_runs_the_check():
    import yaml

    from tests.conftest import REPO

    wf = yaml.safe_load((REPO / "examples" / "github-actions" / "memprof-check.yml").read_text())
    steps = wf["jobs"]["memory"]["steps"]
    run = " ".join(s.get("run", "") for s in steps)
    assert "memprof check --baseline" in run and "--format github" in run and "--junit" in run
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)


def test_repeated_blocks_are_folded_into_one_row(tmp_path, capsys):
    cfg = json.loads(Path(tiny("gpt2")).read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    base = tmp_path / "b.json"
    assert main(["baseline", str(folder), "-b", "2", "-s", "32", "-o", str(base)]) == 0
    cfg["n_inner"] = 8 * cfg["n_embd"]  # every block's MLP twice as wide
    (folder / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["check", "--baseline", str(base), "--format", "json"]) == 5
    mods = [m["module"] for m in json.loads(capsys.readouterr().out)["workloads"][0]["modules"]]
    n = cfg["n_layer"]
    assert f"transformer.h.*.mlp.c_fc (x{n})" in mods[:2] and f"transformer.h.*.mlp.c_proj (x{n})" in mods[:2]
