#!/usr/bin/env bash
# The README's second command: set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one pytest-xdist worker per core this process may use (nproc: xdist's "auto" counts physical
# cores, one on a 2-vCPU runner); an idle worker takes tests queued for the other (worksteal).
# MEMPROF_TEST_WORKERS=0 runs the suite in this process (pytest's own output, pdb)
exec .venv/bin/python -m pytest -q -n "${MEMPROF_TEST_WORKERS:-$(nproc)}" --dist worksteal "$@"
