"""``python -m memprof``: the console script's ``main``; Ctrl-C while it imports is one line, exit 130."""

import sys

try:
    from memprof.cli import main
except KeyboardInterrupt:  # before memprof.cli could catch it (typer, the package face)
    sys.stderr.write("memprof: error: interrupted\n")
    sys.exit(130)

main()
