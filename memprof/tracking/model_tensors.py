"""The model's own tensors: parameters, buffers, packed weights and their quantization state on entry, gradients and optimizer state as hooks see them.

:class:`ModelTensors` is a part of :class:`~memprof.tracking.Tracker`, which holds
the state it uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from memprof.surgery.nf4 import quant_state_tensors
from memprof.tracking.results import _SHARDED, Category
from memprof.tracking.tensors import _inner_tensors, _is_wrapper


class ModelTensors:
    """The Tracker's registration of the model's and the optimizers' tensors."""

    if TYPE_CHECKING:
        # the Tracker's state (set in Tracker.__init__)
        model: torch.nn.Module | None
        optimizers: list[torch.optim.Optimizer]
        distributed: bool
        _handles: list[Any]
        _keep: list[torch.Tensor]
        _mod_index: dict[int, int]
        _param_owner: dict[int, int]

        def register(
            self, t: torch.Tensor, category: Category | str, owner: int = -1, retag: bool = False
        ) -> None: ...

        def _set_role(self, t: Any, role: int) -> None: ...

    def _register_existing(self) -> None:
        assert self.model is not None
        for p in self.model.parameters():
            self.register(p, Category.PARAMETERS, owner=self._param_owner.get(id(p), 0))
            if self.distributed and _is_wrapper(p):
                for inner in _inner_tensors(p):
                    self._set_role(inner, _SHARDED)
            if p.grad is not None:
                self.register(p.grad, Category.GRADIENTS, owner=self._param_owner.get(id(p), 0))
        for mod in self.model.modules():
            owner = self._mod_index[id(mod)]
            for b in mod.buffers(recurse=False):
                self.register(b, Category.BUFFERS, owner=owner)
            packed = getattr(mod, "_packed_params", None)
            if packed is not None and hasattr(packed, "_weight_bias"):
                # torch.ao quantized layers keep their weights in an opaque packed
                # object, not in parameters: count them at their int8 size (an
                # unpacked copy, kept alive while tracking, stands for the packed one)
                for t in packed._weight_bias():
                    if isinstance(t, torch.Tensor):
                        self._keep.append(t)
                        self.register(t, Category.PARAMETERS, owner=owner)
            # bitsandbytes 4-bit layers keep their quantization state (absmax, code
            # tables, offset, nested absmax) beside the packed weight, not in parameters:
            # frozen parameters too (a table shared by layers counts once: by storage)
            for t in quant_state_tensors(mod):
                self.register(t, Category.PARAMETERS, owner=owner)

    def _register_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        for opt in self.optimizers if optimizers is None else optimizers:
            for p, state in opt.state.items():
                owner = self._param_owner.get(id(p), 0)
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self.register(v, Category.OPTIMIZER_STATE, owner=owner, retag=True)

    def _after_optimizer_step(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        self._register_optimizer_state([opt])

    def _install_grad_hooks(self) -> None:
        assert self.model is not None
        for p in self.model.parameters():
            if p.requires_grad:
                owner = self._param_owner.get(id(p), 0)
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, owner)))

    def _on_grad(self, owner: int, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.register(p.grad, Category.GRADIENTS, owner=owner, retag=True)
