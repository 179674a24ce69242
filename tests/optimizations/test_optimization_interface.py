"""The optimization interface: a new optimization is one class, defined here only.

The toy below lives in this file and nowhere else; registering it is all it
takes for ``memprof compare`` (its library function) and the engines to run it:
the step runner calls its hooks, with no branch of its own for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from memprof import optimizations
from memprof.engines.runner import StepRunner
from memprof.optimizations import registry
from memprof.optimizations.registry import Optimization, option
from memprof.recipes import Recipe
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

MiB = 1 << 20


class ExtraBuffer(Optimization):
    """A toy: a buffer of ``mib`` MiB on the model, and a forward that doubles it while it runs."""

    name = "toy_extra_buffer"
    summary = "a toy for the interface test: a buffer on the model, doubled during each forward"
    modes = ("train", "infer")

    @dataclass
    class Config:
        mib: int = option(4, "buffer size, MiB", min=1, max=64)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.forwards = 0

    def apply(self, setup: StepSetup) -> None:
        setup.notes.append(f"toy: a {self.config.mib} MiB buffer")

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        p = next(model.parameters())
        n = self.config.mib * MiB // 4
        model.register_buffer("toy_buffer", torch.zeros(n, dtype=torch.float32, device=p.device))
        return f"toy: registered {self.config.mib} MiB"

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        if kind not in ("train", "infer"):
            return None
        return self._doubled(runner.model)

    def _doubled(self, model: torch.nn.Module) -> Any:
        import contextlib

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            self.forwards += 1
            copy = model.toy_buffer * 2  # a temporary as large as the buffer, alive during the forward
            try:
                yield
            finally:
                del copy

        return ctx()


@pytest.fixture
def toy() -> Iterator[type[ExtraBuffer]]:
    registry.register(ExtraBuffer)
    try:
        yield ExtraBuffer
    finally:
        registry._REGISTRY.pop(ExtraBuffer.name, None)


def test_toy_optimization_runs_through_compare(toy: type[ExtraBuffer]) -> None:
    from memprof.compare import compare

    wl = Workload(batch_size=2, seq_len=32)
    recipe = Recipe(description="toy", steps=[optimizations.make(toy.name, {"mib": 4})])
    cmp = compare(tiny("llama"), recipe, wl, engine="sim")
    base, row = cmp.baseline, cmp.steps[0]
    assert row.skipped is None and row.error is None and row.profile is not None
    after = row.profile
    # the buffer the hook registered: exactly 4 MiB more buffers at the peak
    grew = after.categories_at_peak["buffers"] - base.categories_at_peak["buffers"]
    assert grew == 4 * MiB
    # the doubled copy lives through the forward: the peak grows by more than the buffer
    assert after.peak_bytes - base.peak_bytes >= 4 * MiB
    assert any("toy: registered 4 MiB" in n for n in after.notes)


def test_toy_hooks_run_on_the_cpu_engine(toy: type[ExtraBuffer]) -> None:
    from memprof.engines.cpu import CpuEngine
    from memprof.models import resolve

    wl = Workload(mode="infer", batch_size=1, seq_len=16)
    base = CpuEngine().run(resolve(tiny("llama")), StepSetup.of(wl))
    after = CpuEngine().run(resolve(tiny("llama")), setup_with(wl, (toy.name, {"mib": 2})))
    assert after.categories_at_peak["buffers"] - base.categories_at_peak["buffers"] == 2 * MiB
    # during the forward the doubled copy is a temporary of the same size
    assert after.peak_bytes - base.peak_bytes >= 4 * MiB


def test_runner_calls_each_hook_without_knowing_the_optimization(toy: type[ExtraBuffer]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    setup = setup_with(Workload(mode="infer", batch_size=1, seq_len=1), (toy.name, {"mib": 1}))
    with StepRunner(model, setup) as runner:
        (opt,) = runner.optimizations
        assert isinstance(opt, ExtraBuffer)
        assert model.toy_buffer.numel() * 4 == MiB
        with torch.no_grad(), runner.contexts("infer"):
            model(torch.zeros(1, 4))
        assert opt.forwards == 1
        with runner.contexts("eval"):
            pass
        assert opt.forwards == 1  # the toy ignores the quality probe's forward


def test_registering_twice_is_refused(toy: type[ExtraBuffer]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy)
