"""Weight quantization of the Linear layers: torchao, torch.ao or bitsandbytes."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memprof.errors import EnvironmentProblem, InputError
from memprof.surgery.common import linears, set_module
from memprof.units import format_bytes

QUANT_BACKENDS = ("torchao", "torch.ao", "bitsandbytes")


def quant_backend(backend: str, bits: int) -> str:
    """The backend ``auto`` stands for: torchao where installed, else torch.ao (8-bit) or bitsandbytes (4-bit)."""
    if backend != "auto":
        return backend
    if bits == 4:
        return "bitsandbytes"
    return "torchao" if _installed("torchao") else "torch.ao"


def _installed(module: str) -> bool:
    # find_spec, not import: importing torchao loads native libraries and logs about them
    import importlib.util

    return importlib.util.find_spec(module) is not None


#: loggers that talk on import when torchao or bitsandbytes is installed (native kernels for other
#: GPUs, pytree notices, bitsandbytes' optional Hub kernels)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Import optional libraries (bitsandbytes, torchao, PEFT) quietly, and without compiling.

    The warnings torchao logs on import (native kernels for other GPUs, pytree notices)
    are silenced. ``torch.compile`` of a function is deferred to the function's first
    call (:func:`_compile_on_first_call`): bitsandbytes wraps its CPU kernels in
    ``torch.compile`` at import, which imports TorchInductor (1.0 s of a 1.6 s import
    here) for kernels a sim run never calls. ``torch.compile`` compiles nothing before
    that first call either; only the import moves.
    """
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    compile_ = torch.compile
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        torch.compile = _compile_on_first_call(compile_)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.compile = compile_
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _compile_on_first_call(compile_: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` that compiles a function when it is first called (a module: at once).

    Used as ``torch.compile(fn, **options)`` or as a decorator (``torch.compile(**options)``).
    """

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:
            return lambda fn: deferred(fn, **options)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return compile_(model, **options)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred


def quantization_problem(backend: str, bits: int) -> str | None:
    """Why this quantization cannot run here (library, hardware), or None."""
    if backend == "bitsandbytes":
        if not _installed("bitsandbytes"):
            return "bitsandbytes is not installed (pip install bitsandbytes; it needs a CUDA GPU)"
        if not torch.cuda.is_available():
            return "bitsandbytes 8/4-bit kernels need a CUDA GPU (run with --engine cuda on one)"
        return None
    if bits != 8:
        return (
            f"{backend}: memprof measures 8-bit weight-only quantization with it; 4-bit is bitsandbytes (GPU)"
        )
    if backend == "torchao" and not _installed("torchao"):
        return "torchao is not installed (pip install torchao)"
    return None


def weight_bytes(model: torch.nn.Module, names: set[str] | None = None) -> int:
    """Bytes of the Linear layers' weights (those named, or all), counting a quantized weight's inner tensors."""
    total = 0
    for name, m in model.named_modules():
        if names is not None and name not in names:
            continue
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and isinstance(w, torch.Tensor):
            total += _tensor_bytes(w)
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            total += _tensor_bytes(packed._weight_bias()[0])
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(_tensor_bytes(v) for v in (getattr(t, n) for n in names) if isinstance(v, torch.Tensor))
    return t.numel() * t.element_size()


def _is_fake(model: torch.nn.Module) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(p, FakeTensor) for p in model.parameters())


def quantize(model: torch.nn.Module, backend: str, bits: int = 8) -> str:
    """Weight-only quantization of every Linear layer but the output head, in place.

    * ``torchao``: ``Int8WeightOnlyConfig`` (per-channel int8 weights and a
      scale per output row); each call converts the weight to the activation
      dtype for the matmul, a transient copy the tracker sees.
    * ``torch.ao``: ``quantize_dynamic`` (int8 weights packed for the CPU
      kernels, activations quantized on the fly); real CPU tensors only.
    * ``bitsandbytes``: ``Linear8bitLt`` / ``Linear4bit`` (nf4), on a CUDA GPU.

    The output head stays as it is (transformers does the same: it is often
    tied to the input embeddings).

    Raises:
        EnvironmentProblem: the backend's library or hardware is missing.
        InputError: the backend cannot run on these tensors (torch.ao on fake tensors).
    """
    why = quantization_problem(backend, bits)
    if why:
        raise EnvironmentProblem(why)
    layers = linears(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no Linear layers to quantize")
    names = {n for n, _ in layers}
    before = weight_bytes(model, names)
    if backend == "torchao":
        with quiet_imports():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
        how = "int8 weight-only (torchao Int8WeightOnlyConfig)"
    elif backend == "torch.ao":
        if _is_fake(model):
            raise InputError(
                "torch.ao dynamic quantization packs weights for CPU kernels, which fake tensors cannot "
                "trace: use the cpu engine, or install torchao"
            )
        if next(model.parameters()).device.type != "cpu":
            raise InputError("torch.ao dynamic quantization runs on the CPU only")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {n: default_dynamic_qconfig for n in names}, inplace=True)
        how = "dynamic int8 (torch.ao quantize_dynamic: int8 weights, activations quantized per call)"
    elif backend == "bitsandbytes":
        how = _quantize_bnb(model, layers, bits)
    else:
        raise InputError(f"unknown quantization backend {backend!r}; use one of: {', '.join(QUANT_BACKENDS)}")
    after = weight_bytes(model, names)
    return (
        f"{how}: {len(layers):,} Linear layers, weights {format_bytes(before)} -> {format_bytes(after)} "
        f"({after / before:.1%} of before); the output head is not quantized"
    )


def _quantize_bnb(model: torch.nn.Module, layers: list[tuple[str, torch.nn.Linear]], bits: int) -> str:
    """Swap Linear layers for bitsandbytes' (the weights quantize when moved to the GPU)."""
    import bitsandbytes as bnb

    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise InputError("bitsandbytes quantization runs on a CUDA device (the cuda engine)")
    for name, lin in layers:
        if bits == 4:
            new: torch.nn.Module = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=lin.weight.dtype,
                quant_type="nf4",
            )
            new.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False
            )
            new.weight = bnb.nn.Int8Params(lin.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data.cpu(), requires_grad=False)
        set_module(model, name, new.to(dev))
    return "nf4 4-bit (bitsandbytes Linear4bit)" if bits == 4 else "int8 (bitsandbytes LLM.int8 Linear8bitLt)"
