"""The optimizer and its implementation: AdamW, SGD, Adafactor, 8-bit AdamW (paged or not); foreach or fused."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import OPTIMIZER_IMPLS, StepSetup

if TYPE_CHECKING:
    from memprof.engines.runner import StepRunner

# transformers TrainingArguments.optim values
_HF_OPTIM = {
    ("adamw", "fused"): "adamw_torch_fused",
    ("adamw", "auto"): "adamw_torch",
    ("adamw", "foreach"): "adamw_torch",
    ("adamw", "for-loop"): "adamw_torch",
    ("sgd", "auto"): "sgd",
    ("adafactor", "auto"): "adafactor",
    ("adamw8bit", "auto"): "adamw_bnb_8bit",
    ("paged_adamw8bit", "auto"): "paged_adamw_8bit",
}

#: the optimizer types keeping 8-bit state (one implementation each)
EIGHT_BIT = ("adamw8bit", "paged_adamw8bit")


@register
class OptimizerChoice(Optimization):
    """Choose the optimizer and how it runs.

    Memory per parameter: AdamW keeps two moments (8 bytes per float32
    parameter), SGD with momentum one, Adafactor factored second moments
    (rows + columns), 8-bit AdamW two 1-byte moments and a float32 scale per
    256-element block (bitsandbytes; tensors under 4096 elements keep float32
    moments). Paged 8-bit AdamW keeps the moments of tensors of 100k elements
    and more in CUDA unified memory (``cudaMallocManaged``), outside the caching
    allocator: the driver pages them to the GPU when the step touches them and
    evicts them to host memory under pressure. The profile counts them in
    ``host.paged_bytes``, not in the device peak. ``impl: fused`` steps all
    parameters in one kernel without the foreach path's per-step intermediates;
    ``set_to_none: false`` keeps gradient buffers allocated between steps.
    """

    name = "optimizer"
    summary = "AdamW / SGD / Adafactor / 8-bit AdamW (paged or not), foreach or fused, set_to_none"
    modes = ("train", "distill")  # distill: the student's optimizer

    @dataclass
    class Config:
        type: str = option(
            "adamw", "the optimizer", choices=("adamw", "sgd", "adafactor", "adamw8bit", "paged_adamw8bit")
        )
        impl: str = option("auto", "implementation (auto: the device's default)", choices=OPTIMIZER_IMPLS)
        set_to_none: bool = option(True, "free gradients after the step (zero_grad(set_to_none=True))")

        def problems(self) -> list[str]:
            if self.impl == "fused" and self.type not in ("adamw", "sgd"):
                return [f"impl 'fused' exists for adamw and sgd, not {self.type}"]
            if self.impl != "auto" and self.type in ("adafactor", *EIGHT_BIT):
                return [f"{self.type} has one implementation; leave impl as auto"]
            return []

    def environment_problem(self) -> str | None:
        if self.config.type in EIGHT_BIT and not _installed("bitsandbytes"):
            return f"{self.config.type} needs bitsandbytes, which is not installed: pip install bitsandbytes"
        return None

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if setup.workload.optimizer == "none":
            return "the workload has no optimizer (--optimizer none)"
        return self.environment_problem()

    def apply(self, setup: StepSetup) -> None:
        c = self.config
        setup.update_workload(optimizer=c.type)
        optim = _HF_OPTIM.get((c.type, c.impl))
        if optim:
            setup.training_args["optim"] = optim
        if c.type == "adafactor":
            setup.training_args["optim_args"] = "scale_parameter=False,relative_step=False,warmup_init=False"
        if c.type == "paged_adamw8bit":
            setup.notes.append(
                "paged 8-bit AdamW (bitsandbytes PagedAdamW8bit): the 8-bit moments of tensors of 100k elements "
                "and more live in CUDA unified memory, outside the caching allocator, and are counted in the host "
                "line's paged bytes, not in the peak. Under memory pressure the driver evicts them to host memory "
                "(the assumption here); with memory free they may stay on the GPU, beside the peak. The cpu engine "
                "runs bitsandbytes' AdamW8bit (no unified memory on a CPU: the same state, not paged) and reports "
                "the bytes that would be paged"
            )

    def host_memory(self, runner: StepRunner) -> dict[str, Any] | None:
        if self.config.type != "paged_adamw8bit":
            return None
        from memprof.engines.runner import paged_state_bytes

        return {"paged_bytes": paged_state_bytes(runner.optimizers)}

    def optimizer_settings(self, runner: StepRunner) -> dict[str, Any]:
        impl = self.config.impl
        out: dict[str, Any] = {"set_to_none": self.config.set_to_none}
        if impl == "fused":
            out["fused"] = True
        elif impl != "auto":
            out["foreach"] = impl == "foreach"
        return out


def _installed(module: str) -> bool:
    # find_spec, not import: importing these loads native libraries and logs about them
    return importlib.util.find_spec(module) is not None
