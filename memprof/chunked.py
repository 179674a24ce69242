"""Sequence chunking for causal LMs: chunked loss, exact chunked prefill, independent chunks.

* :func:`chunked_lm_loss`: the LM head and cross-entropy over sequence chunks,
  each chunk checkpointed, so the ``batch x seq x vocab`` logits (and their
  float32 copy) never exist at once; the loss and its gradient equal the
  unchunked ones up to rounding (the idea behind torchtune's chunked
  cross-entropy and Liger's fused linear cross-entropy).
* :func:`chunked_forward` with ``exact=True``: prefill in chunks through the
  KV cache, each chunk attending to everything before it: the same result as
  the unchunked forward, with per-chunk intermediates.
* :func:`chunked_forward` with ``exact=False``: independent chunks, each seeing
  only itself (what many tutorials show). It changes the outputs; the report
  says so and the quality check measures by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def why_not_chunkable(model: Any) -> str | None:
    """Why the chunked loss cannot reproduce this model's loss, or None."""
    if model is None:
        return None
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no LM head to chunk"
    if _base(model) is None:
        return f"{type(model).__name__}: no base model to run without its head"
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"the model post-processes its logits ({attr}); the chunked loss would not reproduce it"
    return None


def _base(model: Any) -> Any:
    base = getattr(model, "model", None)
    if isinstance(base, torch.nn.Module):
        return base
    get = getattr(model, "get_decoder", None)
    return get() if get is not None else None


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # contiguous inside the checkpointed function (recomputed, not kept): a strided slice
    # makes matmul choose between folding and a batched product by what requires grad, and
    # with a frozen head (LoRA) and saved-tensor hooks around the step (activation offload)
    # the recomputation took the other path than the forward (a CheckpointError on fake tensors)
    logits = head(h.contiguous()).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(model: Any, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
    """Causal-LM loss with the head and cross-entropy computed ``chunk`` tokens at a time."""
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = _base(model)(**kwargs).last_hidden_state
    head = model.get_output_embeddings()
    h, y = hidden[:, :-1], labels[:, 1:]
    count = (y != IGNORE_INDEX).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[1], chunk):
        # Checkpointed: the chunk's logits are recomputed in backward instead of kept.
        total = total + checkpoint(
            _chunk_ce, head, h[:, s : s + chunk], y[:, s : s + chunk], use_reentrant=False
        )
    return total / count


def cache_keyword(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns
    "deprecated and will be removed in 5.40" on every call); older versions
    know only ``past_key_values``.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, by the output's own field name (``cache`` or ``past_key_values``)."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    # reading .past_key_values where the field is .cache works, with a deprecation warning
    return out.cache if "cache" in fields else out.past_key_values


@dataclass
class ChunkedOutput:
    """What :func:`chunked_forward` returns: logits (all, or the last chunk's) and the cache."""

    logits: torch.Tensor
    cache: Any


def chunked_forward(
    model: Any, inputs: dict[str, Any], chunk: int, *, exact: bool, keep_all_logits: bool = False
) -> ChunkedOutput:
    """Run a causal LM over ``input_ids`` in chunks of ``chunk`` tokens.

    Args:
        exact: chunks extend the KV cache (chunked prefill: equals the full forward);
            otherwise each chunk runs alone (changes the outputs).
        keep_all_logits: concatenate every chunk's logits (the quality check);
            otherwise only the last chunk's are kept, which is what a prefill needs.
    """
    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels", "use_cache")}
    cache_kw = cache_keyword(model)
    past = None
    kept: list[torch.Tensor] = []
    out = None
    for s in range(0, ids.shape[1], chunk):
        out = model(
            input_ids=ids[:, s : s + chunk], use_cache=exact, **{cache_kw: past if exact else None}, **rest
        )
        past = output_cache(out) if exact else None
        if keep_all_logits:
            kept.append(out.logits)
        else:
            kept = [out.logits]
        del out
    logits = torch.cat(kept, dim=1) if len(kept) > 1 else kept[0]
    return ChunkedOutput(logits, past)
