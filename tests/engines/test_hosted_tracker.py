"""The sim's tracker hosted by its fake mode sees what a tracker on the mode stack sees.

:class:`memprof.engines.fake_fidelity.SimFakeMode` reports each op dispatched from
outside it to the tracker (:func:`memprof.tracking.tracker._hosting_fake_mode`),
instead of the tracker taking a dispatch mode of its own. A no-op dispatch mode on
the stack makes the tracker take its own place again: the two runs of the same
step must give the same trace (every allocation and free, its phase and op
counter), the same op count, the same FLOPs and the same profile.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.engines import SimEngine
from memprof.engines.base import Measure
from memprof.models import resolve
from memprof.tracking import tracker as tracker_module
from memprof.workload import Workload
from tests.conftest import setup_with, tiny

pytestmark = pytest.mark.usefixtures("no_automatic_collections")


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _run(monkeypatch: pytest.MonkeyPatch, hosted: bool, steps: list[tuple[str, dict[str, Any]]]) -> Any:
    seen: list[bool] = []
    real_enter = tracker_module.Tracker.__enter__

    def enter(self: Any) -> Any:
        # a dispatch mode under the tracker: it must take its own place on the stack
        ctx = contextlib.nullcontext() if hosted else _Passthrough()
        ctx.__enter__()
        self._test_ctx = ctx
        out = real_enter(self)
        seen.append(self._host is not None)
        return out

    real_exit = tracker_module.Tracker.__exit__

    def exit_(self: Any, *exc: Any) -> None:
        try:
            real_exit(self, *exc)
        finally:
            self._test_ctx.__exit__(None, None, None)

    monkeypatch.setattr(tracker_module.Tracker, "__enter__", enter)
    monkeypatch.setattr(tracker_module.Tracker, "__exit__", exit_)
    eng = SimEngine()
    eng.keep_trace = True
    wl = Workload(batch_size=2, seq_len=16)
    r = eng.run_detailed(
        resolve(tiny("llama")), setup_with(wl, *steps), measure=Measure(flops=True, timeline=True)
    )
    monkeypatch.undo()
    assert seen == [hosted]
    return r, eng.last_trace


def _events(trace: list[Any]) -> list[tuple[Any, ...]]:
    """The events, each allocation named by its place in the trace and each free by the allocation
    it releases (storage ids differ from run to run, and are reused once freed)."""
    live: dict[int, int] = {}
    out = []
    for i, e in enumerate(trace):
        if e.alloc:
            live[e.storage] = i
        out.append((i if e.alloc else live.pop(e.storage, -1), e.nbytes, e.alloc, e.phase, e.op))
    return out


@pytest.mark.parametrize(
    "steps",
    [
        [],
        [("checkpointing", {}), ("optimizer", {"type": "adafactor"})],
        [("optimizer_in_backward", {}), ("chunking", {"size": 8})],
    ],
    ids=["plain", "checkpointing+adafactor", "in-backward+chunking"],
)
def test_a_hosted_tracker_sees_what_a_tracker_on_the_stack_sees(monkeypatch, steps):
    on_stack, trace_on_stack = _run(monkeypatch, False, steps)
    hosted, trace_hosted = _run(monkeypatch, True, steps)
    assert trace_hosted and _events(trace_hosted) == _events(trace_on_stack)
    assert hosted.flops == on_stack.flops and hosted.flops
    a, b = hosted.profile.to_dict(), on_stack.profile.to_dict()
    for d in (a, b):
        d.pop("notes", None)
    assert a == b
    assert a["timeline"]["ops"] == b["timeline"]["ops"] > 0
