"""The command line: parse, call the library, render, return an exit code.

Every command lives in its own module; errors from the library are typed
(:mod:`memprof.errors`) and turned into one line on stderr and an exit code
here, in one place. Anything else that escapes a command is a bug: one line
too (exit 70), and the traceback in a file (:func:`crash_report`).

Ctrl-C (and, in the console script, SIGTERM) is one line,
``memprof: error: interrupted``, and exit 130: while a command runs and while
this module imports the commands (torch, transformers: seconds); under
``python -m memprof`` also while typer imports, before this module can catch it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path

import typer

from memprof.bounds import MAX_MESSAGE_CHARS, cut
from memprof.cli import common
from memprof.clihelp import new_app
from memprof.errors import ExitCode, InternalError, MemprofError, OutOfMemory

#: problems of a file listed under its summary line (the rest are counted)
MAX_PROBLEMS_SHOWN = 50
#: where crash reports go (default: a ``memprof`` folder in the system's temporary folder)
CRASH_DIR_VAR = "MEMPROF_CRASH_DIR"

app = new_app()


def _register() -> None:
    from memprof.cli import analyze, apply, compare, env, gate, gpus, plan, recipes

    app.command("analyze")(analyze.analyze)
    app.command("compare")(compare.compare)
    app.command("apply")(apply.apply)
    app.command("plan")(plan.plan)
    app.add_typer(recipes.app, name="recipes")
    app.command("baseline")(gate.baseline)
    app.command("check")(gate.check)
    app.command("env")(env.env)
    app.command("gpus")(gpus.gpus)


#: Ctrl-C came while the commands (and torch) were importing: main() reports it. The
#: console script imports this module before it calls main(), so main() cannot catch it.
_interrupted_at_import = False
try:
    _register()
except KeyboardInterrupt:
    _interrupted_at_import = True


def error_line(message: str, prefix: str = "error: ") -> None:
    """Print one error line on stderr (under torchrun, on rank 0 only: the ranks fail alike)."""
    if _other_rank():
        return
    # one line (libraries' messages, the Hub client's, can span several), of a sane length:
    # a message may quote the input, and the input may be huge
    message = cut(message, limit=MAX_MESSAGE_CHARS - len(prefix))
    sys.stderr.write(f"memprof: {prefix}{message}\n")
    sys.stderr.flush()


def _versions() -> str:
    """memprof's, torch's, transformers' and Python's versions, without importing the libraries."""
    from importlib import metadata

    from memprof._version import __version__

    out = [f"memprof {__version__}"]
    for dist in ("torch", "transformers"):
        mod = sys.modules.get(dist)
        try:
            v = getattr(mod, "__version__", None) or metadata.version(dist)
        except metadata.PackageNotFoundError:
            v = "not installed"
        out.append(f"{dist} {v}")
    out.append(f"python {platform.python_version()} ({platform.platform()})")
    return ", ".join(out)


def crash_report(e: BaseException, argv: Sequence[str]) -> Path:
    """Write a crash report: the command line, the versions and the traceback.

    The file is ``memprof-crash-<UTC timestamp>-<pid>.txt`` under ``$MEMPROF_CRASH_DIR``,
    else under a ``memprof`` folder in the system's temporary folder.

    Returns:
        the file's path.

    Raises:
        OSError: the file could not be written.
    """
    folder = Path(os.environ.get(CRASH_DIR_VAR) or Path(tempfile.gettempdir()) / "memprof")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = f"memprof-crash-{now:%Y%m%dT%H%M%SZ}-{os.getpid()}"
    text = "".join(
        [
            f"command: {shlex.join(['memprof', *argv])}\n",
            f"time: {now.isoformat(timespec='seconds')}\n",
            f"versions: {_versions()}\n\n",
            e.traceback_text() if isinstance(e, InternalError) else "".join(traceback.format_exception(e)),
        ]
    )
    for n in range(1, 100):  # two crashes of one process in one second: -2, -3...
        path = folder / (stem + (f"-{n}" if n > 1 else "") + ".txt")
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}/{stem}-*.txt: 99 files already")


def internal_error(e: BaseException, argv: Sequence[str]) -> int:
    """Report a bug: one line on stderr, the traceback in a file. Returns the exit code (70)."""
    err = e if isinstance(e, InternalError) else InternalError(e)
    try:
        where = f"traceback in {crash_report(e, argv)}"
    except Exception as w:  # a report that cannot be written must not hide the error itself
        where = f"the traceback could not be written ({type(w).__name__}: {w})"
    # the file's path ends the line: the cut falls on the message, never on it
    error_line(f"{cut(str(err), MAX_MESSAGE_CHARS - len(where) - 2)}; {where}", prefix="")
    return InternalError.exit_code


def _other_rank() -> bool:
    """True in a torchrun rank other than 0 (rank 0 gathers and reports every rank)."""
    from memprof.sharding import Launch

    launch = Launch.from_env()
    return launch is not None and launch.rank != 0


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a job scheduler, ``kill``, ``timeout``) ends a run as Ctrl-C does: cleaned up, exit 130."""
    raise KeyboardInterrupt


