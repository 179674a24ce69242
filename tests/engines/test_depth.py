"""A stack of blocks measured from three shallow traces (memprof.engines.depth) against the whole trace.

Every bundled decoder is checked at its own depth against the whole trace, for
every shipped recipe (the steps that apply to a training step of it): the
parameter count and the FLOPs must be equal, the allocated peak and each phase's
peak never above the whole trace's (a lower bound: what ``memprof plan`` relies
on), and equal where the bounds below say so. The widths are shrunk (hidden 64,
vocab 256) so a whole trace of 80 blocks takes seconds; depth, layer types and
every block's structure are the model's own. A refused extrapolation must give
one of the documented reasons.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any

import pytest

from memprof import recipes
from memprof.engines import SimEngine
from memprof.engines import depth as D
from memprof.engines.base import Measure
from memprof.models import bundled_configs_dir, bundled_models, resolve
from memprof.prepare import fake_model, stack
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

WL = Workload(batch_size=1, seq_len=32)
MEASURE = Measure(flops=True, timeline=False)
RECIPES = sorted(p.name for p in (bundled_configs_dir().parent / "recipes").glob("*.yaml"))


def narrow(name: str) -> Any:
    """The bundled model with its widths shrunk: same depth, layer types and block structure."""
    rm = resolve(name)
    cfg = copy.deepcopy(rm.config)
    heads = 4
    kv = getattr(cfg, "num_key_value_heads", None)
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 64, 128, 256
    cfg.num_attention_heads = heads
    if kv is not None:
        cfg.num_key_value_heads = 1 if kv < getattr(rm.config, "num_attention_heads", kv) else heads
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = 16
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= 256:
            setattr(cfg, attr, 0)
        elif isinstance(v, list):
            setattr(cfg, attr, [0])
    return replace(rm, config=cfg, notes=[])


DECODERS = [m for m in bundled_models() if resolve(m).model_type in D.STACKS]


def figures(r: Any) -> dict[str, Any]:
    p = r.profile
    return {
        "peak": p.peak_bytes,
        "categories": dict(p.categories_at_peak),
        "phases": {ph.name: ph.peak_bytes for ph in p.phases},
        "peak_phase": p.peak_phase,
        "parameters": p.model["parameters"],
        "flops": r.flops,
    }


def recipe_setup(rm: Any, recipe: str) -> StepSetup:
    wl = WL.for_model(rm)
    setup, _ = stack(recipes.load(bundled_configs_dir().parent / "recipes" / recipe), wl, fake_model(rm, wl))
    return setup


def test_every_bundled_decoder_is_a_stack():
    assert {"llama-3-8b", "llama-3-70b", "gemma-2-9b", "mistral-7b", "qwen2.5-0.5b", "tinyllama-1.1b"} <= set(
        DECODERS
    )


#: the suite's share of the matrix (about 25 s); MEMPROF_DEPTH_MATRIX=1 runs every bundled decoder
#: with every recipe (about 5 minutes on 2 cores). tests/engines/test_depth_trace.py checks these
#: figures too (:func:`check_figures`) on its own cases, Llama-3-8B's and Gemma-2-9B's baselines
#: among them: they are not traced twice
SUITE = {
    ("llama-3-8b", "fastest-fit.yaml"),
    ("qwen2.5-0.5b", "(baseline)"),
    ("qwen2.5-0.5b", "single-gpu-lora.yaml"),
    ("llama-3.2-1b", "(baseline)"),
}
MATRIX = [
    (m, r)
    for m in DECODERS
    for r in ["(baseline)", *RECIPES]
    if os.environ.get("MEMPROF_DEPTH_MATRIX") == "1" or (m, r) in SUITE
]


@pytest.mark.parametrize("model,recipe", MATRIX)
def test_the_shallow_traces_give_the_whole_traces_figures(model, recipe):
    rm = narrow(model)
    setup = StepSetup.of(WL.for_model(rm)) if recipe == "(baseline)" else recipe_setup(rm, recipe)
    plan = D.depths(rm, setup)
    if isinstance(plan, str):
        pytest.skip(f"not extrapolated: {plan}")  # a sharded recipe: documented, whole trace
    shallow, how = D.shallow_run(SimEngine(), rm, setup, MEASURE)
    if shallow is None:
        assert "the peak moves between phases" in how or "not affine in depth" in how
        return
    whole = SimEngine().run_detailed(rm, setup, track_modules=False, measure=MEASURE)
    check_figures(model, recipe, shallow, whole)


def check_figures(model: str, recipe: str, shallow: Any, whole: Any) -> None:
    """The extrapolated figures against the whole trace's: exact counts, peaks no higher (equal where
    the peak's moment is the same, :data:`EXACT`), no reserved memory guessed."""
    a, b = figures(shallow), figures(whole)
    assert a["parameters"] == b["parameters"] and a["flops"] == b["flops"]
    assert a["peak"] <= b["peak"]
    assert all(a["phases"][k] <= b["phases"][k] for k in b["phases"])
    if (model, recipe) in EXACT:
        assert a == b
    assert shallow.profile.peak_reserved_bytes is None  # not extrapolated, not guessed
    assert any("traced at" in n for n in shallow.profile.notes)


