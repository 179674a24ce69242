"""Robustness sweep: every family of ``tests/families.py`` through the commands, in sim.

No input may end in an internal error (exit 70). This runs each tiny family through
every shipped recipe (``analyze --recipe``), then ``plan`` (alone, with ``--peft
any``, over 4 ranks), ``compare`` of a recipe, a decode, an FSDP step and fp16
autocast, in one process (``memprof.cli.main``), and lists every run that exited 70
(or raised), with its one line; the crash files go to ``--crashes``. A one-line
refusal (exit 2) or no plan (exit 6) is an answer, not a finding.

It found the exit-70 cases fixed on 2026-12-04 (QLoRA of T5 and Jamba, LoRA of Mamba,
pruning of shared experts, Qwen2-VL's micro-batches, decoding encoder-decoders and
encoders, FSDP2 and CLIP's scalar, ``plan --peft any``). About 20 minutes on 2 cores.

Usage::

    .venv/bin/python bench/sweep.py [--only FAMILY ...] [--tsv PATH] [--crashes DIR]

Exit status: 0 when no run exited 70, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as C

RECIPES = sorted((C.REPO / "configs" / "recipes").glob("*.yaml"))
SHAPE = ["-b", "2", "-s", "16"]
#: a budget that holds the cuBLAS workspaces and a tiny step, with no CUDA context
PLAN = ["--context-overhead", "0", *SHAPE, "--max-runs", "6"]


def runs(path: str) -> list[list[str]]:
    """The command lines one family goes through."""
    out = [
        [
            "analyze",
            path,
            "-e",
            "sim",
            *SHAPE,
            "--recipe",
            str(r),
            "--mode",
            "infer" if "inference" in r.name else "train",
        ]
        for r in RECIPES
    ]
    out += [
        ["plan", path, "--budget", "66MiB", *PLAN],
        ["plan", path, "--budget", "66MiB", *PLAN, "--peft", "any"],
        ["plan", path, "--budget", "65MiB", *PLAN, "--world-size", "4"],
        ["compare", path, "-e", "sim", *SHAPE, "--recipe", str(C.REPO / "configs/recipes/low-memory-finetune.yaml")],
        ["analyze", path, "-e", "sim", *SHAPE, "--mode", "infer", "--decode-tokens", "2"],
        ["analyze", path, "-e", "sim", *SHAPE, "--world-size", "2", "--shard", "fsdp"],
        ["analyze", path, "-e", "sim", *SHAPE, "--step", "mixed_precision:dtype=float16"],
    ]  # fmt: skip
    return out


def run(args: list[str]) -> tuple[int | str, str]:
    """The exit code (or what was raised) and the last stderr line of one command."""
    from memprof.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else str(e.code)
        except BaseException as e:  # a finding, reported
            code = f"raised {type(e).__name__}: {e}"
    lines = err.getvalue().strip().splitlines()
    return code, lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="these families only")
    ap.add_argument("--tsv", type=Path, help="also write every run (family, command, exit, seconds, line)")
    ap.add_argument("--crashes", type=Path, help="the crash files' folder (default: a temporary one)")
    args = ap.parse_args()
    from tests import families

    fams = families.available()
    names = args.only or list(fams)
    unknown = sorted(set(names) - set(fams))
    if unknown:
        ap.error(f"unknown families: {', '.join(unknown)} (known: {', '.join(fams)})")
    work = Path(tempfile.mkdtemp(prefix="memprof-sweep-"))
    os.environ["MEMPROF_CRASH_DIR"] = str(args.crashes or work / "crashes")
    rows, found = [], []
    t0 = time.perf_counter()
    for name in names:
        path = work / f"{name}.json"
        path.write_text(json.dumps(fams[name]))
        for argv in runs(str(path)):
            t = time.perf_counter()
            code, line = run(argv)
            shown = " ".join(a if a != str(path) else name for a in argv).replace(str(C.REPO) + "/", "")
            rows.append(f"{name}\t{shown}\t{code}\t{time.perf_counter() - t:.1f}\t{line}")
            if code not in (0, 2, 6):
                found.append(f"- `memprof {shown}`: exit {code}: {line[:300]}")
        print(f"{name}: {len(runs(str(path)))} runs", file=sys.__stderr__)
    if args.tsv:
        args.tsv.write_text("\n".join(rows) + "\n")
    print(
        f"{len(rows)} runs of {len(names)} families in {time.perf_counter() - t0:.0f} s; {len(found)} findings"
    )
    print("\n".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
