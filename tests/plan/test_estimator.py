"""The plan's estimator alone: hand-made levers and measured runs, no model, no search, no engine.

The step as given, in MiB: parameters 100, optimizer state 200, inputs 10; activations 1000
at the start of backward; the optimizer step holds the 100 of gradients and 50 of
temporaries. Its peak is the backward one: 1310.
"""

from __future__ import annotations

import pytest

from memprof.plan import Combinations, Estimator, Level, Lever, Measured

MiB = 2**20
SEGMENT = 2 * MiB  # the caching allocator's small segments: a reserved estimate is a multiple
BASE = {"parameters": 100 * MiB, "optimizer_state": 200 * MiB, "buffers": 0, "inputs": 10 * MiB}
KEEP = {"params": 1, "state": 1, "temps": 1}


def levers() -> list[Lever]:
    return [
        Lever(
            "checkpointing",
            [
                Level("off"),
                Level("every 2", prior=dict(KEEP), flops_prior=0.1, amount=2),
                Level("every 1", prior=dict(KEEP), flops_prior=0.2, amount=4),
            ],
            flops=True,
            interpolate=True,
        ),
        Lever(
            "micro-batches", [Level("1"), Level("2 x 1", prior={**KEEP, "acts": 0.5}, amount=2)], flops=True
        ),
        Lever("allocator", [Level("default"), Level("expandable")], derived=True),
    ]


def measured(key, run, *, acts, peak=None, flops=None, temps=50):
    """A training step's run: the backward peak holds ``acts`` MiB of activations over the base."""
    base = 310 * MiB
    backward = base + acts * MiB
    return Measured(
        key=key,
        run=run,
        peak_bytes=peak * MiB if peak is not None else backward,
        categories=dict(BASE),
        phase_peaks={"forward": base, "backward": backward, "optimizer": base + (100 + temps) * MiB},
        flops=flops,
    )


@pytest.fixture
def est() -> Estimator:
    e = Estimator(Combinations(levers()), training=True)
    assert e.add(measured((0, 0, 0), 1, acts=1000, flops=1000)) == []
    return e


def test_a_run_is_decomposed_into_parameters_state_activations_and_temporaries(est):
    f = est.footprints[(0, 0, 0)]
    assert (f.params, f.state, f.other) == (100 * MiB, 200 * MiB, 10 * MiB)
    assert (f.acts, f.temps, f.peak) == (1000 * MiB, 50 * MiB, 1310 * MiB)


def test_the_end_of_backward_bounds_the_activations_only():
    # a backward peak within 3% over the gradients may be the gradients themselves: unknown activations
    e = Estimator(Combinations(levers()), training=True)
    e.add(measured((0, 0, 0), 1, acts=101))
    assert e.footprints[(0, 0, 0)].acts is None


def test_the_forward_bounds_the_activations_from_below_when_the_backward_peak_is_the_gradients():
    # the backward peak is the gradients at its end (101 over the base); the forward peaked 80 over
    # it with no gradient live (set to None by the last step): at least 80 of activations
    e = Estimator(Combinations(levers()), training=True)
    run = measured((0, 0, 0), 1, acts=101)
    run.phase_peaks["forward"] = (310 + 80) * MiB
    e.add(run)
    assert e.footprints[(0, 0, 0)].acts == 80 * MiB
    # two micro-batches: the 80 halved. Optimistic: the activations at the start of backward are
    # at least the forward's
    key = (0, 1, 0)
    assert e.compose("acts", key, e.anchors(key)) == 40 * MiB
    # with no forward above the base, nothing is known of them
    e = Estimator(Combinations(levers()), training=True)
    e.add(measured((0, 0, 0), 1, acts=101))
    assert e.footprints[(0, 0, 0)].acts is None and e.compose("acts", key, e.anchors(key)) is None


def test_an_estimate_composes_the_priors_on_the_measured_step(est):
    # two micro-batches halve the activations; the first's gradients are live during the second
    peak, reserved = est.estimate((0, 1, 0))
    assert peak == (100 + 200 + 10 + 500 + 100) * MiB
    assert reserved == peak == 910 * MiB  # a whole number of segments already
    # the allocator setting comes from the same run: the same estimate
    assert est.estimate((0, 1, 1)) == (peak, reserved)


def test_reserved_is_the_peak_rounded_up_to_whole_segments():
    e = Estimator(Combinations(levers()), training=True)
    e.add(measured((0, 0, 0), 1, acts=1001))  # an odd number of MiB
    peak, reserved = e.estimate((0, 1, 0))
    assert peak == 910.5 * MiB
    assert reserved == 912 * MiB and reserved % SEGMENT == 0


def test_the_strongest_level_teaches_the_levels_between(est):
    est.add(measured((2, 0, 0), 2, acts=250, flops=1300))
    assert est.learned(0, 2, "acts") == 0.25
    assert est.learned(0, 1, "acts") is None
    # every 2 checkpoints half the blocks every 1 does: it saves half as much
    assert est.ratio(0, 1, "acts") == pytest.approx(0.625)
    peak, _ = est.estimate((1, 0, 0))
    assert peak == pytest.approx((310 + 625) * MiB)


def test_an_unknown_effect_is_optimistic():
    lv = levers()
    lv[1].levels[1].prior.pop("acts")  # micro-batches: their effect on activations unknown
    e = Estimator(Combinations(lv), training=True)
    e.add(measured((0, 0, 0), 1, acts=1000))
    assert e.ratio(1, 1, "acts") is None
    peak, _ = e.estimate((0, 1, 0))
    # no activations taken: only what is known (parameters, state, the gradients twice)
    assert peak == (100 + 200 + 10 + 100 + 50) * MiB


