"""The console script's entry (``memprof``) and ``python -m memprof``.

:func:`run` imports the CLI (typer, rich, then torch when a command needs it) inside a
guard, so that a Ctrl-C at any moment of start-up, before ``memprof.cli`` can catch
it, is one line and exit 130.
"""

import sys


def run() -> None:
    """Import and run the CLI; an interrupt during the imports is one line, exit 130.

    ``memprof`` and ``memprof --help`` print the top-level page from stubs
    (:mod:`memprof.clihelp`), without importing the commands and torch.
    """
    from memprof import gcpause

    gcpause.pause()  # until the first step runs (see memprof.gcpause)
    try:
        from memprof.clihelp import help_app, is_top_level_help

        if is_top_level_help(sys.argv[1:]):
            help_app()(prog_name="memprof")
            return
        from memprof.cli import main
    except KeyboardInterrupt:  # before memprof.cli could catch it (typer, the package face)
        sys.stderr.write("memprof: error: interrupted\n")
        sys.exit(130)
    try:
        sys.exit(main())
    finally:
        gcpause.resume()


if __name__ == "__main__":
    run()
