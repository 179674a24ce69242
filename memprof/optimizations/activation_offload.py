"""Activation offloading: tensors saved for backward go to host memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprof.optimizations.registry import Optimization, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    from memprof.engines.runner import StepRunner


@register
class ActivationOffload(Optimization):
    """Save activations in host memory (``torch.autograd.graph.save_on_cpu``, pinned on CUDA).

    Device memory drops by the saved activations; each one crosses the bus
    twice (out in forward, back in backward), so the step slows where the copies
    do not overlap compute. On the cpu engine device memory is host memory, so
    nothing moves (the measurement shows it); the sim engine projects a GPU.
    """

    name = "activation_offload"
    summary = "activations saved for backward kept in host memory (device memory down, PCIe traffic up)"
    modes = ("train", "distill")

    @dataclass
    class Config:
        pass

    def apply(self, setup: StepSetup) -> None:
        setup.notes.append(
            "activation offload: wrap forward and loss in torch.autograd.graph.save_on_cpu(pin_memory=True) "
            "(no TrainingArguments field)"
        )

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        if kind != "train":
            return None
        if runner.env.simulate_cuda:
            # Host memory stands as the meta device: the tracker never counts it,
            # and the copy back in backward is a new device tensor, as on CUDA.
            def pack(t: torch.Tensor) -> Any:
                return (t.device, t.to("meta"))

            def unpack(packed: Any) -> torch.Tensor:
                dev, t = packed
                return t.to(dev)

            return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        return torch.autograd.graph.save_on_cpu(pin_memory=runner.env.device_type == "cuda")
