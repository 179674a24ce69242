"""Hostile input to the gate, the pytest marker and the numbers they read (issue 17).

The promise: bad input is one clear line on stderr (or one summary line and a
line per problem), exit 2, no traceback, found before any step runs; nothing
is silently accepted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memprof import gate
from memprof.cli import main
from memprof.errors import InputError
from memprof.units import parse_percent, parse_size
from tests.conftest import REPO, tiny

MODEL = "tests.gate_model:build"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """A good baseline, as plain data (each test writes its own broken copy)."""
    f = tmp_path_factory.mktemp("gate") / "memprof-baseline.json"
    assert main(["baseline", MODEL, "-b", "4", "-s", "64", "--name", "net", "-o", str(f)]) == 0
    return json.loads(f.read_text())


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test when a workload is run: bad input is found before any work starts."""

    def run(self, **kw):
        raise AssertionError(f"{self.name} ran: the input should have been refused first")

    monkeypatch.setattr(gate.GateWorkload, "run", run)


def write(tmp_path: Path, d: dict, raw: str | None = None) -> Path:
    f = tmp_path / "memprof-baseline.json"
    f.write_text(raw if raw is not None else json.dumps(d))
    return f


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memprof: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- baseline peaks
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"1GiB"', '"1GiB"'),
        ("null", "null"),
        ("1e400", "Infinity"),  # json reads it as inf
        ("Infinity", "Infinity"),
        ("NaN", "NaN"),
        (str(10**40), str(10**40)),
        ("-5000", "-5000"),  # was: "regression (-12725.92%)"
        ("1.5", "1.5"),
        ("true", "true"),
    ],
)
def test_a_bad_baseline_peak_is_refused_naming_the_file_and_field(
    recorded, tmp_path, capsys, no_run, value, shown
):
    d = json.loads(json.dumps(recorded))
    d["workloads"][0]["profile"]["peak_bytes"] = "PEAK"
    f = write(tmp_path, d, json.dumps(d).replace('"PEAK"', value))
    assert main(["check", "--baseline", str(f)]) == 2
    line = one_error(capsys)
    assert "memprof-baseline.json" in line and "workloads[1].profile.peak_bytes" in line
    assert f"whole number of bytes, 0 to 2**63-1, got {shown}" in line


def test_every_problem_of_a_baseline_is_listed_at_once(recorded, tmp_path, capsys, no_run):
    d = json.loads(json.dumps(recorded))
    prof = d["workloads"][0]["profile"]
    prof["peak_bytes"] = -1
    prof["peak_reserved_bytes"] = 2.5
    prof["categories_at_peak"]["activations"] = -3
    prof["modules"][0]["bytes_at_peak"] = "lots"
    prof["phases"][0]["peak_bytes"] = None
    d["versions"] = {"torch": 2}
    d["workloads"].append(json.loads(json.dumps(recorded["workloads"][0])))  # the same name twice
    f = write(tmp_path, d)
    assert main(["check", "--baseline", str(f)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first, *rest = err.strip().splitlines()
    assert first == "memprof: error: memprof-baseline.json: malformed baseline: 7 problems"
    text = "\n".join(rest)
    for field in (
        "workloads[1].profile.peak_bytes",
        "workloads[1].profile.peak_reserved_bytes",
        "workloads[1].profile.categories_at_peak.activations",
        "workloads[1].profile.modules[0].bytes_at_peak",
        "workloads[1].profile.phases[0].peak_bytes",
        "versions: must map package names to version strings",
        "workload name 'net' appears more than once",
    ):
        assert field in text, text
    # the library's error has them all on one line too
    with pytest.raises(gate.GateError, match="malformed baseline: 7 problems: versions: .*peak_bytes"):
        gate.load_baseline(f)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 1.5, "workload.batch_size: must be a whole number, got 1.5"),
        ("batch_size", "4", 'workload.batch_size: must be a whole number, got "4"'),
        ("seq_len", True, "workload.seq_len: must be a whole number, got true"),
        ("dtype", None, "workload.dtype: must not be null, got null"),  # was: float32, silently
    ],
)
def test_a_bad_workload_field_of_a_baseline_is_refused(
    recorded, tmp_path, capsys, no_run, key, value, message
):
    d = json.loads(json.dumps(recorded))
    d["workloads"][0]["workload"][key] = value
    assert main(["check", "--baseline", str(write(tmp_path, d))]) == 2
    line = one_error(capsys)
    assert (
        line
        == f"memprof: error: memprof-baseline.json: malformed baseline: 1 problem: workloads[1].{message}"
    )


