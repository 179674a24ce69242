"""Dynamic padding: pad each batch to its longest sample, optionally in length-grouped batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.data import padding_plan
from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup


@register
class DynamicPadding(Optimization):
    """Pad each batch to its own longest sample instead of a fixed length.

    It needs the lengths of real samples (``--data FILE``, tokenized with the
    model's tokenizer, or ``--lengths``): the whole sample is batched as a data
    loader would, and the step measured is the longest batch, the one that
    sets the peak. The half-truth it corrects: dynamic padding cuts the
    *compute* of an epoch (fewer padded tokens; grouping by length cuts more),
    but the *peak* falls only when even the longest batch is shorter than the
    fixed length; one long sample is enough to keep it. Outputs are unchanged
    (padding is masked).
    """

    name = "dynamic_padding"
    summary = (
        "pad each batch to its longest sample (or group by length): less compute; peak set by the longest"
    )
    modes = ("train", "infer", "distill")

    @dataclass
    class Config:
        group_by_length: bool = option(False, "length-grouped batches (transformers' group_by_length)")
        pad_to_multiple_of: int = option(
            1, "round each padded length up to a multiple (8: tensor cores)", min=1, max=512
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if not setup.data_lengths:
            return (
                "needs sample lengths: pass --data FILE (tokenized with the model's tokenizer) or --lengths"
            )
        if setup.padding is not None:
            return "padding is already dynamic"
        return None

    def apply(self, setup: StepSetup) -> None:
        c = self.config
        wl = setup.workload
        strategy = "grouped" if c.group_by_length else "longest"
        fixed = padding_plan(setup.data_lengths, wl.batch_size, wl.seq_len, "fixed")
        plan = padding_plan(
            setup.data_lengths, wl.batch_size, wl.seq_len, strategy, multiple_of=c.pad_to_multiple_of
        )
        setup.padding = plan.to_dict()
        setup.update_workload(seq_len=plan.worst)
        saved = 1 - plan.padded_tokens / fixed.padded_tokens
        peak_note = f"the measured step is the longest batch ({plan.worst} tokens)" + (
            ", as long as the fixed length: one long sample keeps the peak where it was"
            if plan.worst == wl.seq_len
            else f", shorter than the fixed {wl.seq_len}"
        )
        setup.notes.append(
            f"dynamic padding ({plan.describe()}) against fixed ({fixed.describe()}): "
            f"{saved:.1%} fewer tokens processed over the sample, so an epoch's compute falls about that much "
            f"(attention, quadratic in length, by more); {peak_note}; outputs unchanged (padding is masked)"
        )
        if c.group_by_length:
            setup.training_args["group_by_length"] = True
        setup.notes.append(
            "in your script: tokenize without padding and batch with "
            f"DataCollatorWithPadding(tokenizer{', pad_to_multiple_of=' + str(c.pad_to_multiple_of) if c.pad_to_multiple_of > 1 else ''})"
        )
