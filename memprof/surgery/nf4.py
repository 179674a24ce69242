"""4-bit base weights for QLoRA: Linear layers replaced by bitsandbytes' ``Linear4bit``, in its own layout.

bitsandbytes does the quantization on both kinds of model, so the bytes are its own:

* a real model: ``Params4bit(...).to(device)`` quantizes each weight as
  ``from_pretrained(load_in_4bit=True)`` does (on CUDA, or bitsandbytes' CPU backend);
* a fake-tensor model (the sim engine): ``bitsandbytes.functional.quantize_4bit``
  runs under the fake mode and gives the packed weight (uint8, ``[n/2, 1]``) and
  its ``QuantState`` (absmax per 64-value block, uint8 when double-quantized with
  its own float32 absmax per 256 blocks, the code tables, the offset) as fake
  tensors of bitsandbytes' own shapes. ``Params4bit`` cannot wrap a fake tensor,
  so the packed weight is installed as a frozen parameter carrying the attributes
  ``Linear4bit.forward`` and PEFT's 4-bit LoRA layer read (``quant_state``,
  ``quant_type``, ``compress_statistics``...).

The output head is not quantized (transformers' bitsandbytes quantizer skips it).
The quantization state lives outside the parameters: :func:`quant_state_tensors`
lists it, for the tracker (it counts as frozen parameters) and for checks.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import EnvironmentProblem, InputError

if TYPE_CHECKING:
    import torch


INSTALL_HINT = "QLoRA needs bitsandbytes and PEFT: pip install 'memprof[qlora]'"
QUANT_TYPES = ("nf4", "fp4")
#: the compute dtypes, by name (torch's dtypes are looked up where used: the names need no torch)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
#: bitsandbytes' block size for 4-bit weights (Params4bit's and transformers' default)
BLOCKSIZE = 64


@dataclass(frozen=True)
class NF4Spec:
    """How the base weights are stored: the 4-bit data type, double quantization, the compute dtype."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


def missing_libraries() -> list[str]:
    """The libraries QLoRA needs that cannot be imported here (found without importing them)."""
    return [m for m in ("bitsandbytes", "peft") if importlib.util.find_spec(m) is None]


def require_bnb() -> None:
    """EnvironmentProblem with the install hint when bitsandbytes or PEFT is missing."""
    missing = missing_libraries()
    if missing:
        raise EnvironmentProblem(f"{INSTALL_HINT} ({', '.join(missing)} not installed)")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def quantize_4bit(model: torch.nn.Module, spec: NF4Spec) -> str:
    """Replace every Linear layer but the output head with ``bnb.nn.Linear4bit`` (frozen 4-bit weights), in place.

    Returns:
        A note: the layout and how many layers (their bytes are the profile's).

    Raises:
        EnvironmentProblem: bitsandbytes or PEFT is missing.
        InputError: the model has no Linear layer to quantize, or a weight's dtype
            bitsandbytes cannot quantize.
    """
    from memprof.surgery.common import linears, set_module
    from memprof.surgery.quantization import quiet_imports

    require_bnb()
    with quiet_imports():
        import bitsandbytes as bnb

    kept = not_converted(model)
    layers = [(n, lin) for n, lin in linears(model) if n not in kept]
    if not layers:
        raise InputError(f"{type(model).__name__} has no Linear layers to quantize")
    fake = any(_is_fake(lin.weight) for _, lin in layers)
    if fake:
        _prepare_fake(bnb)
    for name, lin in layers:
        new = _quantized_fake(bnb, lin, spec) if fake else _quantized_real(bnb, lin, spec)
        set_module(model, name, new)
    # PEFT dispatches its 4-bit LoRA layer on this flag (set by transformers' bitsandbytes loading)
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    double = ", double-quantized scales" if spec.double_quant else ""
    others = sorted({n.rpartition(".")[2] for n in kept} - {""})
    unconverted = f" (nor {', '.join(others)}, which transformers keeps in full precision)" if others else ""
    # only counts in the note: the bytes are the profile's (the parameters line, the categories),
    # and a count extends with the depth where bytes rounded for reading do not (memprof.engines.depth)
    return (
        f"{spec.quant_type} 4-bit base weights (bitsandbytes Linear4bit{double}, compute in "
        f"{spec.compute_dtype}): {len(layers):,} Linear layers; the output head is not quantized{unconverted}"
    )


def not_converted(model: torch.nn.Module) -> set[str]:
    """The Linear layers transformers' bitsandbytes quantizer leaves unquantized, by name.

    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
    skips the output head (and tied weights) and the modules a model keeps in full
    precision (``_keep_in_fp32_modules``: T5's ``wo``, whose forward casts its input to
    ``wo``'s weight dtype). The same rule here, from transformers' own functions; the
    output head alone where they are missing. Returns the names of Linear layers only.
    """
    from memprof.surgery.common import linears

    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # pragma: no cover - a transformers without them: the head alone
        return set()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # a module:factory model: its output head alone
        return set()
    keep = model._keep_in_fp32_modules
    patterns = HfQuantizer.get_modules_to_not_convert(model, None, list(keep) if keep else None)
    return {n for n, _ in linears(model) if not should_convert_module(n, patterns)}


