"""What the kinds of surgery share: the Linear layers they touch, and replacing a submodule."""

from __future__ import annotations

from typing import Any

import torch


def linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers pruning touches: all but the output head (tied to the embeddings in many models)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def shrink(layer: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
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


def set_module(owner: Any, path: str, value: torch.nn.Module) -> None:
    """Put ``value`` at the dotted ``path`` under ``owner`` (replacing what is there)."""
    parent, _, name = path.rpartition(".")
    target = owner
    for part in filter(None, parent.split(".")):
        target = getattr(target, part)
    setattr(target, name, value)
