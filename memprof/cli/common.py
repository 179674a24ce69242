"""Helpers shared by the commands: consoles, spinners, JSON output."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from memprof.errors import InputError
from memprof.profile import write_atomic


def stdout_console() -> Console:
    """Console for the report (Rich honours NO_COLOR and non-terminals itself)."""
    return Console(highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def spinner(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr, updated with each progress message."""
    quiet_libraries()
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
    warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")


def write_output(path: str, text: str) -> None:
    """``-`` writes to stdout, anything else atomically to a file."""
    if path == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    else:
        write_atomic(Path(path), text)


def check_output(path: str | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before a long run rather than after it.

    Raises:
        InputError: the path is a directory.
    """
    if path and path != "-" and os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; give a file name")
