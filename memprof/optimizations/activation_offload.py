"""Activation offloading: tensors saved for backward go to host memory."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import Optimization, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


@register
class ActivationOffload(Optimization):
    """Save activations in host memory (``torch.autograd.graph.save_on_cpu``, pinned on CUDA).

    Device memory drops by the saved activations; each one crosses the bus
    twice (out in forward, back in backward), so the step slows where the copies
    do not overlap compute. On the cpu engine device memory is host memory, so
    nothing moves (the measurement shows it); the sim engine projects a GPU. The
    host line (``Profile.host``) has the host copies' highest total in the step
    and the bytes that crossed the bus, counted as the copies were made: every
    tensor saved for backward is copied, the weights a matmul saves included.
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

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        #: host bytes of the saved activations: live now, the step's highest, moved this step
        self._live = 0
        self._peak = 0
        self._moved = 0
        self._forwards = 0

    def forward_context(self, runner: StepRunner, kind: str) -> Any:
        import torch

        if kind != "train":
            return None
        if self._forwards % runner.setup.micro_batches == 0:  # a new step
            self._peak = self._live
            self._moved = 0
        self._forwards += 1
        if runner.env.simulate_cuda:
            # Host memory stands as the meta device: the tracker never counts it,
            # and the copy back in backward is a new device tensor, as on CUDA.
            def pack(t: torch.Tensor) -> Any:
                host = t.to("meta")
                self._count(host)
                return (t.device, host)

            def unpack(packed: Any) -> torch.Tensor:
                dev, t = packed
                return t.to(dev)

            return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=runner.env.device_type == "cuda")
        inner_pack = ctx.pack_hook

        def counted_pack(t: torch.Tensor) -> Any:
            packed = inner_pack(t)
            self._count(packed[1])
            return packed

        ctx.pack_hook = counted_pack  # read when the context is entered
        return ctx

    def _count(self, host: torch.Tensor) -> None:
        """A saved activation's host copy: counted while it lives (the step's host bytes)."""
        n = host.untyped_storage().nbytes()
        self._live += n
        self._moved += 2 * n  # out in forward, back in backward
        self._peak = max(self._peak, self._live)
        weakref.finalize(host, self._release, n)

    def _release(self, n: int) -> None:
        self._live -= n

    def host_memory(self, runner: StepRunner) -> dict[str, Any] | None:
        return {"by_kind": {"activations": self._peak}, "pcie_bytes_per_step": self._moved}
