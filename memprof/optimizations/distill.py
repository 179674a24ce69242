"""The teacher side of a distillation step: no autograd, half precision, precomputed top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class DistillTeacher(Optimization):
    """Make the teacher cheaper (:mod:`memprof.distill`; the student is untouched).

    * ``no_grad`` (default): freeze the teacher and run it under
      ``torch.no_grad``: no activations kept for backward, no teacher
      gradients. Same loss, same student gradients.
    * ``dtype: bfloat16|float16``: store the teacher's weights in half
      precision: its parameters halve; its logits (and so the KL) change by the
      rounding.
    * ``topk: k``: run the teacher once offline, write its top-k logits per
      token to disk, and read them back each step: the teacher is not in
      memory during training, nor in the step's compute. The KL is then over
      the teacher's top-k renormalised: an approximation (the quality check
      measures it; it shrinks with the teacher's mass outside its top-k).
    """

    name = "distill_teacher"
    summary = (
        "distillation teacher: no_grad (no graph, no grads), half-precision weights, or offline top-k logits"
    )
    modes = ("distill",)

    @dataclass
    class Config:
        no_grad: bool = option(True, "freeze the teacher and run it under torch.no_grad")
        dtype: str = option(
            "none", "teacher weights' dtype (none: the student's)", choices=("none", "bfloat16", "float16")
        )
        topk: int = option(
            0, "teacher top-k logits per token, precomputed offline (0: off)", min=0, max=1_000_000
        )

        def problems(self) -> list[str]:
            if self.topk and not self.no_grad:
                return ["the offline top-k pass has no autograd: leave no_grad on with topk"]
            return []

    def _after(self, setup: StepSetup) -> tuple[bool, str, int]:
        c = self.config
        dtype = setup.teacher_dtype or setup.workload.dtype
        return (
            setup.teacher_no_grad or c.no_grad,
            dtype if c.dtype == "none" else c.dtype,
            c.topk or setup.teacher_topk,
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        before = (setup.teacher_no_grad, setup.teacher_dtype or setup.workload.dtype, setup.teacher_topk)
        if self._after(setup) == before:
            return "the teacher already runs this way"
        k = self.config.topk
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if k and isinstance(vocab, int) and k >= vocab:
            return f"a top-k of {k} covers the whole vocabulary of {vocab}: use the full teacher"
        return None

    def apply(self, setup: StepSetup) -> None:
        c = self.config
        setup.teacher_no_grad = setup.teacher_no_grad or c.no_grad
        if c.dtype != "none":
            setup.teacher_dtype = c.dtype
        if c.topk:
            setup.teacher_topk = c.topk
        # No TrainingArguments field: the teacher lives in the user's compute_loss.
        if c.topk:
            setup.notes.append(
                f"teacher top-{c.topk}: precompute once (teacher under torch.no_grad, logits.topk({c.topk})) "
                "and store values+indices with the dataset; the KL is over the renormalised top-k"
            )
        elif c.no_grad:
            setup.notes.append(
                "teacher without autograd: teacher.requires_grad_(False) and its forward under torch.no_grad() "
                "(no_grad rather than inference_mode: a tensor made under inference_mode cannot be saved for "
                "backward, which a loss using the logits as they come would do; the memory is the same)"
            )