def test_an_estimate_is_never_below_a_measured_more_aggressive_peak(est):
    est.add(measured((2, 1, 0), 2, acts=200, peak=1200))
    # composed from the step as given it would be 910 MiB; a stronger combination allocated 1200
    peak, _ = est.estimate((0, 1, 0))
    assert peak == 1200 * MiB


def test_a_stronger_level_that_needs_more_memory_is_not_assumed_monotone(est):
    notes = est.add(measured((2, 0, 0), 2, acts=1500))
    assert notes == [
        "checkpointing: a stronger level needed more memory (runs 1 and 2); the search does not assume "
        "it monotone"
    ]
    assert est.non_monotone == {0}
    assert not est.le((1, 0, 0), (2, 0, 0)) and est.le((2, 0, 0), (2, 1, 0))
    # not carried over: the estimate of every 2 is not raised to every 1's peak
    peak, _ = est.estimate((1, 0, 0))
    assert peak < 1810 * MiB


def test_the_floor_is_parameters_state_and_gradients(est):
    assert est.floor((0, 1, 0)) == (100 + 200 + 10 + 100) * MiB
    assert Estimator(Combinations(levers()), training=True).floor((0, 0, 0)) is None  # nothing measured


def test_flops_are_counted_once_per_signature_and_estimated_for_the_others(est):
    assert not est.counts_flops((0, 0, 1))  # the allocator does not change FLOPs
    assert est.counts_flops((1, 0, 0))
    assert est.flops_of((0, 0, 0)) == (1000.0, "counted (run 1)")
    assert est.flops_of((1, 0, 0)) == (1100.0, "estimated")  # the prior: +10%
    est.add(measured((2, 0, 0), 2, acts=250, flops=1300))
    assert est.counted_flops((2, 0, 1)) == (1300, 2)
    # the counted difference of the strongest level, interpolated by the blocks checkpointed
    assert est.flops_of((1, 0, 0)) == (1150.0, "estimated")
    assert est.overhead((1, 0, 0)) == (pytest.approx(0.15), "estimated")
    assert est.overhead((2, 1, 0)) == (pytest.approx(0.3), "estimated")


def precision_and_optimizer() -> list[Lever]:
    """Pure bf16 halves what is kept in the parameters' dtype; 8-bit moments are 1/4 of AdamW's float32 ones."""
    half = {"params": 0.5, "state": 0.5, "temps": 0.5}
    return [
        Lever("precision", [Level("float32"), Level("pure bf16", prior=half)], dtype=True),
        Lever(
            "optimizer",
            [
                Level("adamw"),
                Level("adamw8bit", prior={"params": 1, "state": 0.25, "acts": 1}, own_dtype=("state",)),
            ],
        ),
    ]


def test_a_state_kept_in_its_own_dtype_is_not_scaled_by_the_parameters_dtype():
    e = Estimator(Combinations(precision_and_optimizer()), training=True)
    e.add(measured((0, 0), 1, acts=1000))
    # pure bf16 + 8-bit moments: 50 of parameters, 200 x 1/4 of state (not halved again), 10 of inputs,
    # 50 of gradients
    assert e.floor((1, 1)) == (50 + 50 + 10 + 50) * MiB
    assert e.floor((1, 0)) == (50 + 100 + 10 + 50) * MiB  # bf16 AdamW moments: halved
    # composed from a measured pure bf16 AdamW run, whose state is halved: the same 8-bit state
    run = measured((1, 0), 2, acts=1000)
    run.categories = {**BASE, "parameters": 50 * MiB, "optimizer_state": 100 * MiB}
    e.add(run)
    assert e.compose("state", (1, 1), [(1, 0)]) == 50 * MiB
    assert e.learned(0, 1, "state") == 0.5
    # a run of pure bf16 with 8-bit moments teaches the 8-bit state against float32 AdamW's, and
    # says nothing of what pure bf16 does to a state
    run = measured((1, 1), 3, acts=1000)
    run.categories = {**BASE, "parameters": 50 * MiB, "optimizer_state": 60 * MiB}
    e.add(run)
    assert e.learned(1, 1, "state") == pytest.approx(0.3)
    assert e.learned(0, 1, "state") == 0.5


def test_an_optimizer_stepped_in_backward_floors_the_peak_with_what_it_holds_at_once():
    lv = [
        Lever(
            "checkpointing", [Level("off"), Level("every 1", prior=dict(KEEP), amount=1)], interpolate=True
        ),
        Lever("optimizer in backward", [Level("off"), Level("on", prior={**KEEP, "acts": 1})]),
    ]
    e = Estimator(Combinations(lv), training=True)
    e.add(measured((0, 0), 1, acts=1000))
    # no full set of gradients when it steps in backward: parameters, state and inputs
    assert e.floor((0, 1)) == (100 + 200 + 10) * MiB
    # one gradient and its step's temporaries (the search measures them) are live at once
    e.in_backward_floor = lambda key: 30 * MiB
    assert e.floor((0, 1)) == (100 + 200 + 10 + 30) * MiB
    assert e.floor((0, 0)) == (100 + 200 + 10 + 100) * MiB  # the whole step's gradients: no floor added
    # the estimate is never below it, whatever the activations (checkpointing's are unknown: none)
    peak, _ = e.estimate((1, 1))
    assert peak == (100 + 200 + 10 + 30) * MiB
