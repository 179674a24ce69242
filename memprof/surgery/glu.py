"""Gated MLPs (GLU): a plain feed-forward block replaced by a gated one at equal parameters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from memprof.choices import GLU_ACTIVATIONS
from memprof.errors import InputError
from memprof.surgery.common import set_module


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
            set_module(model, name, new)
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
        f"glu: {len(blocks):,} plain MLPs ({inner} hidden) replaced by {kind} with {act_name} "
        f"({new_inner} hidden, random "
        f"weights); MLP parameters {mlp_before:,} -> {mlp_after:,} ({(mlp_after - mlp_before) / mlp_before:+.2%})"
    )
