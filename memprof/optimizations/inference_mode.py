"""Inference without autograd state: torch.inference_mode and the KV-cache choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    from memprof.engines.runner import StepRunner


@register
class InferenceMode(Optimization):
    """Run inference under ``torch.inference_mode`` and choose ``use_cache``.

    inference_mode skips version counters and view tracking (speed, not
    memory: no_grad already stores nothing for backward). ``use_cache: false``
    stops a causal LM's plain forward from building a KV cache it never reads;
    generation (``--decode-tokens``) always needs the cache.
    """

    name = "inference_mode"
    summary = "torch.inference_mode, and no KV cache for a plain forward"
    modes = ("infer",)

    @dataclass
    class Config:
        use_cache: bool = option(False, "let the forward build a KV cache")

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if setup.has_step(self.name):
            return "inference_mode is already on"
        return None

    def apply(self, setup: StepSetup) -> None:
        if setup.workload.decode_tokens:
            setup.notes.append("use_cache stays on: generation reads the KV cache")
        else:
            setup.config_updates["use_cache"] = self.config.use_cache

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        import torch

        return torch.inference_mode() if kind == "infer" else None

    def model_kwargs(self, runner: StepRunner) -> dict[str, Any]:
        if runner.setup.workload.decode_tokens:
            return {}  # generation reads the KV cache
        return {"use_cache": self.config.use_cache}
