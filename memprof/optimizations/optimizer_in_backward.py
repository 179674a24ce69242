"""Optimizer step fused into backward: gradients freed as soon as they are used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, register
from memprof.workload import StepSetup


@register
class OptimizerInBackward(Optimization):
    """Step each parameter in its post-accumulate-grad hook and free its gradient.

    The full set of gradients never coexists: at most the gradients of the
    parameters whose backward is running are alive. Not compatible with
    gradient accumulation or a gradient scaler (both need every gradient first)
    or gradient clipping over all parameters.
    """

    name = "optimizer_in_backward"
    summary = "step each parameter in its gradient hook: full gradients never coexist"
    modes = ("train", "distill")  # distill: the student's parameters

    @dataclass
    class Config:
        pass

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if setup.workload.optimizer == "none":
            return "the workload has no optimizer (--optimizer none)"
        if setup.micro_batches > 1:
            return "gradients accumulate over micro-batches, so they must all exist before the step"
        if setup.grad_scaler:
            return "the float16 gradient scaler unscales all gradients before the step"
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.optimizer_in_backward = True
        setup.notes.append(
            "optimizer in backward: one optimizer per parameter stepped in "
            "register_post_accumulate_grad_hook (no TrainingArguments field; see the PyTorch tutorial "
            "'optimizer step in backward')"
        )
