"""The teacher side of a distillation step: no autograd, half precision, precomputed top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.units import format_bytes
from memprof.workload import StepSetup, split_batch

if TYPE_CHECKING:
    import torch

    from memprof.distill_loss import TopkTeacher
    from memprof.engines.runner import StepRunner


@register
class DistillTeacher(Optimization):
    """Make the teacher cheaper (:mod:`memprof.distill_loss`; the student is untouched).

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

    # The hooks read the setup's teacher settings: distill_teacher steps stack
    # (apply merges them), and every instance sees the merged result.
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._topk: TopkTeacher | None = None

    def attach_teacher(
        self, runner: StepRunner, teacher: torch.nn.Module, inputs: dict[str, Any], task: str | None
    ) -> tuple[torch.nn.Module, str] | None:
        from memprof.distill_loss import TopkTeacher

        s = runner.setup
        if not (s.teacher_no_grad or s.teacher_topk):
            return None  # only the dtype changed: the teacher runs as loaded
        teacher.requires_grad_(False)
        if not s.teacher_topk:
            return teacher, "teacher: forward after the student's, under torch.no_grad, parameters frozen"
        parts = split_batch(inputs, s.micro_batches, s.workload.batch_size)
        with runner.contexts("teacher_pass"):
            self._topk = TopkTeacher.write(
                teacher,
                parts,
                s.teacher_topk,
                task=task,
                device=next(runner.model.parameters()).device,
                simulate=runner.env.simulate_cuda,
            )
        note = (
            f"teacher: top-{self._topk.k} logits per token precomputed in one offline pass (not measured), "
            f"{format_bytes(self._topk.stored_bytes())} on disk, read back each step; the KL is over the "
            "teacher's top-k renormalised (an approximation)"
        )
        return self._topk, note

    def teacher_logits(self, runner: StepRunner, part: int | None) -> torch.Tensor | None:
        return self._topk(part) if self._topk is not None else None

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        import torch

        return torch.no_grad() if kind == "teacher" and runner.setup.teacher_no_grad else None

    def close(self) -> None:
        if self._topk is not None:
            self._topk.remove()