def test_a_baseline_with_good_fields_still_loads(recorded, tmp_path):
    b = gate.load_baseline(write(tmp_path, recorded))
    assert [w.name for w in b.workloads] == ["net"] and b.profiles[0].peak_bytes > 0


# --------------------------------------------------------------------------- files a parser gives up on
_DIGITS = f"a number of more than {sys.get_int_max_str_digits()} digits"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was: RecursionError, exit 70
        (
            '{"schema": "memprof.baseline/1", "workloads": [{"profile": {"peak_bytes": '
            + "9" * 5000
            + "}}]}",
            _DIGITS,
        ),
    ],
)
def test_a_baseline_the_json_parser_gives_up_on_is_one_line(tmp_path, capsys, no_run, raw, problem):
    f = write(tmp_path, {}, raw)
    assert main(["check", "--baseline", str(f)]) == 2
    line = one_error(capsys)
    assert line == f"memprof: error: memprof-baseline.json: not valid JSON ({problem}): a corrupt baseline"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a = " + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deeply"),  # was: RecursionError, exit 70
        ("a = " + "9" * 5000 + "\n", _DIGITS),
    ],
)
def test_a_workloads_file_the_toml_parser_gives_up_on_is_one_line(tmp_path, capsys, text, problem):
    f = tmp_path / "workloads.toml"
    f.write_text(text)
    assert main(["baseline", "--workloads", str(f), "-o", str(tmp_path / "b.json")]) == 2
    assert one_error(capsys) == f"memprof: error: workloads.toml: 1 problem: not valid TOML: {problem}"
    assert not (tmp_path / "b.json").exists()


