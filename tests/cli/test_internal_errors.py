"""No traceback, ever: a bug is one line on stderr (exit 70) and a crash file; known limits are typed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memprof.engines.runner as runner_mod
import memprof.report.terminal as terminal  # memprof analyze imports its renderer from here when it runs
from memprof.cli import main
from memprof.engines import get_engine
from memprof.engines.base import Engine
from memprof.errors import InputError, InternalError, NotSupported
from memprof.models import resolve
from memprof.workload import Workload
from tests.conftest import REPO, greedy_model, tiny

LINE = re.compile(
    r"^memprof: internal error(?P<where> while profiling \S+ in \w+)?: (?P<what>.*); (?P<tail>.*)$"
)


def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, forward: str) -> str:
    """A ``module:make`` model (``inner``: a Linear(8, 8)) whose forward body is ``forward``."""
    body = textwrap.indent(textwrap.dedent(forward).strip(), " " * 8)
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Model(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = torch.nn.Linear(8, 8)
                def forward(self, x):
            {body}

            def make():
                return Model(), lambda b, s: (torch.randn(b, 8),)
            """
        ).format(body=body)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:make"


def crash_line(capsys: pytest.CaptureFixture[str]) -> tuple[re.Match[str], Path]:
    """The one stderr line of an internal error, and the crash file it names."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m["tail"].startswith("traceback in "), m["tail"]
    path = Path(m["tail"].removeprefix("traceback in "))
    assert path.is_file()
    return m, path


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "crashes"
    monkeypatch.setenv("MEMPROF_CRASH_DIR", str(d))
    return d


def test_a_bug_in_the_model_is_one_line_with_its_op_and_module(tmp_path, monkeypatch, capsys, crash_dir):
    spec = greedy_model(tmp_path, monkeypatch, "zdiv_model", "ZeroDivisionError('half a step')")
    code = main(["analyze", spec, "--engine", "sim", "--mode", "infer", "-b", "1", "-s", "8"])
    assert code == 70
    m, path = crash_line(capsys)
    assert m["where"] == " while profiling make in sim"
    # the tracker's last op ran, then Python raised: "after" it
    assert m["what"] == "ZeroDivisionError: half a step (after op aten.addmm in module greedy)"
    assert path.parent == crash_dir and re.fullmatch(r"memprof-crash-\d{8}T\d{6}Z-\d+\.txt", path.name)
    text = path.read_text()
    assert text.startswith(f"command: memprof analyze {spec} --engine sim")
    assert re.search(r"versions: memprof \S+, torch \S+, transformers \S+, python \S+", text)
    assert "Traceback (most recent call last)" in text
    assert "ZeroDivisionError: half a step" in text and "raise ZeroDivisionError" in text


def test_an_op_that_raises_is_named(tmp_path, monkeypatch, capsys, crash_dir):
    spec = factory(tmp_path, monkeypatch, "badmm_model", "return torch.mm(self.inner(x), x.new_ones(3, 5))")
    assert main(["analyze", spec, "--engine", "sim", "--mode", "infer", "-b", "1", "-s", "8"]) == 70
    m, _ = crash_line(capsys)
    assert m["what"].startswith("RuntimeError: ")
    assert m["what"].endswith("(op aten.mm in module <model>)")


def test_a_bug_in_the_warm_up_step_names_the_module(tmp_path, monkeypatch, capsys, crash_dir):
    # a whole warm-up step (untracked) where one is needed, e.g. on cuda: the traceback tells the module
    monkeypatch.setattr(Engine, "full_warm_up_reason", lambda *a: "a whole warm-up step")
    spec = greedy_model(tmp_path, monkeypatch, "zdiv_train", "ZeroDivisionError('x')")
    assert main(["analyze", spec, "--engine", "cpu", "-b", "1", "-s", "8"]) == 70
    m, _ = crash_line(capsys)
    assert m["where"] == " while profiling make in cpu"
    assert m["what"] == "ZeroDivisionError: x (in module greedy)"


def test_a_bug_in_the_first_forward_of_a_training_step_names_op_and_module(
    tmp_path, monkeypatch, capsys, crash_dir
):
    # the cpu engine's warm-up runs no forward: the bug surfaces in the tracked step
    spec = greedy_model(tmp_path, monkeypatch, "zdiv_first", "ZeroDivisionError('x')")
    assert main(["analyze", spec, "--engine", "cpu", "-b", "1", "-s", "8"]) == 70
    m, _ = crash_line(capsys)
    assert m["what"] == "ZeroDivisionError: x (after op aten.addmm in module greedy)"


def test_a_bug_in_memprof_step_code(monkeypatch, capsys, crash_dir):
    def boom(*a, **k):
        raise KeyError("no such input")

    monkeypatch.setattr(runner_mod, "call_model", boom)
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "8"]) == 70
    m, path = crash_line(capsys)
    assert m["where"] == " while profiling llama in sim"
    assert m["what"] == "KeyError: 'no such input'"
    text = path.read_text()
    assert "KeyError: 'no such input'" in text and "in boom" in text
    assert "The above exception was the direct cause" in text  # the InternalError wraps the original


def test_the_library_raises_a_typed_internal_error(tmp_path, monkeypatch):
    spec = greedy_model(tmp_path, monkeypatch, "zdiv_lib", "ZeroDivisionError('x')")
    with pytest.raises(InternalError) as e:
        get_engine("sim").run(resolve(spec), Workload(mode="infer", batch_size=1, seq_len=8))
    err = e.value
    assert isinstance(err.__cause__, ZeroDivisionError) and err.exit_code == 70
    assert (err.model, err.engine, err.op, err.op_raised, err.module) == (
        "make",
        "sim",
        "aten.addmm",
        False,
        "greedy",
    )


def test_a_bug_outside_the_engine_has_no_model_context(monkeypatch, capsys, crash_dir):
    def boom(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'rows'")

    monkeypatch.setattr(terminal, "render", boom)
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "8"]) == 70
    m, path = crash_line(capsys)
    assert m["where"] is None
    assert m["what"] == "AttributeError: 'NoneType' object has no attribute 'rows'"
    assert "in boom" in path.read_text()


def test_a_crash_file_that_cannot_be_written_is_said_on_the_same_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMPROF_CRASH_DIR", str(blocker / "crashes"))  # under a file: mkdir fails
    monkeypatch.setattr(runner_mod, "call_model", lambda *a, **k: {}["x"])
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "8"]) == 70
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("memprof: internal error while profiling llama in sim: KeyError: 'x'; ")
    assert "the traceback could not be written (" in lines[0]


def test_the_default_crash_folder_is_in_the_temp_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MEMPROF_CRASH_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    monkeypatch.setattr(terminal, "render", lambda *a, **k: 1 / 0)
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "8"]) == 70
    _, path = crash_line(capsys)
    assert path.parent == tmp_path / "memprof"


def test_interrupt_is_still_130(monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "call_model", interrupt)
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "8"]) == 130
    err = capsys.readouterr().err  # Typer turns the interrupt into a silent exit 130: main says it
    assert err == "memprof: error: interrupted\n"


@pytest.mark.parametrize(
    "forward,op",
    [
        ("y = self.inner(x)\nreturn y[torch.nonzero(y > 0)[:, 0]].sum()", "aten.nonzero"),
        ("y = self.inner(x)\nreturn y * float(y.sum())", "aten._local_scalar_dense"),
    ],
)
def test_reading_tensor_values_in_sim_is_not_supported(tmp_path, monkeypatch, capsys, forward, op):
    spec = factory(tmp_path, monkeypatch, f"values_{op.split('.')[-1].strip('_')}", forward)
    assert main(["analyze", spec, "--engine", "sim", "--mode", "infer", "-b", "1", "-s", "8"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"memprof: error: make: not supported in sim: the step reads tensor values "
        f"({op} in module <model>); use --engine cpu to measure it"
    )
    with pytest.raises(NotSupported) as e:
        get_engine("sim").run(resolve(spec), Workload(mode="infer", batch_size=1, seq_len=8))
    assert isinstance(e.value, InputError) and e.value.exit_code == 2
    # the cpu engine has the values: it measures the step
    assert main(["analyze", spec, "--engine", "cpu", "--mode", "infer", "-b", "1", "-s", "8"]) == 0


def test_not_supported_message():
    e = NotSupported("acme/mamba-7b", "state-space models are not transformers")
    assert str(e) == "acme/mamba-7b: not supported: state-space models are not transformers"
    assert e.exit_code == 2


def test_a_subprocess_gets_one_line_and_exit_70(tmp_path, monkeypatch):
    spec = greedy_model(tmp_path, monkeypatch, "zdiv_proc", "ZeroDivisionError('in a child')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path), env.get("PYTHONPATH", "")])
    env["MEMPROF_CRASH_DIR"] = str(tmp_path / "crashes")
    args = ["analyze", spec, "--engine", "sim", "--mode", "infer", "-b", "1", "-s", "8"]
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 70, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    m = LINE.match(lines[0])
    assert m and m["what"] == "ZeroDivisionError: in a child (after op aten.addmm in module greedy)", lines[0]
    path = Path(m["tail"].removeprefix("traceback in "))
    assert path.parent == tmp_path / "crashes"
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: in a child" in text


def test_a_meta_kernel_that_raises_is_one_line_not_torchs_logged_traceback(tmp_path, monkeypatch):
    """FakeTensorMode logs a failing meta kernel with its whole traceback (``log.exception``)
    before the error reaches the engine: the console script keeps that log quiet."""
    spec = factory(
        tmp_path, monkeypatch, "badcat_proc", "return torch.cat([self.inner(x), torch.zeros(3, 5)]).sum()"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path), env.get("PYTHONPATH", "")])
    env["MEMPROF_CRASH_DIR"] = str(tmp_path / "crashes")
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", "analyze", spec, "--engine", "sim", "-b", "1", "-s", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 70, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Sizes of tensors must match" in lines[0] and "aten.cat" in lines[0], lines[0]
