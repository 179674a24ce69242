"""Plan speed: ``memprof plan`` of a Llama-3-8B-shape full fine-tune into a GPU budget, in the sim engine.

For each budget, :func:`memprof.plan.plan` searches the optimizations that keep the
model's function (the levers: optimizer, checkpointing, chunked loss, activation
offload, optimizer step in backward, allocator setting; precision too for a float32
step) and the search is timed end to end (model resolution, the fake build, every sim
run), in this process with the garbage collector set as the console script sets it; the
CPU time includes the forked workers that run sim runs side by side. The section gives the wall time, the number of sim runs against the number of
combinations, how many were pruned without a run and why, the plan found (or the
closest that do not fit) with its peak, reserved memory and FLOP overhead, and each
run of the search.

Usage::

    .venv/bin/python bench/plan_speed.py [--budgets 24GiB,32GiB] [--dtype bfloat16] [--write]

It prints the section; ``--write`` also puts it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def cpu_seconds() -> float:
    """CPU time of this process and of its children reaped so far (plan's forked sim workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="MODEL spec (default: the bundled llama-3-8b)")
    ap.add_argument("--budgets", default="24GiB,32GiB,40GiB,80GiB", help="comma-separated budgets per GPU")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--world-sizes", default="1,8", help="comma-separated world sizes (ranks sharing the model)"
    )
    ap.add_argument("--plans", type=int, default=3, help="plans to establish (memprof plan --plans)")
    ap.add_argument("--write", action="store_true", help="also write the section into docs/benchmarks.md")
    args = ap.parse_args()

    C.quiet()
    from memprof.cli.common import quiet_libraries
    from memprof.errors import NoPlanFits
    from memprof.units import format_bytes, parse_size
    from memprof.workload import Workload

    quiet_libraries()
    P = importlib.import_module("memprof.plan")  # the module (memprof.plan is also the function)
    # as the console script does once the library is loaded (memprof.cli.common.library_loaded):
    # what exists now and what survives each run is frozen, out of later collections' way
    import gc

    from memprof.engines import base

    base.freeze_survivors = True
    gc.collect()
    gc.freeze()
    rows = []
    details = []
    cases = [(int(ws), text) for ws in args.world_sizes.split(",") for text in args.budgets.split(",")]
    for ws, text in cases:
        wl = Workload(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, world_size=ws)
        budget = parse_size(text)
        C.log(f"plan {args.model} --budget {text} --world-size {ws}")
        w0, c0 = time.perf_counter(), cpu_seconds()
        try:
            result = P.plan(
                args.model, wl, budget, world_size=ws, max_plans=args.plans, progress=lambda m: None
            )
            code = 0
        except NoPlanFits as e:
            result, code = e.result, 6
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        n = result.counts
        without = n["combinations"] - n["measured"]
        best = result.chosen or (result.frontier[0] if result.frontier else None)
        what = (
            ("**" + (best.label if best.steps else "as it is") + "**")
            if result.chosen
            else f"no plan fits (exit 6); closest: {best.label if best else 'n/a'}"
        )
        rows.append(
            [
                text,
                str(ws),
                f"{wall:.0f}",
                f"{cpu:.0f}",
                str(n["runs"]),
                f"{n['combinations']} ({n['product_of_levels']})",
                str(without),
                what,
                format_bytes(best.peak_bytes) if best else "n/a",
                format_bytes(best.reserved_bytes) if best else "n/a",
                format_bytes(best.need_bytes) if best else "n/a",
                f"{best.flop_overhead:+.0%}" if best and best.flop_overhead is not None else "n/a",
            ]
        )
        cmd = (
            f"memprof plan {args.model} --budget {text} -b {args.batch_size} -s {args.seq_len} --dtype {args.dtype}"
            + (f" --world-size {ws}" if ws > 1 else "")
            + (f" --plans {args.plans}" if args.plans != 3 else "")
        )
        pruned = ", ".join(
            f"{n[k]} {k.removeprefix('pruned_').replace('_', ' ')}"
            for k in (
                "pruned_nothing_fits",
                "pruned_misfit",
                "pruned_plan",
                "pruned_state",
                "pruned_estimate",
                "pruned_overhead",
                "not_needed",
                "not_measurable",
                "not_reached",
            )
            if n.get(k)
        )
        run_rows = [
            [
                str(r.index),
                r.purpose.split(" (")[0],
                " + ".join(s["name"] + _opts(s["options"]) for s in r.steps) or "as it is",
                f"{r.seconds:.1f}",
                format_bytes(r.profile.peak_bytes) if r.profile else "failed",
                format_bytes(r.reserved) if r.profile else "",
                format_bytes(r.reserved_expandable) if r.reserved_expandable else "",
            ]
            for r in result.runs
        ]
        plans = "\n".join(
            f"{i}. {c.label if c.steps else 'as it is'}: peak {format_bytes(c.peak_bytes)}, reserved "
            f"{format_bytes(c.reserved_bytes)}, needs {format_bytes(c.need_bytes)}, FLOPs "
            f"{c.flop_overhead:+.0%}, side cost {c.side_cost:.2f} (run {c.run})"
            for i, c in enumerate(result.plans, 1)
        ) or "none: " + "; ".join(result.dominant)
        details.append(
            f"#### `{cmd}` (exit {code})\n\n"
            f"- {n['runs']} sim runs, {wall:.0f} s wall ({cpu:.0f} s CPU); {n['combinations']} combinations of "
            f"{len(result.levers)} levers; without a run: {pruned}.\n"
            f"- Budget: {format_bytes(budget)} - CUDA context {format_bytes(result.budget.context_bytes)} (assumed) "
            f"- cuBLAS workspace {format_bytes(result.budget.cublas_workspace_bytes)} = usable "
            f"{format_bytes(result.budget.usable_bytes)} for reserved memory.\n"
            + "".join(f"- {note}\n" for note in result.notes)
            + f"\nPlans that fit, cheapest first:\n\n{plans}\n\nRuns:\n\n"
            + C.md_table(
                ["run", "why", "steps", "s", "peak", "reserved", "reserved (expandable)"],
                run_rows,
                "llllrrr",
            )
        )

    table = C.md_table(
        [
            "budget per GPU",
            "ranks",
            "wall s",
            "CPU s",
            "sim runs",
            "combinations (product of levels)",
            "without a run",
            "plan found",
            "peak",
            "reserved",
            "needs",
            "FLOPs",
        ],
        rows,
        "lrrrrrrlrrrr",
    )
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Workload: `{args.model}`, training step, {args.dtype}, AdamW, batch {args.batch_size}, "
                    f"seq {args.seq_len}, sim engine (fake tensors projected to an sm 9.x GPU); CUDA context "
                    "assumed 512 MiB.",
                ]
            ),
            "",
            table,
            "",
            "needs = reserved (the caching-allocator model's estimate) + CUDA context + cuBLAS workspace; "
            "a plan fits when it needs at most the budget.",
            "",
            "\n\n".join(details),
        ]
    )
    text = C.section(
        "plan_speed", "6. Plan speed: memprof plan of a Llama-3-8B fine-tune into a GPU budget", body
    )
    print(text)
    if args.write:
        C.write_section("plan_speed", text)
        C.log(f"wrote section plan_speed to {C.DOC}")
    return 0


def _opts(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k in ("type", "every", "steps", "pure", "size")}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


if __name__ == "__main__":
    sys.exit(main())
