"""The savings ladder: each shipped training recipe, step by step, in sim and on the CPU.

(a) sim: TinyLlama-1.1B shape (``configs/models/tinyllama-1.1b.json``), full
fine-tune, float32, AdamW, batch 4, seq 1024, projected for a CUDA GPU: the
baseline, then each step of each shipped training recipe stacked, with the
peak and the FLOPs counted by ``FlopCounterMode`` (recomputation included).

(b) cpu: the same recipes on a small Llama (``bench/configs/llama-h256-l4.json``)
as real CPU steps, with the measured step time (median of untracked steps) and
the quality check against the baseline (output and loss differences).

Target (issue 3): the best shipped recipe cuts the fp32 AdamW peak by at least
4x at no more than 35% extra FLOPs.

Usage::

    .venv/bin/python bench/ladder.py [--recipes low-memory-finetune,...] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

DOC = C.REPO / "docs" / "ladder.md"
HEADER = """# The savings ladder

What each optimization of memprof's shipped recipes buys and costs, measured by
memprof itself (`memprof.compare.compare`, the library behind `memprof compare`).
Each row stacks one more optimization on the rows above it. Sections are written
by `bench/ladder.py`; rerun one with the command given in it.
"""

# What the numbers mean, checked against the tables of the run recorded in docs/ladder.md.
NOTES = """### Reading the tables

- FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over the whole step;
  checkpointing's recomputation shows as +21 to +24% (the LM head and loss are not
  recomputed, so it stays under the textbook one third).
- bfloat16 on this CPU is measured 25-30x *slower* (step time column of (b)): the CPU
  has AVX2 only (no AVX512-BF16/AMX), so bf16 matmuls run through conversion paths. On a
  GPU with bf16 tensor cores the same step is faster; the time column of (b) is a
  statement about this machine, not about bf16.
- Pure bfloat16 loses small updates: with AdamW at lr 1e-5, most updates are below
  bf16's resolution, so the loss after two steps differs from the float32 baseline's by
  about 7e-2 (the float32 run moved, the bf16 run barely did). The memory halves; the
  training changes. Autocast keeps float32 master weights and differs by under 1e-4.
- Adafactor runs at its usual fixed learning rate (1e-3, no relative step) against
  AdamW's 1e-5, so its loss after two steps differs by design, not by precision.
- Activation offload moves nothing on the cpu engine (host memory is its device
  memory): 35.72 MiB before and after, as measured; in sim it moves the checkpointed
  activations to host memory (-916 MiB) and adds the copies back as temporaries.
- `fastest-fit` avoids recomputation and reaches only 1.20x on this workload: at fp32
  with AdamW, parameters, gradients and optimizer state (16 bytes a parameter) dominate,
  and only checkpointing, pure bf16 and a smaller optimizer state move those.
