"""FSDP2 sharding: parameters, gradients and optimizer state split across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import InputError
from memprof.optimizations.registry import MakeOptimizer, Optimization, option, register
from memprof.workload import StepSetup, repeated_blocks

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


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
    #: sharding wraps last: it must see the final modules (after surgery and checkpointing)
    wrap_stage = 1

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

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._shards: Any = None

    def wrap_model(self, model: torch.nn.Module, runner: StepRunner) -> str | None:
        from memprof.models import DTYPES
        from memprof.sharding import shard_model

        if runner.env.mesh is None:
            raise InputError("a sharded step needs its ranks: the engine provides the device mesh")

        autocast = runner.setup.autocast
        mp = DTYPES[autocast] if autocast else None
        if mp is not None and mp == next(model.parameters()).dtype:
            mp = None  # the parameters are already in that dtype
        return shard_model(
            model,
            runner.env.mesh,
            reshard_after_forward=self.config.reshard_after_forward,
            param_dtype=mp,
            # a step that calls the LM head itself needs it as its own unit
            separate_head=any(o.calls_head_directly for o in runner.optimizations),
        )

    def build_optimizer(self, runner: StepRunner, make: MakeOptimizer, params: list[Any]) -> bool:
        from memprof.sharding import LocalShards

        if not runner.env.simulate_cuda:
            return False  # real ranks: the optimizer steps the DTensor parameters

        self._shards = runner.local_shards = LocalShards(params)
        runner.optimizer = make(self._shards.params)
        if runner.optimizer is not None:
            self._shards.attach(runner.optimizer)
        return True

    def full_warm_up_reason(self, runner: StepRunner) -> str | None:
        # FSDP2 initialises lazily in the root's first forward (its shared state, the
        # sharded parameters reset, the root kept unsharded for backward), and its
        # gradients come from the reduce-scatter, not from the parameters' autograd
        return "FSDP2 initialises lazily in the first forward"

    def after_optimizer_step(self, runner: StepRunner, set_to_none: bool) -> None:
        if self._shards is not None:
            runner.model.zero_grad(set_to_none=set_to_none)  # the DTensor gradients

    def close(self) -> None:
        if self._shards is not None:
            self._shards.remove()