# --------------------------------------------------------------------------- workloads files: counts, names
def test_every_count_of_a_workloads_file_is_checked_with_the_other_problems(tmp_path, capsys, no_run):
    f = tmp_path / "workloads.yaml"
    f.write_text(
        "workloads:\n"
        f'  - {{model: "{MODEL}", batch_size: true, seq_len: 16}}\n'  # was: TypeError in randint, exit 70
        f'  - {{model: "{MODEL}", batch_size: .nan, seq_len: 16, mode: frob}}\n'  # was: the NaN unlisted
        f'  - {{model: "{MODEL}", batch_size: 1.5, seq_len: .inf}}\n'
        f'  - {{model: "{MODEL}", mode: infer, decode_tokens: 2.0}}\n'
    )
    assert main(["baseline", "--workloads", str(f), "-o", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "memprof: error: workloads.yaml: 6 problems",
        "  - workloads[1].batch_size: must be a whole number, got true",
        "  - workloads[2].batch_size: must be a whole number, got NaN",
        "  - workloads[2]: mode must be one of train, infer, distill, got 'frob'",
        "  - workloads[3].batch_size: must be a whole number, got 1.5",
        "  - workloads[3].seq_len: must be a whole number, got Infinity",
        "  - workloads[4].decode_tokens: must be a whole number, got 2.0",
    ]


@pytest.mark.parametrize(
    "name", ["w\n::warning title=injected::owned", "a\x1b[31mred", "tab\there", "a\u2028b"]
)
def test_a_workload_name_with_control_characters_is_refused(recorded, tmp_path, capsys, no_run, name):
    d = json.loads(json.dumps(recorded))
    d["workloads"][0]["name"] = name
    assert main(["check", "--baseline", str(write(tmp_path, d)), "--format", "github"]) == 2
    assert one_error(capsys) == (
        "memprof: error: memprof-baseline.json: malformed baseline: 1 problem: workloads[1].name: "
        f"must not hold control characters or line breaks, got {name!r}"
    )
    # the same in a workloads file, and for --name
    wf = tmp_path / "workloads.json"  # JSON is YAML, and spells every character
    wf.write_text(json.dumps({"workloads": [{"name": name, "model": MODEL}]}))
    assert main(["baseline", "--workloads", str(wf), "-o", str(tmp_path / "b.json")]) == 2
    assert "workloads[1].name: must not hold control characters or line breaks" in one_error(capsys)
    assert main(["baseline", MODEL, "--name", name, "-o", str(tmp_path / "b.json")]) == 2
    assert one_error(capsys).startswith("memprof: error: --name: must not hold control characters")
    assert not (tmp_path / "b.json").exists()


def test_the_reports_forge_no_line_and_write_well_formed_xml():
    from xml.dom import minidom

    from memprof.report import gate as render

    # names the baseline file gives the reports besides the workload's: a module's, a phase's, its path
    evil = "x\n::warning title=injected::owned\x1b[31m\x00|"
    r = gate.WorkloadCheck(
        name="net",
        status="regression",
        baseline_peak=100,
        peak=200,
        allowed=0,
        modules=[(f"m{evil}", 0, 100)],
        phase=(f"fwd{evil}", "backward"),
    )
    rep = gate.CheckReport(f"b{evil}.json", "1%", [r], {"torch": (evil, "2.0")})
    minidom.parseString(render.junit(rep))  # was: ExpatError (not well-formed)
    annotations, summary = render.github(rep)
    assert [line[:30] for line in annotations.splitlines()] == [
        "::error title=memprof: memory ",
        "::warning title=memprof: versi",
    ]
    lines = summary.splitlines()
    assert len(lines) == 7 and not any(line.startswith("::") for line in lines), summary
    assert lines[-1].startswith("| net |") and lines[-1].count(" | ") == 5  # the | in the names escaped


@pytest.mark.parametrize("fmt", ["text", "github"])
def test_check_output_without_a_format_that_writes_a_file_is_refused(recorded, tmp_path, capsys, no_run, fmt):
    out = tmp_path / "new.txt"
    args = ["check", "--baseline", str(write(tmp_path, recorded)), "--format", fmt, "--output", str(out)]
    assert main(args) == 2  # was: 0, and no file
    assert one_error(capsys) == (
        "memprof: error: --output writes the json or junit report; give --format json or junit with it "
        f"(--format {fmt} prints to stdout)"
    )
    assert not out.exists()


# --------------------------------------------------------------------------- tolerance
@pytest.mark.parametrize(
    "text", ["nan%", "inf%", "-inf%", "1e400%", "-1%", "", "1e400", "9" * 400, "1048577TiB"]
)
def test_a_non_finite_or_negative_tolerance_is_refused_before_the_run(
    recorded, tmp_path, capsys, no_run, text
):
    f = write(tmp_path, recorded)
    assert main(["check", "--baseline", str(f), f"--tolerance={text}"]) == 2
    line = one_error(capsys)
    assert line.startswith(f"memprof: error: --tolerance {text!r}: give a percentage (2%) or a size (50MiB)")


def test_a_huge_finite_tolerance_allows_any_growth():
    assert gate.Tolerance.parse("1e300%").allowed(10**12) == gate.MAX_BYTES
    assert str(gate.Tolerance.parse("1e300%")) == "1e+300%" and str(gate.Tolerance.parse("2.5%")) == "2.50%"
    assert gate.Tolerance.parse("0%").allowed(10**12) == 0


@pytest.mark.parametrize("text", ["nan%", "inf%", "1e400%", "NaN%"])
def test_parse_percent_refuses_non_finite(text):
    with pytest.raises(InputError, match="not a percentage"):
        parse_percent(text)


def test_parse_size_refuses_a_number_too_large_for_a_float():
    with pytest.raises(InputError, match="too large"):
        parse_size("9" * 400)
    assert parse_size("1.5GiB") == 3 * 2**29


def test_parse_size_caps_a_size_at_one_exbibyte():
    # was: 1e41 bytes, past the 2**63-1 a baseline or a profile may hold
    assert parse_size("1048576TiB") == 2**60 == parse_size(str(2**60))
    for text in ("1048577TiB", str(2**61), "99999999999999999999999999999TiB"):
        with pytest.raises(InputError, match="memprof reads sizes up to 1 EiB"):
            parse_size(text)


# --------------------------------------------------------------------------- the pytest marker
def run_user_suite(folder: Path, source: str) -> tuple[int, dict[str, str], str]:
    """Run a user's test file with the plugin (in a subprocess: see tests/test_pytest_plugin.py).

    Returns the exit code, each test's short-summary line (by test name) and the whole output.
    """
    (folder / "test_user.py").write_text(source)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_user.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        # wide: pytest cuts the short summary's lines to the terminal's width
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "1000"},
        check=False,
    )
    out = p.stdout + p.stderr
    summary = {}
    for line in out.splitlines():
        for outcome in ("PASSED", "FAILED", "ERROR"):
            if line.startswith(f"{outcome} test_user.py::"):
                test, _, rest = line[len(outcome) + len(" test_user.py::") :].partition(" - ")
                summary[test] = f"{outcome} {rest}".strip()
    return p.returncode, summary, out


