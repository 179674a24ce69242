"""Pruning: unstructured (zeros in dense tensors: no memory saved) and structured (smaller layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.surgery import ffn_layout
from memprof.workload import StepSetup


@register
class Pruning(Optimization):
    """Remove weights.

    * ``method: unstructured``: L1 magnitude pruning of every Linear weight
      (``torch.nn.utils.prune``). The popular claim is that it shrinks memory; it
      does not: the zeros are stored densely, and with ``permanent: false`` (the
      reparametrisation torch leaves during training) a mask buffer and a
      recomputed weight per layer make memory go *up*. memprof measures and
      says so.
    * ``method: structured``: remove the least important feed-forward neurons
      (``amount`` of them) of every block, rewriting the Linear layers and
      ``config.intermediate_size``: the tensors really shrink, and ``memprof
      apply`` writes a checkpoint that reloads at its new size. The quality
      check shows what it costs.
    """

    name = "pruning"
    summary = (
        "unstructured (dense zeros: memory unchanged, measured) or structured FFN neurons (really smaller)"
    )
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        method: str = option("structured", "what to remove", choices=("structured", "unstructured"))
        amount: float = option(
            0.5, "fraction of weights (unstructured) or FFN neurons (structured)", min=0.0, max=0.95
        )
        permanent: bool = option(
            True, "unstructured: fold the mask into the weight (as a saved checkpoint has it)"
        )

        def problems(self) -> list[str]:
            if self.amount <= 0:
                return ["option 'amount' must be above 0"]
            return []

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if any(t["kind"].startswith("prune") for t in setup.model_transforms):
            return "the model is already pruned by an earlier step"
        if model is not None and self.config.method == "structured":
            return ffn_layout(model)
        return None

    def apply(self, setup: StepSetup) -> None:
        c = self.config
        if c.method == "unstructured":
            setup.model_transforms.append(
                {"kind": "prune_unstructured", "amount": c.amount, "permanent": c.permanent}
            )
        else:
            setup.model_transforms.append({"kind": "prune_ffn", "amount": c.amount})
