"""Activation (gradient) checkpointing: keep block inputs, recompute the rest in backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup, repeated_blocks


@register
class Checkpointing(Optimization):
    """Recompute each checkpointed block's activations during backward.

    transformers models switch on their own activation checkpointing
    (non-reentrant); other modules get their longest list of same-type blocks
    wrapped in ``torch.utils.checkpoint``. ``every: k`` checkpoints every k-th
    block only (selective checkpointing: less recompute, more memory).
    """

    name = "checkpointing"
    summary = "recompute block activations in backward instead of storing them (one more forward per block)"
    modes = ("train", "distill")  # distill: the student's blocks

    @dataclass
    class Config:
        every: int = option(1, "checkpoint every k-th repeated block (1: all)", min=1, max=1024)

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if model is None:
            return None
        if hasattr(model, "supports_gradient_checkpointing"):
            if not model.supports_gradient_checkpointing:
                return f"{type(model).__name__} does not support activation checkpointing"
            return None
        if not repeated_blocks(model):
            return f"{type(model).__name__} has no list of repeated blocks to checkpoint"
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.checkpointing = self.config.every
        setup.training_args["gradient_checkpointing"] = True
        setup.training_args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if self.config.every > 1:
            setup.notes.append(
                f"checkpointing every {self.config.every} blocks: call "
                f"model.activation_checkpointing_enable(every_n_layers={self.config.every}) in your script "
                "(TrainingArguments has no field for it)"
            )
