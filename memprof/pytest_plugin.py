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

The marker takes keyword arguments only (``max_peak``, ``baseline``, ``name``,
``tolerance``) and is checked before the test runs: a positional argument, an
unknown or misspelled one, a budget that is not a positive whole number of
bytes (or a size such as ``"1.5GiB"``), a negative or non-finite tolerance, or
a baseline file that cannot be read is a setup error of the test, with one line
saying what is wrong.

Loading the plugin imports only pytest (``import memprof`` is lazy): torch,
transformers and memprof's library load when a test records a step with the
fixture, so a suite that never uses memprof pays nothing for it.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

import pytest

MARKER = (
    "memprof(max_peak=None, baseline=None, name=None, tolerance='1%'): fail the test when the "
    "steps recorded with the memprof fixture peak above max_peak, or grow beyond the tolerance of the "
    "named workload of a baseline file"
)


#: the marker's arguments (keywords only)
MARKER_ARGS = ("max_peak", "baseline", "name", "tolerance")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def budget_bytes(max_peak: Any, what: str = "max_peak") -> int:
    """A budget as bytes: a positive int, or a size string (``"1.5GiB"``).

    Raises:
        InputError: anything else (a float, zero, a negative number, not a size).
    """
    from memprof.errors import InputError
    from memprof.units import parse_size

    hint = "give a positive whole number of bytes or a size such as '1.5GiB'"
    if isinstance(max_peak, str):
        try:
            n = parse_size(max_peak)
        except InputError as e:
            raise InputError(f"{what}={max_peak!r}: {e}; {hint}") from None
    elif type(max_peak) is int:  # not a bool, not a float: bytes are whole
        n = max_peak
    else:
        raise InputError(f"{what}={max_peak!r}: {hint}")
    if n <= 0:
        raise InputError(f"{what}={max_peak!r}: the budget must be above 0 bytes; {hint}")
    return n


def _tolerance(tolerance: Any, what: str = "tolerance") -> Any:
    """The gate's Tolerance of a marker's or a call's ``tolerance`` (``"1%"``, ``"50MiB"``)."""
    from memprof import gate

    return gate.Tolerance.parse(tolerance, what=f"{what}=")


def marker_problem(marker: pytest.Mark) -> str | None:
    """What is wrong with a ``memprof`` marker, as one line (None: nothing).

    Checks everything that can be checked before the test runs, the baseline
    file and its workload included.
    """
    from memprof.errors import MemprofError

    known = ", ".join(f"{k}=" for k in MARKER_ARGS)
    if marker.args:
        given = ", ".join(repr(a) for a in marker.args)
        return (
            f"memprof marker: takes keyword arguments only ({known}), got the positional {given}; "
            f"write e.g. @pytest.mark.memprof(max_peak={marker.args[0]!r})"
        )
    kw = marker.kwargs
    for k in kw:
        if k not in MARKER_ARGS:
            close = difflib.get_close_matches(k, MARKER_ARGS, n=1)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            return f"memprof marker: unknown argument {k}={hint}; it takes {known}"
    if kw.get("max_peak") is None and kw.get("baseline") is None:
        return "memprof marker: nothing to enforce; give max_peak= and/or baseline= with name="
    for k in ("name", "tolerance"):
        if k in kw and kw.get("baseline") is None:
            return f"memprof marker: {k}= applies to baseline= only, which is not given"
    try:
        if kw.get("max_peak") is not None:
            budget_bytes(kw["max_peak"])
        if kw.get("baseline") is not None:
            if not isinstance(kw.get("name"), str) or not kw["name"]:
                return (
                    f"memprof marker: baseline= needs name= (the workload in the baseline file), "
                    f"got {kw.get('name')!r}"
                )
            _tolerance(kw.get("tolerance", "1%"))
            from memprof import gate

            b = gate.load_baseline(kw["baseline"])
            names = [w.name for w in b.workloads]
            if kw["name"] not in names:
                return (
                    f"memprof marker: no workload {kw['name']!r} in {kw['baseline']} "
                    f"(it has: {', '.join(names)})"
                )
    except MemprofError as e:
        return f"memprof marker: {e}"
    return None


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
        """Fail unless the peak is at most ``max_peak`` (bytes, or ``"1.5GiB"``).

        Raises:
            AssertionError: the peak is above the budget.
            InputError: ``max_peak`` is not a positive whole number of bytes or a size.
        """
        from memprof.units import format_bytes

        limit = budget_bytes(max_peak)
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

        tol = _tolerance(tolerance)
        b = gate.load_baseline(path)
        names = [w.name for w in b.workloads]
        if name not in names:
            raise AssertionError(f"memprof: no workload {name!r} in {path} (it has: {', '.join(names)})")
        before = b.profiles[names.index(name)]
        p = profile or self.profile
        allowed = tol.allowed(before.peak_bytes)
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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # before the test's fixtures and body: a marker that would enforce nothing
    # (or something else than written) must not let the test pass
    for marker in item.iter_markers("memprof"):
        problem = marker_problem(marker)
        if problem:
            pytest.fail(problem, pytrace=False)


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
    if kw.get("baseline") is not None:
        fixture.assert_within_baseline(kw["baseline"], kw["name"], kw.get("tolerance", "1%"))
    return result