"""

TRAIN_RECIPES = ("low-memory-finetune", "fastest-fit", "minimal-memory")


def pct(new: float | None, old: float | None) -> str:
    if new is None or old is None or not old:
        return "n/a"
    return f"{100 * (new - old) / old:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(TRAIN_RECIPES))
    ap.add_argument("--model", default="tinyllama-1.1b")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--cpu-model", default=str(C.BENCH / "configs" / "llama-h256-l4.json"))
    ap.add_argument("--timing-steps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    C.quiet()
    from memprof import recipes
    from memprof.compare import compare
    from memprof.report.compare import moved
    from memprof.workload import Workload

    t0 = time.perf_counter()
    names = [n for n in args.recipes.split(",") if n]
    wl = Workload(batch_size=args.batch_size, seq_len=args.seq_len, dtype="float32", optimizer="adamw")
    sim_parts, best = [], None
    for name in names:
        rec = recipes.load(name)
        C.log(f"sim: {name}")
        c = compare(args.model, rec, wl, engine="sim", progress=C.log)
        base = c.baseline
        rows = [
            ["0", "baseline (fp32, AdamW)", C.gib(base.peak_bytes), "1.00x", "", "", base.peak_phase or ""]
        ]
        prev, prev_flops = base, c.baseline_flops
        for i, s in enumerate(c.steps, 1):
            if s.profile is None:
                rows.append([str(i), f"`{s.label}`", "skipped", "", "", "", s.skipped or s.error or ""])
                continue
            p = s.profile
            rows.append(
                [
                    str(i),
                    f"`{s.label}`",
                    C.gib(p.peak_bytes),
                    f"{base.peak_bytes / p.peak_bytes:.2f}x",
                    pct(s.flops, prev_flops),
                    pct(s.flops, c.baseline_flops),
                    f"{p.peak_phase}; " + moved(prev, p).replace("\n", ", "),
                ]
            )
            prev, prev_flops = p, s.flops
        last = next((s for s in reversed(c.steps) if s.profile is not None), None)
        ratio = base.peak_bytes / last.profile.peak_bytes if last else 1.0
        extra = (last.flops - c.baseline_flops) / c.baseline_flops if last and last.flops else 0.0
        ok = ratio >= 4 and extra <= 0.35
        if best is None or (ok, ratio) > (best[1], best[2]):
            best = (name, ok, ratio, extra)
        table = C.md_table(
            [
                "#",
                "step",
                "peak",
                "vs baseline",
                "FLOPs vs row above",
                "FLOPs vs baseline",
                "peak phase; what moved",
            ],
            rows,
            "rlrrrrl",
        )
        sim_parts += [
            f"#### `{name}`: {rec.description}",
            "",
            table,
            "",
            f"Baseline {C.gib(base.peak_bytes)} -> {C.gib(last.profile.peak_bytes if last else base.peak_bytes)}: "
            f"**{ratio:.2f}x** less at **{100 * extra:+.1f}%** FLOPs "
            f"({'meets' if ok else 'does not meet'} the 4x / 35% target).",
            "",
        ]

    cpu_parts = []
    cwl = Workload(batch_size=4, seq_len=256, dtype="float32", optimizer="adamw")
    for name in names:
        rec = recipes.load(name)
        C.log(f"cpu: {name}")
        c = compare(args.cpu_model, rec, cwl, engine="cpu", timing_steps=args.timing_steps, progress=C.log)
        base = c.baseline
        bq = c.baseline_quality or {}
        rows = [
            [
                "0",
                "baseline",
                C.mib(base.peak_bytes),
                "1.00x",
                f"{c.baseline_seconds:.3f} s",
                "",
                "",
                f"loss {bq.get('loss', 0):.5f}",
                "",
            ]
        ]
        for i, s in enumerate(c.steps, 1):
            if s.profile is None:
                rows.append([str(i), f"`{s.label}`", "skipped", "", "", "", "", "", s.skipped or ""])
                continue
            q = s.quality or {}
            rows.append(
                [
                    str(i),
                    f"`{s.label}`",
                    C.mib(s.profile.peak_bytes),
                    f"{base.peak_bytes / s.profile.peak_bytes:.2f}x",
                    f"{s.seconds:.3f} s" if s.seconds is not None else "n/a",
                    pct(s.seconds, c.baseline_seconds),
                    pct(s.flops, c.baseline_flops),
                    f"{q.get('output_max_rel_diff', 0):.1e} / {q.get('loss_abs_diff', 0):.1e}",
                    f"{q.get('loss_after_steps_abs_diff') or 0:.1e}",
                ]
            )
        cpu_parts += [
            f"#### `{name}`",
            "",
            C.md_table(
                [
                    "#",
                    "step",
                    "peak",
                    "vs baseline",
                    "step time (median)",
                    "time vs baseline",
                    "FLOPs vs baseline",
                    "output rel diff / loss diff",
                    "loss diff after 2 steps",
                ],
                rows,
                "rlrrrrrrr",
            ),
            "",
        ]

    assert best is not None
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- (a) sim: `{args.model}`, training step, float32 weights, AdamW, batch {args.batch_size}, "
                    f"seq {args.seq_len}, sdpa attention, projected for a CUDA GPU (sm 9.x semantics). In "
                    "float32, grouped-query attention runs CUDA's math kernel (memory-efficient attention refuses "
                    "it; measured on an H200, docs/validation.md), which keeps the seq x seq scores: the baseline "
                    "holds them, the rows from bfloat16 on run flash attention.",
                    f"- (b) cpu: `{Path(args.cpu_model).relative_to(C.REPO)}`, real training steps on the CPU, batch 4, "
                    f"seq 256; step time is the median of {args.timing_steps} untracked steps (a 2-core shared VM: "
                    "noisy); quality is against the baseline on the same inputs and seed (eval-mode forward: max "
                    "relative output difference / absolute loss difference; and the loss after two training steps).",
                ]
            ),
            "",
            "### (a) Simulated GPU, TinyLlama-1.1B shape",
            "",
            *sim_parts,
            f"**Best shipped recipe: `{best[0]}`, {best[2]:.2f}x less memory at {100 * best[3]:+.1f}% FLOPs. "
            f"Target (>= 4x at <= 35% extra FLOPs): {'met' if best[1] else 'NOT met'}.** For scale: torchtune's "
            "published Llama-3.2-3B full fine-tune ladder goes from 25.5 to 17.6 GiB (1.45x); the transformers "
            "docs' bert-large table from 14.9 to 4.8 GB (3.1x).",
            "",
            "### (b) Real CPU steps, small Llama (time and quality measured)",
            "",
            *cpu_parts,
            NOTES,
            f"Whole script: {time.perf_counter() - t0:.0f} s.",
        ]
    )
    C.publish(
        "ladder",
        "The savings ladder of the shipped training recipes",
        body,
        write=not args.no_write,
        doc=DOC,
        header=HEADER,
    )
    return 0 if best[1] else 1


if __name__ == "__main__":
    sys.exit(main())
