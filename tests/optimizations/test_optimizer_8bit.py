"""8-bit AdamW in the sim as on real tensors, and paged 8-bit AdamW's state outside the device peak."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from memprof.cli import main
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.engines.sim import cpu_semantics_sim
from memprof.errors import ExitCode
from memprof.models import resolve
from memprof.workload import Workload
from tests.conftest import setup_with, tiny

pytest.importorskip("bitsandbytes")

WL = Workload(batch_size=1, seq_len=16)


def run(engine, spec, setup):
    return engine.run_detailed(resolve(spec), setup, measure=Measure()).profile


def state(p):
    return p.categories_at_peak["optimizer_state"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The tiny Llama with a 2048-token vocabulary: its embedding and head (131072 elements) are paged."""
    cfg = json.loads(Path(tiny("llama")).read_text()) | {"vocab_size": 2048}
    path = tmp_path_factory.mktemp("wide") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_the_sim_counts_8bit_adamw_state_as_the_real_optimizer_holds_it():
    setup = setup_with(WL, ("optimizer", {"type": "adamw8bit"}))
    cpu = run(CpuEngine(), tiny("llama"), setup)
    sim = run(cpu_semantics_sim(), tiny("llama"), setup)
    assert state(sim) == state(cpu)  # 1-byte moments, block scales, float32 moments of small tensors
    assert sim.peak_bytes == cpu.peak_bytes
    adamw = run(CpuEngine(), tiny("llama"), setup_with(WL, ("optimizer", {"type": "adamw"})))
    assert state(cpu) < 0.35 * state(adamw)
    cuda = run(SimEngine(), tiny("llama"), setup)  # and with CUDA's semantics
    assert state(cpu) <= state(cuda) < 1.1 * state(cpu)


def test_paged_state_is_in_host_paged_bytes_not_in_the_peak(wide):
    eight = run(cpu_semantics_sim(), wide, setup_with(WL, ("optimizer", {"type": "adamw8bit"})))
    paged = run(cpu_semantics_sim(), wide, setup_with(WL, ("optimizer", {"type": "paged_adamw8bit"})))
    n = paged.host["paged_bytes"]
    assert n == 2 * 2 * 131072  # two 1-byte moments of the embedding and of the head
    assert state(paged) + n == state(eight)
    assert paged.peak_bytes == eight.peak_bytes - n
    assert paged.host["bytes"] == 0  # unified memory is apart from the host bytes
    assert paged.allocator["outside_allocator_bytes"] == n
    assert any("unified memory" in note for note in paged.notes)


def test_the_cpu_engine_runs_paged_as_plain_8bit_and_reports_the_bytes(wide):
    eight = run(CpuEngine(), wide, setup_with(WL, ("optimizer", {"type": "adamw8bit"})))
    paged = run(CpuEngine(), wide, setup_with(WL, ("optimizer", {"type": "paged_adamw8bit"})))
    assert paged.peak_bytes == eight.peak_bytes  # no unified memory on a CPU
    assert paged.host["paged_bytes"] == 2 * 2 * 131072


def test_without_bitsandbytes_paged_adamw8bit_is_one_line_with_the_install_hint(
    tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    out = tmp_path / "c.json"
    argv = [
        "compare",
        tiny("llama"),
        "-e",
        "sim",
        "-b",
        "1",
        "-s",
        "8",
        "--step",
        "optimizer:type=paged_adamw8bit",
    ]
    # refused where the step is named, before any run (nothing written)
    assert main([*argv, "--json", str(out)]) == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install bitsandbytes" in err
    assert not out.exists()
