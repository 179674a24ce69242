"""Tensor helpers of the tracker: wrapper subclasses (their memory is in inner tensors), optional ops."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch


def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass made of inner tensors (torchao's quantized weights, DTensor...).

    Its own storage is a placeholder of the logical (dense) size; the memory is
    in the inner tensors, which are counted instead.
    """
    return _wrapper_type(type(t))


@cache
def _wrapper_type(cls: type) -> bool:
    # per type, not per tensor: the tracker asks for every op's output
    return hasattr(cls, "__tensor_flatten__")


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return [v for v in (getattr(t, n) for n in names) if isinstance(v, torch.Tensor)]


def _op(namespace: str, name: str) -> Any:
    """``torch.ops.<namespace>.<name>.default``, or None where this build lacks it."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
