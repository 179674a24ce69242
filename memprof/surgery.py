"""Model surgery: functions that change a built model (pruning, quantization, gated MLPs).

Each carries out one change on a model (real or fake tensors) and returns a
line for the report with what it measured (sparsity, sizes). The
optimizations call them from their ``transform_model`` hook
(:mod:`memprof.optimizations.pruning`, ``quantization``, ``glu``); ``memprof
apply`` runs the same hooks on the loaded weights in the form a saved
checkpoint can hold (``StepSetup.checkpoint_form``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.prune as prune

from memprof.errors import EnvironmentProblem, InputError
from memprof.units import format_bytes


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


#: loggers that talk on import when torchao is installed (native kernels for other GPUs, pytree notices)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the warnings torchao logs on import (native kernels for other GPUs, pytree notices)."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
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


# ------------------------------------------------------------------ attention heads
@dataclass
class _Attention:
    """One attention block as pruning sees it: where its projections are and how heads map to rows."""

    owner: torch.nn.Module
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    #: the module whose head-count attributes describe the layout (BertSelfAttention, LlamaAttention)
    core: torch.nn.Module
    style: str  # "llama" (q_proj/k_proj/v_proj/o_proj, GQA) | "bert" (self.query/key/value, output.dense)

    def layer(self, path: str) -> torch.nn.Linear:
        target: Any = self.owner
        for part in path.split("."):
            target = getattr(target, part)
        return target

    @property
    def heads(self) -> tuple[int, int]:
        """(query heads, key/value heads)."""
        return self.layer(self.q).out_features // self.head_dim, self.layer(
            self.k
        ).out_features // self.head_dim


def _attention_blocks(model: torch.nn.Module) -> list[_Attention]:
    out: list[_Attention] = []
    for mod in model.modules():
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if all(isinstance(getattr(mod, a, None), torch.nn.Linear) for a in names):
            d = getattr(mod, "head_dim", None)
            if isinstance(d, int):
                out.append(_Attention(mod, *names, head_dim=d, core=mod, style="llama"))
            continue
        core = getattr(mod, "self", None)
        dense = getattr(getattr(mod, "output", None), "dense", None)
        if (
            core is not None
            and all(isinstance(getattr(core, a, None), torch.nn.Linear) for a in ("query", "key", "value"))
            and isinstance(dense, torch.nn.Linear)
            and isinstance(getattr(core, "attention_head_size", None), int)
        ):
            out.append(
                _Attention(
                    mod,
                    "self.query",
                    "self.key",
                    "self.value",
                    "output.dense",
                    head_dim=core.attention_head_size,
                    core=core,
                    style="bert",
                )
            )
    return out


def heads_layout(model: torch.nn.Module) -> str | None:
    """Why attention-head pruning cannot rewrite this model, or None."""
    blocks = _attention_blocks(model)
    name = type(model).__name__
    if not blocks:
        return (
            f"{name}: no attention layout it can rewrite (Llama-style q_proj/k_proj/v_proj/o_proj with "
            "head_dim, or BERT-style self.query/key/value with output.dense; fused projections such as "
            "GPT-2's c_attn are not split)"
        )
    if len({b.heads for b in blocks}) > 1:
        return f"{name}: its layers have different head counts ({sorted({b.heads for b in blocks})})"
    n_q, n_kv = blocks[0].heads
    if n_kv < 1 or n_q % n_kv:
        return f"{name}: {n_q} query heads do not split into groups over {n_kv} key/value heads"
    if n_kv < 2:
        return f"{name}: a single key/value group: removing it would remove the attention"
    return None


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the given units (heads or groups) of ``width`` rows each.

    Tensor arithmetic only: on fake tensors (the sim engine) the kept units have
    no values to read, and the sizes do not depend on which they are.
    """
    offsets = torch.arange(width, device=units.device)
    return (units[:, None] * width + offsets[None, :]).flatten()