#: where the extrapolation is the whole trace's, byte for byte (the peak's moment is the same)
EXACT = {
    (m, r)
    for m in ("llama-3-8b", "llama-3-70b", "mistral-7b", "gemma-2-9b", "tinyllama-1.1b")
    for r in ("(baseline)", "compact-encoder.yaml", "low-memory-finetune.yaml", "minimal-memory.yaml")
}


def test_the_depths_follow_the_period_of_what_differs_between_blocks():
    rm = resolve("llama-3-8b")
    wl = WL.for_model(rm)
    assert D.depths(rm, StepSetup.of(wl)).traced == (1, 2, 3)
    assert D.depths(rm, setup_with(wl, ("checkpointing", {"every": 4}))).traced == (4, 8, 12)
    assert D.depths(rm, setup_with(wl, ("checkpointing", {"every": 3}))).traced == (5, 8, 11)  # 32 = 5 + 9*3
    gemma = resolve("gemma-2-9b")  # sliding and full attention alternate
    g = D.depths(gemma, StepSetup.of(WL.for_model(gemma)))
    assert g.period == 2 and g.traced == (2, 4, 6) and g.full == 42


@pytest.mark.parametrize(
    "spec,why",
    [
        (tiny("gpt2"), "not a stack"),
        ("mixtral-8x7b", "not a stack"),
        (tiny("llama"), "too few"),
    ],
)
def test_what_is_not_extrapolated_says_why(spec, why):
    rm = resolve(spec)
    out = D.depths(rm, StepSetup.of(WL.for_model(rm)))
    assert isinstance(out, str) and why in out


def test_a_sharded_step_is_traced_whole():
    rm = resolve("llama-3-8b")
    wl = Workload(batch_size=1, seq_len=32, world_size=2).for_model(rm)
    assert "sharded" in D.depths(rm, setup_with(wl, ("fsdp", {})))


