"""QLoRA: frozen 4-bit (NF4) base weights in bitsandbytes' layout, trainable LoRA adapters through PEFT."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import InputError
from memprof.optimizations.lora import Lora
from memprof.optimizations.registry import Optimization, option, register
from memprof.surgery.lora import LoraSpec, attach_lora
from memprof.surgery.nf4 import (
    COMPUTE_DTYPES,
    INSTALL_HINT,
    QUANT_TYPES,
    NF4Spec,
    missing_libraries,
    quantize_4bit,
)
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch


#: steps that, after qlora, would rewrite or re-quantize the layers it quantized
_REWRITES_AFTER = ("pruning", "glu", "quantization", "lora")


@register
class QLora(Optimization):
    """Quantize the base model's Linear weights to 4 bits and train LoRA adapters on top (Dettmers et al. 2023).

    Every Linear layer but the output head becomes a bitsandbytes ``Linear4bit``
    (frozen; NF4 by default, with double-quantized scales), then PEFT injects
    LoRA adapters (:mod:`memprof.surgery.lora`). What it changes: the base
    weights take about a quarter of their 16-bit bytes (packed 4-bit values and
    their quantization state, counted as frozen parameters), and gradients and
    optimizer state are the adapters' only. Each 4-bit matmul dequantizes its
    weight to ``compute_dtype`` in the forward and again in the backward:
    temporaries of one layer's weight at a time.

    On the sim engine bitsandbytes' own ``quantize_4bit`` runs on the fake
    weights (its layout and state, not an estimate of them), and its 4-bit matmul
    takes the path CUDA takes (:class:`memprof.engines.cuda_semantics.CudaGemm4bit`).
    The cpu engine runs bitsandbytes' CPU backend.
    """

    name = "qlora"
    summary = "4-bit NF4 base weights (bitsandbytes) + LoRA adapters (PEFT): ~1/4 of the weights, adapter-only state"
    modes = ("train",)
    rewrites_model = True

    @dataclass
    class Config(Lora.Config):
        """LoRA's options (rank, alpha, dropout, targets, dora, adapter_dtype), then the 4-bit base's."""

        quant_type: str = option("nf4", "4-bit data type of the base weights", choices=QUANT_TYPES)
        double_quant: bool = option(True, "quantize the per-block scales too (bnb_4bit_use_double_quant)")
        compute_dtype: str = option(
            "bfloat16",
            "dtype the 4-bit weights are dequantized to for the matmuls",
            choices=tuple(COMPUTE_DTYPES),
        )

    def adapters(self) -> Lora:
        """The LoRA step of the same adapters (its PEFT config and call; what apply saves)."""
        names = {f.name for f in dataclasses.fields(Lora.Config)}
        return Lora(Lora.Config(**{k: v for k, v in self.options.items() if k in names}))

    @property
    def lora_spec(self) -> LoraSpec:
        return self.adapters().spec

    @property
    def nf4_spec(self) -> NF4Spec:
        c = self.config
        return NF4Spec(quant_type=c.quant_type, double_quant=c.double_quant, compute_dtype=c.compute_dtype)

    def environment_problem(self) -> str | None:
        missing = missing_libraries()
        return f"{INSTALL_HINT} ({', '.join(missing)} not installed)" if missing else None

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        from memprof.surgery.common import linears

        missing = self.environment_problem()
        if missing:
            return missing
        why = _conflict(setup, self.config.compute_dtype, earlier=True)
        if why:
            return why
        if model is not None and not linears(model):
            return f"{type(model).__name__} has no Linear layers to quantize"
        return None

    def apply(self, setup: StepSetup) -> None:
        pass  # the layers change in transform_model

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        note = quantize_4bit(
            model, self.nf4_spec
        )  # raises EnvironmentProblem first when a library is missing
        try:
            attach_lora(model, self.lora_spec, upcast=self.config.adapter_dtype == "float32")
        except ValueError as e:  # PEFT: no target module matched
            raise InputError(f"qlora: targets {self.config.targets!r}: {e}") from None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"{note}; LoRA adapters (rank {self.config.rank}, {self.config.targets}): {trainable:,} trainable parameters"

    def setup_problems(self, setup: StepSetup) -> list[str]:
        why = _conflict(setup, self.config.compute_dtype, earlier=False)
        return [why] if why else []


def _conflict(setup: StepSetup, compute_dtype: str, *, earlier: bool) -> str | None:
    """What in the setup contradicts QLoRA, in one reason (``earlier``: qlora is not yet among the steps)."""
    names = [s["name"] for s in setup.steps]
    if earlier and "qlora" in names:
        return "the base weights are already 4-bit by an earlier qlora step"
    if "lora" in names and (earlier or names.index("lora") < names.index("qlora")):
        return "LoRA adapters are already attached by the lora step (qlora attaches its own; use one of them)"
    if "glu" in names:
        return (
            "glu builds new random MLP weights; QLoRA freezes the base weights to fine-tune adapters on "
            "trained ones"
        )
    if setup.shard is not None:
        return (
            "FSDP shards parameters, but bitsandbytes keeps the 4-bit quantization state outside them "
            "(FSDP-QLoRA needs its own storage dtype and wrapping): not projected"
        )
    if setup.autocast is not None and setup.autocast != compute_dtype and compute_dtype != "float32":
        return (
            f"autocast runs in {setup.autocast} while the 4-bit layers compute in {compute_dtype}: set "
            f"qlora's compute_dtype to {setup.autocast}"
        )
    if not earlier:
        after = names[names.index("qlora") + 1 :] if "qlora" in names else []
        late = [n for n in after if n in _REWRITES_AFTER]
        if late:
            return f"{late[0]} after qlora would rewrite its 4-bit layers: put it before qlora"
    return None
