"""Activation (gradient) checkpointing: keep block inputs, recompute the rest in backward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import InputError
from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup, repeated_blocks

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


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
        setup.training_args["gradient_checkpointing"] = True
        setup.training_args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if self.config.every > 1:
            setup.notes.append(
                f"checkpointing every {self.config.every} blocks: call "
                f"model.activation_checkpointing_enable(every_n_layers={self.config.every}) in your script "
                "(TrainingArguments has no field for it)"
            )

    def wrap_model(self, model: torch.nn.Module, runner: StepRunner) -> str | None:
        if runner.train:
            enable_checkpointing(model, self.config.every, runner.env.recompute_context)
        return None


def enable_checkpointing(
    model: torch.nn.Module, every: int, recompute_context: Callable[[], Any] | None = None
) -> str:
    """Activation checkpointing (non-reentrant) of every ``every``-th repeated block.

    transformers models use their own switch; other modules get the blocks of
    their longest list of same-type children wrapped in ``torch.utils.checkpoint``.

    Args:
        recompute_context: a context the recomputation runs in (the sim engine
            re-enters its CUDA-semantics mode there).

    Returns:
        how it was done, for the report.

    Raises:
        InputError: the model has no repeated blocks to checkpoint.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if recompute_context is not None:
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), recompute_context())
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and getattr(model, "supports_gradient_checkpointing", False):
        enable(kwargs, every_n_layers=every)
        return "transformers activation_checkpointing_enable"
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if legacy is not None and getattr(model, "supports_gradient_checkpointing", False) and every == 1:
        legacy(gradient_checkpointing_kwargs=kwargs)
        return "transformers gradient_checkpointing_enable"
    blocks = repeated_blocks(model)
    if not blocks:
        raise InputError(f"{type(model).__name__} has no repeated blocks to checkpoint")
    from torch.utils.checkpoint import checkpoint

    for i, block in enumerate(blocks):
        if i % every:
            continue
        # An instance attribute: Module.__call__ (and its hooks) stays outside the checkpoint.
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), **kwargs)
    return "torch.utils.checkpoint around repeated blocks"
