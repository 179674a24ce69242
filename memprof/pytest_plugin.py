"""pytest plugin (entry point ``pytest11``): memory budgets in a project's own tests.

A test records one or more steps with the ``memprof`` fixture and either asserts
on them itself or states a budget with the marker::

    @pytest.mark.memprof(max_peak="1.5GiB")
    def test_train_step_fits(memprof):
        with memprof.track(model, optimizer):
            train_step()

    def test_step_matches_the_baseline(memprof):
        profile = memprof.analyze("gpt2", batch_size=2, seq_len=128, engine="sim")
        memprof.assert_within_baseline("memprof-baseline.json", "gpt2-train-b2-s128", tolerance="1%")

A failure prints the memory at the peak by category and the modules that held
the most (for a baseline: the categories and modules that grew).

Loading the plugin imports only pytest (``import memprof`` is lazy): torch,
transformers and memprof's library load when a test records a step with the
fixture, so a suite that never uses memprof pays nothing for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

MARKER = (
    "memprof(max_peak=None, baseline=None, name=None, tolerance='1%'): fail the test when the "
    "steps recorded with the memprof fixture peak above max_peak, or grow beyond the tolerance of the "
    "named workload of a baseline file"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


class MemprofFixture:
    """Records the profiles of a test's steps; asserts budgets on them."""

    def __init__(self) -> None:
        self.profiles: list[Any] = []

    @contextlib.contextmanager
    def track(
        self, model: Any = None, optimizer: Any = None, *, cuda_rounding: bool = False
    ) -> Iterator[Any]:
        """``memprof.track`` around the block; the profile is recorded on exit."""
        import memprof

        with memprof.track(model, optimizer, cuda_rounding=cuda_rounding) as session:
            yield session
        self.profiles.append(session.profile())

    def analyze(self, spec: str, **kwargs: Any) -> Any:
        """``memprof.analyze`` (engine ``sim`` unless given); the profile is recorded and returned."""
        import memprof

        kwargs.setdefault("engine", "sim")
        profile = memprof.analyze(spec, **kwargs)
        self.profiles.append(profile)
        return profile

    @property
    def profile(self) -> Any:
        """The profile with the highest peak recorded so far."""
        if not self.profiles:
            raise AssertionError("memprof: no step recorded (use memprof.track(...) or memprof.analyze(...))")
        return max(self.profiles, key=lambda p: p.peak_bytes)

    def assert_peak_below(self, max_peak: str | int, profile: Any = None) -> None:
        """Fail unless the peak is at most ``max_peak`` (bytes, or ``"1.5GiB"``)."""
        from memprof.units import format_bytes, parse_size

        limit = max_peak if isinstance(max_peak, int) else parse_size(max_peak)
        p = profile or self.profile
        if p.peak_bytes > limit:
            raise AssertionError(
                f"memprof: peak {format_bytes(p.peak_bytes)} is above the budget of {format_bytes(limit)} "
                f"(+{format_bytes(p.peak_bytes - limit)}), in {p.peak_phase}\n" + breakdown(p)
            )

    def assert_within_baseline(
        self, path: str, name: str, tolerance: str = "1%", profile: Any = None
    ) -> None:
        """Fail when the peak grew beyond ``tolerance`` of workload ``name`` in a baseline file."""
        from memprof import gate
        from memprof.units import format_bytes

        b = gate.load_baseline(path)
        names = [w.name for w in b.workloads]
        if name not in names:
            raise AssertionError(f"memprof: no workload {name!r} in {path} (it has: {', '.join(names)})")
        before = b.profiles[names.index(name)]
        p = profile or self.profile
        allowed = gate.Tolerance.parse(tolerance).allowed(before.peak_bytes)
        grew = p.peak_bytes - before.peak_bytes
        if grew > allowed:
            cats, mods = gate.diff(before, p)
            lines = [f"  {c:<16} {format_bytes(a):>12} -> {format_bytes(b2):>12}" for c, a, b2 in cats]
            lines += [f"  module {m}: {format_bytes(a)} -> {format_bytes(b2)}" for m, a, b2 in mods]
            raise AssertionError(
                f"memprof: peak {format_bytes(before.peak_bytes)} -> {format_bytes(p.peak_bytes)} "
                f"(+{format_bytes(grew)}), beyond the {tolerance} of {name} in {path}\n" + "\n".join(lines)
            )


def breakdown(p: Any, top: int = 5) -> str:
    """The categories at the peak and the modules that held the most, as text."""
    from memprof.units import format_bytes

    lines = [f"  {c:<16} {format_bytes(v):>12}" for c, v in p.categories_at_peak.items() if v]
    mods = sorted((m for m in p.modules if m.name not in ("", "<model>")), key=lambda m: -m.bytes_at_peak)
    lines += [f"  module {m.name}: {format_bytes(m.bytes_at_peak)} at the peak" for m in mods[:top]]
    return "\n".join(lines)


@pytest.fixture
def memprof() -> MemprofFixture:
    """Record steps (``memprof.track(model, optimizer)`` or ``memprof.analyze(spec)``) and assert budgets."""
    return MemprofFixture()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    result = yield
    marker = item.get_closest_marker("memprof")
    if marker is None:
        return result
    fixture = getattr(item, "funcargs", {}).get("memprof")
    if not isinstance(fixture, MemprofFixture) or not fixture.profiles:
        raise AssertionError(
            "memprof marker: the test recorded no step (request the memprof fixture and use "
            "memprof.track(...) or memprof.analyze(...))"
        )
    kw = marker.kwargs
    if kw.get("max_peak") is not None:
        fixture.assert_peak_below(kw["max_peak"])
    if kw.get("baseline"):
        if not kw.get("name"):
            raise AssertionError("memprof marker: baseline= needs name= (the workload in the baseline file)")
        fixture.assert_within_baseline(kw["baseline"], kw["name"], kw.get("tolerance", "1%"))
    return result
