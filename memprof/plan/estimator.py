"""The memory and FLOPs of a combination of lever levels, estimated from the runs measured so far.

The estimator composes per-lever effects on the components of a step's memory
(parameters, optimizer state, activations, optimizer temporaries) from the nearest
measured combinations below it (the anchors): an optimizer's state is rescaled from
the parameters' shapes (8-bit moments, Adafactor's factored ones), pure bf16 halves
the parameters and state and at least halves the activations, micro-batches divide
the activations (the levels' priors). Where a step's backward peak is its gradients,
the forward's peak bounds its activations from below. An effect not known yet is learned from the next run that shows it (a run
that shows one new effect teaches it; a lever's strongest level teaches the levels
between by interpolation); until then it is taken as optimistic, so a combination
is measured rather than wrongly skipped. The peak is never less than the allocated
peak of a measured combination above it (monotonicity: more of a lever never
allocates more, unless a run showed otherwise); the reserved memory is that peak
rounded up to whole 2 MiB segments, a lower bound (fragmentation is measured, not
estimated).

FLOPs are counted once per signature (the levels of the levers that change them)
and estimated for the others from the counted differences, or from the levels'
priors.

It needs no search: give it measured runs (:class:`Measured`, from a profile or
by hand) and ask::

    est = Estimator(Combinations(levers), training=True)
    est.add(Measured.of(run_key, run_index, profile, flops))
    peak, reserved = est.estimate(key)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from memprof.allocator_model import SMALL_BUFFER
from memprof.plan.combinations import Combinations, Key
from memprof.profile import Profile

MiB = 2**20
#: a fb-phase transient within this fraction of the gradients may be the gradients
#: (the end of backward), not the activations: the activations are then only bounded
_CENSOR = 1.03
#: components of a step's memory the estimator composes
COMPONENTS = ("params", "state", "acts", "temps")


@dataclass
class Measured:
    """What one run of a combination measured: the figures the estimator reads."""

    #: the run key (derived levers at level 0)
    key: Key
    #: the run's index (for the notes)
    run: int
    peak_bytes: int
    #: bytes by category at the peak: ``parameters``, ``optimizer_state``, ``buffers``, ``inputs``...
    categories: dict[str, int]
    #: each phase's peak (``forward``, ``backward``, ``optimizer``...)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    #: the FLOPs counted in this run (None: not counted, its signature was counted before)
    flops: int | None = None

    @classmethod
    def of(cls, key: Key, run: int, profile: Profile, flops: int | None = None) -> Measured:
        """From a run's profile."""
        return cls(
            key=key,
            run=run,
            peak_bytes=profile.peak_bytes,
            categories=dict(profile.categories_at_peak),
            phase_peaks={ph.name: ph.peak_bytes for ph in profile.phases},
            flops=flops,
        )


@dataclass
class Footprint:
    """A measured step's memory in the estimator's terms (bytes)."""

    params: float
    other: float  # buffers and inputs
    state: float
    #: activations and what scales with them, at the forward/backward peak (None: only bounded)
    acts: float | None
    #: the optimizer step's temporaries beyond the gradients (None: not seen)
    temps: float | None
    peak: int
    run: int


