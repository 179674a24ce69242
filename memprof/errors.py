"""Typed errors. The CLI maps each class to one exit code, in one place (``memprof.cli``).

Exit codes (documented in the README):

====  =====================================================================
code  meaning (:class:`ExitCode`)
====  =====================================================================
0     success
1     not returned by memprof (Python's code for a crash before memprof's
      entry point runs, e.g. a broken install)
2     usage or input error: bad flag value, missing path, malformed config;
      an output path that cannot be written or (without ``--force``) exists;
      a size past a bound (:mod:`memprof.bounds`), a factory that raises;
      a model memprof knowingly does not support (:class:`NotSupported`)
3     environment error: no GPU for ``--engine cuda``, model not cached
      while offline, optional dependency missing
4     the measured step ran out of memory (the partial profile is reported)
5     memprof check: a memory regression beyond the tolerance
6     memprof plan: no combination of the searched optimizations fits the
      budget (the closest plans are reported)
70    internal error (EX_SOFTWARE): a bug in memprof or in a library it
      drives; one line on stderr, the traceback in a file (please report it)
130   interrupted (Ctrl-C; SIGTERM in the console script)
====  =====================================================================
"""

from __future__ import annotations

import traceback
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memprof.plan import PlanResult
    from memprof.profile import Profile


class ExitCode(IntEnum):
    """Every exit code memprof returns: the table above, the one place they are defined."""

    OK = 0
    INPUT = 2
    ENVIRONMENT = 3
    OUT_OF_MEMORY = 4
    REGRESSION = 5
    NO_PLAN_FITS = 6
    INTERNAL = 70
    INTERRUPTED = 130


class MemprofError(Exception):
    """Base class of every error memprof raises on purpose.

    Subclasses set their exit code; a bare one is a failure memprof did not
    classify, reported as an internal error's code.
    """

    exit_code: int = ExitCode.INTERNAL


class InputError(MemprofError):
    """The user's input is wrong: a path, a value, a config file."""

    exit_code = ExitCode.INPUT


class NotSupported(InputError):
    """A model (a family, or a step) memprof knowingly does not support.

    The message reads ``MODEL: not supported: WHY`` (``MODEL: not supported in
    ENGINE: WHY`` when only that engine cannot do it).

    Args:
        model: the model's name as the user gave it.
        why: what is not supported, and what to do instead where there is a way.
        engine: the engine that cannot do it (None: memprof as a whole).
    """

    def __init__(self, model: str, why: str, engine: str | None = None) -> None:
        self.model = model
        self.why = why
        self.engine = engine
        super().__init__(f"{model}: not supported{f' in {engine}' if engine else ''}: {why}")


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

    exit_code = ExitCode.ENVIRONMENT


class OutOfMemory(MemprofError):
    """The measured step ran out of memory. ``profile`` holds what was measured."""

    exit_code = ExitCode.OUT_OF_MEMORY

    def __init__(self, message: str, profile: Profile | None = None) -> None:
        super().__init__(message)
        self.profile = profile


class NoPlanFits(MemprofError):
    """``memprof plan``: no searched combination of optimizations fits the budget.

    ``result`` holds the search (a :class:`memprof.plan.PlanResult`): the closest
    plans and what dominates their memory.
    """

    exit_code = ExitCode.NO_PLAN_FITS

    def __init__(self, message: str, result: PlanResult | None = None) -> None:
        super().__init__(message)
        self.result: PlanResult | None = result


class InternalError(MemprofError):
    """An unexpected exception inside memprof: a bug (memprof's, or a library's it drives).

    The original exception is the ``__cause__`` (raise it ``from`` the
    original); ``model``, ``engine``, ``op`` and ``module`` say where it
    happened, as far as known. ``str()`` is one line: ``internal error while
    profiling MODEL in ENGINE: TYPE: MESSAGE (op aten.X in module Y)``.

    Args:
        cause: the original exception (None: ``message`` says what failed).
        message: what failed, when there is no exception object (a crashed child process).
        model: the model's name.
        engine: the engine's name.
        op: the aten op that raised it, as ``aten.name``.
        op_raised: False when the exception came after ``op`` returned (Python code
            between ops): the line then says ``after op``.
        module: the innermost module running (its qualified name in the model).
        detail: a traceback from elsewhere (a child process), kept for the crash file.
    """

    exit_code = ExitCode.INTERNAL

    def __init__(
        self,
        cause: BaseException | None = None,
        *,
        message: str | None = None,
        model: str | None = None,
        engine: str | None = None,
        op: str | None = None,
        op_raised: bool = True,
        module: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.cause = cause
        self.model = model
        self.engine = engine
        self.op = op
        self.op_raised = op_raised
        self.module = module
        self.detail = detail
        if cause is not None:
            text = str(cause).strip().splitlines()
            what = f"{type(cause).__name__}: {text[0][:300]}" if text else type(cause).__name__
        else:
            what = message or "unknown failure"
        #: the exception's type and first line (or ``message``)
        self.what = what
        where = ""
        if model:
            where = f" while profiling {model}" + (f" in {engine}" if engine else "")
        site = []
        if op:
            site.append(f"{'op' if op_raised else 'after op'} {op}")
        if module:
            site.append(f"in module {module}")
        super().__init__(f"internal error{where}: {what}" + (f" ({' '.join(site)})" if site else ""))

    def traceback_text(self) -> str:
        """The traceback to keep: the child's (``detail``), else this error's with its cause."""
        if self.detail:
            return self.detail
        return "".join(traceback.format_exception(self))
