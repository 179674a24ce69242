"""FSDP2 sharding: the process group, the wrapping, and the per-rank figures.

memprof shards with PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``),
one unit per repeated block (a transformer layer) and then the root, as
torchtitan and transformers' FSDP2 integration do. So the memory it reports is
that of the real FSDP2 code: sharded parameters, the all-gather buffers, the
gathered (unsharded) parameters of the blocks running, the unsharded gradients
and the reduce-scatter buffers, at the moments FSDP2 creates and frees them.

Where the ranks come from:

* the sim engine: a *fake* process group (``torch.testing._internal.distributed.fake_pg``)
  of ``world_size`` ranks in one process. Its collectives return at once and move
  nothing, so shapes and memory are right and values are not (fake tensors have
  none anyway). Rank 0 is simulated: with uneven shards FSDP2 pads every rank's
  storage to the same size, and rank 0 holds the largest local shard.
* the cpu and cuda engines: a real process group started by ``torchrun``
  (gloo on CPU, NCCL on GPUs); every rank measures itself and rank 0 gathers
  the profiles (:func:`gather_profiles`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.errors import EnvironmentProblem, InputError
from memprof.workload import repeated_blocks

if TYPE_CHECKING:
    import torch

#: DeepSpeed's ZeRO-3 estimate (``estimate_zero3_model_states_mem_needs``, no offload):
#: bytes per parameter over all ranks (fp16 parameters and gradients, fp32 master
#: copy and Adam's two moments) and bytes per parameter of the largest layer
ZERO3_BYTES_PER_PARAM = 18
ZERO3_LARGEST_LAYER_BYTES = 4


@dataclass(frozen=True)
class Launch:
    """The distributed launch this process is part of (torchrun's environment)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Launch | None:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or None outside a launch of 2+ ranks."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            return None
        if world < 2 or "MASTER_ADDR" not in os.environ:
            return None
        return cls(rank=rank, world_size=world, local_rank=local)


@contextlib.contextmanager
def fake_group(world_size: int, rank: int = 0) -> Iterator[Any]:
    """A fake process group of ``world_size`` ranks in this process, and its device mesh.

    The mesh is made before any fake tensor mode is entered (DeviceMesh needs
    real tensors); the group is destroyed on exit, also on errors.

    Raises:
        EnvironmentProblem: another process group is already initialised here.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise EnvironmentProblem(
            "a process group is already initialised in this process: the sim engine's fake ranks need their own"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def init_launched_group(device_type: str, timeout_s: float = 600.0) -> Any:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) once; its device mesh.

    Raises:
        EnvironmentProblem: the backend is missing or the rendezvous fails.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    launch = Launch.from_env()
    if launch is None:
        raise InputError("not launched by torchrun with 2 or more ranks")
    if device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise EnvironmentProblem(
                f"torchrun rendezvous ({backend}) failed: {str(e).splitlines()[0]}"
            ) from None
    return init_device_mesh(device_type, (dist.get_world_size(),))


def blocks_to_shard(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 wraps one unit each (the longest list of same-type children)."""

    return repeated_blocks(model)


def shard_model(
    model: torch.nn.Module,
    mesh: Any,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    separate_head: bool = False,
) -> str:
    """``fully_shard`` each repeated block, then the root (the rest: embeddings, head, norms).

    ``param_dtype`` (mixed precision): FSDP2's ``MixedPrecisionPolicy`` gathers the
    parameters in this dtype and reduces gradients in float32, as FSDP2 users
    configure mixed precision (the sharded parameters and the optimizer stay in
    the model's dtype).

    ``separate_head`` (a chunked loss calls the base model and the output layer
    itself, not the root's forward): the base model (embeddings, final norm) and
    the output layer are FSDP units of their own, as torchtitan shards them, so
    each call gathers what it uses.

    Returns:
        how it was sharded, for the report.

    Raises:
        InputError: the model has no repeated blocks, or a scalar parameter.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = blocks_to_shard(model)
    if not blocks:
        raise InputError(
            f"{type(model).__name__} has no repeated blocks: FSDP2 would gather the whole model at once"
        )
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # fully_shard refuses them, on a GPU too (CLIP's logit_scale)
        raise InputError(
            f"{type(model).__name__} has a scalar parameter ({scalars[0]}), which FSDP2's fully_shard "
            "does not shard; as FSDP2 asks, make it a 1-D tensor of one element"
        )
    kind = type(blocks[0]).__name__  # before fully_shard renames the class (FSDP<name>)
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kw)
    extra = ""
    if separate_head:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        base = getattr(model, "model", None)
        if head is None or not isinstance(base, torch.nn.Module):
            raise InputError(
                f"{type(model).__name__}: a chunked loss with FSDP2 needs a base model and an output layer"
            )
        get_embed = getattr(model, "get_input_embeddings", None)
        embed = get_embed() if callable(get_embed) else None
        if embed is not None and head.weight is embed.weight:
            raise InputError(
                f"{type(model).__name__} ties its output layer to its input embeddings: a chunked loss with FSDP2 "
                "would need the shared weight in two units"
            )
        fully_shard(base, **kw)
        fully_shard(head, **kw)
        extra = "; the base model and the output layer are units of their own (the chunked loss calls them)"
    fully_shard(model, **kw)
    n = mesh.size()
    how = (
        "gathered parameters freed after each block's forward"
        if reshard_after_forward
        else ("gathered parameters kept from forward to backward (reshard_after_forward=False)")
    )
    mp = (
        f"; MixedPrecisionPolicy(param_dtype={str(param_dtype).removeprefix('torch.')}, reduce_dtype=float32)"
        if param_dtype is not None
        else ""
    )
    return f"FSDP2 fully_shard over {n} ranks: {len(blocks)} {kind} units and the root (the rest){extra}; {how}{mp}"


class LocalShards:
    """The sim's optimizer steps the rank's local shards instead of the DTensor parameters.

    DTensor runs an optimizer step by dispatching the same local ops on each
    rank's shard, so the memory is the same; but its sharding propagation of
    multi-tensor (foreach) ops costs time quadratic in the number of parameters
    on fake tensors (minutes for a 70B model). Here each parameter's local shard
    becomes a plain parameter sharing its storage, its gradient is the local
    shard of the DTensor gradient (handed over before each step), and the
    state the optimizer creates is the rank's. Real ranks (torchrun) step the
    DTensors themselves.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        import torch

        self._pairs = []
        for p in params:
            local = getattr(p, "_local_tensor", p)
            self._pairs.append((p, torch.nn.Parameter(local, requires_grad=p.requires_grad)))
        #: the plain parameters the optimizer steps (views of the shards)
        self.params = [lp for _, lp in self._pairs]
        self._handle: Any = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand the gradient shards to the local parameters before each step."""
        self._handle = optimizer.register_step_pre_hook(self._hand_over)

    def _hand_over(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        for p, lp in self._pairs:
            g = p.grad
            lp.grad = None if g is None else getattr(g, "_local_tensor", g)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def largest_layer_params(model: torch.nn.Module) -> int:
    """Parameters of the largest single module's own parameters (DeepSpeed's "largest layer")."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def zero3_estimate(total_params: int, largest_layer: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed's published ZeRO-3 per-GPU estimate of model states (no offload).

    ``largest layer x 4 B + 18 B x parameters / GPUs``: parameters, gradients
    and Adam state only; activations, temporaries and communication buffers are
    not in it.
    """
    states = ZERO3_BYTES_PER_PARAM * total_params // world_size
    layer = ZERO3_LARGEST_LAYER_BYTES * largest_layer
    return {
        "formula": "largest_layer_params x 4 B + 18 B x params / world_size (model states only)",
        "source": "DeepSpeed estimate_zero3_model_states_mem_needs, cpu_offload=False",
        "bytes": states + layer,
        "largest_layer_params": largest_layer,
        "parameters": total_params,
        "world_size": world_size,
    }


def gather_profiles(profile_dict: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's profile (as plain data) on rank 0, in rank order; None on the others."""
    import torch.distributed as dist

    world = dist.get_world_size()
    rank = dist.get_rank()
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(profile_dict, out, dst=0)
    return out


__all__ = [
    "Launch",
    "blocks_to_shard",
    "fake_group",
    "gather_profiles",
    "init_launched_group",
    "largest_layer_params",
    "shard_model",
    "zero3_estimate",
]
