#!/bin/bash
# Plan before and after, interleaved: the README's 24 GiB plan of Llama-3-8B timed with the
# code of two trees (each a checkout of memprof), from an empty folder, PYTHONPATH set to each.
# Usage: bash bench/plan_ab.sh BEFORE_TREE AFTER_TREE [REPEATS [PLAN OPTIONS...]]
# (a tree: e.g. `git worktree add /tmp/before REV`; PLAN OPTIONS are added to the command, e.g.
# --dtype bfloat16 --peft any). Prints wall seconds, runs, runs extended, plans.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="$repo/.venv/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
repeats="${3:-3}"
extra=("${@:4}")
for i in $(seq 1 "$repeats"); do
  for tree in "$1" "$2"; do
    out="$work/plan_${i}_$(basename "$tree").json"
    s=$(date +%s.%N)
    PYTHONPATH="$tree" "$python" -m memprof plan llama-3-8b --budget 24GiB -b 1 -s 2048 "${extra[@]}" --json "$out" >/dev/null 2>&1
    e=$(date +%s.%N)
    counts=$("$python" -c "import json,sys; d=json.load(open(sys.argv[1])); r=d['runs']; print(len(r), sum(1 for x in r if x.get('extended')), len(d['plans']))" "$out")
    echo "$tree repeat $i: $(echo "$e - $s" | bc) s; runs, extended, plans: $counts"
  done
done
