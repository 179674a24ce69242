"""Pruning: unstructured, structured (feed-forward neurons, attention heads) and 2:4 semi-structured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.prune as prune

from memprof.errors import InputError
from memprof.surgery.common import linears, set_module, shrink


def prune_unstructured(model: torch.nn.Module, amount: float, *, permanent: bool = True) -> str:
    """L1 magnitude pruning of every Linear weight (``torch.nn.utils.prune``).

    ``permanent`` folds the mask into the weight (``prune.remove``), as a saved
    checkpoint has it: zeros in a dense tensor, the same bytes. Without it the
    reparametrisation stays: ``weight_orig`` (a parameter), ``weight_mask`` (a
    buffer of the same size) and ``weight`` recomputed at every forward.
    """
    layers = linears(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no Linear layers to prune")
    for _, m in layers:
        prune.l1_unstructured(m, "weight", amount=amount)
        if permanent:
            prune.remove(m, "weight")
    return (
        f"unstructured pruning: {amount:.0%} of the weights of {len(layers):,} Linear layers set to zero; "
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
    width = getattr(getattr(model, "config", None), "intermediate_size", None)
    if width is None:
        return f"{type(model).__name__}: its config has no intermediate_size to update"
    other = sorted({down.in_features for _, down, _, _ in _ffn_pairs(model)} - {width})
    if other:
        # shared experts (DeepSeek-V3, Qwen2-MoE) take their width from other config fields:
        # intermediate_size cannot describe them pruned, and the checkpoint would not reload
        return (
            f"{type(model).__name__}: feed-forward blocks {', '.join(map(str, other))} wide beside "
            f"intermediate_size {width} (shared experts): one intermediate_size cannot describe them pruned"
        )
    return None


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
            set_module(owner, path, shrink(up, keep, 0))
        set_module(owner, paths[-1], shrink(down, keep, 1))
    model.config.intermediate_size = k  # type: ignore[union-attr]
    after = sum(p.numel() for p in model.parameters())
    return (
        f"structured FFN pruning: {len(pairs):,} blocks from {size} to {k} neurons; parameters "
        f"{before:,} -> {after:,} ({before - after:,} fewer)"
    )


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
            set_module(b.owner, path, shrink(layer, keep, dim))
        set_module(b.owner, b.o, shrink(o, q_keep, 1))
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
        f"attention-head pruning: {len(blocks):,} layers from {n_kv} to {keep_n} {unit} (head size {d}); "
        f"parameters {before:,} -> {after:,} ({before - after:,} fewer)"
    )
    if zero_only:
        line = (
            f"attention-head pruning: {len(blocks):,} layers, {n_kv - keep_n} of {n_kv} heads zeroed at full "
            "size: BERT's config cannot express fewer heads (transformers sizes its attention as "
            "hidden_size), so the checkpoint computes the pruned function but is not smaller; the smaller "
            "memory holds once the heads are removed after loading (memprof.surgery.pruning.prune_heads)"
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
    layers = [(n, m) for n, m in linears(model) if m.in_features % 4 == 0]
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
    line = f"2:4 sparsity: 2 of every 4 weights zero in {len(layers):,} Linear layers"
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
