"""FSDP2 projection at scale, and the projection against real ranks.

Part 1 (section ``fsdp_scale``): ``memprof analyze llama-3-70b --engine sim
--world-size N --shard fsdp`` (bf16, AdamW, batch 1 per rank, seq 4096) for
N = 8 and 64, each the real command in a fresh process, timed from start to
exit (target: under 60 s each on this 2-core machine).

Part 2 (section ``fsdp_agreement``): a real 2-rank FSDP2 step of a tiny Llama
under torchrun (gloo, CPU) against the sim projection for N = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

MEMPROF = [sys.executable, "-m", "memprof"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall


def shown(cmd: list[str]) -> str:
    return " ".join(["memprof", *cmd[3:]] if cmd[:3] == MEMPROF else cmd)


def scale(model: str, sizes: list[int], seq: int, tmp: Path) -> str:
    rows = []
    lines = []
    ok = True
    for n in sizes:
        out = tmp / f"n{n}.json"
        cmd = [*MEMPROF, "analyze", model, "--engine", "sim", "--world-size", str(n), "--shard", "fsdp"]
        cmd += ["-b", "1", "-s", str(seq), "--dtype", "bfloat16", "--optimizer", "adamw", "--top", "0"]
        C.log(f"running {shown(cmd)}")
        wall = run([*cmd, "--json", str(out)])
        p = json.loads(out.read_text())
        s = p["sharding"]
        at = s["at_peak"]
        cats = p["categories_at_peak"]
        z = s["zero3_estimate"]
        left_out = cats["activations"] + cats["temporaries"] + cats["inputs"]
        ok = ok and wall < 60
        rows.append(
            [
                n,
                f"{wall:.1f}",
                C.gib(p["peak_bytes"]),
                C.gib(p["peak_reserved_bytes"]),
                C.gib(at["sharded_parameters"]),
                C.gib(at["unsharded_parameters"]),
                C.gib(at["all_gather_buffers"] + at["reduce_scatter_buffers"]),
                C.gib(cats["optimizer_state"]),
                C.gib(cats["activations"]),
                C.gib(z["bytes"]),
                C.gib(left_out),
            ]
        )
        lines.append(f"- N = {n}: `{shown(cmd)}` → {wall:.1f} s (peak phase: {p['peak_phase']}).")
    table = C.md_table(
        [
            "ranks",
            "wall s",
            "peak allocated",
            "reserved (est.)",
            "sharded params",
            "gathered params",
            "AG + RS buffers",
            "optimizer state",
            "activations",
            "ZeRO-3 formula",
            "not in the formula",
        ],
        rows,
        "rrrrrrrrrrr",
    )
    n_params = z["parameters"]
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Workload: `{model}` ({n_params / 1e9:.2f} B parameters), full fine-tune, bfloat16 parameters "
                    f"and AdamW state, batch 1 per rank, seq {seq}, sdpa (flash on the projected sm 9.x GPU); "
                    "FSDP2 `fully_shard` per decoder layer and the root, over a fake process group; rank 0's figures.",
                    "- Wall time: the whole command in a fresh process (imports, build on fake tensors, warm-up step, "
                    "measured step, allocator replay).",
                ]
            ),
            "",
            table,
            "",
            *lines,
            f"- Target (issue 6): under 60 s each: **{'met' if ok else 'not met'}**.",
            "- ZeRO-3 formula: DeepSpeed's `estimate_zero3_model_states_mem_needs` (largest layer x 4 B + 18 B x "
            "parameters / ranks), model states only, for fp16 mixed precision with an fp32 master copy; this step "
            "keeps bf16 parameters and AdamW state (8 B per parameter), so its model states are smaller than the "
            "formula's, and the activations it leaves out (last column) dominate the measured peak.",
            "- All-gather and reduce-scatter buffers are those live at the peak (early in backward, before the "
            "first reduce-scatter).",
        ]
    )
    return C.section("fsdp_scale", "4. FSDP2 projection at scale: Llama-3-70B over 8 and 64 ranks", body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agreement(model: str, tmp: Path, runs: int) -> str:
    args = [model, "-b", "2", "-s", "64", "--attn", "eager", "--shard", "fsdp", "--top", "0"]
    sim_json = tmp / "sim.json"
    sim_cmd = [*MEMPROF, "analyze", *args, "--world-size", "2", "--engine", "sim"]
    run([*sim_cmd, "--json", str(sim_json)])
    sim = json.loads(sim_json.read_text())
    rows = []
    worst = 0.0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tr_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    for i in range(runs):
        out = tmp / f"ranks{i}.json"
        cmd = [
            *tr_cmd,
            "--master-port",
            str(free_port()),
            "-m",
            "memprof",
            "analyze",
            *args,
            "--engine",
            "cpu",
        ]
        C.log(f"torchrun run {i + 1}/{runs}")
        run([*cmd, "--json", str(out)], env=env)
        for r in json.loads(out.read_text())["ranks"]:
            diff = (sim["peak_bytes"] - r["peak_bytes"]) / r["peak_bytes"]
            worst = max(worst, abs(diff))
            rows.append(
                [
                    i + 1,
                    r["sharding"]["rank"],
                    f"{r['peak_bytes']:,}",
                    f"{sim['peak_bytes']:,}",
                    f"{100 * diff:+.2f}%",
                    r["peak_phase"],
                ]
            )
    table = C.md_table(
        ["run", "rank", "measured peak B (gloo, cpu)", "sim projection B (N=2)", "sim vs measured", "phase"],
        rows,
        "rrrrrl",
    )
    body = "\n".join(
        [
            C.header_lines(
                [
                    f"- Workload: `{model}` (tiny Llama: 2 layers, hidden 64, vocabulary 512), training step, float32, AdamW, "
                    "batch 2 per rank, seq 64, eager attention (the same kernels on CPU and in the projection).",
                    "- Measured: `torchrun --nproc-per-node 2 -m memprof analyze "
                    + " ".join(args)
                    + " --engine cpu` (gloo; each rank measures itself; rank 0 prints every rank).",
                    f"- Projected: `{shown(sim_cmd)}`.",
                ]
            ),
            "",
            table,
            "",
            f"- Largest difference: {100 * worst:.2f}% (the projection rounds every storage to CUDA's 512-byte "
            "blocks; the cpu engine counts exact bytes). On gloo a rank can keep a communication buffer alive a "
            "little longer than the fake process group does (+3.3% on one rank once, in the groundwork notes "
            "docs/notes/fsdp2-sim-spike.md); the test `tests/test_sharding.py` asserts agreement within 5%.",
        ]
    )
    return C.section(
        "fsdp_agreement", "5. FSDP2 projection against real ranks (torchrun, 2 ranks, gloo)", body
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--sizes", default="8,64")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--tiny", default="tests/fixtures/tiny/llama.json")
    ap.add_argument("--runs", type=int, default=2, help="torchrun runs of the agreement part")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = [
            ("fsdp_scale", scale(args.model, [int(x) for x in args.sizes.split(",")], args.seq_len, tmp)),
            ("fsdp_agreement", agreement(args.tiny, tmp, args.runs)),
        ]
    for name, text in parts:
        print(text)
        if not args.no_write:
            C.write_section(name, text)
            C.log(f"wrote section {name} to {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
