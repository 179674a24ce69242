"""What :func:`memprof.plan.plan` found, as plain data: runs, candidates, the budget, the result.

:meth:`PlanResult.to_dict` writes the JSON (schema ``memprof.plan/1``); the renderers
(:mod:`memprof.report.plan`, the HTML page) read these classes and never run a step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from memprof.budget import Budget  # re-exported: the plan's results carry it
from memprof.plan.levers import SIDE_COSTS, Lever
from memprof.profile import Profile
from memprof.units import format_bytes
from memprof.workload import Workload

SCHEMA = "memprof.plan/1"


@dataclass
class Run:
    """One sim run: the combination measured and what it showed."""

    index: int
    key: tuple[int, ...]
    steps: list[dict[str, Any]]
    seconds: float
    profile: Profile | None = None
    #: peak reserved with PyTorch's default allocator settings, and with expandable segments
    reserved: int | None = None
    reserved_expandable: int | None = None
    flops: int | None = None
    #: the run whose FLOP count this one shares (same checkpointing, chunking, micro-batches)
    flops_from: int | None = None
    #: why the run failed (out of memory, a step the sim engine cannot run, a level that does not apply)
    error: str | None = None
    #: why it ran: "baseline", "most aggressive", "candidate", "effect of <lever>"
    purpose: str = "candidate"
    #: set when the model was traced at three shallow depths and extrapolated (allocated figures only,
    #: no reserved memory; memprof.engines.depth): how
    depth: str | None = None
    #: set when the whole step's figures came from shallow traces extended to the model's depth
    #: (memprof.engines.depth.extend_run: the same figures as a whole trace): how
    extended: str | None = None

    def to_dict(self) -> dict[str, Any]:
        p = self.profile
        return {
            "index": self.index,
            "purpose": self.purpose,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "peak_bytes": p.peak_bytes if p else None,
            "reserved_bytes": self.reserved,
            "reserved_expandable_bytes": self.reserved_expandable,
            "depth": self.depth,
            "extended": self.extended,
            "peak_phase": p.peak_phase if p else None,
            "categories_at_peak": dict(p.categories_at_peak) if p else None,
            "flops": self.flops,
            "flops_from_run": self.flops_from,
            "error": self.error,
        }


@dataclass
class Candidate:
    """A combination of lever levels, and what the search made of it."""

    levels: tuple[int, ...]
    steps: list[dict[str, Any]]
    label: str
    #: fits | does not fit | over max overhead | failed (measured); estimated not to fit | pruned |
    #: not needed | not reached | not measurable (no run)
    status: str = "unresolved"
    #: why it had no run, in short: misfit (below a measured misfit), plan (above a cheaper plan that
    #: fits), state (its state alone is over the budget), estimate, overhead, not needed, run limit,
    #: not measurable, nothing fits
    skip: str | None = None
    #: why it was skipped, or what it failed with
    reason: str = ""
    #: measured (a run), estimated (the estimator), or none (no numbers)
    source: str = "none"
    run: int | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    #: reserved + the CUDA context + the cuBLAS workspace: what the budget must hold
    need_bytes: int | None = None
    flops: int | None = None
    flop_overhead: float | None = None
    flops_source: str = "estimated"
    side_cost: float = 0.0
    #: the side costs of its levels, one phrase each
    side_notes: list[str] = field(default_factory=list)
    categories: dict[str, int] | None = None
    peak_phase: str | None = None

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def cost(self) -> float:
        return (self.flop_overhead or 0.0) + self.side_cost

    def headroom(self, budget: int) -> int | None:
        return None if self.need_bytes is None else budget - self.need_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            "skip": self.skip,
            "fits": self.fits,
            "source": self.source,
            "run": self.run,
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
            "need_bytes": self.need_bytes,
            "flops": self.flops,
            "flop_overhead": self.flop_overhead,
            "flops_source": self.flops_source,
            "side_cost": self.side_cost,
            "side_notes": self.side_notes,
            "cost": self.cost,
            "categories_at_peak": self.categories,
            "peak_phase": self.peak_phase,
        }


@dataclass
class Maximized:
    """The largest batch size or sequence length that fits with the chosen plan."""

    dimension: str  # batch-size | seq-len
    start: int
    best: int
    #: the smallest value found not to fit (None: the limit was reached first)
    first_misfit: int | None
    #: why the search stopped growing (a misfit, the model's position limit, the probe limit)
    limit: str
    #: the value and need of every probe, in order ({"value", "need_bytes", "fits", "error"})
    probes: list[dict[str, Any]] = field(default_factory=list)
    best_profile: Profile | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "start": self.start,
            "best": self.best,
            "first_misfit": self.first_misfit,
            "limit": self.limit,
            "probes": self.probes,
            "best_peak_bytes": self.best_profile.peak_bytes if self.best_profile else None,
            "best_reserved_bytes": self.best_profile.peak_reserved_bytes if self.best_profile else None,
        }


@dataclass
class PlanResult:
    """What :func:`plan` found: the budget, every evaluated combination, the plans that fit.

    JSON (``to_dict``, schema ``memprof.plan/1``): ``schema``, ``model``, ``workload``,
    ``engine``, ``budget`` (the accounting), ``max_overhead``, ``levers`` (name and
    level labels), ``not_searched``, ``candidates`` (every combination resolved: steps,
    status, source, peak, reserved, need, FLOPs, cost), ``plans`` (those that fit,
    cheapest first), ``chosen`` (the first plan, or null), ``frontier`` (of those that do
    not fit: no other needs less memory at a lower cost), ``runs`` (each sim run),
    ``counts`` (combinations, runs, pruned by reason), ``maximize``, ``recipe`` (YAML
    text of the chosen plan), ``dominant`` (what dominates the closest plan's memory
    when none fits), ``notes``, ``seconds``, ``peft`` (``--peft``: the plan of each kind of
    training, full fine-tune first; added within schema 1).
    """

    model: str
    workload: dict[str, Any]
    engine: str
    budget: Budget
    max_overhead: float | None
    levers: list[Lever]
    not_searched: list[str]
    baseline: Candidate
    candidates: list[Candidate]
    runs: list[Run]
    counts: dict[str, int]
    plans: list[Candidate] = field(default_factory=list)
    frontier: list[Candidate] = field(default_factory=list)
    maximize: Maximized | None = None
    recipe: str | None = None
    dominant: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: ``--peft``: what each kind of training takes ({"trains": full | lora | qlora, "fits",
    #: "steps", "label", "peak_bytes", "need_bytes", "cost", "source", "runs"}, and
    #: "not_applicable": why, for a kind ``--peft any`` left out); empty without it
    peft: list[dict[str, Any]] = field(default_factory=list)
    schema: str = SCHEMA

    @property
    def chosen(self) -> Candidate | None:
        """The cheapest plan that fits (the baseline, with no steps, when it fits as it is)."""
        return self.plans[0] if self.plans else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "workload": self.workload,
            "engine": self.engine,
            "budget": self.budget.to_dict(),
            "max_overhead": self.max_overhead,
            "levers": [
                {"name": lv.name, "levels": [lvl.label for lvl in lv.levels], "derived": lv.derived}
                for lv in self.levers
            ],
            "not_searched": self.not_searched,
            "side_costs": {k: {"cost": v[0], "what": v[1]} for k, v in SIDE_COSTS.items()},
            "baseline": self.baseline.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "plans": [c.to_dict() for c in self.plans],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "frontier": [c.to_dict() for c in self.frontier],
            "runs": [r.to_dict() for r in self.runs],
            "counts": self.counts,
            "maximize": self.maximize.to_dict() if self.maximize else None,
            "recipe": self.recipe,
            "dominant": self.dominant,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
            "peft": self.peft,
        }


@dataclass
class SingleFix:
    """One lever's strongest level alone on the step as given, measured."""

    lever: str
    candidate: Candidate


