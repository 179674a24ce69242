"""Sim runs side by side in forked workers (memprof.engines.pool): the same rows as one by one.

``memprof compare`` hands its rows to :func:`run_many`; with more than one worker
they run in forked processes. Each test runs the same thing with one worker (in
this process) and with two, and the results must be the same, errors included.
"""

from __future__ import annotations

from typing import Any

import pytest

from memprof import recipes
from memprof.compare import compare
from memprof.engines import SimEngine
from memprof.engines.base import Measure
from memprof.engines.pool import Job, available_workers, run_many
from memprof.engines.pool import run_calls as run_calls_of
from memprof.errors import InputError, InternalError, NotSupported, OutOfMemory
from memprof.models import resolve
from memprof.workload import Workload
from tests.conftest import setup_with, tiny

WL = Workload(batch_size=2, seq_len=16)


pytestmark = pytest.mark.usefixtures("no_automatic_collections")


def rows(cmp: Any) -> list[Any]:
    out = []
    for s in cmp.steps:
        d = s.to_dict()
        if d.get("profile"):
            d["profile"].pop("notes")  # which warm-up ran and such: same; kept out of the diff noise
        out.append(d)
    return out


def test_compare_rows_side_by_side_are_the_rows_one_by_one(monkeypatch):
    # (not mixed precision: autocast frees its cache in an order that varies run to run,
    # see tests/engines/test_flops_in_step.py)
    recipe = recipes.from_names(["optimizer:type=adafactor", "checkpointing", "chunking:size=8"])
    monkeypatch.setenv("MEMPROF_WORKERS", "1")
    one = compare(tiny("llama"), recipe, WL, engine="sim")
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    two = compare(tiny("llama"), recipe, WL, engine="sim")
    assert [s.profile is not None for s in two.steps] == [True, True, True]
    assert [s.flops for s in two.steps] == [s.flops for s in one.steps]
    assert rows(two) == rows(one)
    # stacked: the last row carries all three
    assert [o["name"] for o in two.steps[-1].profile.optimizations] == [
        "optimizer",
        "checkpointing",
        "chunking",
    ]


def test_a_row_that_fails_is_left_out_of_the_rows_below_it(monkeypatch):
    """A worker's row runs out of memory: the rows below, built on it, run again without it."""
    real = SimEngine.run_detailed

    def oom_with_checkpointing(self, rm, setup, **kw):
        if any(st["name"] == "checkpointing" for st in setup.steps):
            raise OutOfMemory("out of memory in the backward phase: as a test says", None)
        return real(self, rm, setup, **kw)

    monkeypatch.setattr(SimEngine, "run_detailed", oom_with_checkpointing)
    recipe = recipes.from_names(["mixed_precision", "checkpointing", "chunking:size=8"])
    out = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MEMPROF_WORKERS", n)
        out[n] = compare(tiny("llama"), recipe, WL, engine="sim")
    for cmp in out.values():
        mp, ck, ch = cmp.steps
        assert mp.profile is not None and mp.error is None
        assert ck.error and ck.error.startswith("out of memory") and ck.profile is None
        assert [o["name"] for o in ch.profile.optimizations] == ["mixed_precision", "chunking"]
    assert rows(out["1"]) == rows(out["2"])


def test_errors_come_back_as_the_class_the_worker_raised(monkeypatch):
    real = SimEngine.run_detailed

    def failing(self, rm, setup, **kw):
        names = [st["name"] for st in setup.steps]
        if "checkpointing" in names:
            raise NotSupported("tiny", "the step reads tensor values; use --engine cpu", engine="sim")
        if "chunking" in names:
            raise RuntimeError("a bug in a worker")
        return real(self, rm, setup, **kw)

    monkeypatch.setattr(SimEngine, "run_detailed", failing)
    jobs = [
        Job(setup_with(WL), Measure()),
        Job(setup_with(WL, ("checkpointing", {})), Measure()),
        Job(setup_with(WL, ("chunking", {"size": 8})), Measure()),
    ]
    ok, unsupported, bug = run_many(SimEngine(), resolve(tiny("llama")), jobs, workers=2)
    assert ok.profile.peak_bytes > 0
    assert isinstance(unsupported, NotSupported)
    assert str(unsupported) == "tiny: not supported in sim: the step reads tensor values; use --engine cpu"
    assert isinstance(bug, InternalError)
    assert "RuntimeError: a bug in a worker" in str(bug)
    assert "Traceback" in bug.traceback_text() and "failing" in bug.traceback_text()  # the worker's


