"""Weight-only quantization for inference: int8 (torchao, torch.ao) and 8/4-bit (bitsandbytes, GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch


@register
class Quantization(Optimization):
    """Store the Linear weights in 8 (or 4) bits; compute in the activation dtype.

    ``backend: auto`` picks torchao's int8 weight-only config where torchao is
    installed (it runs on the CPU, under fake tensors and on CUDA, and
    transformers saves and reloads it), else torch.ao's dynamic int8 on the CPU
    (the cpu engine only; no transformers format). ``bits: 4`` is bitsandbytes
    nf4, which needs a CUDA GPU. What is measured: the weight bytes, the peak
    (which includes the transient full-precision copy of a weight that the
    int8 weight-only matmul makes), and the output difference to the baseline.
    """

    name = "quantization"
    summary = (
        "int8 weight-only (torchao / torch.ao) or 8/4-bit bitsandbytes (GPU): smaller weights, inference"
    )
    modes = ("infer",)
    rewrites_model = True

    @dataclass
    class Config:
        bits: int = option(8, "weight bits", choices=(8, 4))
        backend: str = option(
            "auto",
            "auto: torchao if installed, else torch.ao (8-bit) / bitsandbytes (4-bit)",
            choices=("auto", "torchao", "torch.ao", "bitsandbytes"),
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        from memprof.surgery.common import linears
        from memprof.surgery.quantization import quant_backend, quantization_problem

        if setup.has_step(self.name):
            return "the model is already quantized by an earlier step"
        backend = quant_backend(self.config.backend, self.config.bits)
        why = quantization_problem(backend, self.config.bits)
        if why:
            return why
        if model is not None and not linears(model):
            return f"{type(model).__name__} has no Linear layers to quantize"
        return None

    def apply(self, setup: StepSetup) -> None:
        pass  # the weights change in transform_model

    @property
    def backend(self) -> str:
        """The backend ``auto`` resolves to here."""
        from memprof.surgery.quantization import quant_backend

        return quant_backend(self.config.backend, self.config.bits)

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        from memprof.surgery.quantization import quantize

        return quantize(model, self.backend, self.config.bits)

    def checkpoint_problem(self) -> str | None:
        if self.backend == "torch.ao":
            return (
                "torch.ao quantization cannot be saved in a format transformers reloads (its packed CPU "
                "modules have no checkpoint format): install torchao and use the quantization step with "
                "backend torchao"
            )
        return None
