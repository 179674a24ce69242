#!/usr/bin/env bash
# Create .venv (once) and install memprof with its dev extras.
# torch is pinned here, not in pyproject.toml: on a CPU-only machine
# `torch==2.13.0` resolves to the local CPU wheel, while an unpinned torch pulls
# several GB of CUDA packages. Override with MEMPROF_TORCH="torch==X" if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.memprof-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "${MEMPROF_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
