"""Tracking overhead on the cpu engine: a real GPT-2-small training step.

The model (bundled ``gpt2`` config, GPT-2 small, random weights) is built once
in float32 with AdamW (torch's CPU default implementation, as the cpu engine
uses); one plain and one tracked untimed warm-up step run first. Then the
steady-state training step is timed with and without
``Tracker(model, optimizer, block_rounding=1, track_modules=True)`` (phases,
inputs marked and ``result()`` taken, as the cpu engine does), alternating
(the order swaps every repeat).

Target: tracked / untracked <= 1.10, judged on the median of the per-repeat
ratios (each repeat times both variants back to back).

Usage::

    .venv/bin/python bench/cpu_overhead.py [--repeats 11] [--batch-size 1] [--seq-len 128] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    C.quiet()
    import torch

    from memprof.engines.runner import make_optimizer, run_step
    from memprof.models import build_model, parameter_count, resolve
    from memprof.tracking import Tracker
    from memprof.workload import Workload

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wl = Workload(
        mode="train", batch_size=args.batch_size, seq_len=args.seq_len, dtype="float32", optimizer="adamw"
    )
    t_start = time.perf_counter()
    rm = resolve(args.model)
    C.log(f"building {args.model}")
    model, builder = build_model(rm, dtype="float32", attn=wl.attn, load_weights=False, init_weights=True)
    builder.validate(wl.batch_size, wl.seq_len)
    model.train(True)
    n_params = parameter_count(model)
    inputs = builder.build(wl.batch_size, wl.seq_len, torch.device("cpu"), with_labels=True)
    input_tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    optimizer = make_optimizer("adamw", model, foreach=None)

    def untracked() -> None:
        run_step(model, inputs, wl, optimizer)

    def tracked() -> int:
        t = Tracker(model, optimizer, block_rounding=1, track_modules=True)
        with t:
            t.mark_inputs(input_tensors)
            run_step(model, inputs, wl, optimizer, tracker=t)
        return t.result().peak_bytes

    C.log("warm-up: one plain and one tracked step (untimed)")
    untracked()
    tracked()
    ta, tb = C.Timing("untracked"), C.Timing("Tracker")
    outs = C.interleave([(ta, untracked), (tb, tracked)], args.repeats, C.log)
    peaks = set(outs[1])

    ratio = tb.wall_median / ta.wall_median
    cratio = tb.cpu_median / ta.cpu_median
    pw, pc = C.pair_ratios(tb, ta)
    # Judged on the paired ratios: both variants of a repeat run back to back, so they
    # share the machine's state; the ratio of medians mixes repeats taken minutes apart.
    ok = pw <= 1.10
    table = C.md_table(
        [
            "variant",
            "wall s (median)",
            "wall s (min - max)",
            "cpu s (median)",
            "vs untracked (wall)",
            "vs untracked (cpu)",
        ],
        [
            [
                "untracked step",
                f"{ta.wall_median:.3f}",
                ta.spread(),
                f"{ta.cpu_median:.3f}",
                "1.000x",
                "1.000x",
            ],
            [
                "Tracker (rounding 1, modules, phases)",
                f"{tb.wall_median:.3f}",
                tb.spread(),
                f"{tb.cpu_median:.3f}",
                f"{ratio:.3f}x",
                f"{cratio:.3f}x",
            ],
        ],
        "lrrrrr",
    )
    per_rep = C.md_table(
        ["repeat", "order", "untracked wall s", "Tracker wall s", "ratio"],
        [
            [
                r + 1,
                "untracked first" if r % 2 == 0 else "Tracker first",
                f"{a:.3f}",
                f"{b:.3f}",
                f"{b / a:.3f}x",
            ]
            for r, (a, b) in enumerate(zip(ta.wall, tb.wall))
        ],
        "lrrrr",
    )
    lines = [
        f"- Tracked / untracked: **{pw:.3f}x** wall, {pc:.3f}x cpu (median of the per-repeat ratios; "
        f"ratio of the median times {ratio:.3f}x wall, {cratio:.3f}x cpu). Target <= 1.10x: **{'met' if ok else 'NOT met'}**.",
        f"- Absolute overhead: {tb.wall_median - ta.wall_median:+.3f} s wall, {tb.cpu_median - ta.cpu_median:+.3f} s cpu "
        "per step (difference of the medians).",
        f"- Tracker's peak: {C.fmt_bytes(max(peaks))}"
        + ("" if len(peaks) == 1 else f" (differed between repeats: {sorted(peaks)})"),
        f"- Whole script: {time.perf_counter() - t_start:.0f} s.",
    ]
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Workload: `{args.model}` ({n_params / 1e6:.1f} M parameters), real training step on the CPU, "
                    f"float32, AdamW (torch's CPU default, foreach off), batch {args.batch_size}, seq {args.seq_len}, "
                    f"attn sdpa; {args.repeats} repeats per variant, alternating, after two untimed warm-up steps.",
                ]
            ),
            "",
            table,
            "",
            "Per repeat:",
            "",
            per_rep,
            "",
            *lines,
        ]
    )
    # The default run (torch's thread count) owns the section "cpu_overhead"; a run with
    # --threads N writes its own supplementary section beside it.
    name = "cpu_overhead" if not args.threads else f"cpu_overhead_threads{args.threads}"
    title = "2. Tracking overhead on the cpu engine: GPT-2 small"
    if args.threads:
        title += f" ({args.threads} intra-op thread{'s' if args.threads > 1 else ''}, supplementary)"
    if (args.batch_size, args.seq_len) != (1, 128):
        # other shapes are supplementary sections beside the default one
        name += f"_b{args.batch_size}_s{args.seq_len}"
        title += f", batch {args.batch_size}, seq {args.seq_len} (supplementary)"
    text = C.section(name, title, body)
    print(text)
    if not args.no_write:
        C.write_section(name, text)
        C.log(f"wrote section {name} to {C.DOC}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
