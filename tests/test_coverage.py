"""The coverage matrix: every family of tests/families.py through the engines.

Per family (float32, eager attention, AdamW, a tiny batch): the sim engine's
training and inference steps run, the cpu engine's training step runs, and the
sim engine with CPU semantics (exact bytes, the CPU's optimizer loop, SDPA as the
CPU dispatches it) agrees with the cpu engine: the fake-tensor trace is the real
step's. The shipped sim's difference from the cpu engine (CUDA semantics: 512-byte
blocks, foreach AdamW) is recorded as a property of the test. ``bench/coverage.py``
runs the same matrix and writes docs/coverage.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import families


class Family:
    """One family: its model resolved once, and each variant's profile or error, run on first use."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._rm: Any = None
        self._runs: dict[str, Any] = {}

    def run(self, variant: str) -> Any:
        if variant not in self._runs:
            try:
                if self._rm is None:
                    from memprof.models import resolve

                    self._rm = resolve(str(self.path))
                self._runs[variant] = families.run(self._rm, variant)
            except Exception as e:  # kept, so the variants that need it fail with it too
                self._runs[variant] = e
        out = self._runs[variant]
        if isinstance(out, Exception):
            raise out
        return out


def _params() -> list[Any]:
    out = []
    for name in families.available():
        marks = []
        if name in families.PENDING:
            marks.append(pytest.mark.xfail(strict=False, reason=families.PENDING[name]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="module", params=_params())
def family(request: Any, tmp_path_factory: Any) -> Family:
    name = request.param
    return Family(name, families.write_config(name, tmp_path_factory.mktemp("families")))


def test_sim_train(family: Family) -> None:
    p = family.run("sim_train")
    assert p.peak_bytes > 0 and p.categories_at_peak["parameters"] > 0


def test_sim_infer(family: Family) -> None:
    p = family.run("sim_infer")
    assert p.peak_bytes > 0 and p.categories_at_peak["gradients"] == 0


def test_cpu_train(family: Family) -> None:
    p = family.run("cpu_train")
    assert p.peak_bytes > 0 and p.categories_at_peak["parameters"] > 0


def test_sim_with_cpu_semantics_agrees_with_cpu(family: Family, record_property: Any) -> None:
    cpu = family.run("cpu_train").peak_bytes
    sim = family.run("sim_train").peak_bytes
    record_property("sim_vs_cpu_pct", round(100.0 * (sim - cpu) / cpu, 3))
    traced = family.run("sim_cpu_semantics_train").peak_bytes
    diff = 100.0 * (traced - cpu) / cpu
    record_property("sim_cpu_semantics_vs_cpu_pct", round(diff, 3))
    assert abs(diff) < families.AGREEMENT_PCT, (
        f"{family.name}: sim with CPU semantics {traced:,} vs cpu {cpu:,} ({diff:+.2f}%)"
    )


def test_the_families_cover_what_transformers_has() -> None:
    # a family the installed transformers lacks is left out, never an error
    assert set(families.available()) | set(families.missing()) == set(families.FAMILIES)
    assert set(families.PENDING) <= set(families.FAMILIES)
