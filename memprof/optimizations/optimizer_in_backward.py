"""Optimizer step fused into backward: gradients freed as soon as they are used."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.optimizations.registry import MakeOptimizer, Optimization, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch

    from memprof.engines.runner import StepRunner


@register
class OptimizerInBackward(Optimization):
    """Step each parameter in its post-accumulate-grad hook and free its gradient.

    The full set of gradients never coexists: at most the gradients of the
    parameters whose backward is running are alive. Not compatible with
    gradient accumulation or a gradient scaler (both need every gradient first)
    or gradient clipping over all parameters.
    """

    name = "optimizer_in_backward"
    summary = "step each parameter in its gradient hook: full gradients never coexist"
    modes = ("train", "distill")  # distill: the student's parameters

    @dataclass
    class Config:
        pass

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        if setup.workload.optimizer == "none":
            return "the workload has no optimizer (--optimizer none)"
        if setup.micro_batches > 1:
            return "gradients accumulate over micro-batches, so they must all exist before the step"
        if setup.grad_scaler:
            return "the float16 gradient scaler unscales all gradients before the step"
        return None

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._per_param: PerParameterOptimizers | None = None

    def apply(self, setup: StepSetup) -> None:
        setup.notes.append(
            "optimizer in backward: one optimizer per parameter stepped in "
            "register_post_accumulate_grad_hook (no TrainingArguments field; see the PyTorch tutorial "
            "'optimizer step in backward')"
        )

    def setup_problems(self, setup: StepSetup) -> list[str]:
        problems = []
        if setup.micro_batches > 1:
            problems.append("the optimizer cannot step in backward while gradients accumulate")
        if setup.shard:
            problems.append(
                "the optimizer cannot step in backward with FSDP2: it assigns the gradient shards after "
                "the reduce-scatter, where no gradient hook fires"
            )
        if setup.grad_scaler:
            problems.append(
                "the optimizer cannot step in backward with a gradient scaler (unscaling needs all gradients)"
            )
        return problems

    def build_optimizer(self, runner: StepRunner, make: MakeOptimizer, params: list[Any]) -> bool:
        self._per_param = PerParameterOptimizers(make, params)
        return True

    def own_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._per_param.optimizers.values()) if self._per_param is not None else []

    def warm_up_context(
        self, runner: StepRunner, create_state: Callable[[torch.optim.Optimizer], bool]
    ) -> AbstractContextManager[Any] | None:
        per = self._per_param
        if per is None:
            return None

        @contextlib.contextmanager
        def creating() -> Iterator[None]:
            per.create_state = create_state
            try:
                yield
            finally:
                per.create_state = None

        return creating()

    def close(self) -> None:
        if self._per_param is not None:
            self._per_param.remove()


class PerParameterOptimizers:
    """One optimizer per parameter, stepped in the parameter's gradient hook.

    The full set of gradients never exists at once: each gradient is consumed
    and freed as soon as it is accumulated (the PyTorch tutorial
    "How to save memory by fusing the optimizer step into the backward pass").
    """

    def __init__(self, make: Any, params: list[torch.nn.Parameter]) -> None:
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        #: set during the fast warm-up: each optimizer's state created without an update where it can
        self.create_state: Callable[[torch.optim.Optimizer], bool] | None = None
        self._handles = []
        for p in params:
            opt = make([p])
            if opt is None:
                continue
            self.optimizers[p] = opt
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        opt = self.optimizers[p]  # type: ignore[index]
        if self.create_state is None or not self.create_state(opt):
            opt.step()
        opt.zero_grad(set_to_none=True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
