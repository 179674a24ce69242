"""Mixture-of-experts layers: which tokens each expert gets, and the experts' CUDA kernels in sim.

transformers (5.x) runs the experts of its MoE models (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, gpt-oss, Jamba...) through one interface (``use_experts_implementation``):
the router picks ``top_k`` experts per token, and the experts module is called with
the tokens, the chosen expert ids and their weights. Its implementations differ in
memory:

* ``grouped_mm`` (transformers' default where ``torch.nn.functional.grouped_mm``
  exists: torch >= 2.10 on sm80+ GPUs and on CPUs): every token-expert pair is one row
  of two grouped matmuls over ``tokens x top_k`` rows. Every tensor's size depends on
  the number of tokens only, never on which experts they were sent to.
* ``batched_mm``: each pair gathers its expert's weights (``tokens x top_k`` copies of
  a weight matrix): also independent of the routing, and large.
* ``eager``: a Python loop over the experts that were hit, each processing the tokens
  routed to it. The sizes of its tensors, and how many run, depend on the routing.

Under fake tensors the router has no values, so the routing is an explicit,
documented assumption (``--moe-routing``): ``balanced`` gives every expert
``tokens x top_k / num_experts`` tokens (what a trained, load-balanced router
approaches), ``worst`` sends every token to the same ``top_k`` experts (the
most a skewed batch can put on one expert). The sim engine hands each experts module
real expert ids built from the assumption in place of the router's fake ones; the
ops on them (one-hot masks, ``nonzero``, sorting, offsets) run on real values, so the
expert loop gets real sizes, and everything else stays fake. The count of such
value-dependent ops tells whether the step's memory could depend on the routing at
all: when none ran, the other assumption gives the same trace, byte for byte.

The cpu and cuda engines measure with the model's real router.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.overrides import TorchFunctionMode

ROUTINGS = ("balanced", "worst")
#: the attribute that marks the assumed routing's real tensors (and what is computed from them)
_TAG = "_memprof_routing"

#: functions whose output shape (or a Python value the model branches on) depends on tensor values
_VALUE_DEPENDENT = {
    "nonzero",
    "argwhere",
    "__bool__",
    "__int__",
    "__index__",
    "item",
    "tolist",
    "unique",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "repeat_interleave",
}


def is_experts(module: torch.nn.Module) -> bool:
    """True for a transformers experts module (its class went through ``use_experts_implementation``)."""
    return (
        hasattr(module, "num_experts")
        and hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and hasattr(module, "_is_expert_parallel")
    )


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The experts modules of a model, with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if is_experts(m)]


def routing_indices(tokens: int, top_k: int, num_experts: int, routing: str) -> torch.Tensor:
    """Expert ids (``tokens x top_k``, int64) for a routing assumption.

    ``balanced``: token ``t`` goes to experts ``(t * top_k + j) mod num_experts``, so each
    expert gets ``tokens * top_k / num_experts`` tokens (rounded) and a token never
    picks one expert twice. ``worst``: every token goes to experts ``0 .. top_k - 1``.

    Raises:
        ValueError: an unknown routing.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTINGS)}")
    k = torch.arange(top_k, dtype=torch.int64)
    if routing == "worst":
        return k.expand(tokens, top_k).contiguous()
    t = torch.arange(tokens, dtype=torch.int64).unsqueeze(1)
    return (t * top_k + k) % num_experts


def experts_implementation(model: torch.nn.Module) -> str | None:
    """The experts implementation the model runs (``grouped_mm``, ``batched_mm``, ``eager``...)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_experts_implementation", None) if config is not None else None
    if impl is None:
        # composite models keep it on the sub-config that holds the experts
        for name in ("text_config", "language_config"):
            sub = getattr(config, name, None)
            impl = getattr(sub, "_experts_implementation", None)
            if impl is not None:
                break
    return impl


@dataclass
class MoeInfo:
    """What the experts layers did in the measured step (``Profile.moe``)."""

    layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    implementation: str | None = None
    #: "balanced" / "worst" (assumed, sim) or "router" (the model's own, measured)
    routing: str = "router"
    #: token-expert rows per experts call (tokens x top_k), the last seen
    rows: int = 0
    #: value-dependent ops run on the routing (0: the memory cannot depend on it)
    value_dependent_ops: int = 0
    #: the measured step's experts calls
    calls: int = 0
    notes: list[str] = field(default_factory=list)
    #: the sim's routing mode (a torch function mode: checkpoint recomputation re-enters it)
    mode: Any = None

    def reset(self) -> None:
        """Forget the warm-up step's calls: the measured step's are counted."""
        self.calls = 0
        self.value_dependent_ops = 0

    def note(self) -> str:
        """One line for the profile's notes."""
        head = (
            f"mixture of experts: {self.layers} experts layer{'s' if self.layers != 1 else ''}, top-{self.top_k} "
            f"of {self.num_experts} experts, {self.implementation or 'custom'} experts implementation"
        )
        if self.routing == "router":
            return f"{head}; measured with the model's own router"
        what = (
            f"each expert assumed to get tokens x {self.top_k} / {self.num_experts}"
            if self.routing == "balanced"
            else f"every token assumed routed to the same {self.top_k} experts"
        )
        other = "worst" if self.routing == "balanced" else "balanced"
        if self.value_dependent_ops:
            tail = f"the memory depends on the routing (see --moe-routing {other})"
        else:
            tail = f"no tensor's size depended on the routing, so --moe-routing {other} gives the same memory"
        return f"{head}; routing {self.routing} ({what}); {tail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "implementation": self.implementation,
            "routing": self.routing,
            # the real router's routing is what it is: no assumption to depend on
            "routing_dependent": self.value_dependent_ops > 0 if self.routing != "router" else None,
            "rows_per_call": self.rows,
        }


