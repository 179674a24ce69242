"""The :class:`Tracker`: a ``TorchDispatchMode`` that keeps live tensor memory by category and module.

Its parts live beside it: module attribution (:mod:`memprof.tracking.modules`), the model's
own tensors (:mod:`memprof.tracking.model_tensors`),
FSDP2 roles (:mod:`memprof.tracking.fsdp`), the timeline's downsampling
(:mod:`memprof.tracking.timeline`), the results (:mod:`memprof.tracking.results`).
The overview and the known limitations are in :mod:`memprof.tracking`.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.tracking.fsdp import FsdpRoles
from memprof.tracking.model_tensors import ModelTensors
from memprof.tracking.modules import ModuleAttribution, _Frame
from memprof.tracking.results import (
    _ACT,
    _CAT_INDEX,
    _TMP,
    CATEGORIES,
    SHARD_ROLES,
    Category,
    ModuleStats,
    TraceEvent,
    TrackerResult,
)
from memprof.tracking.tensors import _inner_tensors, _is_wrapper, _unpack
from memprof.tracking.timeline import downsample

#: op -> whether ``FlopCounterMode`` would decompose it (an op without a FLOP formula)
_DECOMPOSABLE: dict[Any, bool] = {}


#: ops ``FlopCounterMode.__torch_dispatch__`` passes through (``NotImplemented``) in torch 2.13
_FLOP_COUNTER_SKIPS = (
    "sym_is_contiguous.default",
    "is_contiguous.default",
    "is_contiguous.memory_format",
    "is_strides_like_format.default",
    "is_non_overlapping_and_dense.default",
    "size.default",
    "sym_size.default",
    "stride.default",
    "sym_stride.default",
    "storage_offset.default",
    "sym_storage_offset.default",
    "numel.default",
    "sym_numel.default",
    "dim.default",
    "layout.default",
    "device.default",
)


def _decomposable(func: Any) -> bool:
    """True for an op with a CompositeImplicitAutograd kernel (``OpOverload.decompose`` runs it)."""
    known = _DECOMPOSABLE.get(func)
    if known is None and not _DECOMPOSABLE:  # FlopCounterMode neither counts nor decomposes these
        for skip in _FLOP_COUNTER_SKIPS:
            packet, _, overload = skip.partition(".")
            ns = torch.ops.prim if packet in ("layout", "device") else torch.ops.aten
            op = getattr(getattr(ns, packet, None), overload, None)
            if op is not None:
                _DECOMPOSABLE[op] = False
        known = _DECOMPOSABLE.get(func)
    if known is None:
        key = torch._C.DispatchKey.CompositeImplicitAutograd
        name = getattr(func, "name", None)
        known = _DECOMPOSABLE[func] = bool(
            key in getattr(func, "py_kernels", {})
            or (callable(name) and torch._C._dispatch_has_kernel_for_dispatch_key(name(), key))
        )
    return known


def _hosting_fake_mode() -> Any:
    """The active fake mode, when it can report the ops to the tracker itself, else None.

    A dispatch mode costs every op a round trip through the dispatcher (about a
    seventh of a sim step). A fake mode with a ``host`` method (the sim engine's,
    :class:`memprof.engines.fake_fidelity.SimFakeMode`) calls the tracker's
    :meth:`Tracker.op_start` and :meth:`Tracker.op_done` around each op dispatched
    from outside it: the ops a tracker on top of the mode stack would see, when no
    other dispatch mode is on the stack (one below the tracker could run ops the
    tracker does not see, or run real ops the fake mode never sees: the tracker
    then takes its own place on the stack).
    """
    fake = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
    if fake is None or not callable(getattr(fake, "host", None)):
        return None
    stack = torch._C._len_torch_dispatch_stack()  # the fake mode counts in it
    if any(torch._C._get_dispatch_stack_at(i) is not fake for i in range(stack)):
        return None
    return fake


class _Scratch:
    """A kernel's scratch allocation, as the tracker records storages (``nbytes()``, weakly referenced)."""

    __slots__ = ("__weakref__", "n")

    def __init__(self, n: int) -> None:
        self.n = n

    def nbytes(self) -> int:
        return self.n


