"""Combinations of lever levels: a key holds one level index per lever (all zeros: the step as given).

:class:`Combinations` reads a key (its steps, label, side cost, structure);
:func:`enumerate_setups` stacks every combination's optimizations on the step, once
per prefix, and says which combinations do not apply.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from memprof.optimizations.registry import describe_steps
from memprof.plan.levers import SIDE_COSTS, Lever, apply_steps
from memprof.workload import StepSetup, Workload

#: one level index per lever
Key = tuple[int, ...]


class Combinations:
    """The combinations of ``levers``' levels, and what a key means.

    A derived lever (the allocator setting) comes from the same trace: the run that
    measures a key measures it with the derived lever at level 0 (:meth:`run_key`), and
    gives every level of it (:meth:`with_alloc`).
    """

    def __init__(self, levers: list[Lever]) -> None:
        self.levers = levers
        #: the derived lever's index (None: there is none)
        self.alloc = next((i for i, lv in enumerate(levers) if lv.derived), None)
        #: the step as given
        self.zero: Key = tuple(0 for _ in levers)
        self._level_labels: dict[tuple[int, int], str] = {}
        #: run keys measured by another one's run (:meth:`share`): key -> the run key that measures it
        self._shared: dict[Key, Key] = {}
        #: each run key that measures others: the run keys it measures (itself first)
        self._sharing: dict[Key, list[Key]] = {}

    def run_key(self, key: Key) -> Key:
        """The combination a run measures for ``key`` (the derived lever at level 0; a run key
        :meth:`share` gave to another: that one)."""
        if self.alloc is not None:
            k = list(key)
            k[self.alloc] = 0
            key = tuple(k)
        return self._shared.get(key, key)

    def share(self, key: Key, by: Key) -> None:
        """Run key ``key`` is measured by run key ``by``'s run (the same device memory, proven by
        the caller): :meth:`run_key` gives ``by``, :meth:`measured_by` lists ``key`` with it."""
        self._shared[key] = by
        self._sharing.setdefault(by, [by]).append(key)

    @property
    def sharing(self) -> bool:
        """Some run measures another run key too (:meth:`share`)."""
        return bool(self._shared)

    def measured_by(self, run_key: Key) -> list[Key]:
        """Every combination one run of ``run_key`` measures: each run key it stands for
        (:meth:`share`), at each level of the derived lever (:meth:`with_alloc`)."""
        return [k for rk in self._sharing.get(run_key, [run_key]) for k in self.with_alloc(rk)]

    def with_alloc(self, key: Key) -> list[Key]:
        """``key`` with each level of the derived lever: the combinations one run measures."""
        if self.alloc is None:
            return [key]
        out = []
        for a in range(len(self.levers[self.alloc].levels)):
            k = list(key)
            k[self.alloc] = a
            out.append(tuple(k))
        return out

    def steps_of(self, key: Key) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for lv, i in zip(self.levers, key):
            out += [dict(s) for s in lv.levels[i].steps]
        return out

    def label(self, key: Key) -> str:
        """:func:`describe_steps` of the key's steps (each level's part described once: a search labels
        every combination)."""
        return " + ".join(p for p in (self._describe(i, lvl) for i, lvl in enumerate(key)) if p) or "as it is"

    def _describe(self, i: int, lvl: int) -> str:
        out = self._level_labels.get((i, lvl))
        if out is None:
            steps = self.levers[i].levels[lvl].steps
            out = self._level_labels[(i, lvl)] = describe_steps([dict(s) for s in steps]) if steps else ""
        return out

    def side_cost(self, key: Key) -> float:
        return sum(lv.levels[i].side_cost for lv, i in zip(self.levers, key))

    def side_notes(self, key: Key) -> list[str]:
        return [
            SIDE_COSTS[lv.levels[i].side][1]  # type: ignore[index]
            for lv, i in zip(self.levers, key)
            if i and lv.levels[i].side
        ]

    def lever(self, name: str) -> int | None:
        """The index of the lever called ``name`` (None: not searched)."""
        return next((i for i, lv in enumerate(self.levers) if lv.name == name), None)

    def in_backward(self, key: Key) -> bool:
        """The optimizer steps in backward (no full gradients, no optimizer phase)."""
        i = self.lever("optimizer in backward")
        return i is not None and key[i] > 0

    def gradients_off_device(self, key: Key) -> bool:
        """Gradients leave the device as backward makes them (offloaded to the host optimizer)."""
        i = self.lever("optimizer offload")
        return i is not None and any(
            s["name"] == "optimizer_offload" and s["options"].get("gradients")
            for s in self.levers[i].levels[key[i]].steps
        )

    def trains_adapters(self) -> bool:
        """Every combination trains PEFT adapters (``--peft``): the base weights have no gradients."""
        return self.lever("peft") is not None

    def micro_batches(self, key: Key) -> int:
        i = self.lever("micro-batches")
        return int(self.levers[i].levels[key[i]].amount) if i is not None and key[i] else 1

    def signature(self, key: Key) -> Key:
        """The levels of the levers that change FLOPs: keys with one signature count the same FLOPs."""
        return tuple(k if lv.flops else 0 for lv, k in zip(self.levers, key))


def enumerate_setups(
    levers: list[Lever], model: torch.nn.Module, workload: Workload
) -> tuple[dict[Key, StepSetup], dict[Key, str]]:
    """Every valid run combination's setup, stacked lever by lever (a prefix is stacked once).

    Returns:
        The setups by run key (derived levers at level 0), and the combinations that do
        not apply with the reason (a level that does not apply on top of the others).
    """
    setups: dict[Key, StepSetup] = {}
    invalid: dict[Key, str] = {}
    run_levers = [lv if not lv.derived else Lever(lv.name, lv.levels[:1], derived=True) for lv in levers]

    def walk(depth: int, key: Key, setup: StepSetup) -> None:
        if depth == len(run_levers):
            setups[key] = setup
            return
        for i, level in enumerate(run_levers[depth].levels):
            trial = setup.copy() if level.steps else setup
            reason = apply_steps(level.steps, model, trial)
            if reason:
                rest = [range(len(lv.levels)) for lv in run_levers[depth + 1 :]]
                for tail in itertools.product(*rest):
                    invalid[(*key, i, *tail)] = reason
                continue
            walk(depth + 1, (*key, i), trial)

    walk(0, (), StepSetup.of(workload))
    return setups, invalid
