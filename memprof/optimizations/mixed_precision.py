"""Mixed precision: autocast (float32 master weights) or pure bfloat16."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class MixedPrecision(Optimization):
    """Lower-precision compute.

    * ``pure: false`` (autocast): matmuls run in ``dtype`` and the activations
      they save shrink; weights, gradients and optimizer state stay float32
      (float16 adds a gradient scaler). Autocast cuts activations, not weights.
    * ``pure: true``: weights, gradients and optimizer state are stored in
      bfloat16 (half the bytes of each), with no float32 master copy.
    """

    name = "mixed_precision"
    summary = "autocast (activations shrink) or pure bfloat16 (weights, grads, optimizer state halve)"
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        dtype: str = option("bfloat16", "low-precision dtype", choices=("bfloat16", "float16"))
        pure: bool = option(False, "store weights, gradients and optimizer state in bfloat16")

        def problems(self) -> list[str]:
            if self.pure and self.dtype != "bfloat16":
                return [
                    "pure mixed precision needs dtype bfloat16 (float16 without a float32 master copy diverges)"
                ]
            return []

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        wl = setup.workload
        if self.config.pure and wl.dtype == "bfloat16":
            return "the step already stores everything in bfloat16"
        if not self.config.pure and wl.dtype != "float32":
            return f"autocast needs float32 weights; the step stores {wl.dtype}"
        if setup.autocast:
            return f"autocast to {setup.autocast} is already on"
        return None

    def apply(self, setup: StepSetup) -> None:
        dt = self.config.dtype
        if self.config.pure:
            setup.update_workload(dtype="bfloat16")
            setup.config_updates["dtype"] = "bfloat16"
            if setup.workload.training:
                setup.notes.append(
                    "pure bfloat16: no float32 master weights; updates below bf16 resolution are lost"
                )
            if setup.workload.mode == "distill" and setup.teacher_dtype is None:
                setup.notes.append("the teacher follows the student's dtype: bfloat16 too")
            return
        setup.autocast = dt
        if setup.workload.training:
            setup.training_args["bf16" if dt == "bfloat16" else "fp16"] = True
            if dt == "float16":
                setup.grad_scaler = True
