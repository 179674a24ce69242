"""Shared by the plan tests: the tiny Llama's step, the CLI runner, a direct sim measurement.

The tiny Llama's reserved memory moves in 2 MiB steps (the caching allocator's small-pool
segments), and the sim projects two 32 MiB cuBLAS workspaces in training (the forward's
thread and autograd's): budgets here are 64 MiB plus a few MiB, with no CUDA context
(``--context-overhead 0``).
"""

from __future__ import annotations

from typing import Any

from memprof import recipes
from memprof.cli import main
from memprof.engines import SimEngine
from memprof.prepare import fake_model, prepare, stack
from memprof.workload import Workload

MiB = 2**20
WORKSPACE = 64 * MiB  # the sim's cuBLAS workspaces in training (two handles of 32 MiB, sm 9.x)
TINY = ["-b", "2", "-s", "64", "--dtype", "bfloat16", "--context-overhead", "0"]
TINY_WL = Workload(batch_size=2, seq_len=64, dtype="bfloat16")


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def new_search(spec: str, wl: Workload, budget: int) -> Any:
    """The plan's search for ``spec`` and ``wl`` at ``budget`` (no CUDA context), nothing measured yet."""
    from memprof.plan import planner

    return planner.new_search(
        spec,
        wl,
        budget,
        context_overhead=0,
        engine=None,
        max_overhead=None,
        max_plans=3,
        max_runs=12,
        task=None,
        allow_pickle=False,
        trust_remote_code=False,
        say=lambda m: None,
    )


def need_of(spec: str, wl: Workload, recipe: recipes.Recipe | None) -> tuple[int, int]:
    """(reserved + cuBLAS workspace, peak) of a direct sim run of the step, with the recipe's steps."""
    rm, eng = prepare(spec, wl, SimEngine())
    setup, skipped = stack(recipe, wl, fake_model(rm, wl)) if recipe else (wl, [])
    assert not skipped
    p = eng.run(rm, setup)
    return p.peak_reserved_bytes + p.overheads["cublas_workspace_bytes"], p.peak_bytes


class CountingSim(SimEngine):
    """Counts the steps it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def run_detailed(self, *args, **kwargs):
        self.calls += 1
        return super().run_detailed(*args, **kwargs)
