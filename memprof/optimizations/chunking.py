"""Sequence chunking for causal LMs: chunked loss (training), chunked prefill (inference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


@register
class Chunking(Optimization):
    """Process the sequence in chunks of ``size`` tokens.

    * ``form: loss`` (training): the LM head and cross-entropy run chunk by chunk,
      each checkpointed, so the ``batch x seq x vocab`` logits never exist at
      once. Same loss and gradient (up to rounding); the head runs twice.
    * ``form: prefill`` (inference): the forward (or the prefill before
      ``--decode-tokens``) feeds the chunks through the KV cache: exactly the
      unchunked result, only the last chunk's logits kept.
    * ``form: independent`` (inference): each chunk alone, without the earlier
      ones. What many tutorials show; it changes the outputs (the quality
      check measures by how much).
    """

    name = "chunking"
    summary = (
        "causal LMs: chunked LM head + loss (train), exact chunked prefill or independent chunks (infer)"
    )
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        form: str = option("loss", "what to chunk", choices=("loss", "prefill", "independent"))
        size: int = option(256, "tokens per chunk", min=1, max=1_000_000)

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        from memprof.chunked import why_not_chunkable
        from memprof.models import TASKS

        wl = setup.workload
        form, size = self.config.form, self.config.size
        if wl.mode == "distill":
            return (
                "the distillation loss compares the student's full logits with the teacher's; a chunked KD loss "
                "(torchtune's ForwardKLWithChunkedOutputLoss) is not implemented here"
            )
        if form == "loss" and wl.mode != "train":
            return "the chunked loss applies to training; use form prefill for inference"
        if form != "loss" and wl.mode != "infer":
            return f"form {form} applies to inference; use form loss for training"
        if form == "independent" and wl.decode_tokens:
            return "independent chunks cannot feed a generation (no shared KV cache)"
        if wl.task not in (None, "causal-lm"):
            return f"applies to causal LMs, not {wl.task}"
        if model is not None:
            head = type(model).__name__
            if "CausalLM" not in head and "LMHead" not in head:
                return f"applies to causal LMs, not {head} ({', '.join(t for t in TASKS if t != 'causal-lm')} differ)"
            why = why_not_chunkable(model) if form == "loss" else None
            if why:
                return why
        if size >= wl.seq_len:
            return f"a chunk of {size} tokens covers the whole sequence of {wl.seq_len}"
        return None

    def apply(self, setup: StepSetup) -> None:
        form, size = self.config.form, self.config.size
        if form == "loss":
            setup.notes.append(
                f"chunked loss ({size} tokens): the LM head and cross-entropy run chunk by chunk "
                "(torchtune's chunked cross-entropy, Liger's fused linear cross-entropy do this in a trainer)"
            )
        elif form == "independent":
            setup.notes.append(
                f"independent chunks of {size} tokens: each chunk sees only itself, so the outputs CHANGE "
                "(see the quality column); exact chunking is form: prefill"
            )

    @property
    def calls_head_directly(self) -> bool:  # type: ignore[override]
        return self.config.form == "loss"

    def loss(self, runner: StepRunner, inputs: dict[str, Any]) -> torch.Tensor | None:
        from memprof.chunked import chunked_lm_loss

        if self.config.form != "loss":
            return None
        return chunked_lm_loss(runner.model, runner.model_inputs(inputs), self.config.size)

    def forward(self, runner: StepRunner, inputs: dict[str, Any], *, keep_all_logits: bool) -> Any:
        from memprof.chunked import chunked_forward

        if self.config.form == "loss":
            return None
        return chunked_forward(
            runner.model,
            inputs,
            self.config.size,
            exact=self.config.form == "prefill",
            keep_all_logits=keep_all_logits,
        )
