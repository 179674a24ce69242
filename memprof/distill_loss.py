"""Knowledge distillation: a training step of a student against a teacher's logits.

The step (``--mode distill --teacher MODEL``), as the Hugging Face trainer
examples write ``compute_loss``: the student's forward (with its own
cross-entropy when ``ce_weight > 0``), then the teacher's forward on the same
inputs, then the loss::

    loss = ce_weight * CE(student) + (1 - ce_weight) * T^2 * KL(softmax(t / T) || softmax(s / T))

the KL averaged over tokens (both models' logits compared position by
position, so they must share the vocabulary). Then backward and the student's
optimizer step.

The baseline teacher is the naive one: loaded as ``from_pretrained`` leaves it
(parameters requiring grad), called under autograd, its logits not detached.
Autograd then keeps the teacher's activations for backward and backward
computes gradients for the teacher's parameters, which the student's
optimizer never zeroes, so they stay resident between steps. The
``distill_teacher`` optimization (:mod:`memprof.optimizations.distill`) turns
that off (``no_grad``), stores the teacher in half precision (``dtype``), or
replaces it by its top-k logits, precomputed once offline, written to disk and
read back each step (``topk``): :class:`TopkTeacher`.

Memory is split by side: :class:`DistillPair` holds ``student``, ``teacher``
and ``loss`` as children, so the tracker's per-module attribution separates
them (``Profile.split_at_peak``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memprof.errors import EnvironmentProblem, InputError
from memprof.inputs import call_model
from memprof.models import ResolvedModel, fetch_hub_weights, resolve

#: tasks whose logits compare token by token
DISTILL_TASKS = ("causal-lm", "masked-lm")

#: the groups of Profile.split_at_peak, in display order ("other": inputs, outside every module)
SIDES = ("student", "teacher", "loss")


def resolve_teacher(
    student: ResolvedModel, teacher_spec: str, *, load_weights: bool = False
) -> ResolvedModel:
    """Resolve the teacher's MODEL spec and check that it can teach the student.

    Args:
        student: the resolved student.
        teacher_spec: the teacher's MODEL spec.
        load_weights: locate (or fetch) a Hub teacher's weights, for engines that load them.

    Raises:
        InputError: the student's task has no per-token logits, the teacher has
            another task, or the two vocabularies differ.
    """
    if student.task not in DISTILL_TASKS:
        raise InputError(
            f"distillation compares logits token by token: the student must be a "
            f"{' or '.join(DISTILL_TASKS)} model, {student.name} is {student.task}"
        )
    teacher = resolve(teacher_spec, task=student.task, trust_remote_code=student.trust_remote_code)
    if teacher.factory is not None:
        raise InputError(f"--teacher {teacher_spec}: the teacher must be a transformers model with a config")
    sv, tv = vocab_size(student), vocab_size(teacher)
    if sv is None or tv is None or sv != tv:
        raise InputError(
            f"the teacher {teacher.name} has a vocabulary of {tv} tokens and the student {student.name} "
            f"{sv}: distillation compares logits token by token, so they must share the vocabulary"
        )
    if teacher.source == "hub" and load_weights and not teacher.has_weights:
        try:
            fetch_hub_weights(teacher)
        except EnvironmentProblem:
            teacher.notes.append("teacher weights: not in the local cache; random initialisation")
    return teacher


def vocab_size(rm: ResolvedModel) -> int | None:
    v = getattr(rm.config, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def teacher_inputs(inputs: dict[str, Any], task: str | None) -> dict[str, Any]:
    """The teacher's call: the student's inputs without labels (its own loss is never used)."""
    out = {k: v for k, v in inputs.items() if k != "labels"}
    if task == "causal-lm":
        # One forward never reads a KV cache; without this the model builds one
        # (config.use_cache) and holds every layer's keys and values to its end.
        out["use_cache"] = False
    return out


class DistillLoss(torch.nn.Module):
    """The distillation loss, a module so that its memory is attributed to it.

    ``teacher`` is the teacher's logits (full KL) or a ``(values, indices)``
    pair of its top-k logits per token. With top-k, the KL is from the teacher
    distribution truncated to its top-k tokens and renormalised, to the
    student's full distribution: an approximation whose error shrinks with the
    mass the teacher puts outside its top-k.
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature
        self.ce_weight = ce_weight

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        ce: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kl = kd_loss(student_logits, teacher, self.temperature)
        if ce is None or self.ce_weight == 0:
            return kl
        return self.ce_weight * ce + (1 - self.ce_weight) * kl


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over tokens (float32)."""
    T = temperature
    s = student_logits.float()
    if T != 1:  # a division is a full batch x seq x vocab copy: only when it changes something
        s = s / T
    s_logp = F.log_softmax(s, dim=-1)
    if isinstance(teacher, tuple):
        values, indices = teacher
        t = values.float()
        t_logp = F.log_softmax(t / T if T != 1 else t, dim=-1)  # renormalised over the top-k
        s_sel = s_logp.gather(-1, indices)
        kl = (t_logp.exp() * (t_logp - s_sel)).sum(-1).mean()
    else:
        t = teacher.float()
        t_logp = F.log_softmax(t / T if T != 1 else t, dim=-1)
        v = s_logp.shape[-1]
        kl = F.kl_div(s_logp.reshape(-1, v), t_logp.reshape(-1, v), reduction="batchmean", log_target=True)
    return kl * (T * T) if T != 1 else kl


class TopkTeacher(torch.nn.Module):
    """The teacher replaced by its top-k logits, written to disk once and read back each step.

    :meth:`write` runs the teacher once (no autograd) over each micro-batch and
    saves the top-k values (float32) and indices (int64) per token; on real
    engines to a file that is then memory-mapped, under the sim engine as meta
    tensors (host memory, never device memory). Each call copies one
    micro-batch's tensors to the device: that copy is the teacher's whole
    footprint in the step.
    """

    def __init__(self, values: list[torch.Tensor], indices: list[torch.Tensor], device: torch.device) -> None:
        super().__init__()
        # Plain attributes, not buffers: they live on disk (or the host), not on the device.
        self._values = values
        self._indices = indices
        self._device = device
        self._dir: Path | None = None
        self.k = int(values[0].shape[-1]) if values else 0

    @classmethod
    def write(
        cls,
        teacher: torch.nn.Module,
        parts: list[dict[str, Any]],
        k: int,
        *,
        task: str | None,
        device: torch.device,
        simulate: bool,
    ) -> TopkTeacher:
        """Run the teacher over ``parts`` (micro-batches) and store its top-k logits.

        Raises:
            InputError: ``k`` is not below the vocabulary size.
        """
        values: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        with torch.no_grad():
            for part in parts:
                logits = call_model(teacher, teacher_inputs(part, task)).logits
                if k >= logits.shape[-1]:
                    raise InputError(
                        f"top-k of {k} is not below the vocabulary of {logits.shape[-1]}: use the full teacher"
                    )
                v, ix = logits.topk(k, dim=-1)
                del logits
                values.append(v.float())
                indices.append(ix)
        if simulate:
            return cls([v.to("meta") for v in values], [ix.to("meta") for ix in indices], device)
        tmp = Path(tempfile.mkdtemp(prefix="memprof-topk-"))
        path = tmp / "teacher_topk.pt"
        torch.save({"values": [v.cpu() for v in values], "indices": [ix.cpu() for ix in indices]}, path)
        del values, indices
        stored = torch.load(path, mmap=True, weights_only=True)
        out = cls(stored["values"], stored["indices"], device)
        out._dir = tmp
        return out

    def forward(self, part: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Read micro-batch ``part``'s top-k to the device (None: the whole batch)."""
        if part is None:
            return (
                torch.cat(self._values).to(self._device),
                torch.cat(self._indices).to(self._device),
            )
        # copy=True: on the cpu engine the device is the host, and the read must
        # still be a new tensor (as the copy to a GPU is)
        return (
            self._values[part].to(self._device, copy=True),
            self._indices[part].to(self._device, copy=True),
        )

    def stored_bytes(self) -> int:
        """Bytes on disk (or host) for the whole batch."""
        return sum(t.numel() * t.element_size() for t in [*self._values, *self._indices])

    def remove(self) -> None:
        """Delete the file (real engines)."""
        self._values, self._indices = [], []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class DistillPair(torch.nn.Module):
    """Student, teacher and loss as children: what the tracker watches in a distillation step.

    Never called itself; the step calls each child, so memory created inside
    one is attributed to it (``student``, ``teacher``, ``loss``).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.loss = loss
