"""Gradient accumulation: the same effective batch in k micro-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class GradAccumulation(Optimization):
    """Run the batch as ``steps`` micro-batches, accumulating gradients.

    Activations scale with the micro-batch; parameters, gradients and optimizer
    state do not change. The loss of each micro-batch is divided by ``steps``,
    so the gradient equals the full batch's (up to rounding).
    """

    name = "grad_accumulation"
    summary = "the batch in k micro-batches: activations / k, same gradient, same FLOPs"
    modes = ("train", "distill")  # distill: the teacher runs per micro-batch too

    @dataclass
    class Config:
        steps: int = option(2, "micro-batches per optimizer step", min=1, max=4096)

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        b = setup.workload.batch_size
        k = setup.micro_batches * self.config.steps
        if b % k:
            return f"batch size {b} does not split into {k} equal micro-batches"
        if setup.has_step("optimizer_in_backward"):
            return "the optimizer steps in backward, which leaves no gradients to accumulate"
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.micro_batches *= self.config.steps
        b = setup.workload.batch_size
        setup.training_args["per_device_train_batch_size"] = b // setup.micro_batches
        setup.training_args["gradient_accumulation_steps"] = setup.micro_batches
