"""Typed errors. The CLI maps each class to one exit code, in one place (``memprof.cli``).

Exit codes (documented in the README):

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     internal error (a bug in memprof: please report it)
2     usage or input error: bad flag value, missing path, malformed config
3     environment error: no GPU for ``--engine cuda``, model not cached
      while offline, optional dependency missing
4     the measured step ran out of memory (the partial profile is reported)
5     memprof check: a memory regression beyond the tolerance
6     memprof plan: no combination of the searched optimizations fits the
      budget (the closest plans are reported)
====  =====================================================================
"""

from __future__ import annotations


class MemprofError(Exception):
    """Base class of every error memprof raises on purpose."""

    exit_code = 1


class InputError(MemprofError):
    """The user's input is wrong: a path, a value, a config file."""

    exit_code = 2


class ProblemsError(InputError):
    """An input file (a recipe, a workloads or baseline file) with problems; ``problems`` lists every one.

    The command line prints a summary line and then one line per problem.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}: " + "; ".join(problems))


class EnvironmentProblem(MemprofError):
    """The machine cannot do what was asked: no GPU, no network, no package."""

    exit_code = 3


class OutOfMemory(MemprofError):
    """The measured step ran out of memory. ``profile`` holds what was measured."""

    exit_code = 4

    def __init__(self, message: str, profile: object | None = None) -> None:
        super().__init__(message)
        self.profile = profile


class NoPlanFits(MemprofError):
    """``memprof plan``: no searched combination of optimizations fits the budget.

    ``result`` holds the search (a :class:`memprof.plan.PlanResult`): the closest
    plans and what dominates their memory.
    """

    exit_code = 6

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


EXIT_CODES = {
    "ok": 0,
    "internal": 1,
    "input": InputError.exit_code,
    "environment": EnvironmentProblem.exit_code,
    "out_of_memory": OutOfMemory.exit_code,
    "no_plan_fits": NoPlanFits.exit_code,
}