def _quantized_real(bnb: Any, lin: torch.nn.Linear, spec: NF4Spec) -> torch.nn.Module:
    import torch

    w = lin.weight.detach()
    if w.dtype not in [getattr(torch, n) for n in COMPUTE_DTYPES]:
        raise InputError(f"bitsandbytes quantizes 16/32-bit float weights, not {w.dtype}")
    new = _empty_linear4bit(bnb, lin, spec)
    # Params4bit quantizes when moved to a device (bitsandbytes' own path, as from_pretrained's)
    new.weight = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
        module=new,
    ).to(w.device)
    _keep_bias(new, lin)
    return new


def _prepare_fake(bnb: Any) -> None:
    """Build bitsandbytes' 8-bit code table for the double quantization outside the fake mode.

    ``quantize_blockwise`` builds it lazily (``create_dynamic_map``), with ops that
    read values; built on the host first, it is the same table bitsandbytes caches.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    F = bnb.functional
    if "dynamic" not in F.name2qmap:
        with unset_fake_temporarily():
            F.name2qmap["dynamic"] = F.create_dynamic_map()


def _quantized_fake(bnb: Any, lin: torch.nn.Linear, spec: NF4Spec) -> torch.nn.Module:
    import torch

    w = lin.weight.detach()
    if w.dtype not in [getattr(torch, n) for n in COMPUTE_DTYPES]:
        raise InputError(f"bitsandbytes quantizes 16/32-bit float weights, not {w.dtype}")
    with torch.no_grad():
        packed, state = bnb.functional.quantize_4bit(
            w.contiguous(),
            blocksize=BLOCKSIZE,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
        )
    new = _empty_linear4bit(bnb, lin, spec)
    # nn.Parameter of a fake tensor is the fake tensor itself, marked as a parameter;
    # its class and attributes are those of a quantized Params4bit
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.__class__ = _fake_params4bit_class()
    weight.quant_state = state  # type: ignore[attr-defined]
    weight.blocksize = BLOCKSIZE  # type: ignore[attr-defined]
    weight.compress_statistics = spec.double_quant  # type: ignore[attr-defined]
    weight.quant_type = spec.quant_type  # type: ignore[attr-defined]
    weight.quant_storage = torch.uint8  # type: ignore[attr-defined]
    weight.bnb_quantized = True  # type: ignore[attr-defined]
    weight.module = new  # type: ignore[attr-defined]
    new.weight = weight
    new.quant_state = state
    _keep_bias(new, lin)
    return new


_FAKE_PARAMS4BIT: type | None = None


def _fake_params4bit_class() -> type:
    """A FakeTensor subclass named ``Params4bit``: the fake packed weight, as PEFT recognises bitsandbytes'.

    PEFT finds 4-bit weights by their class name (``dequantize_bnb_weight``, used by
    DoRA's weight norm and by merging); bitsandbytes' own ``Params4bit`` cannot wrap a
    fake tensor. The subclass adds nothing: fake-tensor dispatch is unchanged.
    """
    import torch

    global _FAKE_PARAMS4BIT
    if _FAKE_PARAMS4BIT is None:
        from torch._subclasses.fake_tensor import FakeTensor

        def __deepcopy__(self: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
            # PEFT deep-copies a Linear4bit before DoRA's weight norm (as for a real one: a copy)
            new: torch.Tensor = torch.nn.Parameter(self.detach().clone(), requires_grad=self.requires_grad)
            memo[id(self)] = new
            new.__class__ = type(self)
            with warnings.catch_warnings():  # torch's FakeTensor deepcopy reads a (fake) data pointer
                warnings.simplefilter("ignore", UserWarning)
                new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return new

        _FAKE_PARAMS4BIT = type(
            "Params4bit", (FakeTensor,), {"__module__": __name__, "__deepcopy__": __deepcopy__}
        )
    return _FAKE_PARAMS4BIT


def _empty_linear4bit(bnb: Any, lin: torch.nn.Linear, spec: NF4Spec) -> torch.nn.Module:
    """A Linear4bit of the layer's shape, its placeholder weight on the meta device (no memory)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # built outside any fake mode: Params4bit cannot wrap a fake tensor
    with unset_fake_temporarily():
        new = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=False,
            compute_dtype=getattr(torch, spec.compute_dtype),
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
    new.train(lin.training)
    # On a CPU with AVX512-BF16, an eval-mode forward without gradients repacks the weight
    # in place for bitsandbytes' CPU gemv (another layout, no autograd): keep CUDA's layout
    new.support_avx512bf16_for_cpu = False
    return new


def _keep_bias(new: torch.nn.Module, lin: torch.nn.Linear) -> None:
    import torch

    if lin.bias is not None:
        new.bias = torch.nn.Parameter(lin.bias.detach(), requires_grad=False)


def quant_state_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit layer's quantization state (absmax, codes, offset, nested absmax).

    Any module: layers without a ``quant_state`` on their weight yield nothing.
    A table shared by several layers (the double quantization's code) is yielded
    by each; callers that count bytes count each storage once.
    """
    import torch

    state = getattr(getattr(module, "weight", None), "quant_state", None)
    while state is not None:
        for attr in ("absmax", "code", "offset"):
            t = getattr(state, attr, None)
            if isinstance(t, torch.Tensor):
                yield t
        state = getattr(state, "state2", None)


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' storages, each storage once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        key = id(st) if _is_fake(t) else st.data_ptr()
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def layout_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and its 4-bit quantization state, each storage once."""
    return unique_bytes([*model.parameters(), *(t for m in model.modules() for t in quant_state_tensors(m))])
