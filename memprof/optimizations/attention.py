"""The attention implementation (eager -> sdpa)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class Attention(Optimization):
    """Switch the attention implementation of a transformers model.

    ``sdpa`` runs ``torch.nn.functional.scaled_dot_product_attention``; on CUDA
    its flash and memory-efficient kernels never store the ``seq x seq`` score
    matrix, which eager attention keeps for backward (the sim engine projects
    CUDA's kernel choice; on a CPU, sdpa's kernel saves less too). Where neither
    takes the step, CUDA runs the math kernel, which keeps the scores as eager
    does: float32 with grouped-query attention (a float32 Llama-3: flash wants
    16-bit inputs, memory-efficient the same head count for keys and queries).
    """

    name = "attention"
    summary = "eager -> sdpa attention (no seq x seq scores stored on CUDA's flash/efficient kernels)"
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        implementation: str = option("sdpa", "attention implementation", choices=("sdpa", "eager"))

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        impl = self.config.implementation
        if setup.workload.attn == impl:
            return f"the step already uses {impl} attention"
        if model is not None:
            if not hasattr(model, "config"):
                return "not a transformers model: its attention is its own code"
            if impl == "sdpa" and not getattr(model, "_supports_sdpa", False):
                return f"{type(model).__name__} does not support sdpa attention"
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.update_workload(attn=self.config.implementation)
        if setup.workload.mode == "distill":
            setup.notes.append(f"the teacher is built with {self.config.implementation} attention too")
        setup.config_updates["attn_implementation"] = self.config.implementation