class Estimator:
    """Estimates of combinations not measured, from the ones that were (see the module docstring).

    Args:
        combinations: the levers and what a key means.
        training: the step trains (gradients and an optimizer step shape its peak).
    """

    def __init__(self, combinations: Combinations, *, training: bool) -> None:
        self.combinations = combinations
        self.levers = combinations.levers
        self.training = training
        #: each measured run key's footprint, in run order
        self.footprints: dict[Key, Footprint] = {}
        #: the ratios learned from runs: (lever, level, component) -> ratio against level 0
        self.ratios: dict[tuple[int, int, str], float] = {}
        #: FLOPs counted per signature, and the run that counted them
        self.counted: dict[Key, tuple[int, int]] = {}
        #: the FLOP change of a lever level, learned from two counted signatures
        self.flop_deltas: dict[tuple[int, int], float] = {}
        #: levers a run showed not to be monotone (a stronger level needed more memory)
        self.non_monotone: set[int] = set()
        #: what an optimizer stepped in backward holds at once beyond the parameters and state
        #: (one gradient and its step's temporaries: measured by the search, 0 where not known)
        self.in_backward_floor: Callable[[Key], float] = lambda key: 0.0

    # what was measured -----------------------------------------------------------------------
    def add(self, m: Measured) -> list[str]:
        """Learn from a measured run; returns notes on levers found not to be monotone."""
        key = m.key
        sig = self.combinations.signature(key)
        if m.flops is not None and sig not in self.counted:
            self.counted[sig] = (m.flops, m.run)
        self.footprints[key] = self.decompose(m)
        self._learn(key)
        self._learn_flops(sig)
        return self._check_monotone(key)

    def decompose(self, m: Measured) -> Footprint:
        """A run's memory as parameters, state, activations and optimizer temporaries."""
        c = m.categories
        params, state = float(c.get("parameters", 0)), float(c.get("optimizer_state", 0))
        other = float(c.get("buffers", 0) + c.get("inputs", 0))
        base = params + state + other
        phases = m.phase_peaks
        fb = max([v for k, v in phases.items() if k != "optimizer"] or [m.peak_bytes])
        x = max(fb - base, 0.0)
        y = max(phases.get("optimizer", 0) - base, 0.0)
        # full fine-tuning: every parameter has a gradient of its dtype; adapters: next to none
        grads = 0.0 if self.combinations.trains_adapters() else params
        acts: float | None
        temps: float | None = None
        if (
            not self.training
            or self.combinations.in_backward(m.key)
            or self.combinations.gradients_off_device(m.key)
        ):
            acts = x
        elif self.combinations.micro_batches(m.key) > 1:
            acts = max(x - grads, 0.0)  # the gradients of the earlier micro-batches are there
            temps = max(y - grads, 0.0)
        else:
            # the fb peak is the start of backward (activations) or its end (gradients); at its
            # end, the forward's peak (no gradients yet: they were set to None by the last
            # step) bounds the activations from below, which keeps the estimate optimistic
            acts = x if x > grads * _CENSOR else (max(phases.get("forward", 0) - base, 0.0) or None)
            temps = max(y - grads, 0.0)
        return Footprint(
            params=params, other=other, state=state, acts=acts, temps=temps, peak=m.peak_bytes, run=m.run
        )

    def _check_monotone(self, key: Key) -> list[str]:
        """A lever whose stronger level was measured needing more memory is not assumed monotone.

        Compared on the allocated peak: the reserved memory moves by a fraction of a percent
        with the order of allocations, which says nothing of the lever.
        """
        notes = []
        new = self.footprints[key]
        for other_key, other in self.footprints.items():
            if other_key == key:
                continue
            diff = [i for i, (x, y) in enumerate(zip(key, other_key)) if x != y]
            if len(diff) != 1:
                continue
            i = diff[0]
            lo, hi = (other, new) if other_key[i] < key[i] else (new, other)
            if hi.peak > lo.peak * 1.005 + MiB and i not in self.non_monotone:
                self.non_monotone.add(i)
                notes.append(
                    f"{self.levers[i].name}: a stronger level needed more memory (runs {lo.run} and "
                    f"{hi.run}); the search does not assume it monotone"
                )
        return notes

    # order -------------------------------------------------------------------------------------
    def le(self, a: Key, b: Key) -> bool:
        """a is component-wise no more aggressive than b (equal on levers seen not to be monotone)."""
        return all(x <= y and (x == y or i not in self.non_monotone) for i, (x, y) in enumerate(zip(a, b)))

    def anchors(self, key: Key) -> list[Key]:
        """The measured run keys below ``key``, nearest (fewest levers apart) first."""
        rk = self.combinations.run_key(key)
        out = [a for a in self.footprints if self.le(a, rk)]
        out.sort(key=lambda a: sum(1 for x, y in zip(a, rk) if x != y))
        return out

    # what a lever level does: priors, learned ratios -------------------------------------------
    def learned(self, i: int, level: int, comp: str) -> float | None:
        """The ratio of component ``comp`` a run showed for lever ``i`` at ``level`` (None: none did)."""
        return self.ratios.get((i, level, comp))

    def ratio(self, i: int, level: int, comp: str) -> float | None:
        """Lever ``i``'s effect at ``level`` on ``comp``, against level 0 (None: unknown)."""
        if level == 0:
            return 1.0
        lv = self.levers[i]
        got = self.ratios.get((i, level, comp))
        if got is not None:
            return got
        lvl = lv.levels[level]
        if comp in lvl.prior:
            return float(lvl.prior[comp])
        if comp == "acts" and lv.interpolate:
            top = len(lv.levels) - 1
            r_top = self.ratios.get((i, top, comp))
            if r_top is not None and lv.levels[top].amount:
                return 1.0 - (1.0 - r_top) * lvl.amount / lv.levels[top].amount
        if lv.derived:
            return 1.0
        return None

    def _own_dtype(self, key: Key, comp: str) -> bool:
        """``key`` keeps ``comp`` in a dtype of its own (8-bit moments): no ``dtype`` lever scales it."""
        return any(lvl and comp in self.levers[i].levels[lvl].own_dtype for i, lvl in enumerate(key))

    def _ratio_in(self, i: int, level: int, comp: str, key: Key) -> float | None:
        """:meth:`ratio`, in the combination ``key`` (a ``dtype`` lever leaves an own-dtype component)."""
        if self.levers[i].dtype and self._own_dtype(key, comp):
            return 1.0
        return self.ratio(i, level, comp)

    def _factor(self, comp: str, a: Key, key: Key, skip: int | None = None) -> float:
        """The product of the lever ratios from ``a`` to ``key`` (NaN: one is unknown)."""
        factor = 1.0
        for i, (x, y) in enumerate(zip(a, key)):
            if i == skip or self.levers[i].derived:
                continue
            if x == y and not self.levers[i].dtype:
                continue
            rx, ry = self._ratio_in(i, x, comp, a), self._ratio_in(i, y, comp, key)
            if x == y and rx == ry:
                continue
            if rx is None or ry is None or rx == 0:
                return math.nan
            factor *= ry / rx
        return factor

    def compose(self, comp: str, key: Key, anchors: list[Key]) -> float | None:
        """The component for ``key`` from the nearest anchor where it is known, or None."""
        for a in anchors:
            v = getattr(self.footprints[a], comp)
            if v is None:
                continue
            factor = self._factor(comp, a, key)
            if not math.isnan(factor):
                return float(v) * factor
        return None

    def _learn(self, key: Key) -> None:
        """Learn, per component, the one effect this run shows that no run has shown yet.

        A level whose effect no run has shown is learned against the nearest measured
        combination without it (its prior, if any, is replaced); when several are, the one
        with no prior is learned, the others taken at their priors.
        """
        for comp in COMPONENTS:
            value = getattr(self.footprints[key], comp)
            if value is None:
                continue
            levels = [
                (i, lvl)
                for i, lvl in enumerate(key)
                if lvl
                and not self.levers[i].derived
                # the run does not show a dtype lever's effect on what it does not scale
                and not (self.levers[i].dtype and self._own_dtype(key, comp))
            ]
            unlearned = [(i, lvl) for i, lvl in levels if (i, lvl, comp) not in self.ratios]
            if len(unlearned) != 1:
                unlearned = [(i, lvl) for i, lvl in levels if self._known(i, lvl, comp) is None]
            if len(unlearned) != 1:
                continue
            i, lvl = unlearned[0]
            for a in self.anchors(key):
                va = getattr(self.footprints[a], comp)
                if a == key or a[i] != 0 or not va:
                    continue
                factor = self._factor(comp, a, key, skip=i)
                if math.isnan(factor) or factor == 0:
                    continue
                self.ratios[(i, lvl, comp)] = value / (va * factor)
                break

    def _known(self, i: int, level: int, comp: str) -> float | None:
        """A ratio from a prior or a run (not interpolated)."""
        got = self.ratios.get((i, level, comp))
        if got is not None:
            return got
        prior = self.levers[i].levels[level].prior
        return float(prior[comp]) if comp in prior else None

    # FLOPs ---------------------------------------------------------------------------------------
    def counts_flops(self, key: Key) -> bool:
        """A run of ``key`` should count FLOPs: no run counted its signature yet."""
        return self.combinations.signature(key) not in self.counted

    def counted_flops(self, key: Key) -> tuple[int, int] | None:
        """(FLOPs, run index) counted for ``key``'s signature, or None."""
        return self.counted.get(self.combinations.signature(key))

    def _learn_flops(self, sig: Key) -> None:
        if sig not in self.counted:
            return
        f = self.counted[sig][0]
        for other, (g, _) in self.counted.items():
            diff = [i for i, (x, y) in enumerate(zip(sig, other)) if x != y]
            if len(diff) == 1 and other[diff[0]] == 0:
                self.flop_deltas.setdefault((diff[0], sig[diff[0]]), float(f - g))

    def flops_of(self, key: Key) -> tuple[float | None, str]:
        """The step's FLOPs: counted for this signature, or estimated from the others."""
        sig = self.combinations.signature(key)
        if sig in self.counted:
            f, idx = self.counted[sig]
            return float(f), f"counted (run {idx})"
        base = self.counted.get(self.combinations.zero)
        if base is None:
            return None, "unknown"
        total = float(base[0])
        for i, lvl in enumerate(sig):
            if not lvl:
                continue
            d = self.flop_deltas.get((i, lvl))
            if d is None and self.levers[i].interpolate:
                top = len(self.levers[i].levels) - 1
                dt = self.flop_deltas.get((i, top))
                if dt is not None and self.levers[i].levels[top].amount:
                    d = dt * self.levers[i].levels[lvl].amount / self.levers[i].levels[top].amount
            if d is None:
                prior = self.levers[i].levels[lvl].flops_prior
                d = (prior or 0.0) * base[0]
            total += d
        return total, "estimated"

    def overhead(self, key: Key) -> tuple[float | None, str]:
        """The FLOP overhead against the step as given, as a fraction, and where it comes from."""
        f, src = self.flops_of(key)
        base = self.counted.get(self.combinations.zero)
        if f is None or base is None or not base[0]:
            return None, src
        return (f - base[0]) / base[0], src

    # memory --------------------------------------------------------------------------------------
    def floor(self, key: Key) -> float | None:
        """Parameters, optimizer state and (outside backward) all gradients: a lower bound of the peak.

        None until the step as given was measured.
        """
        zero = self.combinations.zero
        base = self.footprints.get(zero)
        if base is None:
            return None
        params = self.compose("params", key, [zero])
        state = self.compose("state", key, [zero])
        if params is None or state is None:
            return None
        grads = params if self.training and not self._grads_transient(key) else 0.0
        return params + state + base.other + grads + self._stepped_in_backward(key)

    def _stepped_in_backward(self, key: Key) -> float:
        """:attr:`in_backward_floor` where the optimizer steps in backward on the device, else 0."""
        c = self.combinations
        if not self.training or not c.in_backward(key) or c.gradients_off_device(key):
            return 0.0
        return self.in_backward_floor(key)

    def _grads_transient(self, key: Key) -> bool:
        """No full set of gradients on the device: stepped in backward, offloaded, or adapters only."""
        c = self.combinations
        return c.in_backward(key) or c.gradients_off_device(key) or c.trains_adapters()

    def estimate(self, key: Key) -> tuple[float, float]:
        """(peak, reserved) of a combination not measured: optimistic where an effect is unknown.

        The nearest measured combinations below it (the anchors) and the lever effects
        (priors, or learned from runs) give its parameters, optimizer state, activations
        and optimizer temporaries; the structure of the step puts them together: the peak is
        the forward/backward peak (activations, or the gradients at the end of backward, plus
        the earlier micro-batches' gradients) or the optimizer step's (all gradients and the
        optimizer's temporaries), whichever is higher; none with the optimizer in backward.

        Raises:
            KeyError: the step as given was not measured yet (every estimate starts from it).
        """
        anchors = self.anchors(key)
        base = self.footprints[self.combinations.zero]
        params = self.compose("params", key, anchors) or base.params
        state = self.compose("state", key, anchors)
        state = base.state if state is None else state
        acts = self.compose("acts", key, anchors) or 0.0
        temps = self.compose("temps", key, anchors) or 0.0
        grads = params
        if not self.training or self._grads_transient(key):
            x, y = max(acts, self._stepped_in_backward(key)), 0.0
        elif self.combinations.micro_batches(key) > 1:
            x, y = acts + grads, grads + temps
        else:
            x, y = max(acts, grads), grads + temps
        peak = params + state + base.other + max(x, y)
        # a measured combination at least as aggressive allocates no more (monotonicity)
        rk = self.combinations.run_key(key)
        above = [f.peak for m, f in self.footprints.items() if self.le(rk, m)]
        peak = max([peak, *above])
        # reserved: at least the allocated peak rounded up to whole 2 MiB segments (pages, with
        # expandable segments). A lower bound: the fragmentation above it moves with the sizes
        # and order of the allocations (by a quarter between neighbouring runs), and an
        # estimate must only skip what cannot fit
        return peak, float(math.ceil(peak / SMALL_BUFFER) * SMALL_BUFFER)
