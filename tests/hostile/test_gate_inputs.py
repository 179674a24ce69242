"""Hostile input to the gate, the pytest marker and the numbers they read (issue 17).

The promise: bad input is one clear line on stderr (or one summary line and a
line per problem), exit 2, no traceback, found before any step runs; nothing
is silently accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memprof import gate
from memprof.cli import main
from memprof.errors import InputError
from memprof.units import parse_percent, parse_size

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


def test_a_baseline_with_good_fields_still_loads(recorded, tmp_path):
    b = gate.load_baseline(write(tmp_path, recorded))
    assert [w.name for w in b.workloads] == ["net"] and b.profiles[0].peak_bytes > 0


# --------------------------------------------------------------------------- tolerance
@pytest.mark.parametrize("text", ["nan%", "inf%", "-inf%", "1e400%", "-1%", "", "1e400", "9" * 400])
def test_a_non_finite_or_negative_tolerance_is_refused_before_the_run(
    recorded, tmp_path, capsys, no_run, text
):
    f = write(tmp_path, recorded)
    assert main(["check", "--baseline", str(f), f"--tolerance={text}"]) == 2
    line = one_error(capsys)
    assert line.startswith(f"memprof: error: --tolerance {text!r}: give a percentage (2%) or a size (50MiB)")


def test_a_huge_finite_tolerance_allows_any_growth():
    assert gate.Tolerance.parse("1e300%").allowed(10**12) == gate.MAX_BYTES
    assert gate.Tolerance.parse("0%").allowed(10**12) == 0


@pytest.mark.parametrize("text", ["nan%", "inf%", "1e400%", "NaN%"])
def test_parse_percent_refuses_non_finite(text):
    with pytest.raises(InputError, match="not a percentage"):
        parse_percent(text)


def test_parse_size_refuses_a_number_too_large_for_a_float():
    with pytest.raises(InputError, match="too large"):
        parse_size("9" * 400)
    assert parse_size("1.5GiB") == 3 * 2**29
