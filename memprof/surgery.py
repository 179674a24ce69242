"""Model surgery: transforms that change a built model (pruning), described as plain data.

A transform is a dict (``{"kind": "prune_unstructured", "amount": 0.5}``) kept in
:attr:`memprof.workload.StepSetup.model_transforms`; :func:`apply_transform`
carries it out on a model (real or fake tensors) and returns a line for the
report with what it measured (sparsity, sizes).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.utils.prune as prune

from memprof.errors import InputError


def apply_transform(model: torch.nn.Module, spec: dict[str, Any]) -> str:
    """Carry out one transform on ``model`` in place; return what it did, measured."""
    kind = spec["kind"]
    if kind == "prune_unstructured":
        return prune_unstructured(model, spec["amount"], permanent=spec.get("permanent", True))
    if kind == "prune_ffn":
        return prune_ffn(model, spec["amount"])
    if kind == "quantize":
        return quantize(model, spec["backend"], spec.get("bits", 8))
    raise InputError(f"unknown model transform {kind!r}")


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers pruning touches: all but the output head (tied to the embeddings in many models)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def prune_unstructured(model: torch.nn.Module, amount: float, *, permanent: bool = True) -> str:
    """L1 magnitude pruning of every Linear weight (``torch.nn.utils.prune``).

    ``permanent`` folds the mask into the weight (``prune.remove``), as a saved
    checkpoint has it: zeros in a dense tensor, the same bytes. Without it the
    reparametrisation stays: ``weight_orig`` (a parameter), ``weight_mask`` (a
    buffer of the same size) and ``weight`` recomputed at every forward.
    """
    layers = _linears(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no Linear layers to prune")
    for _, m in layers:
        prune.l1_unstructured(m, "weight", amount=amount)
        if permanent:
            prune.remove(m, "weight")
    return (
        f"unstructured pruning: {amount:.0%} of the weights of {len(layers)} Linear layers set to zero; "
        + (
            "dense storage, so parameter bytes are unchanged (sparse kernels or formats are needed to save memory)"
            if permanent
            else "the reparametrisation adds a mask buffer and a recomputed weight per layer: memory goes UP"
        )
    )


def _ffn_pairs(model: torch.nn.Module) -> list[tuple[list[torch.nn.Linear], torch.nn.Linear, Any, list[str]]]:
    """(input projections, output projection, owner module, attribute paths) of each feed-forward block."""
    out: list[Any] = []
    for mod in model.modules():
        if all(
            isinstance(getattr(mod, a, None), torch.nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")
        ):
            out.append(
                ([mod.gate_proj, mod.up_proj], mod.down_proj, mod, ["gate_proj", "up_proj", "down_proj"])
            )
            continue
        inter, output = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        up = getattr(inter, "dense", None)
        down = getattr(output, "dense", None)
        if (
            isinstance(up, torch.nn.Linear)
            and isinstance(down, torch.nn.Linear)
            and up.out_features == down.in_features
        ):
            out.append(([up], down, mod, ["intermediate.dense", "output.dense"]))
    return out


def ffn_layout(model: torch.nn.Module) -> str | None:
    """Why structured FFN pruning cannot rewrite this model, or None."""
    if not _ffn_pairs(model):
        return (
            f"{type(model).__name__}: no feed-forward layout it can rewrite (Llama-style gate/up/down "
            "projections or BERT-style intermediate/output)"
        )
    if getattr(getattr(model, "config", None), "intermediate_size", None) is None:
        return f"{type(model).__name__}: its config has no intermediate_size to update"
    return None


def _shrink(layer: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear with only the ``keep`` rows (dim 0: outputs) or columns (dim 1: inputs)."""
    w = layer.weight.detach().index_select(dim, keep).clone()
    bias: torch.Tensor | None = None
    if layer.bias is not None:
        bias = layer.bias.detach()
        bias = (bias.index_select(0, keep) if dim == 0 else bias).clone()
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight = torch.nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    return new


def _set(owner: Any, path: str, value: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    target = owner
    for part in filter(None, parent.split(".")):
        target = getattr(target, part)
    setattr(target, name, value)


def prune_ffn(model: torch.nn.Module, amount: float) -> str:
    """Remove the least important ``amount`` of the feed-forward neurons of every block.

    Importance of a neuron: the L2 norm of its input-projection row(s) times the
    norm of its output-projection column. The Linear layers are rewritten at
    the new size and ``config.intermediate_size`` updated, so the checkpoint
    reloads at its new size. (On fake tensors the kept neurons are whatever
    ``topk`` returns: the memory does not depend on which.)
    """
    why = ffn_layout(model)
    if why:
        raise InputError(why)
    pairs = _ffn_pairs(model)
    before = sum(p.numel() for p in model.parameters())
    size = pairs[0][1].in_features
    k = max(1, int(round(size * (1 - amount))))
    for ups, down, owner, paths in pairs:
        with torch.no_grad():
            score = down.weight.float().norm(dim=0)
            for up in ups:
                score = score * up.weight.float().norm(dim=1)
            keep = torch.topk(score, k).indices.sort().values
        for up, path in zip(ups, paths[:-1]):
            _set(owner, path, _shrink(up, keep, 0))
        _set(owner, paths[-1], _shrink(down, keep, 1))
    model.config.intermediate_size = k  # type: ignore[union-attr]
    after = sum(p.numel() for p in model.parameters())
    return (
        f"structured FFN pruning: {len(pairs)} blocks from {size} to {k} neurons; parameters "
        f"{before:,} -> {after:,} ({(before - after) / before:.1%} fewer)"
    )


# --------------------------------------------------------------------------- quantization
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


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the warnings torchao logs on import (native kernels for other GPUs, pytree notices)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
    from memprof.errors import EnvironmentProblem

    why = quantization_problem(backend, bits)
    if why:
        raise EnvironmentProblem(why)
    layers = _linears(model)
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
    from memprof.units import format_bytes

    return (
        f"{how}: {len(layers)} Linear layers, weights {format_bytes(before)} -> {format_bytes(after)} "
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
        _set(model, name, new.to(dev))
    return "nf4 4-bit (bitsandbytes Linear4bit)" if bits == 4 else "int8 (bitsandbytes LLM.int8 Linear8bitLt)"