def prune_heads(model: torch.nn.Module, amount: float, *, checkpoint: bool = False) -> str:
    """Remove the least important ``amount`` of the attention heads of every layer.

    With grouped-query attention the unit is a key/value group with its query
    heads, so ``num_key_value_heads`` stays a divisor of ``num_attention_heads``;
    every layer keeps the same number, as the config holds one count. Importance
    of a unit: the norm of its query/key/value rows times the norm of its
    output-projection columns.

    Llama-style models get ``num_attention_heads``, ``num_key_value_heads`` and
    ``head_dim`` in their config, so the checkpoint reloads at its new size.
    BERT's attention (transformers 5) sizes query/key/value as heads x
    (hidden_size / heads) = hidden_size and no longer re-applies
    ``config.pruned_heads`` on load: no config expresses fewer heads. In memory
    the heads are removed all the same (its forward infers the head count from
    the projection's width); with ``checkpoint`` (what ``memprof apply``
    writes) they are zeroed instead, at full size, which reloads and computes
    the pruned model's function but takes the original memory.

    Raises:
        InputError: the model's attention cannot be rewritten (:func:`heads_layout`).
    """
    why = heads_layout(model)
    if why:
        raise InputError(why)
    blocks = _attention_blocks(model)
    before = sum(p.numel() for p in model.parameters())
    d = blocks[0].head_dim
    n_q, n_kv = blocks[0].heads
    rep = n_q // n_kv
    keep_n = max(1, int(round(n_kv * (1 - amount))))
    zero_only = checkpoint and blocks[0].style == "bert"
    for b in blocks:
        q, k, v, o = (b.layer(p) for p in (b.q, b.k, b.v, b.o))
        with torch.no_grad():
            qw = q.weight.float().reshape(n_kv, rep * d, -1).flatten(1)
            kw = k.weight.float().reshape(n_kv, d, -1).flatten(1)
            vw = v.weight.float().reshape(n_kv, d, -1).flatten(1)
            ow = o.weight.float().reshape(o.out_features, n_kv, rep * d).transpose(0, 1).flatten(1)
            score = torch.cat([qw, kw, vw], dim=1).norm(dim=1) * ow.norm(dim=1)
            kept = torch.topk(score, keep_n).indices.sort().values
        q_keep, kv_keep = _rows(kept, rep * d), _rows(kept, d)
        if zero_only:
            _zero_heads(q, k, v, o, q_keep, kv_keep)
            continue
        for path, layer, keep, dim in ((b.q, q, q_keep, 0), (b.k, k, kv_keep, 0), (b.v, v, kv_keep, 0)):
            _set(b.owner, path, _shrink(layer, keep, dim))
        _set(b.owner, b.o, _shrink(o, q_keep, 1))
        if b.style == "bert":
            core: Any = b.core
            core.num_attention_heads = keep_n
            core.all_head_size = keep_n * d
    cfg = getattr(model, "config", None)
    if blocks[0].style == "llama" and cfg is not None:
        cfg.num_attention_heads = keep_n * rep
        cfg.num_key_value_heads = keep_n
        cfg.head_dim = d  # explicit: hidden_size / heads no longer gives it
    after = sum(p.numel() for p in model.parameters())
    unit = f"key/value groups of {rep} query heads" if rep > 1 else "heads"
    line = (
        f"attention-head pruning: {len(blocks)} layers from {n_kv} to {keep_n} {unit} (head size {d}); "
        f"parameters {before:,} -> {after:,} ({(before - after) / before:.1%} fewer)"
    )
    if zero_only:
        line = (
            f"attention-head pruning: {len(blocks)} layers, {n_kv - keep_n} of {n_kv} heads zeroed at full "
            "size: BERT's config cannot express fewer heads (transformers sizes its attention as "
            "hidden_size), so the checkpoint computes the pruned function but is not smaller; the smaller "
            "memory holds once the heads are removed after loading (memprof.surgery.prune_heads)"
        )
    elif blocks[0].style == "bert":
        line += (
            "; in memory only: a saved BERT checkpoint cannot hold fewer heads (memprof apply writes "
            "them zeroed, at full size)"
        )
    return line


def _zero_heads(
    q: torch.nn.Linear,
    k: torch.nn.Linear,
    v: torch.nn.Linear,
    o: torch.nn.Linear,
    q_keep: torch.Tensor,
    kv_keep: torch.Tensor,
) -> None:
    """Zero the removed heads' rows and output columns: the same function as removing them."""

    def kept(n: int, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=like.dtype, device=like.device).index_fill_(0, keep, 1)

    with torch.no_grad():
        for layer, keep in ((q, q_keep), (k, kv_keep), (v, kv_keep)):
            mask = kept(layer.out_features, keep, layer.weight)
            layer.weight.mul_(mask[:, None])
            if layer.bias is not None:
                layer.bias.mul_(mask)
        o.weight.mul_(kept(o.in_features, q_keep, o.weight)[None, :])