@dataclass
class SingleFixes:
    """Each lever alone on the step, then the search on to the cheapest stack that fits.

    ``singles`` are in lever order (only those measured); ``result`` is the search that
    went on from them (its ``chosen`` is None when nothing searched fits).
    """

    baseline: Candidate
    singles: list[SingleFix]
    result: PlanResult


def pareto(cands: Iterable[Candidate]) -> list[Candidate]:
    """Those no other needs less memory at no more cost (lowest memory first)."""
    pts = sorted((c for c in cands if c.need_bytes is not None), key=lambda c: (c.cost, c.need_bytes))
    out: list[Candidate] = []
    best = math.inf
    for c in pts:
        if (c.need_bytes or 0) < best:
            out.append(c)
            best = c.need_bytes or 0
    out.sort(key=lambda c: c.need_bytes or 0)
    return out


_WHAT = {
    "parameters": "parameters",
    "optimizer_state": "optimizer state",
    "gradients": "gradients",
    "activations": "activations",
    "temporaries": "temporaries",
    "buffers": "buffers",
    "inputs": "inputs",
}


def dominant(closest: Candidate, budget: Budget, wl: Workload, levers: list[Lever]) -> list[str]:
    """What dominates the closest plan's memory at its peak, in sentences (largest first)."""
    cats = closest.categories or {}
    usable = budget.usable_bytes
    sharded = any(s["name"] == "fsdp" for s in closest.steps)
    where = f" at the peak (in {closest.peak_phase})" if closest.peak_phase else " at the peak"
    out = []
    for cat, n in sorted(cats.items(), key=lambda kv: -kv[1]):
        if n < 0.05 * usable:
            continue
        share = f"{format_bytes(n)}{where}, {n / usable:.0%} of the usable {format_bytes(usable)}"
        if cat == "parameters":
            if sharded:
                why = f"even fully sharded over {wl.world_size} ranks"
            else:
                why = "no searched optimization shrinks them further on one GPU" + (
                    "" if wl.world_size > 1 else "; shard them over more GPUs (--world-size N)"
                )
                why += (
                    ", or train fewer of them (LoRA) or quantize them (not searched: they change the model)"
                )
            out.append(f"parameters {share}: {why}")
        elif cat == "activations":
            out.append(
                f"activations {share}, at batch {wl.batch_size} x {wl.seq_len} tokens: a smaller batch or "
                "a shorter sequence"
            )
        elif (
            cat == "temporaries"
            and closest.peak_phase == "backward"
            and any(s["name"] == "optimizer_in_backward" for s in closest.steps)
        ):
            out.append(
                f"temporaries {share}: the optimizer's working copies as it steps each parameter in backward"
            )
        else:
            out.append(f"{_WHAT.get(cat, cat)} {share}")
    return out