def _bend(monkeypatch: Any, extra: Any) -> None:
    """Add ``extra(depth)`` bytes to the activations each shallow run reports (at the peak)."""
    real = D._figures
    seen: list[int] = []

    def bent(r: Any) -> dict[str, Any]:
        out = real(r)
        seen.append(out["parameters"])
        per_block = seen[1] - seen[0] if len(seen) > 1 else 1  # the first two calls: depths 1 and 2
        out["category activations"] += extra(1 + (out["parameters"] - seen[0]) // per_block)
        return out

    monkeypatch.setattr(D, "_figures", bent)


def test_a_figure_that_is_not_affine_refuses_the_extrapolation(monkeypatch):
    rm = narrow("llama-3.2-1b")
    _bend(monkeypatch, lambda d: 512 * max(d - 2, 0) ** 2)  # off the line from the third depth on
    out, why = D.shallow_run(SimEngine(), rm, StepSetup.of(WL.for_model(rm)), MEASURE)
    assert out is None and "category activations is not affine in depth" in why and "(2, 3, 4)" in why


def test_a_first_block_of_its_own_is_passed_over_one_period_deeper(monkeypatch):
    """The depths one period on (one run more) when the first depth is off the others' line."""
    rm = narrow("llama-3.2-1b")
    # bfloat16: flash attention (in float32 grouped-query attention runs the math kernel, whose
    # backward peak is off the line at these widths: the extension refuses it, as it should)
    setup = StepSetup.of(Workload(batch_size=1, seq_len=32, dtype="bfloat16").for_model(rm))
    plain, _ = D.shallow_run(SimEngine(), rm, setup, MEASURE)
    _bend(monkeypatch, lambda d: 4096 if d == 1 else 0)
    out, how = D.shallow_run(SimEngine(), rm, setup, MEASURE)
    assert how == "traced at 2, 3 and 4 of 16 blocks and extrapolated"
    assert out is not None and out.shallow.depths.traced == (2, 3, 4)
    assert figures(out) == figures(plain)  # the same line, from the next three depths


@pytest.mark.parametrize(
    "notes,full",
    [
        # the same at every depth: the model's
        (["rank 16, 1.5 MiB"] * 3, "rank 16, 1.5 MiB"),
        # counts one period apart: 31 periods on from the first depth (32 blocks from 1, 2, 3)
        (["x7, flash x1", "x14, flash x2", "x21, flash x3"], "x224, flash x32"),
        (["15,872 of 83,648", "31,744 of 134,464", "47,616 of 185,280"], "507,904 of 1,658,944"),
        (["x900", "x1,000", "x1,100"], "x4,000"),
        (["x1100", "x1200", "x1300"], "x4200"),  # written without separators, as its depths show
        # a count below 1,000 at every depth is written as memprof writes counts, separated
        (["x100", "x200", "x300"], "x3,200"),
        # what cannot be told: a decimal that moves, a count not affine, another skeleton
        (["1.5 MiB", "1.1 MiB", "0.7 MiB"], None),
        (["9.1% fewer", "12.0% fewer", "13.4% fewer"], None),
        (["x1", "x2", "x4"], None),
        (["1 block", "2 blocks", "3 blocks"], None),
    ],
)
def test_a_note_that_counts_blocks_is_extrapolated_and_any_other_change_refused(notes, full):
    out = D.affine_notes([[n] for n in notes], 31)
    assert out == (None if full is None else [full])
    assert D.affine_notes([["a"], ["a", "b"], ["a"]], 31) is None  # a note only some depths have


@pytest.fixture(scope="module")
def deep_narrow_llama(tmp_path_factory) -> str:
    """Llama-3-8B's blocks at widths of a few KiB, 6 of them, as a config file (plan takes a MODEL spec).

    6 blocks: deep enough for three shallow depths (1, 2 and 3) to settle a misfit, shallow
    enough for the plan traced whole to take seconds (its 32 blocks took two minutes).
    """
    import json

    cfg = json.loads((bundled_configs_dir() / "llama-3-8b.json").read_text())
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_hidden_layers=6,
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(k), int) and cfg[k] >= 256:
            cfg[k] = 0
    f = tmp_path_factory.mktemp("deep") / "config.json"
    f.write_text(json.dumps(cfg))
    return str(f)


def test_plan_settles_misfits_from_shallow_traces_and_finds_the_plan_whole_traces_find(
    deep_narrow_llama, monkeypatch
):
    from rich.console import Console

    from memprof.plan import planner, search
    from memprof.report.plan import render_plan

    wl = Workload(batch_size=1, seq_len=64, dtype="bfloat16")
    budget = 66 * 2**20  # 64 MiB of fixed overheads (two cuBLAS workspaces): 2 MiB for the step
    shallow = planner.plan(deep_narrow_llama, wl, budget_bytes=budget, context_overhead=0, max_plans=1)
    settled = [r for r in shallow.runs if r.depth]
    assert settled and all(r.depth.startswith("traced at ") and "of 6 blocks" in r.depth for r in settled)
    whole_runs = {r.index for r in shallow.runs if not r.depth}
    fits = [c for c in shallow.candidates if c.status == "fits"]
    assert fits and all(c.run in whole_runs for c in fits)  # a plan is traced whole, never a bound
    monkeypatch.setattr(search, "shallow_run", lambda *a, **k: (None, "off"))
    whole = planner.plan(deep_narrow_llama, wl, budget_bytes=budget, context_overhead=0, max_plans=1)
    assert not any(r.depth for r in whole.runs)
    a, b = shallow.plans[0], whole.plans[0]
    assert (a.label, a.peak_bytes, a.reserved_bytes, a.need_bytes) == (
        b.label,
        b.peak_bytes,
        b.reserved_bytes,
        b.need_bytes,
    )
    by_label = {r.key: r for r in whole.runs}
    for r in settled:  # a lower bound over the budget: the whole trace does not fit either
        if r.key in by_label:
            assert by_label[r.key].profile.peak_bytes >= r.profile.peak_bytes
    console = Console(record=True, width=200)
    render_plan(shallow, console)
    out = " ".join(console.export_text().split())
    assert "≥: traced at three shallow depths" in out