BAD_MARKERS = {
    "positional": (
        '"1KiB"',
        "takes keyword arguments only (max_peak=, baseline=, name=, tolerance=), "
        "got the positional '1KiB'; write e.g. @pytest.mark.memprof(max_peak='1KiB')",
    ),
    "misspelled": (
        'max_peek="1KiB"',
        "unknown argument max_peek= (did you mean max_peak=?); "
        "it takes max_peak=, baseline=, name=, tolerance=",
    ),
    "unknown": ("colour=1", "unknown argument colour=; it takes"),
    "nothing": ("", "nothing to enforce; give max_peak= and/or baseline= with name="),
    "negative": ("max_peak=-5", "max_peak=-5: the budget must be above 0 bytes"),
    "zero": ('max_peak="0B"', "max_peak='0B': the budget must be above 0 bytes"),
    "fraction": (
        "max_peak=1.5",
        "max_peak=1.5: give a positive whole number of bytes or a size such as '1.5GiB'",
    ),
    "boolean": ("max_peak=True", "max_peak=True: give a positive whole number of bytes"),
    "not_a_size": ('max_peak="lots"', "max_peak='lots': not a size"),
    "name_alone": ('max_peak="1GiB", name="net"', "name= applies to baseline= only, which is not given"),
    "no_name": ('baseline="memprof-baseline.json"', "baseline= needs name="),
    "nan_tolerance": (
        'baseline="memprof-baseline.json", name="net", tolerance="nan%"',
        "tolerance='nan%': give a percentage (2%) or a size (50MiB)",
    ),
    "number_tolerance": (
        'baseline="memprof-baseline.json", name="net", tolerance=0.01',
        "tolerance=0.01: give a percentage (2%) or a size (50MiB)",
    ),
    "no_file": ('baseline="nowhere.json", name="net"', "nowhere.json: no such baseline file"),
    "bad_file": (
        'baseline="broken.json", name="net"',
        "broken.json: malformed baseline: 1 problem: "
        "workloads[1].profile.peak_bytes: must be a whole number of bytes",
    ),
    "no_workload": (
        'baseline="memprof-baseline.json", name="gpt2"',
        "no workload 'gpt2' in memprof-baseline.json (it has: net)",
    ),
}


def test_a_bad_marker_is_a_setup_error_and_the_test_never_runs(recorded, tmp_path):
    write(tmp_path, recorded)
    broken = json.loads(json.dumps(recorded))
    broken["workloads"][0]["profile"]["peak_bytes"] = -56
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    source = "import pytest\n"
    for test, (args, _) in BAD_MARKERS.items():
        source += f"""
@pytest.mark.memprof({args})
def test_{test}(memprof):
    open("ran-{test}", "w").close()
"""
    code, summary, out = run_user_suite(tmp_path, source)
    assert code == 1, out
    for test, (_, message) in BAD_MARKERS.items():
        line = summary.get(f"test_{test}", "")
        assert line.startswith(f"ERROR Failed: memprof marker: {message}"), (test, line, out)
        assert not (tmp_path / f"ran-{test}").exists(), test
    assert "Traceback" not in out and "pytest_plugin.py" not in out, out


