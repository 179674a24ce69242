"""The command line: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from memprof.cli import app, main
from memprof.profile import SCHEMA, Profile
from tests.conftest import tiny


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "analyze" in r.output and "env" in r.output


def test_analyze_prints_report(capsys):
    code, out, err = run(
        capsys, "analyze", tiny("llama"), "--engine", "cpu", "-b", "2", "-s", "16", "--top", "3"
    )
    assert code == 0, err
    for text in (
        "Peak allocated",
        "Memory at the peak, by category",
        "Peak of each phase",
        "Top 3 modules",
        "steady state",
    ):
        assert text in out
    assert "\x1b[" not in out  # not a terminal: no escape codes


def test_analyze_json_stdout_is_the_profile(capsys):
    code, out, err = run(
        capsys, "analyze", tiny("gpt2"), "--engine", "sim", "-b", "1", "-s", "8", "--json", "-"
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["schema"] == SCHEMA
    for key in (
        "engine",
        "device",
        "model",
        "workload",
        "peak_bytes",
        "peak_reserved_bytes",
        "categories_at_peak",
        "phases",
        "modules",
    ):
        assert key in d
    assert set(d["categories_at_peak"]) == {
        "parameters",
        "buffers",
        "gradients",
        "optimizer_state",
        "activations",
        "temporaries",
        "inputs",
    }
    assert sum(d["categories_at_peak"].values()) == d["peak_bytes"]
    assert d["workload"]["mode"] == "train" and d["engine"] == "sim"
    assert Profile.from_dict(d).peak_bytes == d["peak_bytes"]


def test_analyze_json_file(tmp_path, capsys):
    path = tmp_path / "out" / "p.json"
    code, out, _ = run(
        capsys,
        "analyze",
        tiny("bert"),
        "--engine",
        "cpu",
        "--mode",
        "infer",
        "-b",
        "1",
        "-s",
        "8",
        "--json",
        str(path),
    )
    assert code == 0
    assert json.loads(path.read_text())["engine"] == "cpu"
    assert "Peak allocated" in out
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp files left


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["analyze", "/no/such/model"], 2, "no such file or directory"),
        (["analyze", "configs/no-such-model.json"], 2, "no such file or directory"),
        (["analyze", "gpt2", "--dtype", "float64"], 2, "--dtype"),
        (["analyze", "gpt2", "--batch-size", "0"], 2, "--batch-size must be at least 1"),
        (["analyze", "gpt2", "--seq-len", "0"], 2, "--seq-len must be at least 1"),
        (["analyze", "gpt2", "--seq-len", "4096", "--engine", "sim"], 2, "position limit of 1024"),
        (["analyze", "gpt2", "--engine", "tpu"], 2, "--engine"),
        (["analyze", "acme/not-cached-model"], 3, "HF_HUB_OFFLINE=1"),
        (
            ["analyze", "gpt2", "--snapshot", "x.pickle", "--engine", "cpu"],
            2,
            "--snapshot needs the cuda or sim engine",
        ),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code(capsys, monkeypatch, args, code, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got, out, err = run(capsys, *args)
    assert got == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error:")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    code, _, err = run(capsys, "analyze", str(bad))
    assert code == 2 and "not valid JSON" in err
    bad.write_text(json.dumps({"model_type": "nonesuch"}))
    code, _, err = run(capsys, "analyze", str(bad))
    assert code == 2 and "unknown model_type 'nonesuch'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_engine_cuda_without_gpu_is_exit_3(capsys):
    code, _, err = run(capsys, "analyze", tiny("llama"), "--engine", "cuda")
    assert code == 3 and "no CUDA GPU" in err


def test_out_of_memory_exit_4_with_partial_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "oomcli.py").write_text(
        textwrap.dedent(
            """
            import torch

            class M(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(4, 4)
                def forward(self, x):
                    y = self.lin(x)
                    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

            def make():
                return M(), lambda b, s: (torch.randn(b, 4),)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "analyze", "oomcli:make", "--engine", "cpu", "--mode", "infer")
    assert code == 4
    assert "Out of memory" in err and "forward" in err
    assert err.strip().splitlines()[-1].startswith("memprof: error: out of memory in the forward phase")


def test_env_command(capsys):
    code, out, _ = run(capsys, "env")
    assert code == 0
    assert "torch" in out and "Engines available" in out
    code, out, _ = run(capsys, "env", "--json", "-")
    d = json.loads(out)
    assert "sim" in d["engines"] and d["torch"] == torch.__version__


def test_no_color_respected(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    code, out, _ = run(
        capsys, "analyze", tiny("llama"), "--engine", "cpu", "-b", "1", "-s", "8", "--mode", "infer"
    )
    assert code == 0
    assert "\x1b[1m" in out  # styles still render (forced terminal)...
    assert not re.search(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|38|9[0-7])[;m]", out)  # ...but no colours
