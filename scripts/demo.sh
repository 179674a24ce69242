#!/usr/bin/env bash
# The README's first command: set up, then profile a bundled model on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/memprof analyze "${@:-gpt2}" ${MEMPROF_DEMO_ARGS:---batch-size 4 --seq-len 256 --top 10}
