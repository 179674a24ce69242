"""memprof plan: the search on a tiny causal LM in the sim engine, and the recipe and page it writes.

The tiny Llama's reserved memory moves in 2 MiB steps (the caching allocator's small-pool
segments), and the sim projects two 32 MiB cuBLAS workspaces in training: budgets here are
64 MiB plus a few MiB, with no CUDA context (``--context-overhead 0``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re

import pytest

from memprof import recipes
from memprof.cli import main
from memprof.engines.sim import SimEngine
from memprof.errors import InternalError, NoPlanFits
from memprof.workload import Workload
from tests.conftest import tiny
from tests.plan.helpers import TINY, TINY_WL, CountingSim, MiB, need_of, new_search, run

P = importlib.import_module("memprof.plan")  # the package (memprof.plan is also the function)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A budget between the baseline's need (68 MiB) and the most aggressive plan's (66 MiB)."""
    folder = tmp_path_factory.mktemp("plan")
    recipe, out = folder / "plan.yaml", folder / "plan.json"
    budget = 66 * MiB
    args = ["plan", tiny("llama"), "--budget", "66MiB", *TINY, "--plans", "1"]
    code = main(
        [*args, "--write-recipe", str(recipe), "--json", str(out), "--html", str(folder / "plan.html")]
    )
    return code, recipe, json.loads(out.read_text()), budget


def test_a_budget_between_gives_a_plan_that_fits_when_measured_again(fitted):
    code, recipe, d, budget = fitted
    assert code == 0
    assert d["schema"] == P.SCHEMA
    base, chosen = d["baseline"], d["chosen"]
    assert base["need_bytes"] > budget and not base["fits"]  # it does not fit as it is
    assert chosen["steps"] and chosen["fits"] and chosen["source"] == "measured"
    assert chosen["need_bytes"] <= budget
    b = d["budget"]
    assert b["usable_bytes"] == budget - b["cublas_workspace_bytes"] - b["context_bytes"]
    # measured again, from the recipe it wrote, outside the search
    need, _ = need_of(tiny("llama"), TINY_WL, recipes.load(recipe))
    assert need <= budget
    assert need == chosen["need_bytes"]


def test_the_html_page_shows_the_measured_plans_and_the_budget(fitted, tmp_path_factory):
    code, recipe, d, budget = fitted
    text = (recipe.parent / "plan.html").read_text()
    assert "Cheapest plan that fits" in text and "data-expected-charts=1" in text
    assert "chosen plan" in text and "budget 66.0 MiB" in text


def test_d_pruning_runs_fewer_steps_than_combinations(fitted):
    _, _, d, _ = fitted
    n = d["counts"]
    assert n["runs"] == len(d["runs"]) < n["product_of_levels"]
    assert n["pruned"] + n["not_needed"] + n["not_measurable"] > 0
    assert n["runs"] <= 8
    # every combination is accounted for: measured (two allocator settings per run), or skipped with a reason
    skipped = [c for c in d["candidates"] if c["source"] != "measured"]
    assert all(c["reason"] for c in skipped)
    assert (
        n["combinations"]
        == n["measured"] + n["pruned"] + n["not_needed"] + n["not_reached"] + n["not_measurable"]
    )


def test_c_d_the_library_raises_no_plan_fits_after_the_two_ends():
    eng = CountingSim()
    wl = Workload(batch_size=1, seq_len=64, dtype="bfloat16", optimizer="sgd")
    with pytest.raises(NoPlanFits) as e:
        # usable: 64.4 MiB less the 64 MiB of cuBLAS workspaces
        P.plan(tiny("llama"), wl, int(64.4 * MiB), context_overhead=0, engine=eng)
    assert e.value.exit_code == 6
    r = e.value.result
    # the two ends: the baseline, and the most aggressive combinations (the optimizer stepped in
    # backward, or offloaded to the host: they exclude each other), none of which fits either
    purposes = [run.purpose for run in r.runs]
    assert eng.calls == len(r.runs) == 3
    assert purposes == ["baseline", "most aggressive", "most aggressive"]
    product = math.prod(len(lv.levels) for lv in r.levers)
    assert r.counts["product_of_levels"] == product > 2 * eng.calls
    assert r.counts["pruned_nothing_fits"] == r.counts["combinations"] - r.counts["measured"]
    assert r.chosen is None and r.frontier and r.dominant
    closest = r.frontier[0]
    assert closest.need_bytes > int(64.4 * MiB) and closest.source == "measured"
    # the frontier: no point needs less memory at a lower cost than another
    for a in r.frontier:
        assert not any(b is not a and b.need_bytes < a.need_bytes and b.cost < a.cost for b in r.frontier)


def test_g_the_written_recipe_loads_and_names_the_command_that_confirms_it(fitted):
    _, recipe, d, _ = fitted
    r = recipes.load(recipe)
    assert [s.name for s in r.steps] == [s["name"] for s in d["chosen"]["steps"]]
    text = recipe.read_text()
    assert (
        f"memprof compare {tiny('llama')} --recipe {recipe} --engine sim -b 2 -s 64 --dtype bfloat16" in text
    )
    assert text == d["recipe"]
    assert not [f for f in os.listdir(recipe.parent) if f.startswith(".")]  # no temporary file left