class Tracker(ModuleAttribution, ModelTensors, FsdpRoles, TorchDispatchMode):
    """Track live tensor memory by category and module.

    Use it as a context manager around the region to measure::

        with Tracker(model, optimizer) as t:
            with t.phase("forward"):
                loss = model(**batch).loss
            ...
        result = t.result()

    Hooks, saved-tensor hooks and the dispatch mode are all removed on exit,
    also when the region raises.

    Args:
        model: the module whose parameters, buffers and submodules are tracked.
        optimizer: optional optimizer whose state is tracked, or a sequence of
            them (one per parameter when the optimizer steps in backward).
        block_rounding: round each storage up to this many bytes (512 projects
            the CUDA caching allocator; 1 counts exact bytes).
        track_modules: attribute memory to modules (forward and backward).
        groups: names of submodules whose memory (descendants included) is
            broken down by category at the peak (``TrackerResult.groups_at_peak``).
        device_type: count only storages on this device type (``"cuda"``: host
            tensors such as offloaded activations are not device memory). Meta
            tensors are never counted: they hold no memory (the sim engine
            offloads to them to stand for host memory).
        record_trace: keep the ordered allocations and frees in :attr:`trace`
            (what :mod:`memprof.allocator_model` replays); the tensors that exist on
            entry come first, as allocations. Off: :attr:`trace` is None and
            nothing is recorded.
        distributed: the model is sharded with FSDP2 (parameters are DTensors):
            follow ``UntypedStorage.resize_``, let DTensor ops reach the tracker
            as the rank's local tensor ops, ignore the global-shape fake tensors
            of DTensor's sharding propagation, and break the FSDP storages down
            by role (:data:`SHARD_ROLES`).
        record_timeline: keep the live bytes by category after every change,
            against the op counter (:meth:`timeline` downsamples them).
        budget: bytes; the first time the live total rises above it, the state
            is kept (:attr:`crossing`: op, phase, module, live bytes by
            category and by module), for an out-of-memory diagnosis.
        flop_counter: count the region's FLOPs (:attr:`flops`) as this
            ``torch.utils.flop_counter.FlopCounterMode`` (not entered) would: its
            formulas applied to the ops as they reach the tracker, and an op
            without a formula decomposed under the counter's own dispatch mode,
            as ``FlopCounterMode`` does, outside the tracked region (the step
            runs the op itself). The count costs no step of its own.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        block_rounding: int = 1,
        track_modules: bool = True,
        device_type: str | None = None,
        record_trace: bool = False,
        groups: Sequence[str] = (),
        distributed: bool = False,
        record_timeline: bool = False,
        budget: int | None = None,
        flop_counter: Any = None,
        scratch: Mapping[Any, Callable[..., list[int]]] | None = None,
    ) -> None:
        super().__init__()
        #: op -> the bytes its kernel allocates beyond its outputs, freed before it returns
        #: (called as ``f(args, kwargs, out)``; see :meth:`_kernel_scratch`)
        self._scratch = scratch or None
        self._flop_counter = flop_counter
        self._flop_formulas: dict[Any, Any] | None = (
            flop_counter.flop_registry if flop_counter is not None else None
        )
        #: the region's FLOPs (``flop_counter`` given), else None
        self.flops: int | None = 0 if flop_counter is not None else None
        self.model = model
        if optimizer is None:
            self.optimizers: list[torch.optim.Optimizer] = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizers = [optimizer]
        else:
            self.optimizers = list(optimizer)
        self.device_type = device_type
        self.block_rounding = block_rounding
        self.track_modules = track_modules and model is not None
        # storage id -> [nbytes, category index, owner module index]
        self._records: dict[int, list[int]] = {}
        self._keep: list[torch.Tensor] = []
        self._refs: dict[int, weakref.ref] = {}
        #: allocations and frees in order (``record_trace=True``), else None
        self.trace: list[TraceEvent] | None = [] if record_trace else None
        self._cat = [0] * 7
        self.current = 0
        self.peak = 0
        self._dirty = False
        self._cat_at_peak = [0] * 7
        # live bytes (all, activations) per owner module, kept as running totals so
        # the breakdown at a peak is a list copy, not a walk over the live set
        self._mod_tot: list[int] = []
        self._mod_act: list[int] = []
        self._mod_tot_at_peak: list[int] = []
        self._mod_act_at_peak: list[int] = []
        self._phase_at_peak: str | None = None
        self._module_at_peak: int = -1
        self._phase: str | None = None
        self._phase_peaks: dict[str, int] = {}
        self._phase_order: list[str] = []
        self._new_cat = _TMP
        # modules
        self._mod_names: list[str] = []
        self._mod_types: list[str] = []
        self._mod_parent: list[int] = []
        self._mod_index: dict[int, int] = {}
        self._mod_peak: list[int] = []
        self._fw_stack: list[_Frame] = []
        self._bw_stack: list[_Frame] = []
        self._handles: list[Any] = []
        self._exit_stack: contextlib.ExitStack | None = None
        self._closed = False
        self._active = False
        self._param_owner: dict[int, int] = {}
        # groups: module index -> group index (the last group is "other"), and
        # running bytes per (group, category), flat: group * 7 + category
        self.groups = tuple(groups)
        self._grouped = bool(self.groups)
        self._other = len(self.groups)
        self._mod_group: list[int] = []
        self._grp = [0] * (7 * (len(self.groups) + 1))
        self._grp_at_peak = list(self._grp)
        #: where an exception escaped the tracked region (phase, innermost module)
        self.error_phase: str | None = None
        self.error_module: str | None = None
        # FSDP2: storage id -> role index, and running bytes per role
        self.distributed = distributed
        self._role: dict[int, int] = {}
        self._roles = [0] * len(SHARD_ROLES)
        self._roles_at_peak = list(self._roles)
        self._entry_fake: Any = None
        self._dtensor: type | None = None
        self._collectives: dict[Any, str] = {}
        self._active_fake: Any = None
        #: ops dispatched in the region so far (the timeline's x axis)
        self.ops = 0
        #: the last op dispatched (an OpOverload; None before the first): where a failure happened
        self.last_op: Any = None
        #: the fake mode that reports the region's ops to this tracker (None: a dispatch mode of its own)
        self._host: Any = None
        # timeline: flat rows of (op, owner module, 7 category totals), and phase spans
        self._tl: list[int] | None = [] if record_timeline else None
        self._spans: list[list[Any]] = []
        self._budget = budget if budget is not None and budget > 0 else sys.maxsize
        #: the state when the live total first rose above ``budget`` (None: it never did)
        self.crossing: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> Tracker:
        self._closed = False
        stack = contextlib.ExitStack()
        try:
            if self.model is not None:
                self._index_modules(self.model)
                self._register_existing()
                if self.track_modules:
                    self._install_module_hooks()
                self._install_grad_hooks()
            if self.optimizers:
                self._register_optimizer_state()
                for opt in self.optimizers:
                    self._handles.append(opt.register_step_post_hook(self._after_optimizer_step))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack))
            if self.distributed:
                self._enter_distributed(stack)
            self._host = None if self.distributed else _hosting_fake_mode()
            if self._host is not None:
                self._host.host(self)
            else:
                super().__enter__()
            self._active = True
        except BaseException:
            self._remove_hooks()
            stack.close()
            raise
        self._exit_stack = stack
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._active:
                self._active = False
                if self._host is not None:
                    self._host.host(None)
                    self._host = None
                else:
                    super().__exit__(exc_type, exc, tb)
        finally:
            if self._dirty:
                self._snapshot()
            self._remove_hooks()
            if self._exit_stack is not None:
                self._exit_stack.close()
                self._exit_stack = None
            self._closed = True
            self._keep.clear()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fw_stack.clear()
        self._bw_stack.clear()

    # --------------------------------------------------------------- phases
    @contextlib.contextmanager
    def phase(self, name: str, category: Category | None = None) -> Iterator[None]:
        """Mark a phase of the step (``forward``, ``backward``, ``optimizer``...)."""
        prev, prev_cat = self._phase, self._new_cat
        self._phase = name
        span = [name, self.ops, self.ops]
        self._spans.append(span)
        if name not in self._phase_peaks:
            self._phase_peaks[name] = self.current
            self._phase_order.append(name)
        elif self.current > self._phase_peaks[name]:
            self._phase_peaks[name] = self.current
        if category is not None:
            self._new_cat = _CAT_INDEX[Category(category).value]
        try:
            yield
        except BaseException:
            if self.error_phase is None:
                self.error_phase = name
                if self.error_module is None and self._owner() >= 0:
                    self.error_module = self._mod_names[self._owner()]
            raise
        finally:
            if name == "backward":
                self.end_backward()
            span[2] = self.ops
            self._phase, self._new_cat = prev, prev_cat

    # ------------------------------------------------------------- recording
    def register(
        self, t: torch.Tensor, category: Category | str, owner: int = -1, retag: bool = False
    ) -> None:
        """Record a tensor created outside the tracked region (or re-tag it)."""
        cat = _CAT_INDEX[Category(category).value]
        if _is_wrapper(t):
            for inner in _inner_tensors(t):
                self.register(inner, category, owner, retag)
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return
        if not self._counts(t):
            return
        sid = id(st)
        rec = self._records.get(sid)
        if rec is not None:
            if retag and rec[1] != cat:
                self._move(rec, cat)
                if owner >= 0 and owner != rec[2]:
                    self._set_owner(rec, owner)
            return
        self._add(st, sid, cat, owner)

    def _retag(self, t: torch.Tensor, cat: int, from_cat: int) -> None:
        try:
            rec = self._records.get(id(t.untyped_storage()))
        except (NotImplementedError, RuntimeError):
            return
        if rec is not None and rec[1] == from_cat:
            self._move(rec, cat)

    def _move(self, rec: list[int], cat: int) -> None:
        # No snapshot here: a tag names the tensor's role (a tensor saved for
        # backward right after it was made is an activation at that peak too).
        n, old, owner = rec
        self._cat[old] -= n
        self._cat[cat] += n
        if self._grouped:
            self._grp[self._gi(owner, old)] -= n
            self._grp[self._gi(owner, cat)] += n
        rec[1] = cat
        if owner >= 0 and (old == _ACT) != (cat == _ACT):
            self._mod_act[owner] += n if cat == _ACT else -n
        if self._tl is not None and n:
            self._tl_row()

    def _set_owner(self, rec: list[int], owner: int) -> None:
        n, cat, old = rec
        act = cat == _ACT
        if self._grouped:
            self._grp[self._gi(old, cat)] -= n
            self._grp[self._gi(owner, cat)] += n
        if old >= 0:
            self._mod_tot[old] -= n
            if act:
                self._mod_act[old] -= n
        self._mod_tot[owner] += n
        if act:
            self._mod_act[owner] += n
        rec[2] = owner

    def _add(self, st: Any, sid: int, cat: int, owner: int) -> None:
        n = self._size(st)
        self._records[sid] = [n, cat, owner]
        self._refs[sid] = weakref.ref(st, partial(self._on_free, sid))
        if self.trace is not None and n:
            self.trace.append(TraceEvent(sid, n, True, self._phase, self.ops, cat))
        self._cat[cat] += n
        if self._grouped:
            self._grp[self._gi(owner, cat)] += n
        if owner >= 0:
            self._mod_tot[owner] += n
            if cat == _ACT:
                self._mod_act[owner] += n
        cur = self.current + n
        self.current = cur
        if self._fw_stack:
            top = self._fw_stack[-1]
            if cur > top.peak:
                top.peak = cur
        if self._bw_stack:
            top = self._bw_stack[-1]
            if cur > top.peak:
                top.peak = cur
        ph = self._phase
        if ph is not None and cur > self._phase_peaks[ph]:
            self._phase_peaks[ph] = cur
        if cur > self.peak:
            self.peak = cur
            self._dirty = True
        if cur > self._budget and self.crossing is None:
            self._cross()
        if self._tl is not None and n:
            self._tl_row()

    def _tl_row(self) -> None:
        self._tl.extend((self.ops, self._owner(), *self._cat))  # type: ignore[union-attr]

    def _cross(self) -> None:
        """Keep the state at the moment the live total first rose above the budget."""
        self.crossing = self.state()

    def state(self) -> dict[str, Any]:
        """What is live now: op, phase, running module, bytes by category and by module.

        Modules' bytes are inclusive (a module with its submodules), as
        ``ModuleStats.bytes_at_peak``; modules holding nothing are left out.
        """
        n = len(self._mod_names)
        incl = self._mod_tot[:] if self.track_modules else []
        for j in range(len(incl) - 1, 0, -1):
            p = self._mod_parent[j]
            if p >= 0:
                incl[p] += incl[j]
        owner = self._owner()
        return {
            "op": self.ops,
            "live_bytes": self.current,
            "phase": self._phase,
            "module": self._mod_names[owner] if self.track_modules and 0 <= owner < n else None,
            "categories": dict(zip(CATEGORIES, self._cat)),
            "modules": {self._mod_names[j]: incl[j] for j in range(len(incl)) if incl[j]},
        }

    def _size(self, st: Any) -> int:
        """Bytes a storage occupies, rounded up to the allocator's block size."""
        n = st.nbytes()
        r = self.block_rounding
        return ((n + r - 1) // r) * r if r > 1 and n > 0 else n

    def _on_free(self, sid: int, ref: Any) -> None:
        if self._closed:
            self._records.pop(sid, None)
            self._refs.pop(sid, None)
            return
        rec = self._records.get(sid)
        if rec is None:
            self._refs.pop(sid, None)
            return
        if self._dirty:
            # snapshot while the freed storage is still in the live set
            self._snapshot()
        del self._records[sid]
        self._refs.pop(sid, None)
        n, cat, owner = rec
        if self._role:
            role = self._role.pop(sid, None)
            if role is not None:
                self._roles[role] -= n
        if self.trace is not None and n:
            self.trace.append(TraceEvent(sid, n, False, self._phase, self.ops, cat))
        self._cat[cat] -= n
        if self._grouped:
            self._grp[self._gi(owner, cat)] -= n
        self.current -= n
        if owner >= 0:
            self._mod_tot[owner] -= n
            if cat == _ACT:
                self._mod_act[owner] -= n
        if self._tl is not None and n:
            self._tl_row()

    def _snapshot(self) -> None:
        self._dirty = False
        self._cat_at_peak = list(self._cat)
        if self._grouped:
            self._grp_at_peak = self._grp[:]
        if self.distributed:
            self._roles_at_peak = self._roles[:]
        self._phase_at_peak = self._phase
        self._module_at_peak = self._owner()
        if self.track_modules:
            self._mod_tot_at_peak = self._mod_tot[:]
            self._mod_act_at_peak = self._mod_act[:]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if _is_wrapper(t):
            for inner in _inner_tensors(t):
                self._pack(inner)
            return t
        try:
            rec = self._records.get(id(t.untyped_storage()))
        except (NotImplementedError, RuntimeError):
            return t
        if rec is not None and rec[1] == _TMP:
            self._move(rec, _ACT)
        return t

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.distributed:
            if any(issubclass(t, self._dtensor) for t in types):  # type: ignore[arg-type]
                return NotImplemented  # DTensor desugars into local-tensor ops, which come back here
            if self._active_fake() is not self._entry_fake:
                return func(*args, **(kwargs or {}))  # DTensor's sharding propagation: nothing real
            self._fsdp_roles(func, args)
        self.op_start(func)
        return self.op_done(func, args, kwargs, func(*args, **(kwargs or {})))

    def op_start(self, func: Any) -> None:
        """An op is dispatched (hosted by the fake mode: see :func:`_hosting_fake_mode`)."""
        self.ops += 1
        self.last_op = func

    def op_done(self, func: Any, args: Any, kwargs: Any, out: Any) -> Any:
        """An op returned ``out``: its new storages are recorded (and its FLOPs counted); returns ``out``."""
        if self._flop_formulas is not None:
            self._count_flops(func, args, kwargs, out)
        if func is torch.ops.aten.resize_.default:
            self._on_resize(args[0])
            return out
        if isinstance(out, torch.Tensor):
            self._maybe_add(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._maybe_add(o)
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, torch.Tensor):
                            self._maybe_add(oo)
        if self._scratch is not None:
            sizes = self._scratch.get(func)
            if sizes is not None:
                self._kernel_scratch(sizes(args, kwargs or {}, out))
        return out

    def _kernel_scratch(self, sizes: list[int]) -> None:
        """Allocations a kernel makes after its output and frees before it returns.

        No tensor stands for them (the op's own implementation holds them), so each is
        an object of ``nbytes()`` recorded as a temporary of the running module, in
        the trace too, and freed when the list is dropped.
        """
        held = [_Scratch(n) for n in sizes]
        owner = self._owner()
        for s in held:
            self._add(s, id(s), _TMP, owner)
        del held  # each one's weakref calls _on_free, in order

    def _count_flops(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """What ``FlopCounterMode`` counts for the op: its formula, or its decomposition's FLOPs."""
        formulas = self._flop_formulas
        assert formulas is not None and self.flops is not None
        formula = formulas.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        elif _decomposable(func):
            # FlopCounterMode decomposes it and counts the parts (silu_backward, ...): the
            # same, below the tracker (its dispatch mode is off here), the result dropped
            from torch.utils.flop_counter import _FlopCounterMode

            counter = self._flop_counter
            before = counter.get_total_flops()
            with _FlopCounterMode(counter):
                func.decompose(*args, **(kwargs or {}))
            self.flops += counter.get_total_flops() - before

    def _maybe_add(self, t: torch.Tensor) -> None:
        if t.layout is not torch.strided:
            return
        if _is_wrapper(t):
            for inner in _inner_tensors(t):
                self._maybe_add(inner)
            return
        st = t.untyped_storage()
        sid = id(st)
        if sid not in self._records and self._counts(t):
            self._add(st, sid, self._new_cat, self._owner())

    def _counts(self, t: torch.Tensor) -> bool:
        # the tensor's device, not its storage's: a fake tensor's storage is on meta
        dev = t.device.type
        if dev == "meta":
            return False
        return self.device_type is None or dev == self.device_type

    def _on_resize(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        sid = id(st)
        rec = self._records.get(sid)
        if rec is None:
            if self._counts(t):
                self._add(st, sid, self._new_cat, self._owner())
            return
        self._resized(st, sid, rec)

    def _resized(self, st: Any, sid: int, rec: list[int]) -> None:
        n = self._size(st)
        delta = n - rec[0]
        if delta < 0 and self._dirty:
            self._snapshot()
        if self.trace is not None and delta:
            # the allocator gives a resized storage a new block (the copy is
            # brief, so the old block is counted as freed first)
            if rec[0]:
                self.trace.append(TraceEvent(sid, rec[0], False, self._phase, self.ops, rec[1]))
            if n:
                self.trace.append(TraceEvent(sid, n, True, self._phase, self.ops, rec[1]))
        rec[0] = n
        if self._role:
            role = self._role.get(sid)
            if role is not None:
                self._roles[role] += delta
        self._cat[rec[1]] += delta
        if self._grouped:
            self._grp[self._gi(rec[2], rec[1])] += delta
        if rec[2] >= 0:
            self._mod_tot[rec[2]] += delta
            if rec[1] == _ACT:
                self._mod_act[rec[2]] += delta
        self.current += delta
        if self.current > self.peak:
            self.peak = self.current
            self._dirty = True
        if self.current > self._budget and self.crossing is None:
            self._cross()
        if self._tl is not None and delta:
            self._tl_row()

    # ---------------------------------------------------------------- results
    def mark_inputs(self, tensors: Iterable[Any]) -> None:
        """Register the step's input tensors (category ``inputs``)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.register(t, Category.INPUTS, retag=True)

    def live_by_category(self) -> dict[str, int]:
        """Live bytes by category right now."""
        return dict(zip(CATEGORIES, self._cat))

    def timeline(self, max_points: int = 800) -> dict[str, Any] | None:
        """The live bytes by category over the region, downsampled (``record_timeline=True``).

        Every change of the live set is a row (op counter, running module, bytes
        by category). Past ``max_points`` rows, the rows are cut into buckets of
        consecutive rows and each bucket keeps its lowest and its highest total,
        in order, so the shape (and the peak itself) survives the downsampling.

        Returns:
            None without ``record_timeline``; else plain data: ``op`` (the x
            axis: ops dispatched so far), ``categories`` (category -> bytes per
            point), ``module`` (index into ``modules`` of the module running, -1:
            none), ``phases`` (``name``, ``start``, ``end`` op of each phase span,
            in order), ``ops`` (ops in the region), ``rows`` (changes recorded)
            and ``peak_index`` (the point of the highest total).
        """
        tl = self._tl
        if tl is None:
            return None
        return downsample(tl, self._spans, self._mod_names, self.track_modules, self.ops, max_points)

    def result(self, top_level_only: bool = False) -> TrackerResult:
        """The plain-data result. Valid inside or after the tracked region."""
        if self._dirty:
            self._snapshot()
        modules: list[ModuleStats] = []
        if self.track_modules and self._mod_names:
            n = len(self._mod_names)
            incl_total = self._mod_tot_at_peak[:] or [0] * n
            incl_act = self._mod_act_at_peak[:] or [0] * n
            # Modules are indexed parents first: fold children into parents bottom-up.
            for j in range(n - 1, 0, -1):
                p = self._mod_parent[j]
                if p >= 0:
                    incl_total[p] += incl_total[j]
                    incl_act[p] += incl_act[j]
            peaks = list(self._mod_peak)
            # A parent's running peak includes its children's.
            for j in range(n - 1, 0, -1):
                p = self._mod_parent[j]
                if p >= 0 and peaks[j] > peaks[p]:
                    peaks[p] = peaks[j]
            for j in range(n):
                modules.append(
                    ModuleStats(
                        name=self._mod_names[j],
                        type=self._mod_types[j],
                        peak_bytes=peaks[j],
                        activation_bytes=incl_act[j],
                        bytes_at_peak=incl_total[j],
                    )
                )
        phases = [{"name": p, "peak_bytes": self._phase_peaks[p]} for p in self._phase_order]
        mod_at_peak = (
            self._mod_names[self._module_at_peak]
            if self.track_modules and 0 <= self._module_at_peak < len(self._mod_names)
            else None
        )
        return TrackerResult(
            peak_bytes=self.peak,
            categories_at_peak=dict(zip(CATEGORIES, self._cat_at_peak)),
            phases=phases,
            modules=modules,
            peak_phase=self._phase_at_peak,
            peak_module=mod_at_peak,
            final_bytes=self.current,
            live_by_category=self.live_by_category(),
            groups_at_peak={
                name: dict(zip(CATEGORIES, self._grp_at_peak[g * 7 : g * 7 + 7]))
                for g, name in enumerate([*self.groups, "other"])
            }
            if self._grouped
            else {},
            sharding_at_peak=dict(zip(SHARD_ROLES, self._roles_at_peak)) if self.distributed else {},
        )