def test_one_worker_or_one_job_runs_here(monkeypatch):
    import os

    pid = os.getpid()
    seen = []
    real = SimEngine.run_detailed

    def where(self, rm, setup, **kw):
        seen.append(os.getpid())
        return real(self, rm, setup, **kw)

    monkeypatch.setattr(SimEngine, "run_detailed", where)
    jobs = [Job(setup_with(WL), Measure()), Job(setup_with(WL, ("checkpointing", {})), Measure())]
    run_many(SimEngine(), resolve(tiny("llama")), jobs, workers=1)
    run_many(SimEngine(), resolve(tiny("llama")), jobs[:1], workers=4)
    assert seen == [pid, pid, pid]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_worker_count_is_an_input_error(monkeypatch, value):
    monkeypatch.setenv("MEMPROF_WORKERS", value)
    with pytest.raises(InputError, match="MEMPROF_WORKERS must be a whole number"):
        available_workers()


def test_the_worker_count_is_capped_by_the_environment(monkeypatch):
    monkeypatch.setenv("MEMPROF_WORKERS", "3")
    assert available_workers() == 3
    monkeypatch.delenv("MEMPROF_WORKERS")
    assert available_workers() >= 1


def test_a_baseline_recorded_side_by_side_is_the_one_recorded_one_by_one(tmp_path, monkeypatch):
    """memprof baseline / check: sim workloads run in forked workers, each with its own model."""
    import json

    from memprof.cli import main

    y = tmp_path / "w.yaml"
    y.write_text(
        f"workloads:\n  - model: {tiny('llama')}\n    batch_size: 2\n    seq_len: 32\n"
        f"  - model: {tiny('gpt2')}\n    batch_size: 2\n    seq_len: 16\n"
        f"  - model: {tiny('llama')}\n    name: infer\n    mode: infer\n    batch_size: 2\n    seq_len: 32\n"
    )
    out = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MEMPROF_WORKERS", n)
        f = tmp_path / f"b{n}.json"
        assert main(["baseline", "--workloads", str(y), "-o", str(f)]) == 0
        d = json.loads(f.read_text())
        d.pop("created")
        out[n] = d
        assert main(["check", "--baseline", str(f), "--tolerance", "0"]) == 0
    assert out["1"] == out["2"]
    assert [w["workload"]["attn"] for w in out["2"]["workloads"]] == ["sdpa", "sdpa", "sdpa"]  # resolved


def test_a_workload_that_fails_in_a_worker_fails_the_record(monkeypatch):
    from memprof import gate

    real = gate.GateWorkload.run

    def second_fails(self, *, progress=None):
        if self.name == "b":
            raise InputError("b: no such thing, as a test says")
        return real(self, progress=progress)

    monkeypatch.setattr(gate.GateWorkload, "run", second_fails)
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    ws = [gate.GateWorkload(name=n, model=tiny("llama"), workload=WL) for n in ("a", "b", "c")]
    with pytest.raises(InputError, match="b: no such thing, as a test says"):
        gate.record(ws)


def test_a_worker_that_dies_is_an_internal_error_not_a_hang():
    import os

    def dies():
        os._exit(9)  # as a worker the kernel kills for memory would: no result, no exception

    out = run_calls_of([lambda: 1, dies], parallel=True, workers=2)
    assert out[0] == 1 or isinstance(out[0], InternalError)  # the other call may die with the pool
    assert isinstance(out[1], InternalError) and "a worker process died" in str(out[1])