def test_b_a_budget_above_the_baseline_needs_no_plan(tmp_path, capsys):
    path = tmp_path / "never.yaml"
    code, out, err = run(
        capsys, "plan", tiny("llama"), "--budget", "72MiB", *TINY, "--json", "-", "--write-recipe", str(path)
    )
    assert code == 0, err
    d = json.loads(out)
    chosen = d["chosen"]
    assert chosen["steps"] == [] and chosen["flop_overhead"] == 0 and chosen["fits"]
    assert d["counts"]["runs"] == 1
    assert not path.exists()  # nothing to write


def test_c_impossible_budget_exits_6_with_the_frontier(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "plan.yaml"
    code, out, err = run(
        capsys,
        "plan",
        tiny("llama"),
        "--budget",
        "64.5MiB",
        *TINY[2:],
        "-b",
        "1",
        "--write-recipe",
        str(path),
    )
    assert code == 6
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error: no plan fits 64.5 MiB")
    assert "Traceback" not in err
    assert "Closest that do not fit (Pareto frontier" in out
    assert "What dominates the closest plan's memory" in out
    assert "No plan fits 64.5 MiB" in out
    assert "\x1b[" not in out  # not a terminal: no escape codes
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, nothing left behind


def test_world_size_adds_the_fsdp_lever_and_reports_per_rank(tmp_path, capsys, monkeypatch):
    # plumbing only: the numbers do not matter (until the sim engine shards, a sharded step
    # measures like an unsharded one)
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "plan.json"
    args = ["--budget", "64.5MiB", "-b", "1", "-s", "64", "--dtype", "bfloat16", "--optimizer", "sgd"]
    args += ["--context-overhead", "0", "--world-size", "2", "--json", str(path)]
    code, out, err = run(capsys, "plan", tiny("llama"), *args)
    assert code == 6, err
    d = json.loads(path.read_text())
    assert d["workload"]["world_size"] == 2 and d["budget"]["per_rank"]
    fsdp = next(lv for lv in d["levers"] if lv["name"] == "fsdp")
    assert fsdp["levels"] == ["off", "keep gathered", "reshard"]
    assert any(s["name"] == "fsdp" for r in d["runs"] for s in r["steps"])  # the most aggressive shards
    assert "per rank of 2" in out and "(per rank)" in out


@pytest.fixture
def second_run_raises_key_error(monkeypatch):
    """A bug in memprof inside the second sim run (the first lever's): a KeyError as its trace is replayed."""
    replay = SimEngine.replay_trace
    calls = []

    def broken(self, trace, setup, extra):
        calls.append(setup)
        if len(calls) == 2:
            raise KeyError("no such segment")
        return replay(self, trace, setup, extra)

    monkeypatch.setattr(SimEngine, "replay_trace", broken)
    return calls


def test_a_key_error_in_a_sim_run_propagates_instead_of_dropping_the_lever(second_run_raises_key_error):
    # before: caught as a "failed run", the lever dropped with a note, the search went on
    with pytest.raises(InternalError) as e:
        P.plan(tiny("llama"), TINY_WL, 66 * MiB, context_overhead=0, max_plans=1)
    assert isinstance(e.value.__cause__, KeyError)
    assert e.value.exit_code == 70 and "KeyError: 'no such segment'" in str(e.value)
    assert len(second_run_raises_key_error) == 2  # the baseline ran; the search stopped at the bug


def test_a_key_error_in_a_sim_run_is_an_internal_error_on_the_command_line(
    second_run_raises_key_error, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("MEMPROF_CRASH_DIR", str(tmp_path / "crashes"))
    code, out, err = run(capsys, "plan", tiny("llama"), "--budget", "66MiB", *TINY, "--plans", "1")
    assert code == 70
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert re.match(
        r"memprof: internal error while profiling llama in sim: KeyError: 'no such segment'", lines[0]
    )


def test_single_fixes_measures_each_lever_alone_then_searches_on_reusing_the_runs():
    # the diagnosis's step (tests/test_diagnose.py): 68 MiB as it is, a 67 MiB budget
    wl = Workload(batch_size=4, seq_len=64, dtype="bfloat16", optimizer="sgd")
    found = P.single_fixes(tiny("llama"), wl, 67 * MiB, context_overhead=0)
    r = found.result
    assert found.baseline is r.baseline and found.baseline.need_bytes > 67 * MiB
    names = [s.lever for s in found.singles]
    assert names == [lv.name for lv in r.levers if lv.name in names]  # in lever order
    assert "allocator" in names  # from the baseline's run: no run of its own
    for s in found.singles:
        c = s.candidate
        assert c.source == "measured" and sum(1 for x in c.levels if x) == 1
        lever = next(i for i, x in enumerate(c.levels) if x)
        assert r.levers[lever].name == s.lever
    purposes = [run.purpose for run in r.runs]
    n_alone = sum(1 for p in purposes if p.startswith("effect of "))
    assert purposes[0] == "baseline" and all(p.startswith("effect of ") for p in purposes[1 : 1 + n_alone])
    assert any(s.candidate.fits for s in found.singles)
    assert "most aggressive" not in purposes  # a single lever fits: only cheaper stacks are looked for
    assert r.chosen is not None and r.chosen.fits and len(r.runs) <= 16


def test_the_most_aggressive_ends_are_only_a_bound_until_the_search_traces_them_whole(
    monkeypatch, tiny_plan_34
):
    """Shallow traces that may fit settle nothing: a plan is always a whole trace.

    The tiny Llama is too shallow to extrapolate, so its shallow result here is the whole
    trace's, marked as shallow: the plans must be those of whole traces, from whole runs.
    """
    from memprof.plan import planner, search

    budget = 66 * MiB
    whole = tiny_plan_34

    def shallow_run(engine, rm, setup, measure, **kw):
        kw.pop("progress", None)
        kw.pop("meanwhile", None)  # nothing runs beside: the search reads its floors when it needs them
        return engine.run_detailed(rm, setup, measure=measure, **kw), "traced at 1, 2 and 3 of 2 blocks"

    monkeypatch.setattr(search, "shallow_run", shallow_run)
    bound = planner.plan(tiny("llama"), TINY_WL, budget_bytes=budget, context_overhead=0)
    ends = [r for r in bound.runs if r.purpose == "most aggressive"]
    assert len(ends) >= 2 and all(r.depth for r in ends)
    traced_whole = {r.index for r in bound.runs if not r.depth}
    assert bound.plans and all(p.run in traced_whole for p in bound.plans)
    key = lambda c: (c.label, c.peak_bytes, c.reserved_bytes, c.need_bytes)  # noqa: E731
    assert [key(p) for p in bound.plans] == [key(p) for p in whole.plans]


def _device_figures(p) -> tuple:
    return (p.peak_bytes, p.categories_at_peak, [(ph.name, ph.peak_bytes) for ph in p.phases], p.allocator)


def test_under_optimizer_offload_one_run_measures_every_optimizer(tmp_path):
    """Every parameter offloaded (none under minimal_size): the device memory does not depend on the
    optimizer, so Adafactor under offload is measured by AdamW's run. With parameters left on the
    device (the tiny Llama's 64-wide norms), it does, and each optimizer runs."""
    from memprof.models import bundled_configs_dir

    cfg = json.loads((bundled_configs_dir() / "llama-3-8b.json").read_text())
    cfg.update(num_hidden_layers=2, intermediate_size=128, vocab_size=256, bos_token_id=0, eos_token_id=0)
    wide = tmp_path / "config.json"  # the 8B's 4096-wide blocks, two of them: norms of 4096 elements
    wide.write_text(json.dumps(cfg))
    wl = Workload(batch_size=1, seq_len=64)
    s = new_search(str(wide), wl, 600 * MiB)
    combos = s.combinations
    opt, off = combos.lever("optimizer"), combos.lever("optimizer offload")
    shared = [k for k in s.setups if combos.run_key(k) != k]
    assert shared and all(k[off] and k[opt] and combos.run_key(k)[opt] < k[opt] for k in shared)
    assert not set(shared) & set(s.maximal())  # the most aggressive ends are run keys
    key = next(k for k in shared if sum(1 for x in k if x) == 2)  # Adafactor + offload, nothing else
    run = s.measure(key, "test")
    assert run.key == combos.run_key(key) and not any(st["name"] == "optimizer" for st in run.steps)
    c = s.candidate(key)
    assert (c.source, c.run, c.peak_bytes) == ("measured", run.index, run.profile.peak_bytes)
    # the claim itself: Adafactor's own step under offload has AdamW's allocated peak, each phase's,
    # reserved memory and allocator figures; one 512-byte block at the peak may be an activation in
    # one step and a temporary in the other (the categories, not the bytes)
    own = SimEngine().run(s.rm, s.setups[key])
    a, b = _device_figures(own), _device_figures(run.profile)
    assert (a[0], a[2], a[3]) == (
        b[0],
        b[2],
        b[3],
    ) and own.peak_reserved_bytes == run.profile.peak_reserved_bytes
    assert sum(abs(a[1][k] - b[1][k]) for k in a[1]) <= 2 * 512

    tiny_search = new_search(tiny("llama"), TINY_WL, 66 * MiB)
    tc = tiny_search.combinations
    assert all(tc.run_key(k) == k for k in tiny_search.setups)
    key = next(k for k in tiny_search.setups if k[tc.lever("optimizer offload")] and k[tc.lever("optimizer")])
    adamw = list(key)
    adamw[tc.lever("optimizer")] = 0
    eng = SimEngine()
    ada, ref = (
        eng.run(tiny_search.rm, tiny_search.setups[key]),
        eng.run(tiny_search.rm, tiny_search.setups[tuple(adamw)]),
    )
    assert _device_figures(ada) != _device_figures(ref)  # the small parameters' state is on the device
