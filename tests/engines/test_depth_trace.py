"""A deep stack's trace extended from shallow traces (memprof.engines.depth_trace) against the whole trace.

Every bundled decoder, for every shipped recipe (the steps that apply to a training
step of it), at its own depth with its widths shrunk (tests/engines/test_depth.py's
``narrow``): where the extension is made, the extended trace must be the whole
trace event for event (sizes, phases, what each free releases, op counters) and
the profile :func:`~memprof.engines.depth.extend_run` gives must be the whole run's
(reserved memory and the allocator's figures included), but for the note that says
how it was made. Where it is refused, the reason is one of the documented ones.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest

from memprof.engines import SimEngine
from memprof.engines import depth as D
from memprof.engines.base import Measure
from memprof.engines.depth_trace import extend, same_trace, template
from memprof.tracking import TraceEvent
from memprof.workload import StepSetup
from tests.engines.test_depth import DECODERS, RECIPES, WL, check_figures, narrow, recipe_setup

MEASURE = Measure(flops=True, timeline=False)

#: the suite's share (about 30 s); MEMPROF_DEPTH_MATRIX=1 runs every bundled decoder with every recipe
SUITE = {
    ("llama-3-8b", "(baseline)"),
    ("llama-3-8b", "low-memory-finetune.yaml"),
    ("gemma-2-9b", "(baseline)"),  # two layer types: a period of 2 blocks; a chain of blocks
    ("llama-3-8b", "minimal-memory.yaml"),  # a free of the template's allocation, then a run's
}
MATRIX = [
    (m, r)
    for m in DECODERS
    for r in ["(baseline)", *RECIPES]
    if os.environ.get("MEMPROF_DEPTH_MATRIX") == "1" or (m, r) in SUITE
]
#: extended today (a refusal there is a regression, not a documented limit)
MUST_EXTEND = (
    SUITE
    | {
        (m, r)
        for m in ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-0.5b", "tinyllama-1.1b")
        for r in ("(baseline)", "low-memory-finetune.yaml", "minimal-memory.yaml")
    }
    | {(m, "compact-encoder.yaml") for m in DECODERS}
    | {("gemma-2-9b", "single-gpu-lora.yaml"), ("gemma-2-9b", "fastest-fit.yaml")}
    # QLoRA under checkpointing: the end of backward's frees compared as a set (same_trace); with
    # the head tied to the embedding (llama-3.2, qwen2.5), its period aligned from the ends
    | {(m, "single-gpu-qlora.yaml") for m in DECODERS}
)
#: why an extension may be refused (each a check of memprof.engines.depth_trace or extend_run)
REFUSALS = (
    "not the shallower one with runs inserted",
    "releases an allocation of another rank",
    "not the one the first two give",
    "one period deeper still",
    "another moment",
    "not affine in depth",
    "a note of the profile depends on the depth",
)


def _without_depth_note(p: dict[str, Any]) -> dict[str, Any]:
    return {**p, "notes": [n for n in p["notes"] if not n.startswith("depth: ")]}


@pytest.mark.parametrize("model,recipe", MATRIX)
def test_the_extended_trace_is_the_whole_trace(model, recipe):
    rm = narrow(model)
    setup = StepSetup.of(WL.for_model(rm)) if recipe == "(baseline)" else recipe_setup(rm, recipe)
    if isinstance(D.depths(rm, setup), str):
        pytest.skip("not extrapolated (a sharded recipe): traced whole")
    eng = SimEngine()
    shallow, how = D.shallow_run(eng, rm, setup, MEASURE)
    if shallow is None:
        pytest.skip(f"not extrapolated: {how}")
    out = D.extend_run(eng, setup, shallow)
    whole_eng = SimEngine()
    whole_eng.keep_trace = True
    whole = whole_eng.run_detailed(rm, setup, track_modules=False, measure=MEASURE)
    check_figures(model, recipe, shallow, whole)  # the extrapolation's own checks (test_depth.py)
    if isinstance(out, str):
        assert (model, recipe) not in MUST_EXTEND, out
        assert any(r in out for r in REFUSALS), out
        return
    ext, how = out
    assert "extended" in how
    sh = shallow.shallow
    trace = D.extend(sh.traces, sh.depths.traced, sh.depths.full)
    assert not isinstance(trace, str)
    assert same_trace(trace, whole_eng.last_trace) is None
    assert ext.flops == whole.flops
    a, b = ext.profile.to_dict(), whole.profile.to_dict()
    assert a["peak_reserved_bytes"] is not None
    assert _without_depth_note(a) == b
    assert any(n.startswith("depth: ") and "extended" in n for n in a["notes"])


def test_the_plan_for_llama_3_8b_at_its_own_widths_extends_to_its_whole_trace():
    """Plan #1 of ``memprof plan llama-3-8b --budget 24GiB`` (README) at the model's own widths:
    the extended trace is the whole one and the profiles agree, reserved memory included."""
    from memprof.models import resolve
    from memprof.plan.levers import apply_steps
    from memprof.prepare import fake_model
    from memprof.workload import Workload

    rm = resolve("llama-3-8b")
    wl = Workload(batch_size=1, seq_len=512).for_model(rm)
    setup = StepSetup.of(wl)
    steps = [
        {"name": "mixed_precision", "options": {"pure": True}},
        {"name": "optimizer", "options": {"type": "paged_adamw8bit"}},
        {"name": "checkpointing", "options": {}},
        {"name": "optimizer_in_backward", "options": {}},
    ]
    assert apply_steps(steps, fake_model(rm, wl), setup) is None
    eng = SimEngine()
    shallow, _ = D.shallow_run(eng, rm, setup, MEASURE)
    out = D.extend_run(eng, setup, shallow)
    assert not isinstance(out, str), out
    whole_eng = SimEngine()
    whole_eng.keep_trace = True
    whole = whole_eng.run_detailed(rm, setup, track_modules=False, measure=MEASURE)
    sh = shallow.shallow
    assert same_trace(D.extend(sh.traces, sh.depths.traced, 32), whole_eng.last_trace) is None
    assert _without_depth_note(out[0].profile.to_dict()) == whole.profile.to_dict()
    assert whole.profile.peak_reserved_bytes > whole.profile.peak_bytes  # a replay, not a copy


@pytest.mark.parametrize(
    "method,blocks",
    [
        ("lora", 8),
        ("qlora", 8),
        # 25 s: in the matrix's share (the suite has the burst's own tests: same_trace, the allocator)
        pytest.param(
            "qlora+checkpointing",
            12,
            marks=pytest.mark.skipif(
                os.environ.get("MEMPROF_DEPTH_MATRIX") != "1", reason="MEMPROF_DEPTH_MATRIX=1"
            ),
        ),
    ],
)
def test_an_adapter_step_extends_to_its_whole_trace(method, blocks):
    """LoRA and QLoRA on every linear layer (8 blocks of Llama-3-8B's, narrowed), and QLoRA under
    checkpointing (12 blocks), bf16: the extended trace is the whole one, and so is the profile,
    notes included (the adapter and layer counts extrapolated: :func:`~memprof.engines.depth.affine_notes`).

    LoRA: the optimizer's multi-tensor ops hold nothing but the blocks' adapters, one block's
    share after another's in each op; the alignment keeps a period in one op (``_diff_tokens``'s
    op flag). QLoRA: the tensors there at the start are recorded at one op counter, the
    parameters, the quantization state and the optimizer's state each block after block; the
    alignment keeps a period in one section (its category flag): without it, the last block's
    quantization state and the first block's optimizer state were taken as one run.

    From 12 blocks on, the end of QLoRA's backward under checkpointing frees the loss, its
    gradient, the last gradients and the labels at one op in an order that moves with the depth
    (MEMPROF_DEPTH_MATRIX=1 found it on every decoder, at 32 blocks): the extended trace has them
    in the shallow traces' order. A burst of frees is compared as a set (``same_trace``): the
    allocator after it is the same in any order, and so is the profile, every figure."""
    from memprof.engines.depth_trace import _pairs, _token
    from memprof.plan.levers import apply_steps
    from memprof.prepare import fake_model

    rm = D._at_depth(narrow("llama-3-8b"), blocks)  # the same checks as at 32, in a fraction of the time
    setup = StepSetup.of(replace(WL, dtype="bfloat16").for_model(rm))
    steps = [{"name": name, "options": {}} for name in method.split("+")]
    assert apply_steps(steps, fake_model(rm, setup.workload), setup) is None
    eng = SimEngine()
    eng.keep_trace = True
    shallow, how = D.shallow_run(eng, rm, setup, MEASURE)
    assert shallow is not None, how
    sh = shallow.shallow
    trace = D.extend(sh.traces, sh.depths.traced, sh.depths.full)
    assert not isinstance(trace, str), trace
    out = D.extend_run(eng, setup, shallow)
    assert not isinstance(out, str), out
    whole_eng = SimEngine()
    whole_eng.keep_trace = True
    whole = whole_eng.run_detailed(rm, setup, track_modules=False, measure=MEASURE)
    wt = whole_eng.last_trace
    assert same_trace(trace, wt) is None
    assert _without_depth_note(out[0].profile.to_dict()) == whole.profile.to_dict()
    if "checkpointing" in method:  # the last frees, in another order: one burst
        pe, pw = _pairs(trace), _pairs(wt)
        assert not isinstance(pe, str) and not isinstance(pw, str)
        moved = [
            i
            for i, (e, w) in enumerate(zip(trace, wt))
            if (_token(e), pe.partner[i]) != (_token(w), pw.partner[i])
        ]
        assert moved and all(not wt[i].alloc and wt[i].op == wt[moved[0]].op for i in moved)
    # the note that counts the adapted layers (QLoRA) or the adapter parameters (LoRA) moves with
    # the depth: the extended profile's is not any shallow depth's, and is the whole trace's
    counts = " Linear layers" if method.startswith("qlora") else " adapter parameters"
    (note,) = [n for n in out[0].profile.notes if counts in n]
    assert note in whole.profile.notes
    assert all(note not in p.notes and any(counts in n for n in p.notes) for p in sh.profiles)
    assert method == "lora" or f" {7 * blocks} Linear layers" in note  # 7 in a block


def ev(sid: int, n: int, alloc: bool, phase: str = "forward", op: int = 0) -> TraceEvent:
    return TraceEvent(sid, n, alloc, phase, op)


def stack_trace(blocks: int, *, fifo: bool) -> list[TraceEvent]:
    """A toy step: each block's forward keeps an activation of 1 KiB; a loss of 8 KiB;
    each block's backward takes a 2 KiB temporary and frees an activation, the last
    block's first (a backward: LIFO) or the first block's (FIFO); then the optimizer's
    4 KiB temporary comes and goes."""
    out = [ev(0, 512, True, None)]
    sid, op = 1, 0
    for _ in range(blocks):
        op += 2
        out.append(ev(sid, 1024, True, "forward", op))
        sid += 1
    acts = list(range(1, sid))
    loss = sid
    out.append(ev(loss, 8192, True, "forward", op + 1))
    sid += 1
    for s in acts if fifo else reversed(acts):
        op += 3
        out += [ev(sid, 2048, True, "backward", op), ev(s, 1024, False, "backward", op + 1)]
        out.append(ev(sid, 2048, False, "backward", op + 2))
        sid += 1
    op += 3
    out += [ev(loss, 8192, False, "backward", op), ev(sid, 4096, True, "optimizer", op + 1)]
    out.append(ev(sid, 4096, False, "optimizer", op + 2))
    return out


@pytest.mark.parametrize("fifo", [False, True])
def test_a_periodic_toy_trace_extends_to_the_whole_one(fifo):
    traces = [stack_trace(d, fifo=fifo) for d in (1, 2, 3)]
    got = extend(traces, (1, 2, 3), 40)
    assert not isinstance(got, str)
    assert same_trace(got, stack_trace(40, fifo=fifo)) is None


def test_a_third_depth_off_the_pattern_refuses_the_extension():
    traces = [stack_trace(d, fifo=False) for d in (1, 2, 3)]
    third = list(traces[2])
    third[-1] = third[-1]._replace(op=third[-1].op + 1)  # one op more at depth 3 only
    out = extend([traces[0], traces[1], third], (1, 2, 3), 40)
    assert isinstance(out, str) and "not the one the first two give" in out
    bent = [e._replace(nbytes=2048) if e.nbytes == 4096 else e for e in traces[2]]  # another size
    assert "not the one the first two give" in extend([traces[0], traces[1], bent], (1, 2, 3), 40)


def test_a_deeper_trace_that_changes_an_event_refuses_the_extension():
    a, b = stack_trace(1, fifo=False), stack_trace(2, fifo=False)
    b = [e._replace(phase="optimizer") if e.nbytes == 512 else e for e in b]  # not an insertion
    out = template(a, b)
    assert isinstance(out, str) and "not the shallower one with runs inserted" in out


def test_a_free_whose_allocation_moves_rank_refuses_the_extension():
    # depth 1: the block frees the newest 1 KiB; depth 2: the oldest; depth 3 follows neither
    a = [ev(1, 1024, True), ev(2, 1024, True), ev(2, 1024, False)]
    b = [ev(1, 1024, True), ev(3, 1024, True), ev(2, 1024, True), ev(1, 1024, False), ev(3, 1024, False)]
    c = [ev(1, 1024, True), ev(4, 1024, True), ev(3, 1024, True), ev(2, 1024, True)]
    c += [ev(3, 1024, False), ev(1, 1024, False), ev(4, 1024, False)]
    out = extend([a, b, c], (1, 2, 3), 10)
    assert isinstance(out, str)


def test_a_burst_of_frees_is_compared_as_a_set():
    """Frees one after another at one op and phase are compared by what they release, not by
    their order; a free in another op, or a burst releasing other allocations, is a difference."""
    allocs = [
        ev(1, 512, True, "forward", 1),
        ev(2, 512, True, "forward", 2),
        ev(3, 1024, True, "backward", 3),
    ]
    x = [
        *allocs,
        ev(1, 512, False, "backward", 4),
        ev(3, 1024, False, "backward", 4),
        ev(2, 512, False, "backward", 5),
    ]
    reordered = [*allocs, x[4], x[3], x[5]]
    assert same_trace(x, reordered) is None
    other = [
        *allocs,
        ev(2, 512, False, "backward", 4),
        ev(3, 1024, False, "backward", 4),
        ev(1, 512, False, "backward", 5),
    ]
    assert "burst" in (same_trace(x, other) or "")
    later = [*allocs, x[3], ev(3, 1024, False, "backward", 5), x[5]]
    assert "a burst of 2 frees against 1" in (same_trace(x, later) or "")
    phase = [*allocs, x[3], ev(3, 1024, False, "optimizer", 4), x[5]]
    assert same_trace(x, phase) is not None


def test_a_period_the_alignment_from_the_start_misplaces_is_aligned_from_the_ends():
    """The tensors there when the step starts (one op) of a narrowed Qwen2.5 under QLoRA, in 512 B
    units: the embedding, each block's parameters, the final norm, each block's 4-bit state, then
    each block's optimizer state. Aligned from the start, the first period's parameters are split
    around the final norm (a 512 B event like the block's second) and the third depth refutes the
    template; aligned from the ends, the period is whole and the trace extends to the model's."""
    from memprof.engines.depth_trace import _extended

    params = [4, 1, 8, 8, 1, 1, 8, 2, 1, 1, 8, 2, 4, 8, 8, 8, 8, 16, 8, 8, 16, 8, 16, 8, 1, 1]
    state = [8, 8, 1, 8, 8, 1, 8, 8, 1, 2, 2, 1, 8, 8, 1, 2, 2, 1, 8, 8, 1, 8, 8, 1, 8, 8, 1]
    state += [16, 16, 1, 8, 8, 1, 16, 16, 1, 16, 16, 1, 8, 8, 1]

    def trace(n: int) -> list[TraceEvent]:
        sizes = [64, *params * n, 1, *[1, 1, 1, 1, 2] * n, 1, 1, 1, *state * n, 1]
        return [TraceEvent(i, s * 512, True, None, 0, 0) for i, s in enumerate(sizes)]

    a, b, c = trace(2), trace(3), trace(4)
    assert "other events" in str(_extended(a, b, c, 6))  # from the start: refuted
    out = D.extend([a, b, c], (2, 3, 4), 8)
    assert not isinstance(out, str), out
    assert same_trace(out, trace(8)) is None