def interrupted() -> int:
    """Report an interrupt: one line. Returns the exit code (130)."""
    try:
        error_line("interrupted")
    except KeyboardInterrupt:  # a second Ctrl-C while reporting the first
        sys.stderr.write("memprof: error: interrupted\n")
    return ExitCode.INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memprof`` console script. Returns the exit code."""
    if argv is None and threading.current_thread() is threading.main_thread():
        # the console script's own process (a library caller keeps its own handlers)
        signal.signal(signal.SIGTERM, _terminate)
    if _interrupted_at_import:
        code: int = interrupted()
        if argv is None:
            sys.exit(code)
        return code
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        command = typer.main.get_command(app)
        if argv is None:
            # the console script's own process: the library, once a command loads it, and
            # what survives each run live until exit (see common.library_loaded)
            common.console_script = True
        rv = command.main(args=args, prog_name="memprof", standalone_mode=False)
    except InternalError as e:
        code = internal_error(e, args)
    except OutOfMemory as e:
        error_line(str(e))
        code = e.exit_code
    except MemprofError as e:
        problems = getattr(e, "problems", None)
        if problems and len(problems) > 1:
            # a recipe: the summary line, then every problem on its own line
            error_line(f"{getattr(e, 'source', 'recipe')}: {len(problems)} problems")
            shown = problems[:MAX_PROBLEMS_SHOWN] if not _other_rank() else []
            for p in shown:
                sys.stderr.write(f"  - {cut(p)}\n")
            if shown and len(problems) > len(shown):
                sys.stderr.write(f"  - ... and {len(problems) - len(shown)} more\n")
        else:
            error_line(str(e))
        code = e.exit_code
    except KeyboardInterrupt:
        code = interrupted()
    except Exception as e:
        # Typer vendors its own click in recent releases: match click's
        # exceptions by shape rather than by class.
        name = type(e).__name__
        if name == "Exit" and hasattr(e, "exit_code"):
            code = int(e.exit_code)
        elif name == "Abort":
            error_line("aborted")
            code = ExitCode.INTERRUPTED
        elif name == "NoArgsIsHelpError" and command is not None:
            command.main(args=[*args, "--help"], prog_name="memprof", standalone_mode=False)
            code = ExitCode.INPUT
        elif hasattr(e, "format_message") and hasattr(e, "exit_code"):
            error_line(e.format_message().replace("\n", " "))
            code = int(e.exit_code)
        else:
            code = internal_error(e, args)
    else:
        code = rv if isinstance(rv, int) else 0
        if code == ExitCode.INTERRUPTED:
            # typer turns a KeyboardInterrupt inside a command into a silent exit 130
            code = interrupted()
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
