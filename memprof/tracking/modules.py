"""Module attribution: which module owns a storage (forward and backward), and module groups.

A storage belongs to the innermost module running when it was created; in
backward, to the module whose backward is running (found with multi-grad hooks,
as ``torch.distributed._tools.mod_tracker`` does). :class:`ModuleAttribution` is
a part of :class:`~memprof.tracking.Tracker`, which holds the state it uses.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from memprof.tracking.results import _ACT, _TMP


class _Frame:
    """One active module on the forward or backward stack."""

    __slots__ = ("idx", "peak")

    def __init__(self, idx: int, current: int) -> None:
        self.idx = idx
        self.peak = current


class ModuleAttribution:
    """The Tracker's module index, groups and forward/backward module hooks."""

    if TYPE_CHECKING:
        # the Tracker's state (set in Tracker.__init__)
        model: torch.nn.Module | None
        current: int
        groups: tuple[str, ...]
        error_module: str | None
        _closed: bool
        _other: int
        _handles: list[Any]
        _param_owner: dict[int, int]
        _mod_names: list[str]
        _mod_types: list[str]
        _mod_parent: list[int]
        _mod_index: dict[int, int]
        _mod_peak: list[int]
        _mod_group: list[int]
        _mod_tot: list[int]
        _mod_act: list[int]
        _fw_stack: list[_Frame]
        _bw_stack: list[_Frame]

        def _retag(self, t: torch.Tensor, cat: int, from_cat: int) -> None: ...

    def _index_modules(self, model: torch.nn.Module) -> None:
        self._mod_names.clear()
        self._mod_types.clear()
        self._mod_parent.clear()
        self._mod_index.clear()
        name_of: dict[str, int] = {}
        for name, mod in model.named_modules(remove_duplicate=True):
            idx = len(self._mod_names)
            self._mod_names.append(name or "<model>")
            self._mod_types.append(type(mod).__name__)
            parent_name = name.rsplit(".", 1)[0] if "." in name else ("" if name else None)
            self._mod_parent.append(-1 if parent_name is None else name_of.get(parent_name, 0))
            name_of[name] = idx
            self._mod_index[id(mod)] = idx
        self._mod_peak = [0] * len(self._mod_names)
        self._mod_group = [self._group_of(n) for n in self._mod_names]
        self._mod_tot = [0] * len(self._mod_names)
        self._mod_act = [0] * len(self._mod_names)
        for mod in model.modules():
            owner = self._mod_index[id(mod)]
            for p in mod.parameters(recurse=False):
                self._param_owner.setdefault(id(p), owner)

    def _group_of(self, name: str) -> int:
        for g, prefix in enumerate(self.groups):
            if name == prefix or name.startswith(prefix + "."):
                return g
        return self._other

    def _gi(self, owner: int, cat: int) -> int:
        """Index of (the owner's group, category) in the flat group counters."""
        g = self._mod_group[owner] if 0 <= owner < len(self._mod_group) else self._other
        return g * 7 + cat

    def _install_module_hooks(self) -> None:
        assert self.model is not None
        for mod in self.model.modules():
            idx = self._mod_index.get(id(mod))
            if idx is None:
                continue
            self._handles.append(mod.register_forward_pre_hook(partial(self._fw_pre, idx)))
            self._handles.append(mod.register_forward_hook(partial(self._fw_post, idx), always_call=True))

    # ----------------------------------------------------------- module hooks
    def _fw_pre(self, idx: int, mod: torch.nn.Module, args: Any) -> None:
        self._fw_stack.append(_Frame(idx, self.current))
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
            if tensors:
                # Fires when the gradients w.r.t. the module's inputs exist: its backward ended.
                self._handles.append(
                    torch.autograd.graph.register_multi_grad_hook(tensors, partial(self._bw_post, idx))
                )

    def _fw_post(self, idx: int, mod: torch.nn.Module, args: Any, output: Any) -> None:
        if output is None and self.error_module is None and sys.exc_info()[0] is not None:
            # always_call hooks run while an exception propagates: innermost first
            self.error_module = self._mod_names[idx]
        stack = self._fw_stack
        # Pop down to this module (always_call=True also runs on exceptions).
        while stack:
            frame = stack.pop()
            self._close_frame(frame)
            if frame.idx == idx:
                break
        outs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
        for o in outs:
            self._retag(o, _ACT, from_cat=_TMP)
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            req = [o for o in outs if o.requires_grad]
            if req:
                # Fires on the first gradient w.r.t. an output: the module's backward begins.
                self._handles.append(
                    torch.autograd.graph.register_multi_grad_hook(req, partial(self._bw_pre, idx), mode="any")
                )

    def _bw_pre(self, idx: int, *args: Any) -> None:
        if self._closed:
            return
        self._bw_stack.append(_Frame(idx, self.current))

    def _bw_post(self, idx: int, *args: Any) -> None:
        if self._closed:
            return
        stack = self._bw_stack
        if not any(f.idx == idx for f in stack):
            return
        while stack:
            frame = stack.pop()
            self._close_frame(frame)
            if frame.idx == idx:
                break

    def _close_frame(self, frame: _Frame) -> None:
        if frame.peak > self._mod_peak[frame.idx]:
            self._mod_peak[frame.idx] = frame.peak

    def end_backward(self) -> None:
        """Close module frames left open when a backward pass ends."""
        while self._bw_stack:
            self._close_frame(self._bw_stack.pop())

    def _owner(self) -> int:
        if self._bw_stack and torch._C._current_graph_task_id() != -1:
            return self._bw_stack[-1].idx
        if self._fw_stack:
            return self._fw_stack[-1].idx
        return -1
