"""Live tensor storages -> categories and owning modules.

:class:`Tracker` is a ``TorchDispatchMode`` used as a context manager. Every
tensor storage created while it is active is recorded once, with its size, the
category it was created in and the module that was running. A weak reference
to the storage tells when it is freed, so the tracker keeps an exact running
total of live bytes, and its peak, without ever walking the live set per op.

Categories (``Category``):

* ``parameters``, ``buffers``: the model's own tensors, registered on entry.
* ``gradients``: ``param.grad`` (tagged by post-accumulate-grad hooks).
* ``optimizer_state``: tensors held in ``optimizer.state``.
* ``activations``: tensors autograd saved for the backward pass, and module
  outputs (in inference, where nothing is saved, the outputs are what flows).
* ``inputs``: the step's input tensors (registered by the caller).
* ``temporaries``: everything else created during the step.

Module attribution: a storage belongs to the innermost module running when it
was created; in backward, to the module whose backward is running (found with
multi-grad hooks, as ``torch.distributed._tools.mod_tracker`` does).

Groups: given submodule names (``groups=("student", "teacher")``), the tracker
also keeps the categories of each group (a submodule with its descendants) at
the peak; memory outside every group (inputs, code outside modules) is ``other``.

The breakdown at the peak is taken lazily: the live set at a peak is the same
as just before the first free that follows it, so the tracker aggregates the
live set only at those moments, and only when the peak was a new maximum.

The parts: :mod:`~memprof.tracking.tracker` (the Tracker: recording, dispatch,
phases, results), :mod:`~memprof.tracking.modules` (module attribution and
groups), :mod:`~memprof.tracking.model_tensors` (parameters, buffers, gradients,
optimizer state), :mod:`~memprof.tracking.fsdp` (FSDP2 roles and ``resize_``),
:mod:`~memprof.tracking.timeline` (downsampling), :mod:`~memprof.tracking.results`
(categories and plain-data results), :mod:`~memprof.tracking.tensors` (tensor
subclass helpers).

Known limitations:

* Memory not held by tensors (the cuBLAS workspace, the CUDA context, the
  allocator's cache) is invisible here; the cuda engine reads it from the
  allocator instead.
* A storage resized in place (``resize_``) keeps the size it had when first
  seen, except through ``aten.resize_`` itself, which is followed.
* FSDP2 (``distributed=True``): PyTorch frees and re-allocates the gathered
  parameters with ``UntypedStorage.resize_``, which is not a dispatched op;
  the tracker wraps that method while it is active (as PyTorch's own
  ``MemTracker`` does) and restores it on exit.
* Non-reentrant checkpointing installs its own saved-tensor hooks, which hide
  the tensors it saves from the ``activations`` tag (they stay temporaries).
"""

from typing import TYPE_CHECKING, Any

from memprof.tracking.results import (
    CATEGORIES,
    SHARD_ROLES,
    Category,
    ModuleStats,
    TraceEvent,
    TrackerResult,
)

if TYPE_CHECKING:
    from memprof.tracking.tracker import Tracker


def __getattr__(name: str) -> Any:
    # the Tracker imports torch: it loads on first use, so that the plain data (CATEGORIES,
    # the results) reads without torch (memprof.profile, the command line's checks)
    if name == "Tracker":
        from memprof.tracking.tracker import Tracker

        return Tracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CATEGORIES", "SHARD_ROLES", "Category", "ModuleStats", "TraceEvent", "Tracker", "TrackerResult"]
