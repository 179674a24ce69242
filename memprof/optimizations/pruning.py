"""Pruning: unstructured and 2:4 (zeros: memory unchanged in dense tensors), structured FFN neurons and attention heads (smaller layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch


# "2to4", not "2:4": YAML 1.1 (PyYAML) reads an unquoted 2:4 as the base-60 number 124
METHODS = ("structured", "heads", "unstructured", "2to4")


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
    * ``method: heads``: remove the least important ``amount`` of the attention
      heads of every layer (whole key/value groups with grouped-query
      attention): smaller projections and fewer ``seq x seq`` score maps.
      Llama-style checkpoints reload at the new size (``num_attention_heads``,
      ``num_key_value_heads``, ``head_dim``); BERT's config cannot express fewer
      heads, so its checkpoint holds them zeroed at full size.
    * ``method: 2to4``: zero 2 of every 4 contiguous input weights by magnitude
      (the semi-structured pattern sparse tensor cores run). Dense zeros save
      nothing; for inference on a CUDA GPU of compute capability >= 8.0 in
      float16/bfloat16 the weights are converted to torch's semi-structured
      format (about 56% of their dense bytes).
    """

    name = "pruning"
    summary = (
        "unstructured / 2:4 (zeros: memory unchanged unless 2:4 is compressed on a CUDA GPU, sm >= 8.0), "
        "structured FFN neurons or attention heads (really smaller)"
    )
    modes = ("train", "infer", "distill")
    rewrites_model = True

    @dataclass
    class Config:
        method: str = option(
            "structured",
            "structured: FFN neurons; heads: attention heads (KV groups with GQA); "
            "unstructured: L1 zeros; 2to4: 2 of every 4 weights zero (2:4 semi-structured)",
            choices=METHODS,
        )
        amount: float = option(
            0.5,
            "fraction of weights (unstructured), FFN neurons (structured) or heads per layer (heads); "
            "2to4 is always half",
            min=0.0,
            max=0.95,
        )
        permanent: bool = option(
            True, "unstructured: fold the mask into the weight (as a saved checkpoint has it)"
        )

        def problems(self) -> list[str]:
            if self.amount <= 0:
                return ["option 'amount' must be above 0"]
            if self.method == "2to4" and self.amount != 0.5:
                return ["method 2to4 zeroes exactly half of the weights: leave 'amount' at 0.5"]
            return []

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        from memprof.surgery.pruning import ffn_layout, heads_layout

        if setup.has_step(self.name):
            return "the model is already pruned by an earlier step"
        if model is None:
            return None
        if self.config.method == "structured":
            return ffn_layout(model)
        if self.config.method == "heads":
            return heads_layout(model)
        return None

    def apply(self, setup: StepSetup) -> None:
        if self.config.method == "2to4" and setup.workload.mode != "infer":
            setup.notes.append(
                "2:4 sparsity in training: the pattern is applied once here; a real sparse fine-tune re-applies "
                "the mask after every optimizer step, and the dense weights take the same memory"
            )

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        from memprof.surgery.pruning import prune_ffn, prune_heads, prune_unstructured, sparsify_2to4

        c = self.config
        if c.method == "unstructured":
            # a checkpoint holds the weights with the mask folded in
            return prune_unstructured(model, c.amount, permanent=c.permanent or setup.checkpoint_form)
        if c.method == "heads":
            return prune_heads(model, c.amount, checkpoint=setup.checkpoint_form)
        if c.method == "2to4":
            # compressed weights are inference-only: the optimizer cannot step a
            # semi-structured tensor, and training keeps the mask on dense weights;
            # safetensors holds plain tensors, so a checkpoint keeps the dense zeros
            compress = setup.workload.mode == "infer" and not setup.checkpoint_form
            return sparsify_2to4(model, compress=compress)
        return prune_ffn(model, c.amount)