# ------------------------------------------------------------------ 2:4 semi-structured
#: dtypes torch's semi-structured format compresses on CUDA (int8 too, not a training dtype)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_support(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the compressed 2:4 format is not available for weights on ``device`` in ``dtype``, or None."""
    if device.type != "cuda":
        return (
            "the compressed 2:4 format (torch.sparse.to_sparse_semi_structured) needs a CUDA GPU with "
            f"compute capability >= 8.0; the weights are on {device.type}"
        )
    if torch.cuda.get_device_capability(device) < (8, 0):
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"the compressed 2:4 format needs compute capability >= 8.0, this GPU has {cc}"
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"the compressed 2:4 format takes float16 or bfloat16 weights, not {str(dtype).replace('torch.', '')}"
    return None


def sparsify_2to4(model: torch.nn.Module, *, compress: bool = False) -> str:
    """Zero the 2 smallest-magnitude weights of every 4 contiguous inputs of each Linear (2:4 sparsity).

    With ``compress`` and where torch supports it (CUDA, compute capability >=
    8.0, float16/bfloat16: :func:`semi_structured_support`) the weights are
    converted to torch's semi-structured format, which stores the kept half
    plus 2 bits of position per kept value: 9/16 (~56%) of the dense bytes.
    Elsewhere the zeros stay in dense tensors and the memory is unchanged.
    """
    layers = [(n, m) for n, m in _linears(model) if m.in_features % 4 == 0]
    if not layers:
        raise InputError(f"{type(model).__name__} has no Linear layer with inputs in groups of 4")
    for _, m in layers:
        with torch.no_grad():
            groups = m.weight.view(m.out_features, m.in_features // 4, 4)
            drop = groups.abs().topk(2, dim=-1, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
            m.weight.mul_(mask.view_as(m.weight))
    p = layers[0][1].weight
    why = (
        semi_structured_support(p.device, p.dtype)
        if compress
        else "the compressed semi-structured format is for inference steps on a CUDA GPU with compute capability >= 8.0"
    )
    line = f"2:4 sparsity: 2 of every 4 weights zero in {len(layers)} Linear layers"
    if why:
        return line + f"; dense storage, parameter bytes unchanged ({why})"
    from torch.sparse import to_sparse_semi_structured

    done = 0
    for _, m in layers:
        try:
            sparse = to_sparse_semi_structured(m.weight.detach())
        except (RuntimeError, ValueError):  # shapes below the kernels' minimum stay dense
            continue
        m.weight = torch.nn.Parameter(sparse, requires_grad=False)
        done += 1
    return line + f"; {done} of them compressed to the semi-structured format (~56% of their dense bytes)"


# ------------------------------------------------------------------ gated MLP (GLU)
class GatedMLP(torch.nn.Module):
    """``down(act(gate(x)) * up(x))``: GeGLU with a GELU, SwiGLU with SiLU (Shazeer 2020).

    Without ``down`` it returns the gated hidden state (BERT keeps its own output projection).
    """

    def __init__(
        self,
        hidden: int,
        inner: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        *,
        bias: bool,
        down: bool,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"bias": bias, "device": device, "dtype": dtype}
        self.gate = torch.nn.Linear(hidden, inner, **kw)
        self.up = torch.nn.Linear(hidden, inner, **kw)
        self.down = torch.nn.Linear(inner, hidden, **kw) if down else None
        self.act = act
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(hidden_states)) * self.up(hidden_states)
        if self.down is None:
            return h
        return self.dropout(self.down(h))


def _plain_mlps(model: torch.nn.Module) -> list[tuple[str, str, Any]]:
    """(style, name, module) of each plain (ungated) MLP: "gpt2" (c_fc/c_proj), "bert" (intermediate/output)."""
    out: list[tuple[str, str, Any]] = []
    for name, mod in model.named_modules():
        fc, proj = getattr(mod, "c_fc", None), getattr(mod, "c_proj", None)
        if fc is not None and proj is not None and hasattr(fc, "nf") and hasattr(mod, "act"):
            out.append(("gpt2", name, mod))
            continue
        inter, output = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        if isinstance(getattr(inter, "dense", None), torch.nn.Linear) and isinstance(
            getattr(output, "dense", None), torch.nn.Linear
        ):
            out.append(("bert", name, mod))
    return out


def glu_layout(model: torch.nn.Module) -> str | None:
    """Why the gated MLP cannot replace this model's MLP, or None."""
    name = type(model).__name__
    if any(isinstance(getattr(m, "gate_proj", None), torch.nn.Linear) for m in model.modules()):
        return f"{name}: its MLP is already gated (gate_proj/up_proj/down_proj)"
    if not _plain_mlps(model):
        return f"{name}: no plain MLP it can replace (GPT-2 c_fc/c_proj or BERT intermediate/output)"
    return None


def gated_inner(inner: int) -> int:
    """The gated hidden size with the parameters of a plain MLP of ``inner``: three matrices for two."""
    return max(1, int(round(inner * 2 / 3)))


GLU_ACTIVATIONS = ("model", "gelu", "silu")


def _gate_activation(activation: str, own: Any) -> Any:
    """The gate's activation: the MLP's own (``model``), torch's fused GELU, or SiLU."""
    if activation == "model":
        # the plain MLP's own implementation: the comparison then isolates the gating
        # (GPT-2's gelu_new is a chain of Python ops that saves several tensors; torch's GELU saves one)
        return copy.deepcopy(own)
    if activation not in GLU_ACTIVATIONS:
        raise InputError(f"activation must be one of {', '.join(GLU_ACTIVATIONS)}, got {activation!r}")
    return torch.nn.GELU() if activation == "gelu" else torch.nn.SiLU()


def gated_mlp(model: torch.nn.Module, activation: str) -> str:
    """Replace every plain MLP with a gated one of equal parameter count (2/3 of the hidden size).

    The new weights are freshly initialised: it is a different function, for
    models trained from a config, never a conversion of trained weights.

    Args:
        model: a GPT-2- or BERT-style model.
        activation: ``model`` (the MLP's own activation), ``gelu`` (torch's GELU) or ``silu`` (SwiGLU).

    Raises:
        InputError: no plain MLP to replace (:func:`glu_layout`).
    """
    why = glu_layout(model)
    if why:
        raise InputError(why)
    blocks = _plain_mlps(model)
    mlp_before = mlp_after = 0
    inner = new_inner = 0
    new_mods: list[torch.nn.Module]
    w: torch.Tensor
    for style, name, mod in blocks:
        if style == "gpt2":
            fc, proj = mod.c_fc, mod.c_proj
            w = fc.weight
            hidden, inner = int(w.shape[0]), int(fc.nf)
            old = [fc, proj]
            new_inner = gated_inner(inner)
            drop = getattr(getattr(mod, "dropout", None), "p", 0.0)
            act = _gate_activation(activation, mod.act)
            new = GatedMLP(
                hidden,
                new_inner,
                act,
                bias=True,
                down=True,
                dropout=drop,
                device=w.device,
                dtype=w.dtype,
            )
            # GPT2Block calls self.mlp(hidden_states): the replacement takes the same call
            _set(model, name, new)
            new_mods = [new]
        else:
            up, down = mod.intermediate.dense, mod.output.dense
            w = up.weight
            hidden, inner = up.in_features, up.out_features
            old = [up, down]
            new_inner = gated_inner(inner)
            act = _gate_activation(activation, mod.intermediate.intermediate_act_fn)
            gated = GatedMLP(
                hidden,
                new_inner,
                act,
                bias=up.bias is not None,
                down=False,
                device=w.device,
                dtype=w.dtype,
            )
            out = torch.nn.Linear(
                new_inner, hidden, bias=down.bias is not None, device=w.device, dtype=w.dtype
            )
            # BertLayer calls intermediate(x) then output(h, x): keep BertOutput's residual and LayerNorm
            mod.intermediate = gated
            mod.output.dense = out
            new_mods = [gated, out]
        mlp_before += sum(p.numel() for m in old for p in m.parameters())
        mlp_after += sum(p.numel() for m in new_mods for p in m.parameters())
        for m in new_mods:
            m.requires_grad_(w.requires_grad)
    act_name = getattr(act, "__name__", type(act).__name__)
    kind = "GeGLU" if "gelu" in act_name.lower() else "SwiGLU" if "silu" in act_name.lower() else "GLU"
    return (
        f"glu: {len(blocks)} plain MLPs ({inner} hidden) replaced by {kind} with {act_name} "
        f"({new_inner} hidden, random "
        f"weights); MLP parameters {mlp_before:,} -> {mlp_after:,} ({(mlp_after - mlp_before) / mlp_before:+.2%})"
    )
