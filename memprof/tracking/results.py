"""The tracker's categories, FSDP2 roles and plain-data results (no torch needed to read them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple


class Category(str, Enum):
    """Where a tensor's memory comes from."""

    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    INPUTS = "inputs"


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}
_PARAM, _BUF, _GRAD, _OPT, _ACT, _TMP, _INP = range(7)

#: What FSDP2's storages are, beside their category (``Tracker(distributed=True)``):
#: the rank's shards of the parameters, the parameters all-gathered for the block
#: running, the unsharded gradients waiting for the reduce-scatter, and the
#: communication buffers (all-gather output, reduce-scatter input)
SHARD_ROLES: tuple[str, ...] = (
    "sharded_parameters",
    "unsharded_parameters",
    "unsharded_gradients",
    "all_gather_buffers",
    "reduce_scatter_buffers",
)
_SHARDED, _UNSHARDED, _UNSHARDED_GRAD, _AG, _RS = range(5)


class TraceEvent(NamedTuple):
    """One allocation or free of a tracked storage (``Tracker(record_trace=True)``)."""

    #: the storage's id: unique among the storages live at the same time
    storage: int
    #: its size as tracked (rounded up to the tracker's ``block_rounding``)
    nbytes: int
    #: True: allocated (or first seen); False: freed
    alloc: bool
    #: the phase running when it happened (None: before the first phase, e.g. the
    #: tensors that existed on entry and the inputs)
    phase: str | None
    #: the tracker's op counter when it happened (ops dispatched so far in the region)
    op: int = 0
    #: the storage's category then (an index of ``CATEGORIES``; -1: not recorded): what the
    #: depth extension aligns sections of the trace on (parameters, then optimizer state...)
    category: int = -1


@dataclass
class ModuleStats:
    """What the tracker learned about one module (plain data)."""

    name: str
    type: str
    peak_bytes: int = 0  # highest live bytes while the module ran (forward or backward)
    activation_bytes: int = 0  # its activations (with submodules') live at the global peak
    bytes_at_peak: int = 0  # everything it owns (with submodules') live at the global peak


@dataclass
class TrackerResult:
    """Plain-data result of a tracked region."""

    peak_bytes: int
    categories_at_peak: dict[str, int]
    phases: list[dict[str, Any]]
    modules: list[ModuleStats]
    peak_phase: str | None
    peak_module: str | None
    final_bytes: int
    live_by_category: dict[str, int] = field(default_factory=dict)
    #: per group (and "other"): bytes by category at the peak; empty without groups
    groups_at_peak: dict[str, dict[str, int]] = field(default_factory=dict)
    #: FSDP2 (distributed=True): bytes by SHARD_ROLES at the peak; empty otherwise
    sharding_at_peak: dict[str, int] = field(default_factory=dict)
