"""Sliding-window (local) attention where the model supports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class LocalAttention(Optimization):
    """Attend to the last ``window`` tokens only (Mistral-style ``sliding_window``).

    It changes the function (tokens lose the context beyond the window), and
    whether it saves memory depends on the kernel: eager attention and SDPA
    apply the window as a mask over the full ``seq x seq`` scores, which are
    still computed (eager stores them for backward); only a kernel with native
    windows (flash-attention 2's ``window_size``) skips them. memprof measures
    what the kernel in use does.
    """

    name = "local_attention"
    summary = (
        "sliding-window attention (Mistral-style): changes outputs; with eager/sdpa the window is a mask"
    )
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        window: int = option(4096, "tokens each position attends to", min=1, max=10_000_000)

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if self.config.window >= setup.workload.seq_len:
            return f"a window of {self.config.window} covers the whole sequence of {setup.workload.seq_len}"
        cfg = getattr(model, "config", None)
        if model is not None and (cfg is None or not hasattr(cfg, "sliding_window")):
            return f"{type(model).__name__}: its attention code has no sliding window (Mistral, Qwen2 and others do)"
        return None

    def apply(self, setup: StepSetup) -> None:
        w = self.config.window
        setup.config_updates["sliding_window"] = w
        setup.notes.append(
            f"sliding window of {w} tokens: outputs change beyond the window; with attn "
            f"{setup.workload.attn} the window is a mask over the full seq x seq scores, so they are still "
            "computed (only flash-attention 2's native window skips them)"
        )

    def config_overrides(self, setup: StepSetup) -> dict[str, Any]:
        return {"sliding_window": self.config.window}