def test_the_console_script_runs_its_rows_side_by_side_and_exits(tmp_path):
    """The command's own process (SIGTERM handler, spinner thread) forks its workers: it ends, every time."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEMPROF_WORKERS": "2", "NO_COLOR": "1"}
    args = [
        sys.executable,
        "-m",
        "memprof",
        "compare",
        tiny("llama"),
        "--engine",
        "sim",
        "-b",
        "2",
        "-s",
        "16",
    ]
    args += ["--step", "checkpointing", "--step", "chunking:size=8", "--step", "optimizer:type=sgd"]
    for _ in range(2):  # a hang seen once in bench/speed.py: more than one try
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "chunking" in p.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["compare", tiny("llama"), "--engine", "sim", "--step", "checkpointing"],
        ["plan", tiny("llama"), "--budget", "66MiB", "-b", "2", "-s", "64", "--context-overhead", "0"],
        ["baseline", tiny("llama"), "-b", "2", "-s", "16", "-o", "{tmp}/b.json"],
    ],
)
def test_a_bad_worker_count_is_refused_before_any_run(monkeypatch, capsys, tmp_path, args):
    from memprof.cli import main

    runs = []
    monkeypatch.setattr(SimEngine, "run_detailed", lambda *a, **k: runs.append(1))
    monkeypatch.setenv("MEMPROF_WORKERS", "zero")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not runs
    assert len(err) == 1 and "MEMPROF_WORKERS must be a whole number of at least 1, got 'zero'" in err[0]
    assert not (tmp_path / "b.json").exists()


def _pid() -> int:
    import os

    return os.getpid()


def _nested() -> tuple[int, list[int]]:
    """A run_beside inside the call this process runs beside a worker: its parts run here."""
    from memprof.engines.pool import run_beside

    side, here = run_beside(_pid, [_pid])
    assert not isinstance(side, BaseException)
    return side, here


def test_run_beside_runs_one_call_in_a_worker_and_the_others_here(monkeypatch):
    from memprof.engines.pool import run_beside

    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    side, (here, nested) = run_beside(_pid, [_pid, _nested])
    assert here == _pid() and side != here
    assert nested == (here, [here])  # the cores are taken: no third process
    monkeypatch.setenv("MEMPROF_WORKERS", "1")
    side, (here,) = run_beside(_pid, [_pid])
    assert side == here == _pid()


def _slow_pid() -> int:
    import os
    import time

    time.sleep(1.0)
    return os.getpid()


def test_run_beside_does_the_callers_work_meanwhile_while_the_worker_runs(monkeypatch):
    from memprof.engines.pool import run_beside

    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    done: list[int] = []
    side, (here,) = run_beside(_slow_pid, [_pid], meanwhile=lambda: done.append(_pid()))
    assert done == [here] and side != here  # here, once, while the worker slept
    monkeypatch.setenv("MEMPROF_WORKERS", "1")
    side, (here,) = run_beside(_slow_pid, [_pid], meanwhile=lambda: done.append(_pid()))
    assert side == here and done == [here]  # nothing ran beside: the caller does it when it needs it


def _unsupported() -> None:
    raise NotSupported("tiny", "the step reads tensor values", engine="sim")


def test_run_beside_returns_the_workers_error_and_raises_its_own(monkeypatch):
    from memprof.engines.pool import run_beside

    for n in ("2", "1"):
        monkeypatch.setenv("MEMPROF_WORKERS", n)
        side, here = run_beside(_unsupported, [_pid])
        assert isinstance(side, NotSupported) and here == [_pid()]
        with pytest.raises(NotSupported):
            run_beside(_pid, [_unsupported])


def test_shallow_depths_side_by_side_are_the_depths_one_by_one(monkeypatch, tmp_path):
    """memprof.engines.depth.shallow_run traces the two shallower depths in a worker: the same
    result, profiles and traces as all three here."""
    import os

    from memprof.engines import depth as D
    from memprof.workload import StepSetup
    from tests.engines.test_depth import narrow
    from tests.engines.test_hosted_tracker import _events

    real = D._at_depth

    def at_depth(rm, d):
        (tmp_path / f"{d}-{os.getpid()}").touch()
        return real(rm, d)

    monkeypatch.setattr(D, "_at_depth", at_depth)
    rm = narrow("llama-3-8b")
    setup = StepSetup.of(Workload(batch_size=1, seq_len=64).for_model(rm))
    out = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MEMPROF_WORKERS", n)
        r, how = D.shallow_run(SimEngine(), rm, setup, Measure(flops=True, timeline=False))
        assert r is not None and r.shallow is not None and r.shallow.traces is not None, how
        out[n] = (
            r.profile.to_dict(),
            r.flops,
            [p.to_dict() for p in r.shallow.profiles],
            [_events(t) for t in r.shallow.traces],
        )
        pids = {int(f.name.split("-")[1]) for f in tmp_path.iterdir()}
        assert len(pids) == int(n)  # two: the shallower depths ran in another process
        for f in tmp_path.iterdir():
            f.unlink()
    assert out["1"] == out["2"]
