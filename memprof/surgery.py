"""Model surgery: transforms that change a built model (pruning), described as plain data.

A transform is a dict (``{"kind": "prune_unstructured", "amount": 0.5}``) kept in
:attr:`memprof.workload.StepSetup.model_transforms`; :func:`apply_transform`
carries it out on a model (real or fake tensors) and returns a line for the
report with what it measured (sparsity, sizes).
"""

from __future__ import annotations

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
