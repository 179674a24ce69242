"""LoRA adapters through PEFT: injected in place into a built model (real or on fake tensors).

PEFT does the work (``peft.inject_adapter_in_model``): the adapter layers, their
initialisation, freezing the base weights. memprof only chooses the targets and
makes PEFT's device/dtype move of the new adapters work on a model built on
fake tensors, where ``Module.to`` cannot swap parameters (torch 2.13: fake
tensors carry weak references, so ``torch.utils.swap_tensors`` refuses them).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import EnvironmentProblem

if TYPE_CHECKING:
    import torch


#: what ``targets`` may name besides a comma-separated list of module names
TARGET_PRESETS = {
    "all-linear": "every Linear layer but the output head (PEFT's all-linear)",
    "attention": "the attention projections (q, k, v, o and their fused forms)",
}
#: the attention projections' names across families (Llama, GPT-2, BERT, T5, Falcon, Phi, MPT...)
ATTENTION_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "c_attn",
    "query",
    "key",
    "value",
    "q",
    "k",
    "v",
    "o",
    "query_key_value",
    "Wqkv",
    "out_proj",
)

INSTALL_HINT = "LoRA needs PEFT: pip install 'memprof[lora]' (or pip install peft)"


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape: rank, scaling, dropout, targets, DoRA."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all-linear"
    dora: bool = False

    def target_modules(self, model: torch.nn.Module) -> str | list[str]:
        """PEFT's ``target_modules`` for this model (``all-linear`` is PEFT's own preset)."""
        if self.targets == "all-linear":
            return "all-linear"
        if self.targets == "attention":
            present = {name.rpartition(".")[2] for name, _ in adaptable_layers(model)}
            return [n for n in ATTENTION_NAMES if n in present]
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def peft_config(self, model: torch.nn.Module) -> Any:
        """The ``peft.LoraConfig`` of this spec for ``model``."""
        from memprof.surgery.quantization import quiet_imports

        require_peft()
        with quiet_imports():  # PEFT imports bitsandbytes and torchao where installed
            from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # typed int by PEFT; a float scales as well
            lora_dropout=self.dropout,
            target_modules=self.target_modules(model),
            use_dora=self.dora,
        )


def adaptable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers LoRA can adapt: Linear and transformers' Conv1D (GPT-2), but the output head."""
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (torch.nn.Linear, Conv1D)
    except ImportError:  # a plain-torch model without transformers
        pass
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [
        (n, m) for n, m in model.named_modules() if any(isinstance(m, k) for k in kinds) and m is not head
    ]


def peft_installed() -> bool:
    """Whether PEFT can be imported (found without importing it)."""
    return importlib.util.find_spec("peft") is not None


def require_peft() -> None:
    """EnvironmentProblem with the install hint when PEFT is missing."""
    if not peft_installed():
        raise EnvironmentProblem(INSTALL_HINT)


def attach_lora(model: torch.nn.Module, spec: LoraSpec, *, upcast: bool = True) -> Any:
    """Inject LoRA adapters into ``model`` in place (base weights frozen); PEFT's LoraConfig used.

    As ``peft.get_peft_model`` (``autocast_adapter_dtype=True``, its default): with
    ``upcast``, adapters of a float16/bfloat16 model are kept in float32 (and PEFT
    casts each adapted layer's input to float32 for them).

    Raises:
        EnvironmentProblem: PEFT is not installed.
        ValueError: PEFT found no target module (the caller words it).
    """
    config = spec.peft_config(model)
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    with fake_safe_module_apply():
        inject_adapter_in_model(config, model)
        cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=upcast)
    return config


def _is_fake(t: torch.Tensor | None) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def fake_safe_module_apply() -> Iterator[None]:
    """``Module.to``/``_apply`` on modules holding fake tensors: replace parameters instead of swapping them.

    Modules without fake tensors take torch's own path.
    """
    import torch

    original = torch.nn.Module._apply

    def _apply(self: torch.nn.Module, fn: Any, recurse: bool = True) -> torch.nn.Module:
        own = [*self._parameters.values(), *self._buffers.values()]
        if not any(_is_fake(t) for t in own):
            if recurse:
                for child in self.children():
                    child._apply(fn)
            return original(self, fn, recurse=False)
        if recurse:
            for child in self.children():
                child._apply(fn)
        for key, param in self._parameters.items():
            if param is None:
                continue
            with torch.no_grad():
                new = fn(param)
            if new is not param:
                self._parameters[key] = torch.nn.Parameter(new, requires_grad=param.requires_grad)
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
        return self

    torch.nn.Module._apply = _apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module._apply = original  # type: ignore[method-assign]
