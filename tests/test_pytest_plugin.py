"""The pytest plugin, run on small test files by pytest in a subprocess (as a user's suite loads it).

Not pytester: its fixture resets sys.modules after each test, which breaks
torch's and transformers' modules for the tests that follow.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tests.conftest import REPO, tiny


def run_pytest(folder: Path, source: str) -> tuple[int, str]:
    (folder / "test_user.py").write_text(source)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    return p.returncode, p.stdout + p.stderr


STEP = """
import pytest, torch

def step(memprof, width):
    model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 256)
    with memprof.track(model, opt):
        model(x).pow(2).mean().backward()
        opt.step()
"""


def test_the_plugin_is_registered_for_pytest():
    assert any(e.value == "memprof.pytest_plugin" for e in entry_points(group="pytest11"))


def test_a_suite_that_does_not_use_memprof_never_imports_torch(tmp_path):
    code, out = run_pytest(
        tmp_path,
        f"""
import sys

def test_plain(request):
    plugin = request.config.pluginmanager.get_plugin("memprof")
    assert plugin is not None and plugin.__file__.startswith({str(REPO)!r})
    heavy = [m for m in ("torch", "transformers", "yaml", "memprof.api") if m in sys.modules]
    assert heavy == []
""",
    )
    assert code == 0 and "1 passed" in out, out


def test_marker_fails_a_step_over_budget_and_passes_one_under(tmp_path):
    code, out = run_pytest(
        tmp_path,
        STEP
        + """
@pytest.mark.memprof(max_peak="4MiB")
def test_small(memprof):
    step(memprof, 256)   # ~1.3 MiB

@pytest.mark.memprof(max_peak="4MiB")
def test_big(memprof):
    step(memprof, 4096)  # ~20 MiB

@pytest.mark.memprof(max_peak="1GiB")
def test_nothing_recorded(memprof):
    pass
""",
    )
    assert code == 1 and "2 failed, 1 passed" in out
    assert "is above the budget of 4.0 MiB" in out
    assert "parameters" in out and "module 0:" in out  # the category and module breakdown
    assert "recorded no step" in out


def test_fixture_against_a_baseline(tmp_path):
    from memprof.cli import main

    base = tmp_path / "b.json"
    assert main(["baseline", tiny("llama"), "-b", "2", "-s", "32", "--name", "tiny", "-o", str(base)]) == 0
    code, out = run_pytest(
        tmp_path,
        f"""
def test_same(memprof):
    memprof.analyze({tiny("llama")!r}, batch_size=2, seq_len=32)
    memprof.assert_within_baseline({str(base)!r}, "tiny")

def test_longer_sequences_grow(memprof):
    memprof.analyze({tiny("llama")!r}, batch_size=2, seq_len=64)
    memprof.assert_within_baseline({str(base)!r}, "tiny", tolerance="2%")
""",
    )
    assert code == 1 and "1 failed, 1 passed" in out
    assert "beyond the 2% of tiny" in out and "activations" in out
