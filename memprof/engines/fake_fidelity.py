"""Where a fake-tensor step would differ from the real one, on any device, and the corrections.

:mod:`cuda_semantics` applies what CUDA does differently from the CPU. This
module corrects what fake tensors themselves get wrong, so that the sim's trace
is the trace of the real step (the sim engine with CPU semantics agrees with the
cpu engine byte for byte, ``tests/test_coverage.py``):

* **Kernel layouts** (:class:`SimFakeMode`). A few of torch's meta
  kernels, which fake tensors run, give an output another layout than the real
  CPU and CUDA kernels allocate. The layout decides what later ops copy: a
  non-contiguous gradient reaching a ``view``'s backward is copied by
  ``reshape``, a copy the real step never makes. Corrected here:

  - ``native_layer_norm_backward``: the real kernels (``layer_norm_backward_cpu``,
    ``layer_norm_backward_cuda``) allocate the input's gradient contiguous
    (``empty_like(X.contiguous(), LEGACY_CONTIGUOUS_MEMORY_FORMAT)``); the meta
    kernel (torch's decomposition) gives it the layout of the incoming gradient,
    because ``Tensor.to(dtype, memory_format=torch.contiguous_format)`` returns a
    transposed 3-d tensor unchanged when the dtype matches. Seen in Swin, whose
    pooler hands its last layer norm a transposed gradient.

* **Host constants at build time** (:func:`host_constants`). Models compute some
  construction constants on the host with values, e.g. stochastic-depth rates
  ``torch.linspace(0, rate, n, device="cpu").tolist()`` (ConvNeXt, PVT, CvT,
  Hiera...). A real run builds the model with real tensors, so the values exist;
  under fake tensors they do not, and ``.tolist()`` / ``.item()`` raise
  ``DataDependentOutputException``. While the sim builds the model, tensors made
  by a factory called with an explicit host device (``device="cpu"``, the
  transformers convention for host-side arithmetic that must stay off the meta
  device) are real, and so is every op whose tensor arguments are all such host
  tensors: the values are the real run's, and nothing of the step changes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only


def _layer_norm_backward(out: Any, args: Any, kwargs: Any) -> Any:
    grad_input, grad_weight, grad_bias = out
    if grad_input is not None and not grad_input.is_contiguous():
        grad_input = grad_input.contiguous()
    return grad_input, grad_weight, grad_bias


#: op -> fix(out, args, kwargs): the output as the real kernels allocate it
LAYOUT_FIXES: dict[Any, Callable[[Any, Any, Any], Any]] = {
    torch.ops.aten.native_layer_norm_backward.default: _layer_norm_backward,
}


class SimFakeMode(FakeTensorMode):
    """The sim engine's fake tensors: the real kernels' layouts, and the tracker hosted.

    * The ops in :data:`LAYOUT_FIXES` give their outputs the layout of the real
      kernels, inside the fake mode's own dispatch: whatever is above it (the
      tracker) sees only the corrected outputs, as it sees the real kernels'.
    * :meth:`host` takes a listener (the tracker, :func:`memprof.tracking.tracker._hosting_fake_mode`)
      that is told of every op dispatched from outside this mode (not the ops the
      mode runs within one: a decomposition, a layout fix), before and after it,
      exactly the ops a dispatch mode on top of the stack would see when no other
      is there.

    Neither needs a dispatch mode of its own: every mode on the stack costs each
    op a round trip through the dispatcher (a seventh of a sim step each).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener: Any = None
        self._depth = 0

    def host(self, listener: Any) -> None:
        """Report the ops to ``listener`` (``op_start(func)``, ``op_done(func, args, kwargs, out)``), or stop (None)."""
        self._listener = listener

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        listener = self._listener if self._depth == 0 else None
        self._depth += 1
        try:
            if listener is not None:
                listener.op_start(func)
            out = super().dispatch(func, types, args, kwargs)
            fix = LAYOUT_FIXES.get(func)
            if fix is not None:
                out = fix(out, args, kwargs)
            return out if listener is None else listener.op_done(func, args, kwargs, out)
        finally:
            self._depth -= 1


#: factories whose explicit host device marks a host-side constant
_HOST_FACTORIES = frozenset({torch.linspace, torch.logspace, torch.arange, torch.tensor})


class _HostConstants(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        # id -> weak reference: the real host tensors made so far (identity, not equality)
        self.host: dict[int, weakref.ref[torch.Tensor]] = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def _add(self, t: torch.Tensor) -> None:
        self.host[id(t)] = weakref.ref(t)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _HOST_FACTORIES:
            dev = kwargs.get("device")
            real = dev is not None and torch.device(dev).type == "cpu"
        else:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            real = bool(tensors) and all(self._is_host(t) for t in tensors)
        if not real:
            return func(*args, **kwargs)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            out = func(*args, **kwargs)
        tree_map_only(torch.Tensor, self._add, out)
        return out


@contextlib.contextmanager
def host_constants() -> Iterator[None]:
    """While building a model under fake tensors: host-side constants are real (see the module)."""
    with _HostConstants():
        yield
