"""The plan tests count and patch engine runs in this process: one worker (MEMPROF_WORKERS=1).

tests/plan/test_search_side_by_side.py runs the search with two workers against one.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    monkeypatch.setenv("MEMPROF_WORKERS", "1")
