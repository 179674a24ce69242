"""plan's two ends run side by side (Search.prefetch): the same search as one run at a time."""

from __future__ import annotations

import pytest

from memprof.engines import SimEngine
from memprof.errors import InternalError
from memprof.plan import planner
from tests.conftest import tiny
from tests.plan.helpers import TINY_WL, MiB, new_search


def search(budget: int):
    return planner.plan(tiny("llama"), TINY_WL, budget_bytes=budget, context_overhead=0)


def comparable(result) -> dict:
    d = result.to_dict()
    d.pop("seconds", None)
    for r in d["runs"]:
        r.pop("seconds")
    return d


pytestmark = pytest.mark.usefixtures("no_automatic_collections")


def test_the_most_aggressive_runs_side_by_side_give_the_search_one_at_a_time_gives(monkeypatch, tiny_plan_34):
    # 66 MiB: between the baseline (68 MiB) and the most aggressive plan (tests/plan/test_search.py)
    budget = 66 * MiB
    one = tiny_plan_34
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    two = search(budget)
    assert sum(r.purpose == "most aggressive" for r in two.runs) >= 2  # the case is exercised
    assert comparable(two) == comparable(one)


def test_a_bug_in_a_run_side_by_side_is_an_internal_error(monkeypatch):
    real = SimEngine.run_detailed

    def aggressive_raises(self, rm, setup, **kw):
        if len(setup.steps) > 3:
            raise KeyError("a bug, as a test says")
        return real(self, rm, setup, **kw)

    monkeypatch.setattr(SimEngine, "run_detailed", aggressive_raises)
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    with pytest.raises(InternalError, match="KeyError"):
        search(66 * MiB)


def test_the_next_candidate_runs_beside_the_current_one_and_the_search_is_the_same(monkeypatch, tiny_plan_34):
    from memprof.plan.search import Search

    budget = 66 * MiB
    one = tiny_plan_34
    speculated: list[int] = []
    real_speculate = Search._speculate

    def speculate(self, first, *args):
        n = len(self._prefetched)
        real_speculate(self, first, *args)
        speculated.append(len(self._prefetched) - n)

    monkeypatch.setattr(Search, "_speculate", speculate)
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    two = search(budget)
    assert max(speculated) == 2  # the case is exercised: two candidates ran side by side
    assert comparable(two) == comparable(one)


def test_runs_traced_shallow_run_one_at_a_time_their_depths_side_by_side(monkeypatch, tmp_path):
    """A run traced at three shallow depths already runs them in two processes (shallow_run):
    two such runs are not paired (one at a time, each split evenly, none in vain). Runs
    traced whole still are (the tests above, on the 2-block Llama)."""
    import json

    with open(tiny("llama")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 6  # deep enough to extrapolate (depths 1, 2 and 3)
    deep = tmp_path / "llama6.json"
    deep.write_text(json.dumps(cfg))
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    s = new_search(str(deep), TINY_WL, 69 * MiB)
    keys = [k for k in s.setups if s._traced_beside(k)][:2]
    assert len(keys) == 2 and s.combinations.zero in s.setups
    s.measure(s.combinations.zero, "baseline")
    s.prefetch(keys)
    assert not s._prefetched  # measure() runs each, its depths side by side
    shallow_2 = [k for k in s.setups if not s._traced_beside(k)]
    assert shallow_2  # e.g. checkpointing every 4: too few blocks to gain, traced whole


def test_the_in_backward_floors_are_measured_while_the_first_shallow_run_waits(monkeypatch, tmp_path):
    """While the baseline's two shallower depths run in a worker, this process measures the
    in-backward floors the first best-first step reads (memprof.plan.search.Search._in_backward_floors):
    the same floors as measured when read, one at a time."""
    import json
    import time

    with open(tiny("llama")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 6  # deep enough to extrapolate (depths 1, 2 and 3)
    deep = tmp_path / "llama6.json"
    deep.write_text(json.dumps(cfg))
    real = SimEngine.run_detailed

    def slow_in_a_worker(self, *args, **kw):
        from memprof.engines.pool import in_worker

        if in_worker():
            time.sleep(1.0)  # the worker is still running when this process's depth is done
        return real(self, *args, **kw)

    monkeypatch.setattr(SimEngine, "run_detailed", slow_in_a_worker)
    floors = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MEMPROF_WORKERS", n)
        s = new_search(str(deep), TINY_WL, 69 * MiB)
        zero = s.combinations.zero
        assert s._traced_beside(zero)  # the baseline is traced shallow, its depths side by side
        s.measure(zero, "baseline")
        floors[n] = dict(s._transients)
        if n == "1":
            assert not floors[n]  # nothing waited: measured when first read
            s._in_backward_floors()
            floors[n] = dict(s._transients)
    assert floors["2"] == floors["1"] and len(floors["1"]) >= 2  # AdamW and more, in bf16
