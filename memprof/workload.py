"""The step to measure: a training step or an inference step, and its settings.

:class:`Workload` is what the user asked for (mode, shapes, dtype, optimizer).
:class:`StepSetup` is the whole step as plain data: the workload, the
optimizations applied (``steps``) and what they record for the engines and
``memprof apply`` (micro-batches, config and training-argument changes,
notes...). :class:`StepRunner` runs it on a built model: it rebuilds the
optimizations from ``steps`` and calls their hooks
(:mod:`memprof.optimizations.registry`); what an optimization does to the
model or the step lives in its own module.

A training step is forward, loss, backward, optimizer step and zeroing of the
gradients (``set_to_none``). It is measured in steady state: the engine first
creates the optimizer state as one step leaves it (or runs a whole warm-up step
where more of a step persists), so it exists as in every step of a real run but
the first. An inference step is a forward pass without autograd; for causal
LMs, ``decode_tokens > 0`` adds N decode steps on the KV cache after the prefill.
A distillation step is a training step of the student whose loss compares its
logits with a teacher's (:mod:`memprof.distill_loss`): the teacher runs beside it,
or its top-k logits are read back from disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from memprof.allocator_model import AllocatorSettings
from memprof.bounds import workload_bound_problems
from memprof.choices import MORE_OPTIMIZERS, Attn, DType, Experts, Mode, MoeRouting, Optim, values
from memprof.errors import InputError

if TYPE_CHECKING:
    import torch

    from memprof.models import ResolvedModel

MODES = values(Mode)
#: the parameter dtypes, by name (memprof.models.DTYPES maps them to torch's)
DTYPE_NAMES = values(DType)
#: modes whose step trains (backward, optimizer): the student, in distillation
TRAINING_MODES = ("train", "distill")
OPTIMIZERS = values(Optim)[:-1] + MORE_OPTIMIZERS + ("none",)
ATTNS = values(Attn)
MOE_ROUTINGS = values(MoeRouting)
EXPERTS = values(Experts)


@dataclass(frozen=True)
class Workload:
    """What step to run, on which shapes."""

    mode: str = "train"
    batch_size: int = 8
    seq_len: int = 512
    dtype: str = "float32"
    optimizer: str = "adamw"
    #: "auto" until the model is known (:meth:`for_model`), then "sdpa" or "eager"
    attn: str = "auto"
    task: str | None = None
    decode_tokens: int = 0
    #: distill: the teacher's MODEL spec (resolved like the student's)
    teacher: str | None = None
    #: distill: softmax temperature of both sides of the KL (the KL is scaled by T^2)
    temperature: float = 1.0
    #: distill: weight of the student's own cross-entropy; the KL gets 1 - ce_weight
    ce_weight: float = 0.5
    #: mixture-of-experts models, sim engine: the tokens each expert is assumed to get
    #: (memprof.engines.moe): "balanced" or "worst"; real engines use the real router
    moe_routing: str = "balanced"
    #: mixture-of-experts models: transformers' experts implementation ("auto": its own
    #: choice, grouped_mm where torch has it; "batched_mm"; "eager": a loop over experts)
    experts: str = "auto"
    #: ranks (GPUs) running the step together; ``batch_size`` is per rank. Without
    #: sharding every rank holds a full replica (data parallel), so the per-rank
    #: memory is the single-GPU step's
    world_size: int = 1

    @property
    def training(self) -> bool:
        """True when the step has a backward pass and an optimizer step."""
        return self.mode in TRAINING_MODES

    def validate(self) -> None:
        """Raise InputError listing what is wrong."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPE_NAMES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.attn not in ATTNS:
            problems.append(f"attn must be one of {', '.join(ATTNS)}, got {self.attn!r}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len < 1:
            problems.append(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.decode_tokens < 0:
            problems.append(f"--decode-tokens must be 0 or more, got {self.decode_tokens}")
        if self.decode_tokens and self.mode != "infer":
            problems.append("--decode-tokens applies to --mode infer only")
        if self.mode == "distill" and not self.teacher:
            problems.append("--mode distill needs --teacher MODEL")
        if self.teacher and self.mode != "distill":
            problems.append("--teacher applies to --mode distill only")
        if not self.temperature > 0:
            problems.append(f"--temperature must be above 0, got {self.temperature}")
        if not 0 <= self.ce_weight <= 1:
            problems.append(f"--ce-weight must be between 0 and 1, got {self.ce_weight}")
        if self.world_size < 1:
            problems.append(f"--world-size must be at least 1, got {self.world_size}")
        if self.experts not in EXPERTS:
            problems.append(f"--experts must be one of {', '.join(EXPERTS)}, got {self.experts!r}")
        if self.moe_routing not in MOE_ROUTINGS:
            problems.append(
                f"--moe-routing must be one of {', '.join(MOE_ROUTINGS)}, got {self.moe_routing!r}"
            )
        if not problems:  # the bounds assume the values above are sane
            problems += workload_bound_problems(
                self.batch_size, self.seq_len, self.decode_tokens, self.world_size
            )
        if problems:
            raise InputError("; ".join(problems))

    def for_model(self, rm: ResolvedModel) -> Workload:
        """This workload with ``attn="auto"`` resolved to the model's own implementation.

        What ``from_pretrained`` picks: sdpa when the model class supports it, else
        eager (:meth:`ResolvedModel.default_attn`). Commands resolve it as soon as the
        MODEL spec is, so profiles, recipes and optimizations never see ``auto``
        (it stays for factory models, whose attention is their own code).
        """
        attn = rm.resolve_attn(self.attn)
        return self if attn == self.attn else replace(self, attn=attn)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.mode != "distill":
            # other steps' profiles stay as they were: no distillation keys
            for k in ("teacher", "temperature", "ce_weight"):
                del d[k]
        if self.world_size == 1:
            del d["world_size"]  # single-GPU profiles stay as they were
        if self.experts == "auto":
            del d["experts"]
        if self.moe_routing == "balanced":
            del d["moe_routing"]  # the default; Profile.moe says what was used
        return d


@dataclass
class StepSetup:
    """The step to run, as plain data: a workload, the optimizations applied, what they record.

    Engines run it (:class:`StepRunner`, which calls the hooks of the
    optimizations in ``steps``); ``memprof apply`` persists the part that lives
    in a checkpoint (``config_updates``, storage dtype, the optimizations'
    model transforms) and writes the rest as training arguments. The fields
    below are the ones several optimizations, the engines or the reports read;
    a setting only one optimization reads is that optimization's config.
    """

    workload: Workload
    #: gradient accumulation: the batch runs as this many equal micro-batches
    micro_batches: int = 1
    #: autocast dtype ("bfloat16" / "float16") of the mixed_precision step, or None
    #: (read by the fsdp step: the sharded parameters' compute dtype)
    autocast: str | None = None
    #: float16 autocast scales the loss (torch.amp.GradScaler)
    grad_scaler: bool = False
    #: distill: the teacher's forward under torch.no_grad, its parameters frozen
    teacher_no_grad: bool = False
    #: distill: the teacher's parameter dtype (None: the student's)
    teacher_dtype: str | None = None
    #: distill: the teacher's top-k logits per token precomputed offline and read
    #: back each step, instead of the teacher itself (0: off)
    teacher_topk: int = 0
    #: model transforms in the form a saved checkpoint holds (masks folded in,
    #: BERT's pruned heads zeroed rather than removed): set by ``memprof apply``
    checkpoint_form: bool = False
    #: token lengths of the data sample (--data / --lengths): what dynamic padding batches
    data_lengths: list[int] = field(default_factory=list)
    #: dynamic padding's plan over the sample (memprof.data.PaddingPlan.to_dict), or None: fixed
    padding: dict[str, Any] | None = None
    #: the step runs on the checkpoint's trained weights (set by compare and apply from the
    #: model and engine): optimizations that replace layers with new random ones refuse it
    pretrained: bool = False
    #: the optimizations applied, in order: {"name", "options"}; the step runner
    #: rebuilds them from here and calls their hooks (memprof.optimizations.registry)
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: config.json changes that persist in a checkpoint (memprof apply)
    config_updates: dict[str, Any] = field(default_factory=dict)
    #: transformers TrainingArguments fields for the training-loop changes
    training_args: dict[str, Any] = field(default_factory=dict)
    #: parameter sharding across ``workload.world_size`` ranks: "fsdp" (FSDP2's
    #: fully_shard per repeated block, then the root) or None (the engines report it)
    shard: str | None = None
    #: FSDP2 reshard_after_forward (reported with the sharding)
    reshard_after_forward: bool = True
    #: CUDA caching allocator settings (memprof.allocator_model.AllocatorSettings as plain
    #: data; empty: PyTorch's defaults). They only take effect through
    #: PYTORCH_CUDA_ALLOC_CONF before CUDA initialises: the cuda engine measures
    #: them in a child process, the sim engine replays its trace through a model
    alloc_conf: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, workload: Workload | StepSetup) -> StepSetup:
        """A setup for a plain workload (a copy when given a setup)."""
        if isinstance(workload, StepSetup):
            return workload.copy()
        return cls(workload=workload)

    def copy(self) -> StepSetup:
        return replace(
            self,
            padding=dict(self.padding) if self.padding is not None else None,
            steps=[dict(s) for s in self.steps],
            config_updates=dict(self.config_updates),
            training_args=dict(self.training_args),
            alloc_conf=dict(self.alloc_conf),
            notes=list(self.notes),
        )

    def update_workload(self, **changes: Any) -> None:
        self.workload = replace(self.workload, **changes)

    def has_step(self, name: str) -> bool:
        """True when the optimization ``name`` is among the applied steps."""
        return any(s["name"] == name for s in self.steps)

    def validate(self) -> None:
        """Raise InputError listing what is wrong with the plain data.

        What the applied optimizations find wrong is checked by
        :func:`memprof.optimizations.registry.check_setup`, which calls this first.
        """
        problems = self.problems()
        if problems:
            raise InputError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the plain data (the workload raises on its own problems)."""
        self.workload.validate()
        problems = []
        if self.micro_batches < 1:
            problems.append(f"micro-batches must be at least 1, got {self.micro_batches}")
        elif self.workload.batch_size % self.micro_batches:
            problems.append(
                f"batch size {self.workload.batch_size} does not split into {self.micro_batches} equal micro-batches"
            )
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPE_NAMES:
            problems.append(
                f"unknown teacher dtype {self.teacher_dtype!r}; use one of: {', '.join(DTYPE_NAMES)}"
            )
        if self.teacher_topk < 0:
            problems.append(f"teacher top-k must be 0 or more, got {self.teacher_topk}")
        if self.workload.mode != "distill" and (
            self.teacher_no_grad or self.teacher_dtype or self.teacher_topk
        ):
            problems.append("teacher settings apply to distillation steps only")
        if self.shard is not None:
            if self.shard != "fsdp":
                problems.append(f"unknown sharding {self.shard!r}; use: fsdp")
            elif self.workload.world_size < 2:
                problems.append("sharding needs --world-size N with N >= 2")
        if self.alloc_conf:
            try:
                AllocatorSettings.from_dict(self.alloc_conf)
            except InputError as e:
                problems.append(str(e))
        return problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workload"] = self.workload.to_dict()
        d["data_lengths"] = len(self.data_lengths)  # the count: the lengths are the data's
        return d


OPTIMIZER_IMPLS = ("auto", "foreach", "fused", "for-loop")


def main_output(out: Any) -> torch.Tensor | None:
    """The tensor a quality check compares: logits, else the last hidden state, else the first tensor."""
    import torch

    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        vals = list(out.values())
    elif isinstance(out, (tuple, list)):
        vals = list(out)
    else:
        vals = [getattr(out, k) for k in getattr(out, "keys", lambda: [])()]
    for v in vals:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v
    return None


def split_batch(inputs: dict[str, Any], k: int, batch_size: int) -> list[dict[str, Any]]:
    """``k`` equal micro-batches of ``inputs`` (views along the batch dimension).

    Qwen2-VL's inputs are not all batch-first: its ``pixel_values`` are every image's
    patches in turn (one image per sequence, each of the same grid, as memprof builds
    them), and its M-RoPE ``position_ids`` are ``(3, batch, seq)``; each is cut where
    its sequences are.
    """
    import torch

    if k <= 1:
        return [inputs]
    size = batch_size // k
    packed = "image_grid_thw" in inputs

    def part(key: str, v: Any, i: int) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] == batch_size:
                return v[i * size : (i + 1) * size]
            if key == "position_ids" and v.dim() == 3 and v.shape[1] == batch_size:
                return v[:, i * size : (i + 1) * size]
            if packed and key == "pixel_values" and v.shape[0] % batch_size == 0:
                rows = v.shape[0] // batch_size * size
                return v[i * rows : (i + 1) * rows]
            return v
        if isinstance(v, list):
            return [part(key, x, i) for x in v]
        return v

    return [{key: part(key, v, i) for key, v in inputs.items()} for i in range(k)]


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ModuleList/Sequential of two or more children of one type."""
    import torch

    best: list[torch.nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            kids = list(mod.children())
            if len(kids) >= 2 and len({type(c) for c in kids}) == 1 and len(kids) > len(best):
                best = kids
    return best
