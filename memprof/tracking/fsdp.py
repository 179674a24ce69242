"""FSDP2 (``Tracker(distributed=True)``): ``UntypedStorage.resize_`` and the storages' roles.

FSDP2 frees and re-allocates the gathered parameters with
``UntypedStorage.resize_``, which is not a dispatched op: the tracker wraps that
method while it is active (as PyTorch's own ``MemTracker`` does) and restores it
on exit. Its collectives name the communication buffers and the unsharded
gradients (:data:`~memprof.tracking.SHARD_ROLES`). :class:`FsdpRoles` is a part
of :class:`~memprof.tracking.Tracker`, which holds the state it uses.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from memprof.tracking.results import _AG, _PARAM, _RS, _UNSHARDED, _UNSHARDED_GRAD, Category
from memprof.tracking.tensors import _op


class FsdpRoles:
    """The Tracker's FSDP2 support: the ``resize_`` wrapper and the role accounting."""

    if TYPE_CHECKING:
        # the Tracker's state (set in Tracker.__init__)
        device_type: str | None
        optimizers: list[torch.optim.Optimizer]
        _active: bool
        _handles: list[Any]
        _param_owner: dict[int, int]
        _records: dict[int, list[int]]
        _role: dict[int, int]
        _roles: list[int]
        _entry_fake: Any
        _dtensor: type | None
        _collectives: dict[Any, str]
        _active_fake: Any

        def register(
            self, t: torch.Tensor, category: Category | str, owner: int = -1, retag: bool = False
        ) -> None: ...

        def _add(self, st: Any, sid: int, cat: int, owner: int) -> None: ...

        def _resized(self, st: Any, sid: int, rec: list[int]) -> None: ...

        def _owner(self) -> int: ...

    def _enter_distributed(self, stack: contextlib.ExitStack) -> None:
        from torch._guards import active_fake_mode
        from torch.distributed.tensor import DTensor

        self._dtensor = DTensor
        self._collectives = {
            op: kind
            for op, kind in (
                (_op("c10d", "_allgather_base_"), "all_gather"),
                (_op("c10d", "_reduce_scatter_base_"), "reduce_scatter"),
                (_op("fsdp", "chunk_cat"), "chunk_cat"),
            )
            if op is not None
        }
        # the fake mode of the step (sim engine) or None: any other one is DTensor's
        # sharding propagation, whose global-shape tensors hold nothing
        self._active_fake = active_fake_mode
        self._entry_fake = active_fake_mode()
        orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            if tracker._active:
                tracker._on_storage_resize(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        stack.callback(setattr, torch.UntypedStorage, "resize_", orig)
        for opt in self.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._before_optimizer_step))

    def _before_optimizer_step(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        # FSDP2 assigns the sharded gradients itself (no accumulate-grad hook fires)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.register(
                        p.grad, Category.GRADIENTS, owner=self._param_owner.get(id(p), 0), retag=True
                    )

    def _fsdp_roles(self, func: Any, args: Any) -> None:
        """Tag FSDP2's communication buffers and unsharded gradients as they reach a collective."""
        op = self._collectives.get(func)
        if op is None:
            return
        if op == "all_gather":
            self._set_role(args[0], _AG)
        elif op == "reduce_scatter":
            self._set_role(args[1], _RS)
            # the output is the rank's gradient shard (FSDP2 assigns it as .grad)
            self.register(args[0], Category.GRADIENTS, retag=True)
        elif op == "chunk_cat":
            for g in args[0]:
                if isinstance(g, torch.Tensor):
                    self.register(g, Category.GRADIENTS, retag=True)
                    self._set_role(g, _UNSHARDED_GRAD)

    def _set_role(self, t: Any, role: int) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            sid = id(t.untyped_storage())
        except (NotImplementedError, RuntimeError):
            return
        rec = self._records.get(sid)
        if rec is None:
            return
        old = self._role.get(sid)
        if old == role:
            return
        if old is not None:
            self._roles[old] -= rec[0]
        self._role[sid] = role
        self._roles[role] += rec[0]

    def _on_storage_resize(self, st: Any) -> None:
        """``UntypedStorage.resize_`` (FSDP2's gather and reshard of a block's parameters)."""
        sid = id(st)
        rec = self._records.get(sid)
        if rec is None:
            if st.nbytes() == 0:
                return
            # a fake tensor's storage is on meta: the step's device is what counts
            dev = st.device.type
            if self.device_type is not None and dev not in (self.device_type, "meta"):
                return
            self._add(st, sid, _PARAM, self._owner())
            self._role[sid] = _UNSHARDED
            self._roles[_UNSHARDED] += self._records[sid][0]
            return
        self._resized(st, sid, rec)
