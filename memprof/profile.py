"""The Profile: plain data, one format for every engine, versioned JSON.

JSON keys other tools rely on (schema ``memprof.profile/1``): ``schema``,
``engine``, ``device``, ``model``, ``workload``, ``peak_bytes``,
``peak_reserved_bytes``, ``categories_at_peak`` (exactly the keys of
:data:`memprof.tracking.CATEGORIES`, summing to ``peak_bytes``), ``phases``
and ``modules``. Bytes are integers. Other keys may be added within a schema
version; removing or renaming one bumps it.

``allocator`` (added in schema 1; None in profiles written before it): the
caching allocator's numbers beside the peak. ``source`` says where they come
from: ``"measured"`` (cuda engine: ``max_memory_reserved`` and
``max_memory_allocated``) or ``"model"`` (sim engine: the step's allocations
replayed through :mod:`memprof.allocator_model`, an estimate); ``conf`` is the
``PYTORCH_CUDA_ALLOC_CONF`` in effect, ``peak_reserved_bytes``,
``peak_allocated_bytes``, ``fragmentation_bytes`` (reserved minus allocated at
their peaks) and ``segments``.

Added within version 1: ``split_at_peak`` (distillation: ``student``,
``teacher``, ``loss`` and ``other``, each the categories of its memory at the
peak; per category the sides sum to ``categories_at_peak``; ``{}`` for other
steps and in profiles written before it).

Added within version 1: ``sharding`` (None unless the step was sharded):
``method`` ("fsdp"), ``world_size``, ``rank`` (the rank measured),
``launcher`` ("fake process group" in the sim engine, "torchrun" on real
ranks), ``at_peak`` (bytes by FSDP role at the peak: ``sharded_parameters``,
``unsharded_parameters``, ``unsharded_gradients``, ``all_gather_buffers``,
``reduce_scatter_buffers``; they overlap the categories, they do not add to
them) and ``zero3_estimate`` (DeepSpeed's per-GPU formula, model states only).
``ranks`` (torchrun): every rank's profile as plain data, rank 0's first.

Added within version 1, in ``allocator``: ``timeline`` (allocated and reserved
over the step, downsampled; ``x`` is ``"op"`` in sim, the tracker's op counter,
and ``"event"`` on cuda, the allocator history's entry), ``at_peak``
(``allocated`` and ``reserved``: the state when each first peaked: ``event``,
``op``, ``allocated_bytes``, ``reserved_bytes``, ``fragmentation_bytes``,
``largest_free_block_bytes``, ``segments``), ``expandable_segments_hint`` (None
when they are on; else the reserved peak with them, ``saved_bytes`` and a
``message`` when they would help) and, on cuda, ``notes``.

Added within version 1: ``timeline`` (None in profiles written before it, and
with the timeline off): the live bytes of the measured step over its ops,
downsampled (each bucket of consecutive changes keeps its lowest and highest
total, so the peak survives). ``x`` is ``"op"``: ``op`` holds the count of
ops dispatched when each point was taken; ``categories`` maps each category
to its bytes per point (they sum to the live total); ``module`` indexes
``modules`` (the module running, -1: none); ``phases`` lists the phase spans
in order (``name``, ``start``, ``end`` op); ``ops`` is the step's op count,
``rows`` the changes recorded, ``peak_index`` the point of the peak.

Added within version 1: ``budget`` (None unless a budget was given): the
budget accounting (``budget_bytes``, ``context_bytes``,
``cublas_workspace_bytes``, ``usable_bytes``: what is left for the tensors
and the allocator's cache; ``need_bytes``; ``fits``), ``crossing`` (the moment
the live tensors first rose above the usable bytes: ``op``, ``phase``,
``module``, ``live_bytes``, ``categories``, ``modules``; None if they never
did), and, when it does not fit, ``fixes`` (single optimizations ranked by the
memory they cut, each measured) and ``plan`` (the cheapest stack that fits,
from :func:`memprof.plan.plan`'s search).

Added within version 1: ``moe`` (None unless the model has mixture-of-experts
layers; :mod:`memprof.engines.moe`): ``layers`` (experts modules),
``num_experts``, ``top_k``, ``implementation`` (transformers' experts
implementation: ``grouped_mm``, ``batched_mm``, ``eager``), ``routing``
(``balanced`` or ``worst``: the sim's assumption; ``router``: the model's own,
measured), ``routing_dependent`` (whether any op's size depended on the
routing; when not, the other assumption gives the same memory),
``rows_per_call`` (token-expert rows per experts call) and, when analyze
measured it, ``other`` (the other assumption's ``routing`` and ``peak_bytes``).

Added within version 1: ``parameters`` (None in profiles written before it):
``trainable`` and ``frozen`` (parameter counts), ``trainable_bytes`` and
``frozen_bytes`` (their device bytes; frozen includes packed 4-bit weights and
their quantization state), and ``adapters`` (LoRA/QLoRA: the adapter
parameters' count, or None without adapters).

Added within version 1: ``host`` (None unless the step keeps tensors in host
memory: offloaded optimizer state or gradients, paged optimizer state,
offloaded activations): ``bytes`` (host memory the step needs at once, never
part of ``peak_bytes``), ``by_kind`` (``optimizer_state``, ``gradients``,
``parameters``, ``activations`` -> bytes), ``pcie_bytes_per_step`` (bytes
crossing the bus each step, both directions) and ``paged_bytes`` (state in
unified memory outside the caching allocator, which pages it to the GPU on
demand; not in ``bytes``: it lives on the host only under memory pressure).
Each is measured from the tensors the step kept on the host side (their
sizes). On the cpu engine device memory is host memory: those tensors are in
the peak as well. ``allocator`` then has ``outside_allocator_bytes`` (the paged
bytes, which neither allocated nor reserved memory counts).

Added within version 1, in ``overheads`` (sim engine): ``cuda_context_bytes``
(an int: the ``--gpu`` preset's estimate, ``--context-overhead``, or the 512 MiB
default; None in profiles written before it), ``gpu`` (the ``--gpu`` preset as
plain data: ``name``, ``sm``, ``memory_bytes``, ``context_bytes``,
``memory_bandwidth_gbps``, ``host_link``, ``host_link_gbps``, ``source``...; None
without one) and ``non_tensor``: every byte beyond the allocator's reserved
memory, named (:func:`memprof.budget.non_tensor`): ``cublas_workspace_bytes``
(per stream x ``cublas_streams``, 1), ``cudnn_workspace_bytes`` (0 unless the
step runs ``convolutions``), ``nccl_buffers_bytes`` (0 unless the world size is
above 1; ``nccl`` has the channels and peers assumed), ``cuda_context_bytes``,
``cuda_context_source``, ``total_bytes`` and ``assumptions`` (one sentence each).

Added within version 1: ``fit`` (None unless ``--gpu`` or ``--budget`` on the sim
engine): ``against`` (the GPU or the budget), ``memory_bytes``,
``reserved_bytes``, ``non_tensor_bytes``, ``need_bytes`` (their sum),
``headroom_bytes`` and ``fits``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.errors import InputError
from memprof.files import write_atomic  # noqa: F401  (re-exported: its old home)
from memprof.tracking import CATEGORIES

SCHEMA = "memprof.profile/1"
SCHEMA_VERSION = 1


@dataclass
class PhaseStat:
    name: str
    peak_bytes: int


@dataclass
class ModuleStat:
    name: str
    type: str
    peak_bytes: int
    activation_bytes: int
    bytes_at_peak: int = 0


@dataclass
class Profile:
    """One measured (or simulated) step."""

    engine: str
    device: str
    model: dict[str, Any]
    workload: dict[str, Any]
    peak_bytes: int
    categories_at_peak: dict[str, int]
    phases: list[PhaseStat]
    modules: list[ModuleStat]
    peak_reserved_bytes: int | None = None
    peak_phase: str | None = None
    peak_module: str | None = None
    engine_reason: str = ""
    overheads: dict[str, Any] = field(default_factory=dict)
    nvml: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    oom: dict[str, Any] | None = None
    #: optimizations applied to the step, in order: {"name", "options"}
    optimizations: list[dict[str, Any]] = field(default_factory=list)
    #: the caching allocator's numbers (see the module docstring), or None
    allocator: dict[str, Any] | None = None
    #: distillation: side (student, teacher, loss, other) -> category -> bytes at the peak
    split_at_peak: dict[str, dict[str, int]] = field(default_factory=dict)
    #: sharded steps: world size, rank, bytes by FSDP role at the peak (see the module docstring)
    sharding: dict[str, Any] | None = None
    #: torchrun: every rank's profile as plain data (rank order), on rank 0's profile
    ranks: list[dict[str, Any]] | None = None
    #: live bytes by category over the step's ops, downsampled (see the module docstring)
    timeline: dict[str, Any] | None = None
    #: a budget's accounting, where it is first crossed, and the fixes (see the module docstring)
    budget: dict[str, Any] | None = None
    #: mixture-of-experts models: the experts layers and the routing used (see the module docstring)
    moe: dict[str, Any] | None = None
    #: trainable and frozen parameters (see the module docstring)
    parameters: dict[str, Any] | None = None
    #: host memory the step keeps off the device (see the module docstring)
    host: dict[str, Any] | None = None
    #: will it fit: reserved + every non-tensor byte against a GPU preset or a budget (see the module docstring)
    fit: dict[str, Any] | None = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        missing = set(CATEGORIES) - set(self.categories_at_peak)
        extra = set(self.categories_at_peak) - set(CATEGORIES)
        if missing or extra:
            raise ValueError(f"categories_at_peak must have exactly {CATEGORIES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # schema first: readers check it before anything else
        return {"schema": d.pop("schema"), **d}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """Read a profile written by :meth:`to_dict`.

        Raises:
            InputError: not a memprof profile, or one from a newer schema.
        """
        if not isinstance(d, dict) or "schema" not in d:
            raise InputError("not a memprof profile (no 'schema' key)")
        schema = str(d["schema"])
        name, _, ver = schema.partition("/")
        if name != "memprof.profile" or not ver.isdigit():
            raise InputError(f"not a memprof profile (schema {schema!r})")
        if int(ver) > SCHEMA_VERSION:
            raise InputError(
                f"profile schema {schema} is newer than this memprof reads ({SCHEMA}); upgrade memprof"
            )
        try:
            d = dict(d)
            d["phases"] = [PhaseStat(**p) for p in d.get("phases", [])]
            d["modules"] = [ModuleStat(**m) for m in d.get("modules", [])]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise InputError(f"malformed memprof profile ({e})") from None

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise InputError(f"profile is not valid JSON ({e.msg} at line {e.lineno})") from None


def from_tracker(
    r: Any,
    *,
    engine: str,
    device: str,
    model: dict[str, Any],
    workload: dict[str, Any],
    categories_at_peak: dict[str, int] | None = None,
    peak_bytes: int | None = None,
    **fields: Any,
) -> Profile:
    """The one place a Profile is built from a tracker's result (:class:`memprof.tracking.TrackerResult`).

    Engines and :func:`memprof.track` give what they know beside it in ``fields``;
    ``categories_at_peak`` and ``peak_bytes`` override the tracker's (the cuda
    engine reconciles them with the allocator's own peak).
    """
    return Profile(
        engine=engine,
        device=device,
        model=model,
        workload=workload,
        peak_bytes=int(r.peak_bytes if peak_bytes is None else peak_bytes),
        categories_at_peak={
            c: int(v)
            for c, v in (r.categories_at_peak if categories_at_peak is None else categories_at_peak).items()
        },
        phases=[PhaseStat(p["name"], int(p["peak_bytes"])) for p in r.phases],
        modules=[
            ModuleStat(m.name, m.type, int(m.peak_bytes), int(m.activation_bytes), int(m.bytes_at_peak))
            for m in r.modules
        ],
        peak_phase=r.peak_phase,
        peak_module=r.peak_module,
        **fields,
    )
