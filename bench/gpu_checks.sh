#!/usr/bin/env bash
# The GPU checks of docs/validation.md in one bounded run, for a machine with a CUDA GPU:
#   1. the machine: nvidia-smi, Python, torch, CUDA, transformers;
#   2. the tests marked gpu (pytest -m gpu) in the files that hold them (found by their gpu_test mark);
#   3. bench/validate.py: the zoo on the cuda engine against the sim as shipped
#      (it rewrites docs/validation.md's section; the file is copied to $OUT);
#   4. analyze on the cuda engine beside the sim with the GPU's --gpu preset, one
#      process each, alone on the GPU: the measured CUDA context against the preset's
#      estimate, the cuBLAS workspaces, an inference step's allocator snapshot;
#   5. (GPU_SNAPSHOTS=1, the default) the allocator's peak of the workloads whose memory
#      beyond tensors the sim does not name yet, by the op that allocated it.
# Everything goes to $OUT (default /tmp/memprof-gpu), and into $OUT/gpu-checks.tgz. Each step has its own time limit, so a
# slow or failing step leaves the others' results.
#
#   bash bench/gpu_checks.sh                 # from the repository root
#   PYTHON=python3 GPU_PRESET=h200 GPU_MODEL=llama-3.2-1b GPU_SHAPE="-b 4 -s 2048" bash bench/gpu_checks.sh
#
# Wheels in .whl/ (e.g. the transformers release the suite is tested on) are installed
# into /tmp/site first and put ahead of the machine's own packages.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/memprof-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >"$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="/tmp/site"
  else
    echo "wheels: not installed (see wheels.log); the machine's own packages run" >>"$OUT/summary.txt"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=160
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, record rc and time
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc $rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/summary.txt"
}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$PY" - <<'EOF'
import sys, torch, transformers
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
print("transformers", transformers.__version__)
EOF
} >"$OUT/env.txt" 2>&1
# the files that hold GPU tests (collecting all of tests/ needs every dev extra installed)
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'gpu_test(' tests | sort)
step pytest_gpu "${PYTEST_LIMIT:-120}" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
step validate "${VALIDATE_LIMIT:-240}" "$PY" bench/validate.py --engine cuda --json "$OUT/validate.json"
GPU_PRESET="${GPU_PRESET:-h200}"
MODEL="${GPU_MODEL:-llama-3.2-1b}"
# a training step (two cuBLAS workspaces: the forward's thread and autograd's) and an
# inference step (one), each in a fresh process; the inference step's allocator snapshot
read -ra SHAPE <<<"${GPU_SHAPE:--b 4 -s 2048}"
T=(analyze "$MODEL" "${SHAPE[@]}" --dtype bfloat16)
I=(analyze "$MODEL" "${SHAPE[@]}" --dtype float32 --mode infer)
for e in cuda sim; do
  g=(); [ $e = sim ] && g=(--gpu "$GPU_PRESET")
  step "train_$e" "${ANALYZE_LIMIT:-60}" "$PY" -m memprof "${T[@]}" --engine $e "${g[@]}" --json "$OUT/train_$e.json"
  step "infer_$e" "${ANALYZE_LIMIT:-60}" "$PY" -m memprof "${I[@]}" --engine $e "${g[@]}" --json "$OUT/infer_$e.json" \
    --snapshot "$OUT/infer_$e.pickle"
done
# what the sim does not name yet (docs/validation.md, "Not validated yet"): the allocator's
# peak of two autocast training steps, by the op that allocated it (bench/snapshot_peak.py)
if [ "${GPU_SNAPSHOTS:-1}" = 1 ]; then
  for w in "qwen2.5-0.5b -b 4 -s 1024" "vit-base -b 64"; do
    read -ra W <<<"$w"
    n="peak_${W[0]%%[.-]*}"
    step "$n" "${ANALYZE_LIMIT:-60}" "$PY" -m memprof analyze "${W[@]}" --step mixed_precision --engine cuda \
      --top 0 --json "$OUT/$n.json" --snapshot "$OUT/$n.pickle"
    [ -f "$OUT/$n.pickle" ] && "$PY" bench/snapshot_peak.py "$OUT/$n.pickle" --top 20 >"$OUT/$n.txt" 2>&1
  done
fi
cp docs/validation.md "$OUT/validation.md"
# one archive: the device tool brings back at most 8 files
(cd "$OUT" && tar czf /tmp/gpu-checks.tgz --exclude=gpu-checks.tgz . && mv /tmp/gpu-checks.tgz .)
cat "$OUT/summary.txt"
