"""The step to measure: a training step or an inference step, and its settings.

A training step is forward, loss, backward, optimizer step and zeroing of the
gradients (``set_to_none``). It is measured in steady state: the engine runs one
warm-up step first, so the optimizer state exists as in every step of a real run
but the first. An inference step is a forward pass without autograd; for causal
LMs, ``decode_tokens > 0`` adds N decode steps on the KV cache after the prefill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from memprof.errors import InputError
from memprof.models import DTYPES, InputBuilder, call_model

MODES = ("train", "infer")
OPTIMIZERS = ("adamw", "sgd", "none")
ATTNS = ("eager", "sdpa")


@dataclass(frozen=True)
class Workload:
    """What step to run, on which shapes."""

    mode: str = "train"
    batch_size: int = 8
    seq_len: int = 512
    dtype: str = "float32"
    optimizer: str = "adamw"
    attn: str = "sdpa"
    task: str | None = None
    decode_tokens: int = 0

    def validate(self) -> None:
        """Raise InputError listing what is wrong."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.attn not in ATTNS:
            problems.append(f"attn must be one of {', '.join(ATTNS)}, got {self.attn!r}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len < 1:
            problems.append(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.decode_tokens < 0:
            problems.append(f"--decode-tokens must be 0 or more, got {self.decode_tokens}")
        if self.decode_tokens and self.mode != "infer":
            problems.append("--decode-tokens applies to --mode infer only")
        if problems:
            raise InputError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(
    name: str, model: torch.nn.Module, *, foreach: bool | None
) -> torch.optim.Optimizer | None:
    """The optimizer of a training step.

    Args:
        name: ``adamw``, ``sgd`` (momentum 0.9) or ``none``.
        model: its trainable parameters are optimized.
        foreach: the multi-tensor implementation; ``None`` lets torch choose for
            the device (the sim engine passes ``True``, CUDA's default).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "none" or not params:
        return None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class _NoPhases:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def run_step(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    workload: Workload,
    optimizer: torch.optim.Optimizer | None,
    tracker: Any = None,
    on_phase: Callable[[str], None] | None = None,
) -> None:
    """Run one step of the workload; mark its phases on the tracker when given."""
    t = tracker if tracker is not None else _NoPhases()

    def enter(name: str) -> Any:
        if on_phase is not None:
            on_phase(name)
        return t.phase(name)

    if workload.mode == "train":
        with enter("forward"):
            out = call_model(model, inputs)
            loss = InputBuilder.loss(out)
            del out
        with enter("backward"):
            loss.backward()
            del loss
        with enter("optimizer"):
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
        return
    with torch.no_grad():
        if workload.decode_tokens:
            _generate(model, inputs, workload.decode_tokens, enter)
        else:
            with enter("forward"):
                out = call_model(model, inputs)
                del out


def _generate(model: torch.nn.Module, inputs: dict[str, Any], n: int, enter: Callable[[str], Any]) -> None:
    with enter("prefill"):
        out = model(**inputs, use_cache=True)
        past = out.past_key_values
        next_ids = out.logits[:, -1:].argmax(-1)
        del out
    mask = inputs.get("attention_mask")
    with enter("decode"):
        for _ in range(n):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=next_ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1:].argmax(-1)
            del out
    del past
