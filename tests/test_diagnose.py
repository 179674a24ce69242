"""Out-of-memory diagnosis (``analyze --budget``): where the budget is crossed, what was live, the fixes.

The tiny Llama in bfloat16 with SGD, batch 4 x 64: 3.37 MiB at the peak (in
backward), 4 MiB reserved, plus the sim's two 32 MiB cuBLAS workspaces; with no CUDA
context assumed it needs 68 MiB. A 67 MiB budget leaves 3 MiB for the tensors:
they cross it, and a fix that takes the reserved memory down to 2 MiB fits.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from memprof.api import analyze
from memprof.cli import main
from memprof.engines import SimEngine
from memprof.errors import InputError, OutOfMemory
from memprof.prepare import prepare
from memprof.profile import Profile
from memprof.workload import Workload
from tests.conftest import greedy_model, setup_with, tiny

MiB = 2**20


@contextlib.contextmanager
def capture():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


STEP = {"batch_size": 4, "seq_len": 64, "dtype": "bfloat16", "optimizer": "sgd"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``memprof analyze ... --budget 67MiB --json``: exit code, output, the profile."""
    out_json = tmp_path_factory.mktemp("diag") / "p.json"
    args = ["analyze", tiny("llama"), "--engine", "sim", "-b", "4", "-s", "64", "--dtype", "bfloat16"]
    args += ["--optimizer", "sgd", "--budget", "67MiB", "--context-overhead", "0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "160")
        with capture() as (out, err):
            code = main([*args, "--json", str(out_json)])
    return code, out.getvalue(), err.getvalue(), Profile.from_json(out_json.read_text())


@pytest.fixture(scope="module")
def diagnosed(cli_run):
    return cli_run[3]


def test_it_names_the_phase_module_and_what_was_live_when_the_budget_is_crossed(diagnosed):
    p = diagnosed
    b = p.budget
    assert b["fits"] is False
    assert b["need_bytes"] == p.peak_reserved_bytes + 64 * MiB > b["budget_bytes"] == 67 * MiB
    assert b["usable_bytes"] == 3 * MiB
    c = b["crossing"]
    # the first moment the live tensors rose above the usable budget: before (or at) the peak
    assert b["usable_bytes"] < c["live_bytes"] <= p.peak_bytes
    assert sum(c["categories"].values()) == c["live_bytes"]
    assert c["phase"] in ("forward", "backward")
    assert c["module"]  # a module of the model by name, or <model>: its own code (the loss)
    assert c["op"] <= p.timeline["op"][p.timeline["peak_index"]]
    # modules holding most then, largest first, never the root
    sizes = [m["bytes"] for m in c["modules"]]
    assert sizes == sorted(sizes, reverse=True) and all(m["module"] != "<model>" for m in c["modules"])
    assert c["phase"] in b["cause"]
    assert (c["module"] in b["cause"]) or (c["module"] == "<model>" and "own code" in b["cause"])


def test_the_fixes_are_ranked_by_the_memory_they_cut_and_measured(diagnosed):
    b = diagnosed.budget
    fixes = b["fixes"]
    assert 1 <= len(fixes) <= 3
    needs = [f["need_bytes"] for f in fixes]
    assert needs == sorted(needs)
    assert all(f["cut_bytes"] == b["need_bytes"] - f["need_bytes"] > 0 for f in fixes)
    # the best one, measured again outside the diagnosis, needs what it said
    best = fixes[0]
    wl = Workload(**STEP)
    rm, eng = prepare(tiny("llama"), wl, SimEngine())
    setup = setup_with(wl, *[(st["name"], st["options"]) for st in best["steps"]])
    again = eng.run(rm, setup)
    assert again.peak_reserved_bytes + 64 * MiB == best["need_bytes"]
    assert best["fits"] == (best["need_bytes"] <= 67 * MiB)
    # and the cheapest stack that fits, from the plan search
    plan = b["plan"]
    assert plan["fits"] and plan["need_bytes"] <= 67 * MiB and plan["steps"]


def test_cli_exit_4_with_the_diagnosis_on_screen_and_in_json(cli_run):
    code, out, err, p = cli_run
    assert code == 4
    assert err.strip().splitlines()[-1].startswith("memprof: error: does not fit --budget 67MiB")
    assert len(err.strip().splitlines()) == 1
    assert "does not fit" in out and "What would cut that peak most" in out
    assert "Cheapest stack that fits" in out
    assert p.budget["fits"] is False and len(p.budget["fixes"]) >= 1


def test_a_budget_that_fits_says_so_without_searching(capsys):
    code = main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "16", "--budget", "1GiB"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "Budget 1.00 GiB: fits" in out
    p = analyze(tiny("llama"), engine="sim", batch_size=1, seq_len=16, budget=2**30)
    assert p.budget["fits"] and p.budget["crossing"] is None and p.budget["fixes"] == []
    assert "runs" not in p.budget  # no fix was searched


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "0"], "--budget: must be more than 0"),
        (["--budget", "lots"], "--budget"),
        (["--budget", "100MiB"], "leaves nothing after the CUDA context"),
        (["--budget", "1GiB", "--context-overhead", "-1"], "--context-overhead"),
    ],
)
def test_bad_budgets_are_one_line_exit_2(args, message, capsys):
    code = main(["analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "16", *args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_real_out_of_memory_is_diagnosed_where_it_happened(tmp_path, monkeypatch):
    spec = greedy_model(
        tmp_path,
        monkeypatch,
        "oomdiag",
        'RuntimeError("DefaultCPUAllocator: can\'t allocate memory: you tried to allocate 1 TB")',
    )
    with pytest.raises(OutOfMemory) as e:
        analyze(spec, engine="cpu", mode="infer", batch_size=2, budget=2**30, context_overhead=0)
    b = e.value.profile.budget
    assert b["fits"] is False and "greedy" in b["cause"]
    c = b["crossing"]
    assert c["phase"] == "forward" and c["module"] == "greedy"
    # inclusive bytes; a module whose child holds all of it is named by the child
    assert {m["module"] for m in c["modules"]} == {"pre", "greedy.inner"}
    # the model fails in the sim engine too: no fixes, and the reason
    assert b["fixes"] == [] and b["fixes_error"].startswith("no fixes projected")


def test_the_library_refuses_a_budget_that_leaves_nothing():
    with pytest.raises(InputError, match="leaves nothing"):
        analyze(tiny("llama"), engine="sim", batch_size=1, seq_len=16, budget=16 * MiB, context_overhead=0)
