"""The console script's garbage collector: paused while it imports, on again before any step runs.

See :mod:`memprof.gcpause`: the pause saves the collector's walks of a heap that only
grows while torch and transformers import; a step (measured or a warm-up) must never
run with it paused, and a library caller's collector is never touched.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from memprof import gcpause
from memprof.engines import SimEngine
from memprof.engines.base import Engine
from memprof.models import resolve
from memprof.workload import Workload
from tests.conftest import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def collector():
    """The test's process gets its collector back as it was."""
    was = gc.isenabled()
    yield
    gcpause.resume()
    (gc.enable if was else gc.disable)()


def test_resume_turns_on_only_what_pause_turned_off(collector):
    gc.enable()
    gcpause.pause()
    assert not gc.isenabled() and gcpause.paused()
    gcpause.resume()
    assert gc.isenabled() and not gcpause.paused()
    gc.disable()  # turned off by someone else (a test's fixture, a caller): not ours to turn on
    gcpause.pause()
    assert not gcpause.paused()
    gcpause.resume()
    assert not gc.isenabled()


def test_no_step_runs_with_the_collector_paused(collector, monkeypatch):
    states: list[bool] = []
    before = Engine.before_measure

    def seen(self):
        states.append(gc.isenabled())
        before(self)

    monkeypatch.setattr(Engine, "before_measure", seen)
    gc.enable()
    gcpause.pause()
    SimEngine().run_detailed(resolve(tiny("llama")), Workload(batch_size=1, seq_len=16))
    assert states == [True]  # the measured step ran with the collector on
    assert gc.isenabled() and not gcpause.paused()


#: the console script's entry, with its command replaced by one that reports the collector's state
CODE = """\
import gc, sys
import memprof.cli
def command():
    sys.stdout.write(f"during {gc.isenabled()}\\n")
    return 0
memprof.cli.main = command
sys.argv = ["memprof", "recipes"]
from memprof.__main__ import run
try:
    run()
except SystemExit as e:
    sys.stdout.write(f"exit {e.code} after {gc.isenabled()}\\n")
"""


def test_the_console_script_pauses_the_collector_until_its_command_ends():
    p = subprocess.run(
        [sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert p.stdout.split() == ["during", "False", "exit", "0", "after", "True"], p.stderr
