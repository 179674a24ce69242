"""The levers :func:`memprof.plan.plan` searches: the catalogue, and which apply to a step.

A lever is an optimization that keeps the model's function, with ordered levels of
increasing memory saving and cost (level 0: the step as given). Each level states what
it costs besides FLOPs (:data:`SIDE_COSTS`) and, where known beforehand, its effect on
the memory the estimator composes (:class:`Level.prior`). :func:`build_levers` keeps the
levels that apply to the model and step, checked with each optimization's own
``applies_to``; :func:`apply_steps` is the one place levels are applied to a setup.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from memprof import optimizations
from memprof.engines import runner
from memprof.errors import EnvironmentProblem, InputError
from memprof.models import DTYPES
from memprof.prepare import apply_step
from memprof.workload import StepSetup, Workload, repeated_blocks

#: side costs, in units of FLOP overhead (0.10 = as costly as 10% more FLOPs): what a
#: lever level costs besides FLOPs. A stated guess, used to rank plans; shown in the output.
SIDE_COSTS: dict[str, tuple[float, str]] = {
    "autocast": (0.005, "bf16 matmuls under autocast (float32 master weights kept)"),
    "pure_bf16": (0.04, "numerics: no float32 master weights, updates below bf16 resolution are lost"),
    "adamw8bit": (0.02, "numerics: 8-bit optimizer moments (block-wise quantized)"),
    "paged_adamw8bit": (
        0.05,
        "numerics: 8-bit moments; the state lives in unified memory outside the caching allocator, "
        "paged over PCIe while the GPU is full",
    ),
    "cpu_optimizer": (
        0.3,
        "PCIe traffic and a CPU optimizer step: gradients to host, updated parameters back, every step",
    ),
    "lora": (
        0.1,
        "trains low-rank adapters, not the weights (PEFT): fewer trainable parameters, quality task-dependent",
    ),
    "qlora": (
        0.15,
        "trains adapters over 4-bit NF4 base weights: quantization error in the frozen weights, "
        "dequantization in every forward and backward",
    ),
    "adafactor": (0.04, "numerics: Adafactor's factored second moment, no first moment (retune the LR)"),
    "fsdp_keep": (0.03, "communication: one all-gather per block and forward, reduce-scatter of gradients"),
    "fsdp": (
        0.05,
        "communication: all-gathers in forward and again in backward, reduce-scatter of gradients",
    ),
    "micro_batch": (
        0.02,
        "smaller kernels: lower GPU utilisation (same FLOPs), per halving of the micro-batch",
    ),
    "offload": (0.25, "PCIe traffic: every saved activation crosses the bus twice"),
    "in_backward": (0.01, "no gradient clipping over all parameters, no accumulation"),
    "expandable": (0.001, "none measurable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"),
}

#: registered optimizations never searched, and why
NOT_SEARCHED: dict[str, str] = {
    "pruning": "changes the model's function",
    "quantization": "changes the model's function (and applies to inference)",
    "glu": "changes the model's function",
    "local_attention": "changes the model's function",
    "dynamic_padding": "changes the batches (it needs the data's lengths)",
    "lora": "changes what is trained (searched with --peft lora or any)",
    "qlora": "changes what is trained and quantizes the base weights (searched with --peft qlora or any)",
}

#: what ``--peft`` may ask for, and the adapters each searches
PEFT_CHOICES: dict[str, tuple[str, ...]] = {"lora": ("lora",), "qlora": ("qlora",), "any": ("lora", "qlora")}


@dataclass
class Level:
    """One level of a lever: the optimizations it adds, and what it costs besides FLOPs."""

    label: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    side: str | None = None  # key of SIDE_COSTS
    side_cost: float = 0.0
    #: prior ratios of the memory components (params, state, acts, temps); missing: learned from runs
    prior: dict[str, float] = field(default_factory=dict)
    #: prior FLOP change as a fraction of the baseline's FLOPs (None: learned)
    flops_prior: float | None = 0.0
    #: checkpointing: blocks checkpointed; micro-batches: their number (interpolation)
    amount: float = 0.0
    #: components this level keeps in a dtype of its own whatever the parameters' (8-bit
    #: moments): a lever with ``dtype`` set does not scale them
    own_dtype: tuple[str, ...] = ()


@dataclass
class Lever:
    """An ordered list of levels, level 0 the step as given."""

    name: str
    levels: list[Level]
    #: the lever changes the step's FLOPs (its levels take part in a FLOP signature)
    flops: bool = False
    #: an unmeasured level's activation effect is interpolated from the strongest level's
    interpolate: bool = False
    #: from the same trace, no run of its own (the allocator setting)
    derived: bool = False
    #: the lever changes the parameters' dtype, and with it what is kept in that dtype
    dtype: bool = False


def apply_steps(steps: list[dict[str, Any]], model: torch.nn.Module, setup: StepSetup) -> str | None:
    """Apply each step (``{"name", "options"}``) to ``setup`` in order; why one does not apply, or None.

    ``setup`` is changed in place (pass a copy to try a level).
    """
    for st in steps:
        reason = apply_step(optimizations.make(st["name"], st["options"]), model, setup)
        if reason:
            return reason
    return None


def _opt(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": dict(options)}


def _side(level: Level, key: str, scale: float = 1.0) -> Level:
    level.side = key
    level.side_cost = SIDE_COSTS[key][0] * scale
    return level


def state_bytes_8bit(model: torch.nn.Module) -> int:
    """AdamW8bit's state: two 1-byte moments per element plus a float32 scale per 256-element block.

    torchao and bitsandbytes keep parameters under 4096 elements in float32 (8 bytes an element).
    """
    total = 0
    for p in _unique_params(model):
        n = p.numel()
        total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256)
    return total


def state_bytes_adafactor(model: torch.nn.Module) -> int:
    """Adafactor's state (transformers, no first moment): row and column second moments of each matrix."""
    total = 0
    for p in _unique_params(model):
        e = p.element_size()
        if p.dim() >= 2:
            total += (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) * e
        else:
            total += p.numel() * e
        total += 4  # the step counter
    return total


