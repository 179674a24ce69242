"""The plan tests count and patch engine runs in this process: one worker (MEMPROF_WORKERS=1).

tests/plan/test_search_side_by_side.py runs the search with two workers against one.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    monkeypatch.setenv("MEMPROF_WORKERS", "1")


@pytest.fixture(scope="session")
def tiny_plan_34():
    """The tiny Llama's search at 66 MiB, one run at a time: what the side-by-side and shallow
    variants are compared with (a few seconds, made once; read, never changed, by the tests)."""
    from memprof.plan import planner
    from tests.conftest import tiny
    from tests.plan.helpers import TINY_WL, MiB

    with pytest.MonkeyPatch.context() as m:
        m.setenv("MEMPROF_WORKERS", "1")
        return planner.plan(tiny("llama"), TINY_WL, budget_bytes=66 * MiB, context_overhead=0)
