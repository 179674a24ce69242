"""Helpers shared by the commands: consoles, spinners, JSON output."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from rich.console import Console

from memprof.errors import InputError
from memprof.files import check_output_file, check_outputs_apart, is_stream, write_atomic, write_error

#: set by :func:`memprof.cli.main` in the console script's own process (not for a library caller)
console_script = False


def library_loaded() -> None:
    """After a command has imported the library (torch, transformers), before it runs a step.

    In the console script's own process what exists now, and what survives each run,
    lives until exit: keep it out of the garbage collector's way (see
    :data:`memprof.engines.base.freeze_survivors`). The commands import the library
    only once their arguments are checked, so that a bad argument is answered before
    torch loads; this runs from :func:`spinner`, which every such command enters then.
    """
    if not console_script:
        return
    from memprof.engines import base

    base.freeze_survivors = True
    gc.collect()
    gc.freeze()


def stdout_console() -> Console:
    """Console for the report (Rich honours NO_COLOR and non-terminals itself)."""
    return Console(highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def spinner(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr, updated with each progress message (the library is loaded: see :func:`library_loaded`)."""
    quiet_libraries()
    library_loaded()
    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield lambda msg: None
        return
    with console.status("Starting", spinner="dots") as status:
        yield lambda msg: status.update(msg)


def quiet_libraries() -> None:
    """Keep transformers' advisory warnings out of the report."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars would break the report
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # transformers imports torchao (when installed) as it loads any model; torchao
    # logs about native kernels built for other GPUs and pytree registrations, and
    # torch.ao warns that its quantized dtypes are deprecated: none of it concerns
    # the measurement.
    from memprof.surgery.quantization import NOISY_LOGGERS

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # a meta kernel that raises is logged with its whole traceback before the error reaches
    # the engine, which reports it in one line (and an internal error's crash file keeps it)
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")


def write_output(path: str, text: str) -> None:
    """``-`` writes to stdout, anything else atomically to a file (see :func:`memprof.files.write_atomic`).

    Raises:
        InputError, EnvironmentProblem: the file cannot be written (one line, not a traceback).
    """
    if path == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    try:
        write_atomic(Path(path).expanduser(), text)
    except OSError as e:
        raise write_error(path, e) from None


def check_output(path: str | Path | None, flag: str, *, force: bool = False) -> None:
    """Refuse an output path that cannot be written, before a long run rather than after it.

    ``-`` (stdout) passes; a folder, a path under a file or in a folder where no
    file can be created, and an existing file without ``force`` are refused.

    Raises:
        InputError: the path cannot be written, or exists and ``force`` is not given.
    """
    check_output_file(path, flag, force=force)


def check_outputs(
    force: bool,
    *,
    inputs: Mapping[str, str | Path | None] | None = None,
    folder: tuple[str, str | Path] | None = None,
    not_streams: Collection[str] = (),
    stdout: str | None = None,
    **paths: str | Path | None,
) -> None:
    """:func:`check_output` for several options at once: ``check_outputs(force, json=..., html=...)``.

    The keyword is the flag without its dashes (``write_recipe`` for ``--write-recipe``).
    Also refused, whatever ``force`` says: two options naming one file; more than one
    output to stdout (``-``), which would mix them; an output that would replace an
    input or lie inside the output folder (:func:`memprof.files.check_outputs_apart`).

    Args:
        inputs: what the command reads, in words, -> path (see :func:`model_input`).
        folder: the command's output folder (``apply --output``), checked on its own.
        not_streams: keywords whose file cannot go to stdout (``snapshot``: a pickle).
        stdout: what else of the command writes to stdout (``--format json``), if anything.
    """

    def opt(k: str) -> str:
        return f"--{k.replace('_', '-')}"

    given = [(opt(k), p) for k, p in paths.items() if p is not None and str(p) != "-"]
    streams = [k for k, p in paths.items() if p is not None and str(p) == "-"]
    for k in streams:
        check_output_file("-", opt(k), stream=k not in not_streams)
    users = [f"{opt(k)} -" for k in streams] + ([stdout] if stdout else [])
    if len(users) > 1:
        raise InputError(f"{', '.join(users)}: only one output can go to stdout; give the others a file name")
    for flag, p in given:
        check_output(p, flag, force=force)
    seen: dict[str, str] = {}
    for flag, p in given:
        if is_stream(Path(p).expanduser()):
            continue  # /dev/null twice is fine
        real = os.path.realpath(Path(p).expanduser())
        if real in seen:
            raise InputError(f"{seen[real]} and {flag} name the same file {p}; give each its own")
        seen[real] = flag
    outputs: dict[str, str | Path | None] = dict(given)
    if folder is not None:
        outputs[folder[0]] = folder[1]
    check_outputs_apart(outputs, inputs or {}, folders=[folder[0]] if folder else ())


def on_stdout(*paths: str | Path | None) -> bool:
    """One of the outputs is stdout (``-``): the terminal report then stays off it."""
    return any(p is not None and str(p) == "-" for p in paths)


def model_input(spec: str | Path | None, where: str = "MODEL") -> dict[str, Path]:
    """What a MODEL spec reads from disk, in words, for :func:`check_outputs`'s ``inputs``.

    A config file or a model folder, or a bundled config by its name; nothing for
    a Hub id or a ``module:factory``.
    """
    if spec is None or str(spec) == "":
        return {}
    p = Path(spec).expanduser()
    if not p.exists():
        from memprof.model_config import bundled_configs_dir

        p = bundled_configs_dir() / f"{spec}.json"
        if "/" in str(spec) or not p.is_file():
            return {}
    kind = "folder" if p.is_dir() else "config"
    return {f"the model {kind} ({where})": p}


def recipe_input(spec: str | None, where: str = "--recipe") -> dict[str, Path]:
    """The recipe file a ``--recipe`` reads (a shipped one by its name), for :func:`check_outputs`."""
    if not spec:
        return {}
    from memprof import recipes

    try:
        return {f"the recipe ({where})": recipes.resolve_path(spec)}
    except InputError:
        return {}  # refused as a recipe later, with its own message