def test_good_markers_still_enforce_and_pass(recorded, tmp_path):
    write(tmp_path, recorded)
    code, summary, out = run_user_suite(
        tmp_path,
        f"""
import pytest

@pytest.mark.memprof(max_peak="1GiB")
def test_size_string(memprof):
    memprof.analyze({MODEL!r}, batch_size=4, seq_len=64)

@pytest.mark.memprof(max_peak=2**30)
def test_int_bytes(memprof):
    memprof.analyze({MODEL!r}, batch_size=4, seq_len=64)

@pytest.mark.memprof(max_peak=1024)
def test_over_budget(memprof):
    memprof.analyze({MODEL!r}, batch_size=4, seq_len=64)

@pytest.mark.memprof(baseline="memprof-baseline.json", name="net", tolerance="0")
def test_baseline(memprof):
    memprof.analyze({MODEL!r}, batch_size=4, seq_len=64)
""",
    )
    assert summary["test_size_string"] == "PASSED", out
    assert summary["test_int_bytes"] == "PASSED", out
    assert summary["test_baseline"] == "PASSED", out
    assert summary["test_over_budget"].startswith("FAILED AssertionError: memprof: peak"), out


def test_the_fixture_refuses_a_bad_budget_or_tolerance():
    from memprof.pytest_plugin import MemprofFixture, budget_bytes

    assert budget_bytes("1KiB") == 1024 and budget_bytes(5) == 5
    fixture = MemprofFixture()
    for bad in (-5, 0, 1.5, "1e400", None):
        with pytest.raises(InputError, match="max_peak="):
            fixture.assert_peak_below(bad)
    with pytest.raises(InputError, match="tolerance='inf%'"):
        fixture.assert_within_baseline("nowhere.json", "net", tolerance="inf%")


# --------------------------------------------------------------------------- --allow-pickle checkpoints
class _Hostile:
    """Unpickling it would run a command: weights-only loading must refuse it, as input."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > pwned",))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not really a pickle")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _hostile(path: Path) -> None:
    import torch

    torch.save({"w": _Hostile()}, path)


def _cut_short(path: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(4096)}, path)
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_garbage, "UnpicklingError: Unsupported operand"),
        (_empty, "EOFError: the file is empty or cut short"),
        (_hostile, "UnpicklingError: Trying to load unsupported GLOBAL"),
        (_cut_short, "RuntimeError: PytorchStreamReader failed reading zip archive"),
    ],
)
def test_an_unloadable_pickle_checkpoint_is_one_line_naming_the_file(
    tmp_path, capsys, monkeypatch, make, reason
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMPROF_CRASH_DIR", str(tmp_path / "crash"))
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(Path(tiny("gpt2")).read_text())
    make(d / "pytorch_model.bin")
    args = ["analyze", "pickled", "--engine", "cpu", "--allow-pickle", "-b", "1", "-s", "8"]
    assert main(args) == 2
    line = one_error(capsys)
    assert line.startswith(
        f"memprof: error: pickled/pytorch_model.bin: cannot load this pickle checkpoint ({reason}"
    )
    assert line.endswith("it is corrupt, cut short, or holds objects other than tensors")
    assert "weights_only` set to `False`" not in line  # torch's advice, wrong for such a file
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "crash").exists()


@pytest.mark.parametrize("name", ["baseline.json", "workloads.toml", "workloads.yaml"])
def test_a_binary_baseline_or_workloads_file_is_one_line(tmp_path, capsys, name):
    """Not UTF-8: a UnicodeDecodeError, an internal error (exit 70) before."""
    from memprof.cli import main

    path = tmp_path / name
    path.write_bytes(b"\xff\xfe\x00\x98 not text")
    args = (
        ["check", "--baseline", str(path)]
        if name.startswith("baseline")
        else ["baseline", "--workloads", str(path), "-o", str(tmp_path / "out.json")]
    )
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "not a text file (not UTF-8)" in err[0]


def test_a_baseline_string_with_an_escape_sequence_is_refused(tmp_path, capsys):
    """The reports print module, phase and note strings as they are (Rich passes ESC through):
    a crafted baseline could drive the terminal. memprof writes none."""
    from memprof.cli import main
    from tests.conftest import REPO

    d = json.loads((REPO / "configs" / "baselines" / "memprof-baseline.json").read_text())
    d["workloads"][0]["profile"]["modules"][0]["name"] = "evil\x1b]0;pwned\x07"
    path = tmp_path / "esc.json"
    path.write_text(json.dumps(d))
    code = main(["check", "--baseline", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "\x1b" not in err
    assert "workloads[1].profile.modules[0].name: must not hold control characters" in err