def _unique_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model))


def build_levers(
    model: torch.nn.Module,
    workload: Workload,
    *,
    derived_allocator: bool = True,
    peft: str | None = None,
) -> tuple[list[Lever], list[str]]:
    """The levers searched for this model and step, and the levers left out with the reason.

    Levels that do not apply to the model or step (checked with each optimization's
    own ``applies_to`` on the baseline setup) are left out.

    Args:
        peft: ``lora`` or ``qlora``: every combination trains those adapters (a lever of
            one level, first, whose step is part of the step as given), so the search
            finds the cheapest stack on top of them.

    Raises:
        InputError: ``peft`` does not apply to this model and step.
    """
    wl = workload
    levers: list[Lever] = []
    left_out: list[str] = []
    base = StepSetup.of(wl)
    if peft is not None:
        forced = _side(Level(peft, [_opt(peft)]), peft)
        reason = apply_steps(forced.steps, model, base)
        if reason:
            raise InputError(f"--peft {peft}: {reason}")
        levers.append(Lever("peft", [forced]))
    train = wl.training
    elem = DTYPES[wl.dtype].itemsize
    adamw_state = 2 * param_bytes(model)  # two moments in the parameters' dtype

    def applies(level: Level) -> str | None:
        return apply_steps(level.steps, model, base.copy())

    def add(lever: Lever) -> None:
        kept = [lever.levels[0]]
        for lv in lever.levels[1:]:
            reason = applies(lv)
            if reason:
                left_out.append(f"{lever.name} {lv.label}: {reason}")
            else:
                kept.append(lv)
        if len(kept) > 1:
            lever.levels = kept
            levers.append(lever)

    if wl.attn == "eager":
        add(
            Lever(
                "attention",
                [
                    Level("eager"),
                    Level("sdpa", [_opt("attention")], prior={"params": 1, "state": 1, "temps": 1}),
                ],
                flops=True,
            )
        )
    if wl.dtype == "float32":
        half = 2 / elem
        add(
            Lever(
                "precision",
                [
                    Level("float32"),
                    _side(
                        Level(
                            "bf16 autocast",
                            [_opt("mixed_precision")],
                            prior={"params": 1, "state": 1, "temps": 1},
                        ),
                        "autocast",
                    ),
                    _side(
                        Level(
                            "pure bf16",
                            [_opt("mixed_precision", pure=True)],
                            # activations too: what keeps its dtype (ids, masks, float32 upcasts
                            # of the loss) only adds to half, so half is optimistic until a run
                            # shows the ratio
                            prior={"params": half, "state": half, "acts": half, "temps": half},
                        ),
                        "pure_bf16",
                    ),
                ],
                dtype=True,
            )
        )
    if train and wl.optimizer == "adamw":
        r8 = state_bytes_8bit(model) / adamw_state if adamw_state else 1.0
        raf = state_bytes_adafactor(model) / adamw_state if adamw_state else 1.0
        add(
            Lever(
                "optimizer",
                [
                    Level("adamw"),
                    # the state is rescaled (measured when a plan uses it); its temporaries taken
                    # as none until measured: optimistic, so a plan is measured rather than skipped
                    _side(
                        Level(
                            "adamw8bit",
                            [_opt("optimizer", type="adamw8bit")],
                            prior={"params": 1, "state": r8, "acts": 1, "temps": 0.0},
                            own_dtype=("state",),
                        ),
                        "adamw8bit",
                    ),
                    _side(
                        Level(
                            "adafactor",
                            [_opt("optimizer", type="adafactor")],
                            prior={"params": 1, "state": raf, "acts": 1},
                        ),
                        "adafactor",
                    ),
                    # the 8-bit state in unified memory: none of it in the device peak
                    _side(
                        Level(
                            "paged adamw8bit",
                            [_opt("optimizer", type="paged_adamw8bit")],
                            prior={"params": 1, "state": 0.0, "acts": 1, "temps": 0.0},
                            own_dtype=("state",),
                        ),
                        "paged_adamw8bit",
                    ),
                ],
            )
        )
    if train and wl.world_size > 1:
        n = wl.world_size
        shard = {"params": 1 / n, "state": 1 / n, "temps": 1 / n, "acts": 1}
        add(
            Lever(
                "fsdp",
                [
                    Level("off"),
                    _side(
                        Level(
                            "keep gathered", [_opt("fsdp", reshard_after_forward=False)], prior=dict(shard)
                        ),
                        "fsdp_keep",
                    ),
                    _side(
                        Level("reshard", [_opt("fsdp", reshard_after_forward=True)], prior=dict(shard)),
                        "fsdp",
                    ),
                ],
            )
        )
    if train:
        n_blocks = len(repeated_blocks(model))
        levels = [Level("off")]
        seen: set[int] = set()
        for every in (4, 2, 1):
            count = math.ceil(n_blocks / every) if n_blocks else 0
            if not count or count in seen:
                continue
            seen.add(count)
            frac = count / n_blocks
            levels.append(
                Level(
                    f"every {every}",
                    [_opt("checkpointing", every=every)],
                    prior={"params": 1, "state": 1, "temps": 1},
                    # one more forward of the checkpointed blocks: about a third of a step's FLOPs
                    flops_prior=0.31 * frac,
                    amount=count,
                )
            )
        add(Lever("checkpointing", levels, flops=True, interpolate=True))
        b = wl.batch_size
        # micro-batches of halving size down to 1 sample (more levels add runs, not insight)
        ks = [k for k in (2, 4, 8, 16) if k <= b and b % k == 0]
        if b > 1 and b not in ks:
            ks.append(b)
        if ks:
            add(
                Lever(
                    "micro-batches",
                    [Level("1")]
                    + [
                        _side(
                            Level(
                                f"{k} x {b // k}",
                                [_opt("grad_accumulation", steps=k)],
                                prior={"params": 1, "state": 1, "temps": 1, "acts": 1 / k},
                                amount=k,
                            ),
                            "micro_batch",
                            math.log2(k),
                        )
                        for k in ks
                    ],
                    flops=True,
                )
            )
    if wl.mode == "train" and wl.seq_len > 1:
        size = 256 if wl.seq_len > 512 else max(1, wl.seq_len // 4)
        head = getattr(model, "get_output_embeddings", lambda: None)()
        n_params = sum(p.numel() for p in _unique_params(model))
        # the head runs once more (its forward, per chunk): 2 x tokens x in x out FLOPs,
        # against about 6 x tokens x parameters for the step
        share = (
            head.weight.numel() / (3 * n_params) if isinstance(head, torch.nn.Linear) and n_params else 0.0
        )
        add(
            Lever(
                "chunked loss",
                [
                    Level("off"),
                    Level(
                        f"{size} tokens",
                        [_opt("chunking", form="loss", size=size)],
                        prior={"params": 1, "state": 1, "temps": 1},
                        flops_prior=share,
                    ),
                ],
                flops=True,
            )
        )
    if wl.mode == "infer" and wl.seq_len > 1:
        size = 256 if wl.seq_len > 512 else max(1, wl.seq_len // 4)
        add(
            Lever(
                "chunked prefill",
                [
                    Level("off"),
                    Level(
                        f"{size} tokens",
                        [_opt("chunking", form="prefill", size=size)],
                        prior={"params": 1, "state": 1, "temps": 1},
                    ),
                ],
                flops=True,
            )
        )
    if wl.mode == "infer":
        add(
            Lever(
                "inference_mode",
                [
                    Level("off"),
                    Level("on", [_opt("inference_mode")], prior={"params": 1, "state": 1, "temps": 1}),
                ],
            )
        )
    if wl.mode == "distill":
        add(
            Lever(
                "teacher",
                [
                    Level("as loaded"),
                    Level(
                        "no_grad",
                        [_opt("distill_teacher", no_grad=True)],
                        prior={"params": 1, "state": 1, "temps": 1},
                    ),
                ],
                flops=True,
            )
        )
    if train:
        add(
            Lever(
                "activation offload",
                [
                    Level("off"),
                    _side(
                        Level(
                            "on", [_opt("activation_offload")], prior={"params": 1, "state": 1, "temps": 1}
                        ),
                        "offload",
                    ),
                ],
            )
        )
        if wl.optimizer != "none":
            # the optimizer state (and then the gradients) stepped in host memory
            add(
                Lever(
                    "optimizer offload",
                    [
                        Level("off"),
                        _side(
                            Level(
                                "state",
                                [_opt("optimizer_offload", gradients=False)],
                                prior={"params": 1, "state": 0.0, "acts": 1, "temps": 0.0},
                            ),
                            "cpu_optimizer",
                        ),
                        _side(
                            Level(
                                "state + gradients",
                                [_opt("optimizer_offload", gradients=True)],
                                prior={"params": 1, "state": 0.0, "acts": 1, "temps": 0.0},
                            ),
                            "cpu_optimizer",
                            1.1,
                        ),
                    ],
                )
            )
            # its effect is structural (no full gradients, no optimizer phase): no ratios to learn
            add(
                Lever(
                    "optimizer in backward",
                    [
                        Level("off"),
                        _side(
                            Level(
                                "on",
                                [_opt("optimizer_in_backward")],
                                prior={"params": 1, "state": 1, "acts": 1, "temps": 1},
                            ),
                            "in_backward",
                        ),
                    ],
                )
            )
    if derived_allocator:
        levers.append(
            Lever(
                "allocator",
                [
                    Level("default"),
                    _side(
                        Level("expandable", [_opt("allocator", expandable_segments=True)], prior={}),
                        "expandable",
                    ),
                ],
                derived=True,
            )
        )
    return levers, left_out


@contextlib.contextmanager
def _fake_optimizer(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, *, simulate: bool = False
) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
    """One parameter of ``shape`` and ``dtype`` on fake tensors with a zero gradient, and its
    optimizer as the sim's runner builds it (``foreach``); fake mode is on inside.

    The optimizer is None for ``none``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        holder = torch.nn.Module()
        holder.weight = weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        opt = runner.make_optimizer(name, holder, foreach=True, simulate=simulate)
        weight.grad = torch.zeros_like(weight)
        yield holder, opt


def optimizer_trace_problem(name: str, dtype: torch.dtype) -> str | None:
    """Why optimizer ``name`` cannot step under fake tensors, or None (one 128 x 128 step)."""
    try:
        with _fake_optimizer(name, (128, 128), dtype) as (_, opt):
            if opt is not None:
                opt.step()
    except (InputError, EnvironmentProblem) as e:
        return str(e)
    except RuntimeError as e:
        # a library reading tensor values (e.g. .tolist()) or running an op fake tensors cannot
        # (torch's fake-tensor limits are RuntimeErrors, NotImplementedError is one too); anything
        # else is a bug and propagates
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def step_transient(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes one step of optimizer ``name`` allocates for a parameter of ``shape`` and ``dtype``.

    Beyond the parameter, its gradient and its state (made by a first step, as the
    warm-up makes them): the step's own temporaries at their peak (Adafactor's float32
    copies of a bfloat16 gradient and update, for one), measured by the tracker on fake
    tensors, in the caching allocator's 512-byte blocks, as the sim engine's runner
    builds the optimizer (``foreach``). Milliseconds for any shape.

    An optimizer stepped in backward (``optimizer_in_backward``) holds them beside the
    parameter's gradient, over the parameters and every state: a floor of its peak.
    0 where it cannot step on fake tensors (:func:`optimizer_trace_problem` says why):
    no floor, which only keeps the estimate optimistic.
    """
    from memprof.tracking import Tracker
    from memprof.units import CUDA_BLOCK_BYTES

    try:
        with _fake_optimizer(name, shape, dtype, simulate=True) as (holder, opt):
            if opt is None:
                return 0
            opt.step()  # the state, as the warm-up leaves it
            weight = holder.get_parameter("weight")
            weight.grad = torch.zeros_like(weight)
            # the parameter, its gradient and the state are registered as there before: views
            # of them (the step's detach) are not new memory
            with Tracker(holder, opt, block_rounding=CUDA_BLOCK_BYTES, track_modules=False) as tracker:
                there = tracker.current
                opt.step()
            return int(tracker.peak - there)
    except (InputError, EnvironmentProblem, RuntimeError):
        return 0
