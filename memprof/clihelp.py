"""``memprof --help`` without importing the commands (and torch with them): the same page, from stubs.

The top-level page lists each command with its one-line help. Building it from the
real commands imports every command module, which imports torch (two seconds here);
the stubs below carry the same names and lines, so the page is the same (a test
compares the two) and answers in a fraction of that. Any other argument line goes to
the real CLI (:mod:`memprof.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

import typer

#: the application's help line (the real app in :mod:`memprof.cli` uses it too)
APP_HELP = "GPU-memory profiler and optimizer for PyTorch and Hugging Face models."
#: the commands in the order ``memprof --help`` lists them, each with its one-line help
#: (the first line of the command's docstring; a test keeps the two the same)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("analyze", "Measure the peak memory of one training or inference step."),
    (
        "compare",
        "Profile the baseline, then each optimization of a recipe stacked: memory, FLOPs, time, quality.",
    ),
    ("apply", "Write an optimized checkpoint (safetensors, config.json, tokenizer, memprof.json, README)."),
    ("plan", "Find the least costly optimizations that make a step fit a GPU memory budget (sim engine)."),
    ("baseline", "Profile workloads and record their memory as a baseline for `memprof check`."),
    ("check", "Profile the baseline's workloads again; exit 5 when a peak grew beyond the tolerance."),
    ("env", "Print torch, CUDA and driver versions, the GPUs and the engines available here."),
    (
        "gpus",
        "List the GPU presets of --gpu: compute capability, memory, CUDA context estimate, bandwidth, host link.",
    ),
)
#: command groups (sub-apps) after the commands, each with its help line
GROUPS: tuple[tuple[str, str], ...] = (
    ("recipes", "List the optimizations and the shipped recipes; validate a recipe."),
)


def new_app() -> typer.Typer:
    """The application object with memprof's settings, no commands yet."""
    return typer.Typer(
        name="memprof",
        help=APP_HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )


def is_top_level_help(argv: Sequence[str]) -> bool:
    """The argument line asks for the top-level page only (``memprof``, ``memprof --help``)."""
    return list(argv) in ([], ["--help"])


def help_app() -> typer.Typer:
    """An app whose commands are stubs with the real ones' names and help lines."""
    app = new_app()
    for name, line in COMMANDS:

        def stub() -> None:
            pass

        stub.__doc__ = line
        app.command(name)(stub)
    for name, line in GROUPS:
        app.add_typer(typer.Typer(help=line), name=name)
    return app
