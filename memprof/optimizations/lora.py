"""LoRA: train low-rank adapters beside frozen base weights (PEFT)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import InputError
from memprof.optimizations.registry import Optimization, for_setup, option, register
from memprof.surgery.lora import (
    INSTALL_HINT,
    TARGET_PRESETS,
    LoraSpec,
    adaptable_layers,
    attach_lora,
    peft_installed,
)
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch

#: a module name in ``targets``: PEFT matches it against the end of each module's dotted path
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
#: the other optimizations that attach adapters (one adapter set per step)
ADAPTER_STEPS = ("lora", "qlora")


def target_names(targets: str) -> list[str]:
    """The module names of a ``targets`` list (commas; ``+`` or spaces where commas cannot go, as in ``--step``)."""
    return [t for t in re.split(r"[,+\s]+", targets) if t]


@register
class Lora(Optimization):
    """Freeze the model and train rank-``rank`` adapters ``B @ A`` beside the targeted layers.

    PEFT builds the adapters (``peft.inject_adapter_in_model``, as
    ``get_peft_model`` does, adapters of a bfloat16 model kept in float32 unless
    ``adapter_dtype: model``; the float32 adapters then get a float32 copy of each
    adapted layer's input, saved for backward: more activations, measured). The
    base weights stop needing gradients and optimizer state: those shrink to
    the adapters' size (about 1% of a Llama's parameters at rank 16 on all-linear). The
    activations stay: the frozen layers' inputs are still saved for the
    adapters' gradients and to carry the gradient to the earlier layers.
    ``memprof apply`` writes the unchanged base checkpoint with the initialised
    adapter (``adapter_config.json``, ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads.
    """

    name = "lora"
    summary = "frozen base weights + low-rank adapters (PEFT): gradients and optimizer state shrink to the adapters'"
    modes = ("train",)
    rewrites_model = True

    @dataclass
    class Config:
        rank: int = option(16, "adapter rank r (at least 1)")
        alpha: float = option(32.0, "scaling numerator: the update is (alpha / rank) B @ A (above 0)")
        dropout: float = option(0.0, "dropout on the adapters' input (0 <= dropout < 1)")
        targets: str = option(
            "all-linear",
            "all-linear (every Linear but the output head), attention (the attention projections), or "
            "module names separated by commas (+ in a --step option)",
        )
        dora: bool = option(False, "DoRA: a trained magnitude vector per output feature besides B @ A")
        adapter_dtype: str = option(
            "float32",
            "float32: a bfloat16/float16 model's adapters upcast, get_peft_model's default (each adapted "
            "layer's input is cast to float32 for them); model: the model's dtype (autocast_adapter_dtype=False)",
            choices=("float32", "model"),
        )

        def problems(self) -> list[str]:
            problems = []
            if self.rank < 1:
                problems.append(f"option 'rank' must be at least 1, got {self.rank}")
            if not self.alpha > 0:
                problems.append(f"option 'alpha' must be above 0, got {self.alpha}")
            if not 0 <= self.dropout < 1:
                problems.append(f"option 'dropout' must be at least 0 and below 1, got {self.dropout}")
            if self.targets not in TARGET_PRESETS:
                names = target_names(self.targets)
                bad = [n for n in names if not _NAME.match(n)]
                if not names:
                    problems.append("option 'targets' is empty: give all-linear, attention or module names")
                elif bad:
                    problems.append(
                        f"option 'targets': {', '.join(map(repr, bad))} is not a module name "
                        f"(use {', '.join(TARGET_PRESETS)} or names like q_proj,v_proj)"
                    )
            return problems

    def environment_problem(self) -> str | None:
        # checked where the step is named (a recipe, --step, plan --peft), before anything is built
        return None if peft_installed() else INSTALL_HINT

    @property
    def spec(self) -> LoraSpec:
        c = self.config
        targets = c.targets if c.targets in TARGET_PRESETS else ",".join(target_names(c.targets))
        return LoraSpec(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=targets, dora=c.dora)

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        problem = self.environment_problem()
        if problem:
            return problem
        for name in ADAPTER_STEPS:
            if setup.has_step(name):
                return f"the model already has adapters ({name}, an earlier step)"
        if setup.workload.optimizer == "none":
            return "the workload has no optimizer (--optimizer none): nothing would train the adapters"
        if model is None:
            return None
        layers = [n for n, _ in adaptable_layers(model)]
        if not layers:
            return f"{type(model).__name__} has no Linear layer to adapt"
        present = sorted({n.rpartition(".")[2] for n in layers})
        targets = self.config.targets
        if targets == "attention":
            if not self.spec.target_modules(model):
                return (
                    f"{type(model).__name__} has no attention projection LoRA knows by name; its Linear "
                    f"layers: {', '.join(present)} (name them in 'targets')"
                )
        elif targets != "all-linear":
            missing = [t for t in target_names(targets) if not any(_matches(n, t) for n in layers)]
            if missing:
                return (
                    f"{type(model).__name__} has no Linear layer named {', '.join(missing)}; "
                    f"its Linear layers: {', '.join(present)}"
                )
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.notes.append(
            f"LoRA: {self.peft_call()} on the model before training (no TrainingArguments field); "
            "the base weights are frozen, only the adapters get gradients and optimizer state"
        )

    def peft_call(self) -> str:
        """The PEFT call that builds this step's adapters, as code."""
        c = self.config
        listed: Any = c.targets if c.targets in TARGET_PRESETS else target_names(c.targets)
        # no square brackets: the terminal report reads them as markup
        targets = "<the attention projections' names>" if listed == "attention" else repr(listed)
        return (
            f"peft.get_peft_model(model, LoraConfig(r={c.rank}, lora_alpha={c.alpha:g}, "
            f"lora_dropout={c.dropout:g}, target_modules={targets}"
            + (", use_dora=True" if c.dora else "")
            + ")"
            + (", autocast_adapter_dtype=False" if c.adapter_dtype == "model" else "")
            + ")"
        )

    def peft_config(self, model: torch.nn.Module) -> Any:
        """PEFT's ``LoraConfig`` of this step for ``model`` (``attention`` resolved to its names)."""
        return self.spec.peft_config(model)

    def setup_problems(self, setup: StepSetup) -> list[str]:
        problems = []
        names = [s["name"] for s in setup.steps]
        if self.name in names:
            later = names[names.index(self.name) + 1 :]
            rewrites = [o.name for o in for_setup(setup) if o.rewrites_model and o.name in later]
            for name in rewrites:
                problems.append(
                    f"{name} rewrites layers after lora attached its adapters: list it before lora "
                    "(the adapters then wrap the rewritten layers)"
                )
        if sum(n in ADAPTER_STEPS for n in names) > 1:
            problems.append("one adapter method per step: lora and qlora both attach adapters")
        return problems

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        try:
            attach_lora(model, self.spec, upcast=self.config.adapter_dtype == "float32")
        except ValueError as e:  # PEFT refuses the targets (Mamba's out_proj and conv1d under all-linear)
            raise InputError(f"lora: targets {self.config.targets!r}: {e}") from None
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        total = sum(p.numel() for p in model.parameters())
        return (
            f"LoRA rank {self.config.rank} on {self.config.targets}"
            + (" (DoRA)" if self.config.dora else "")
            + f": {adapters:,} adapter parameters of {total:,}; the rest frozen"
        )


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a listed target: the module's path is the name or ends with ``.name``."""
    return module_name == target or module_name.endswith("." + target)
