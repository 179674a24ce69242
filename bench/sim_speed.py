"""Simulation speed: a Llama-3-8B training step under fake tensors.

The model is built once under ``FakeTensorMode`` (with the sim engine's
``CudaSDPA``), one untimed warm-up step creates the optimizer state, then three
variants of the same steady-state training step are timed, interleaved:

(a) the untracked fake step;
(b) the step inside ``memprof.tracking.Tracker(model, optimizer, block_rounding=512,
    track_modules=True)``, with phases (``run_step(..., tracker=t)``), inputs
    marked and ``result()`` taken, as the sim engine does;
(c) the step inside ``torch.distributed._tools.mem_tracker.MemTracker``
    (``track_external(model, optimizer, *inputs)``, then ``with mt:``).

Targets: (b) at most 2x (a); (b) at least 5x faster than (c).

After the timed repeats, one untimed step runs under a ``Tracker`` with
``block_rounding=1`` so its peak can be compared byte for byte with MemTracker's
(MemTracker rounds only tensors on CUDA devices; the sim step runs on CPU fake
tensors, so MemTracker counts exact bytes here).

Usage::

    .venv/bin/python bench/sim_speed.py [--repeats 3] [--seq-len 2048] [--no-write]
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
    ap.add_argument("--model", default="llama-3-8b", help="MODEL spec (default: the bundled llama-3-8b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-memtracker", action="store_true", help="skip variant (c)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    C.quiet()
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.engines.cuda_semantics import CudaSDPA
    from memprof.engines.runner import make_optimizer, run_step
    from memprof.models import build_model, parameter_count, resolve
    from memprof.tracking import Tracker
    from memprof.workload import Workload

    wl = Workload(
        mode="train",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        optimizer="adamw",
        attn="sdpa",
    )
    t_start = time.perf_counter()
    rm = resolve(args.model)
    sdpa = CudaSDPA(9)
    results: dict[str, list] = {}
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa:
        C.log(f"building {args.model} under FakeTensorMode")
        model, builder = build_model(rm, dtype=wl.dtype, attn=wl.attn, load_weights=False, init_weights=False)
        builder.validate(wl.batch_size, wl.seq_len)
        model.train(True)
        n_params = parameter_count(model)
        inputs = builder.build(wl.batch_size, wl.seq_len, torch.device("cpu"), with_labels=True)
        input_tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        optimizer = make_optimizer("adamw", model, foreach=True)
        assert optimizer is not None
        C.log("warm-up step (untimed)")
        t0 = time.perf_counter()
        run_step(model, inputs, wl, optimizer)
        warm_s = time.perf_counter() - t0
        kernels = dict(sdpa.kernels)  # per step

        def untracked() -> None:
            run_step(model, inputs, wl, optimizer)

        def tracked(rounding: int = 512) -> tuple[int, str | None]:
            t = Tracker(model, optimizer, block_rounding=rounding, track_modules=True)
            with t:
                t.mark_inputs(input_tensors)
                run_step(model, inputs, wl, optimizer, tracker=t)
            r = t.result()
            return r.peak_bytes, r.peak_phase

        def memtracker() -> tuple[int | None, str | None]:
            from torch.distributed._tools.mem_tracker import MemTracker

            try:
                mt = MemTracker()
                mt.track_external(model, optimizer, *input_tensors)
                with mt:
                    run_step(model, inputs, wl, optimizer)
                snap = mt.get_tracker_snapshot("peak")
                return sum(d["Total"] for d in snap.values()), None
            except Exception as e:  # recorded honestly in the table
                return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

        ta, tb, tc = C.Timing("(a) untracked"), C.Timing("(b) Tracker"), C.Timing("(c) MemTracker")
        variants: list = [(ta, untracked), (tb, tracked)]
        if not args.no_memtracker:
            variants.append((tc, memtracker))
        C.log(f"timing {len(variants)} variants x {args.repeats} repeats, interleaved")
        outs = C.interleave(variants, args.repeats, C.log)
        results["b"] = outs[1]
        results["c"] = outs[2] if not args.no_memtracker else []
        C.log("untimed Tracker(block_rounding=1) step, for a byte-exact comparison with MemTracker")
        exact_peak, _ = tracked(1)

    b_peaks = {p for p, _ in results["b"]}
    b_peak, b_phase = results["b"][0]
    c_peaks = {p for p, _ in results["c"]}
    c_errors = [e for _, e in results["c"] if e]
    c_peak = results["c"][0][0] if results["c"] else None

    rows = [
        [
            "(a) untracked fake step",
            f"{ta.wall_median:.2f}",
            ta.spread(),
            f"{ta.cpu_median:.2f}",
            "1.00x",
            "-",
        ],
        [
            "(b) memprof Tracker (rounding 512, modules, phases)",
            f"{tb.wall_median:.2f}",
            tb.spread(),
            f"{tb.cpu_median:.2f}",
            f"{tb.wall_median / ta.wall_median:.2f}x",
            C.fmt_bytes(b_peak),
        ],
    ]
    if not args.no_memtracker:
        rows.append(
            [
                "(c) torch MemTracker",
                f"{tc.wall_median:.2f}",
                tc.spread(),
                f"{tc.cpu_median:.2f}",
                f"{tc.wall_median / ta.wall_median:.2f}x",
                C.fmt_bytes(c_peak) if c_peak is not None else f"error: {c_errors[0]}",
            ]
        )
    table = C.md_table(
        [
            "variant",
            "wall s (median)",
            "wall s (min - max)",
            "cpu s (median)",
            "vs (a)",
            "peak bytes reported",
        ],
        rows,
        "lrrrrr",
    )

    ba_w = tb.wall_median / ta.wall_median
    ba_pw, ba_pc = C.pair_ratios(tb, ta)
    ok1 = ba_w <= 2.0
    lines = [
        f"- (b)/(a): **{ba_w:.2f}x** (median of wall times; median of per-repeat ratios {ba_pw:.2f}x wall, "
        f"{ba_pc:.2f}x cpu). Target <= 2x: **{'met' if ok1 else 'NOT met'}**.",
    ]
    ok2 = None
    if not args.no_memtracker:
        cb_w = tc.wall_median / tb.wall_median
        cb_pw, cb_pc = C.pair_ratios(tc, tb)
        ok2 = cb_w >= 5.0 and not c_errors
        lines.append(
            f"- (c)/(b): **{cb_w:.2f}x** (median of wall times; median of per-repeat ratios {cb_pw:.2f}x wall, "
            f"{cb_pc:.2f}x cpu). Target >= 5x: **{'met' if ok2 else 'NOT met'}**."
        )
        if c_peak is not None:
            lines.append(
                f"- Peaks: Tracker (512-byte rounding) {C.fmt_bytes(b_peak)}; MemTracker {C.fmt_bytes(c_peak)} "
                f"(exact bytes: MemTracker rounds only CUDA-device tensors, and these are CPU fake tensors); "
                f"Tracker with `block_rounding=1` on one more step: {C.fmt_bytes(exact_peak)}, "
                f"{C.pct(exact_peak, c_peak)} from MemTracker. The 512-byte rounding adds "
                f"{C.fmt_bytes(b_peak - exact_peak)}."
            )
        if c_errors:
            lines.append(f"- MemTracker failed: `{c_errors[0]}`")
    if len(b_peaks) > 1 or len(c_peaks) > 1:
        lines.append(
            f"- Note: peaks differed between repeats: Tracker {sorted(b_peaks)}, MemTracker {sorted(c_peaks)}"
        )
    lines.append(
        f"- Tracker's peak phase: `{b_phase}`. SDPA kernels projected per step: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items()))
    )
    lines.append(
        f"- Untimed warm-up step: {warm_s:.2f} s. Whole script: {time.perf_counter() - t_start:.0f} s."
    )

    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Workload: `{args.model}` ({n_params / 1e9:.2f} B parameters), training step, {args.dtype}, "
                    f"AdamW (foreach=True), batch {args.batch_size}, seq {args.seq_len}, attn sdpa (CUDA kernel "
                    f"choice via `CudaSDPA`), under `FakeTensorMode(allow_non_fake_inputs=True)`; "
                    f"{args.repeats} interleaved repeats per variant after one untimed warm-up step.",
                ]
            ),
            "",
            table,
            "",
            *lines,
        ]
    )
    text = C.section("sim_speed", "1. Simulation speed: Llama-3-8B training step under fake tensors", body)
    print(text)
    if not args.no_write:
        C.write_section("sim_speed", text)
        C.log(f"wrote section sim_speed to {C.DOC}")
    return 0 if ok1 and ok2 is not False else 1


if __name__ == "__main__":
    sys.exit(main())
