"""Mixed precision: autocast (float32 master weights) or pure bfloat16."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


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

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        # the teacher's forward in a distillation step runs inside the step's own autocast
        import torch

        from memprof.models import DTYPES

        if self.config.pure or kind == "teacher":
            return None
        return torch.autocast(runner.env.device_type, dtype=DTYPES[self.config.dtype])

    def grad_scaler(self, runner: StepRunner) -> Any:
        import torch

        if not runner.setup.grad_scaler:
            return None
        return _SimScaler() if runner.env.simulate_cuda else torch.amp.GradScaler(runner.env.device_type)


class _SimScaler:
    """The memory of torch.amp.GradScaler without its data-dependent branch.

    GradScaler.step reads found_inf with .item(), which fake tensors cannot
    answer; the tensors it creates (scale, found_inf, in-place unscaling) are
    the same here.
    """

    def __init__(self) -> None:
        self._scale: torch.Tensor | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        import torch

        if self._scale is None:
            self._scale = torch.full((), 2.0**16, dtype=torch.float32, device=loss.device)
        return loss * self._scale

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        import torch

        assert self._scale is not None
        inv = self._scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        optimizer.step()

    def update(self) -> None:
        pass
