"""Optimizer offload: the optimizer state (and optionally the gradients) kept and stepped in host memory."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import EnvironmentProblem
from memprof.optimizations.registry import MakeOptimizer, Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

    from memprof.engines.runner import StepRunner

#: optimizer types whose state offloading refuses, and why
_NOT_WITH = {
    "adamw8bit": "8-bit state exists to fit the state on the GPU; offloaded, it would only shrink host "
    "memory while the host steps it with bitsandbytes' slow CPU kernels: choose one",
    "paged_adamw8bit": "paged 8-bit AdamW already keeps its state off the caching allocator in unified "
    "memory: choose one",
}


@register
class OptimizerOffload(Optimization):
    """Keep the optimizer state in host memory and step it there, as torchao's ``CPUOffloadOptimizer``.

    Each parameter of at least ``minimal_size`` elements gets a host copy and a host
    gradient buffer (pinned on CUDA); its gradient hook copies the device gradient
    to the host, the host optimizer steps the host copy after backward, and the
    updated parameter is copied back into the device parameter (in place: no new
    device memory). Smaller parameters keep an ordinary optimizer on the device.
    Device memory drops by the optimizer state; with ``gradients`` each device
    gradient is freed once copied, so the full set never coexists. Host memory holds
    the state, a copy of the parameters and one of the gradients; every step moves
    the gradients to the host and the parameters back (``Profile.host``).

    ``gradients`` defaults to False, as torchao's ``offload_gradients``: freeing them
    breaks gradient accumulation (torchao: "not compatible with gradient
    accumulation"). DeepSpeed ZeRO-Offload always moves gradients to the host (its
    fp32 gradient partitions live there); ``gradients: true`` is that choice here.

    Engines: cuda runs torchao's ``CPUOffloadOptimizer`` itself; the sim engine runs
    the same scheme with host memory standing as the meta device (the tracker never
    counts it, and the host updates after the state exists are skipped: they make
    only meta tensors); on the cpu engine device memory is host memory, so nothing moves: the
    step is the baseline's and the host line reports the tensors a GPU step would
    keep on the host (their real sizes).
    """

    name = "optimizer_offload"
    summary = (
        "optimizer state kept and stepped in host memory (torchao CPUOffloadOptimizer): state off the GPU"
    )
    modes = ("train", "distill")  # distill: the student's optimizer

    @dataclass
    class Config:
        gradients: bool = option(
            False,
            "also free each device gradient once copied to the host (torchao's offload_gradients; "
            "not with gradient accumulation)",
        )
        minimal_size: int = option(
            4096,
            "parameters with fewer elements keep their optimizer on the device (torchao's minimal_size)",
            min=0,
        )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._offloaded: OffloadedOptimizer | None = None
        #: the cpu engine: the trainable parameters (their optimizer is the runner's own)
        self._params: list[torch.nn.Parameter] = []

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        problems = self._conflicts(setup)
        return problems[0] if problems else None

    def _conflicts(self, setup: StepSetup) -> list[str]:
        wl = setup.workload
        out = []
        if wl.optimizer == "none":
            out.append("the workload has no optimizer (--optimizer none)")
        if wl.optimizer in _NOT_WITH:
            out.append(f"not with optimizer {wl.optimizer}: {_NOT_WITH[wl.optimizer]}")
        if setup.shard:
            out.append(
                "not with FSDP: torchao's CPUOffloadOptimizer is single-GPU (FSDP2 has its own "
                "CPUOffloadPolicy, which offloads parameters too)"
            )
        if setup.grad_scaler:
            out.append(
                "not with the float16 gradient scaler: it unscales the device gradients after backward, "
                "but they were copied to the host during backward"
            )
        if self.config.gradients and setup.micro_batches > 1:
            out.append(
                "gradients: true frees each device gradient once copied, so gradients cannot accumulate "
                "over micro-batches (leave gradients false)"
            )
        if any(s["name"] == "optimizer_in_backward" for s in setup.steps):
            out.append(
                "not with optimizer_in_backward: the offload already handles each gradient in its hook "
                "(gradients: true frees it there), and a host step inside backward would stall it"
            )
        if any(s["name"] == "optimizer" and s["options"].get("set_to_none") is False for s in setup.steps):
            out.append("not with set_to_none false: the offload frees device gradients (torchao asserts it)")
        return out

    def setup_problems(self, setup: StepSetup) -> list[str]:
        return [f"optimizer_offload: {p}" for p in self._conflicts(setup)]

    def apply(self, setup: StepSetup) -> None:
        what = "optimizer state and gradients" if self.config.gradients else "optimizer state"
        setup.notes.append(
            f"optimizer offload: {what} in host memory, stepped there (torchao.optim.CPUOffloadOptimizer, "
            f"offload_gradients={self.config.gradients}, minimal_size={self.config.minimal_size}; no "
            "TrainingArguments field); each step copies the gradients to the host and the parameters back "
            "(the host line)"
        )

    def build_optimizer(self, runner: StepRunner, make: MakeOptimizer, params: list[Any]) -> bool:
        env = runner.env
        if not env.simulate_cuda and env.device_type == "cpu":
            self._params = list(params)
            runner.setup.notes.append(
                "optimizer offload on the cpu engine: device memory is host memory, so nothing moves (the "
                "step and its peak are the baseline's); the host line reports the tensors a GPU step keeps "
                "on the host, measured from this step's"
            )
            return False
        from memprof.engines.runner import make_optimizer

        name = runner.setup.workload.optimizer

        def make_host(ps: list[torch.nn.Parameter]) -> Any:
            # torchao steps the host copies with fused CPU AdamW; in the sim they are meta
            # tensors (a for-loop step: their memory is never counted, only their state's size)
            fused = name == "adamw" and not env.simulate_cuda
            return make_optimizer(
                name,
                runner.model,
                foreach=None if fused or not env.simulate_cuda else False,
                fused=fused,
                params=ps,
                simulate=env.simulate_cuda,
            )

        c = self.config
        if env.simulate_cuda:
            inner: Any = HostOffloadOptimizer(
                make, make_host, params, offload_gradients=c.gradients, minimal_size=c.minimal_size
            )
        else:
            inner = _torchao_offload(make, make_host, params, c.gradients, c.minimal_size)
        self._offloaded = OffloadedOptimizer(inner)
        runner.optimizer = self._offloaded  # type: ignore[assignment]  # duck-typed: step, zero_grad, state
        return True

    def host_memory(self, runner: StepRunner) -> dict[str, Any] | None:
        if self._offloaded is not None:
            return self._offloaded.host_memory()
        # the cpu engine: the tensors a GPU step keeps on the host are this step's own
        big = [p for p in self._params if p.numel() >= self.config.minimal_size]
        opt = runner.optimizer
        state = _state_bytes([opt.state.get(p, {}) for p in big] if opt is not None else [])
        p_bytes = sum(_nbytes(p) for p in big)
        return {
            "by_kind": {"optimizer_state": state, "parameters": p_bytes, "gradients": p_bytes},
            "pcie_bytes_per_step": p_bytes * runner.setup.micro_batches + p_bytes,
        }

    def close(self) -> None:
        if self._offloaded is not None:
            self._offloaded.remove()


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _stateful(optimizer: Any) -> bool:
    """Every parameter of ``optimizer`` has its state (its first step ran, or created it)."""
    return all(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"])


def _state_bytes(states: list[dict[str, Any]]) -> int:
    """Bytes of the tensors in optimizer states, each storage once."""
    import torch

    seen: set[int] = set()
    total = 0
    for st in states:
        for v in st.values():
            if isinstance(v, torch.Tensor):
                s = v.untyped_storage()
                if id(s) not in seen:
                    seen.add(id(s))
                    total += s.nbytes()
    return total


def _torchao_offload(
    make: MakeOptimizer, make_host: MakeOptimizer, params: list[Any], gradients: bool, minimal_size: int
) -> Any:
    """torchao's CPUOffloadOptimizer over ``params``: host copies stepped by ``make_host``'s optimizer."""
    if importlib.util.find_spec("torchao") is None:
        raise EnvironmentProblem("optimizer_offload on the cuda engine needs torchao: pip install torchao")
    from torchao.optim import CPUOffloadOptimizer

    def optimizer_class(groups: list[dict[str, Any]], **kwargs: Any) -> Any:
        ps = [p for g in groups for p in (g["params"] if isinstance(g["params"], list) else [g["params"]])]
        return make_host(ps) if ps[0].device.type == "cpu" else make(ps)

    return CPUOffloadOptimizer(
        params, optimizer_class, offload_gradients=gradients, minimal_size=minimal_size
    )


class HostOffloadOptimizer:
    """torchao's ``CPUOffloadOptimizer`` scheme where host memory is another device (the sim: meta).

    The same attributes as torchao's (``param_d2h_map``, ``optim_dict``, ``d_opt``,
    ``queue``), so :class:`OffloadedOptimizer` reads both alike. Without streams: the
    sim has no time, only memory, and the copies are in place on both sides.
    """

    def __init__(
        self,
        make: MakeOptimizer,
        make_host: MakeOptimizer,
        params: list[torch.nn.Parameter],
        *,
        offload_gradients: bool,
        minimal_size: int,
        host_device: str = "meta",
    ) -> None:
        import torch

        self.offload_gradients = offload_gradients
        self.param_d2h_map: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.optim_dict: dict[torch.nn.Parameter, Any] = {}
        self.queue: dict[torch.nn.Parameter, None] = {}
        self._handles: list[Any] = []
        #: host copies on the meta device: their updates make nothing the sim measures
        self._meta_host = torch.device(host_device).type == "meta"
        retained = []
        with torch.no_grad():
            for p in params:
                if p.numel() < minimal_size:
                    retained.append(p)
                    continue
                p_host = torch.empty_like(p, device=host_device)
                p_host.grad = torch.empty_like(p_host)
                p_host.copy_(p.detach())
                self.param_d2h_map[p] = p_host
                self._handles.append(p.register_post_accumulate_grad_hook(self._backward_hook))
                self.optim_dict[p] = make_host([p_host])
        self.d_opt = make(retained) if retained else None

    def _backward_hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self.param_d2h_map[p].grad.copy_(p.grad)  # type: ignore[index,union-attr]
        self.queue.pop(p, None)  # type: ignore[call-overload]  # re-queued last, as torchao does
        self.queue[p] = None  # type: ignore[index]
        if self.offload_gradients:
            p.grad = None  # the device gradient is freed once copied

    def step(self) -> None:
        self._step(None)

    def create_state(self, create: Callable[[Any], bool]) -> bool:
        """The warm-up: each optimizer creates its first step's state without the update.

        ``create(optimizer)`` creates it where it can (False: that optimizer steps); the
        parameters are copied back as in a step. Always True: the step's work is done.
        """
        self._step(create)
        return True

    def _step(self, create: Callable[[Any], bool] | None) -> None:
        """A step (``create``: the warm-up's, see :meth:`create_state`).

        The host copies are meta tensors: once a host optimizer has its state, its
        update only makes meta tensors, which the sim never measures, and changes no
        state's size. Those updates are skipped (Llama-3-8B's plan: 4.1 s of its 24 offload steps); the
        parameters are still copied back into the device's, the device's own op.
        """
        import torch

        with torch.no_grad():
            if self.d_opt is not None and (create is None or not create(self.d_opt)):
                self.d_opt.step()
            for p in self.queue:
                host = self.optim_dict[p]
                if self._meta_host and _stateful(host):
                    pass  # its update: meta tensors only
                elif create is None or not create(host):
                    host.step()
                p.copy_(self.param_d2h_map[p])  # host to device, into the parameter's own memory
            self.queue.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_d2h_map:
            p.grad = None
        if self.d_opt is not None:
            self.d_opt.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class OffloadedOptimizer:
    """The optimizer the runner and the tracker see: the device side of an offloaded optimizer.

    Wraps torchao's ``CPUOffloadOptimizer`` or :class:`HostOffloadOptimizer`. Its
    ``state`` is the device optimizer's (the small parameters'): the host state is not
    device memory. It counts the bytes each step moves over the bus (the gradients
    copied in their hooks, once per micro-batch, and the parameters copied back) and
    reads the host side's tensors for :meth:`host_memory`.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._moved = 0
        self._last_moved = 0
        self._handles = [
            p.register_post_accumulate_grad_hook(self._count_gradient) for p in inner.param_d2h_map
        ]

    def _count_gradient(self, p: torch.Tensor) -> None:
        self._moved += _nbytes(self.inner.param_d2h_map[p].grad)

    @property
    def state(self) -> Any:
        d_opt = self.inner.d_opt
        return d_opt.state if d_opt is not None else {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups if hasattr(self.inner, "param_groups") else []

    def step(self) -> None:
        self._moving(self.inner.step)
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def _moving(self, step: Callable[[], Any]) -> None:
        """``step`` with its bus traffic counted: the parameters it copies back, and the gradients before."""
        self._moved += sum(_nbytes(self.inner.param_d2h_map[p]) for p in self.inner.queue)
        step()
        self._last_moved, self._moved = self._moved, 0

    def create_state(self, create: Callable[[Any], bool]) -> bool:
        """What :meth:`step` leaves behind, each optimizer's state created by ``create`` where it can.

        For the runner's warm-up (``memprof.engines.runner._create_state``). False (the
        warm-up steps instead) with torchao's optimizer, or when a hook listens for the step.
        """
        inner = self.inner
        if self._post_hooks or not isinstance(inner, HostOffloadOptimizer):
            return False
        self._moving(lambda: inner.create_state(create))
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def host_memory(self) -> dict[str, Any]:
        inner = self.inner
        hosts = list(inner.param_d2h_map.values())
        return {
            "by_kind": {
                "optimizer_state": _state_bytes(
                    [st for o in inner.optim_dict.values() for st in o.state.values()]
                ),
                "parameters": sum(_nbytes(h) for h in hosts),
                "gradients": sum(_nbytes(h.grad) for h in hosts if h.grad is not None),
            },
            "pcie_bytes_per_step": self._last_moved,
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if hasattr(self.inner, "remove"):
            self.inner.remove()
