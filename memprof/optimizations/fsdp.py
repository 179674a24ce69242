"""FSDP2 sharding: parameters, gradients and optimizer state split across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup, repeated_blocks


@register
class Fsdp(Optimization):
    """Shard the model with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Each repeated block (a transformer layer) is one FSDP unit, then the root:
    every rank keeps 1/N of the parameters, gradients and optimizer state, and
    all-gathers one block's parameters at a time for its forward and backward.
    The per-rank memory is measured by running the real FSDP2 code: in the sim
    engine over a fake process group (no communication), on the cpu and cuda
    engines under ``torchrun`` (gloo or NCCL). It needs ``--world-size N >= 2``.
    """

    name = "fsdp"
    summary = "FSDP2 fully_shard per block: parameters, gradients and optimizer state / world size"
    modes = ("train", "distill")

    @dataclass
    class Config:
        reshard_after_forward: bool = option(
            True, "free each block's gathered parameters after its forward (gather again in backward)"
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if setup.workload.world_size < 2:
            return "sharding needs --world-size N with N >= 2 (the ranks sharing the model)"
        if model is not None and not repeated_blocks(model):
            return f"{type(model).__name__} has no repeated blocks to shard one at a time"
        return None

    def apply(self, setup: StepSetup) -> None:
        setup.shard = "fsdp"
        setup.reshard_after_forward = self.config.reshard_after_forward
        # transformers >= 5: fsdp=True and everything in fsdp_config (the string form is deprecated)
        setup.training_args["fsdp"] = True
        setup.training_args["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": self.config.reshard_after_forward,
        }