class _RealRouting(TorchFunctionMode):
    """Run what is computed from the assumed routing's ids for real, below fake mode.

    Entered inside the sim's ``FakeTensorMode``. A function whose tensor arguments
    are all routing tensors (the ids, or what was computed from them) runs on real
    values with fake mode set aside, factories inside composites (``one_hot``)
    included, and its results are routing tensors too; anything else (a fake tensor
    among the arguments: the tokens, the weights) passes through to fake mode. It
    counts the value-dependent functions it runs.
    """

    def __init__(self, info: MoeInfo) -> None:
        super().__init__()
        self.info = info

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if (
            flat
            and any(getattr(a, _TAG, False) for a in flat)
            and not any(isinstance(a, FakeTensor) for a in flat)
        ):
            name = getattr(func, "__name__", "")
            if name in _VALUE_DEPENDENT or (name == "where" and len(args) + len(kwargs) == 1):
                self.info.value_dependent_ops += 1
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
                    setattr(t, _TAG, True)
            return out
        if flat and getattr(func, "__name__", "") in ("__getitem__", "__setitem__") and len(args) > 1:
            # a 0-d integer index is read as a Python int (a select, a view), as on a GPU
            # after its sync; fake mode cannot read a routing value, so read it here
            args = (args[0], _scalars(args[1]), *args[2:])
        return func(*args, **kwargs)


def _scalars(index: Any) -> Any:
    """Routing tensors of 0 dimensions in an index, as Python ints."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and getattr(x, _TAG, False) and x.dim() == 0:
            with unset_fake_temporarily():
                return int(x.item())
        return x

    if isinstance(index, tuple):
        return tuple(one(x) for x in index)
    return one(index)


@contextlib.contextmanager
def assumed_routing(model: torch.nn.Module, routing: str) -> Iterator[MoeInfo | None]:
    """Feed every experts module of ``model`` the expert ids of a routing assumption.

    Yields the :class:`MoeInfo` that collects what the experts did (None, and nothing
    installed, when the model has no experts). Hooks and the mode are removed on exit.
    """
    found = experts_modules(model)
    if not found:
        yield None
        return
    info = _info(model, found, routing)
    mode = _RealRouting(info)
    info.mode = mode

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return None  # called with keywords: the model's own (fake) routing stays
        hidden, index = args[0], args[1]
        tokens, top_k = int(index.shape[0]), int(index.shape[-1])
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            ids = routing_indices(tokens, top_k, int(cast(Any, module).num_experts), routing).to(index.dtype)
            ids = ids.view(index.shape)
        setattr(ids, _TAG, True)
        info.calls += 1
        info.top_k = top_k
        info.rows = tokens * top_k
        return (hidden, ids, *args[2:])

    handles = [m.register_forward_pre_hook(pre_hook) for _, m in found]
    try:
        with mode:
            yield info
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def router_counts(model: torch.nn.Module) -> Iterator[MoeInfo | None]:
    """Real engines: what the experts did with the model's own router (no assumption)."""
    found = experts_modules(model)
    if not found:
        yield None
        return
    info = _info(model, found, "router")

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if len(args) >= 2 and isinstance(args[1], torch.Tensor):
            info.calls += 1
            info.top_k = int(args[1].shape[-1])
            info.rows = int(args[1].shape[0]) * info.top_k

    handles = [m.register_forward_pre_hook(pre_hook) for _, m in found]
    try:
        yield info
    finally:
        for h in handles:
            h.remove()


def _info(model: torch.nn.Module, found: list[tuple[str, torch.nn.Module]], routing: str) -> MoeInfo:
    config = getattr(model, "config", None)
    top_k = 0
    for sub in (config, getattr(config, "text_config", None)):
        for attr in ("num_experts_per_tok", "top_k", "moe_topk"):
            v = getattr(sub, attr, None) if sub is not None else None
            if isinstance(v, int):
                top_k = v
                break
        if top_k:
            break
    return MoeInfo(
        layers=len(found),
        num_experts=int(cast(Any, found[0][1]).num_experts),
        top_k=top_k,
        implementation=experts_implementation(model),
        routing=routing,
    )
