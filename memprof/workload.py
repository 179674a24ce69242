"""The step to measure: a training step or an inference step, and its settings.

:class:`Workload` is what the user asked for (mode, shapes, dtype, optimizer).
:class:`StepSetup` is the whole step as plain data: the workload plus what the
optimizations of a recipe changed (micro-batches, autocast, checkpointing,
optimizer implementation...). :class:`StepRunner` runs it on a built model.

A training step is forward, loss, backward, optimizer step and zeroing of the
gradients (``set_to_none``). It is measured in steady state: the engine runs one
warm-up step first, so the optimizer state exists as in every step of a real run
but the first. An inference step is a forward pass without autograd; for causal
LMs, ``decode_tokens > 0`` adds N decode steps on the KV cache after the prefill.
A distillation step is a training step of the student whose loss compares its
logits with a teacher's (:mod:`memprof.distill`): the teacher runs beside it,
or its top-k logits are read back from disk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from memprof.allocator import AllocatorSettings
from memprof.choices import MORE_OPTIMIZERS, Attn, Experts, Mode, MoeRouting, Optim, values
from memprof.chunking import cache_keyword, chunked_forward, chunked_lm_loss, output_cache
from memprof.distill import DistillLoss, DistillPair, TopkTeacher, teacher_inputs
from memprof.errors import EnvironmentProblem, InputError
from memprof.models import DTYPES, InputBuilder, ResolvedModel, call_model
from memprof.surgery import apply_transform
from memprof.units import format_bytes

MODES = values(Mode)
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
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
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
    """The step to run, as plain data: a workload and the settings optimizations change.

    Engines interpret it (:class:`StepRunner`); ``memprof apply`` persists the
    part that lives in a checkpoint (``config_updates``, storage dtype) and
    writes the rest as training arguments.
    """

    workload: Workload
    #: gradient accumulation: the batch runs as this many equal micro-batches
    micro_batches: int = 1
    #: autocast dtype ("bfloat16" / "float16") around forward and loss, or None
    autocast: str | None = None
    #: scale the loss (float16 autocast): torch.amp.GradScaler
    grad_scaler: bool = False
    #: activation checkpointing of every n-th repeated block; 0 = off
    checkpointing: int = 0
    #: saved activations go to host memory (torch.autograd.graph.save_on_cpu)
    offload_activations: bool = False
    #: optimizer implementation: auto (the engine's default), foreach, fused, for-loop
    optimizer_impl: str = "auto"
    #: zero_grad(set_to_none=...) after the step
    set_to_none: bool = True
    #: step each parameter in its gradient hook (full gradients never coexist)
    optimizer_in_backward: bool = False
    #: inference under torch.inference_mode instead of torch.no_grad
    inference_mode: bool = False
    #: pass use_cache to the model's forward (None: the config's default)
    use_cache: bool | None = None
    #: causal LMs, training: LM head and cross-entropy over chunks of this many tokens (0: off)
    loss_chunk: int = 0
    #: causal LMs, inference: the forward (or prefill) in chunks of this many tokens (0: off)
    prefill_chunk: int = 0
    #: chunks extend the KV cache (exact); False: independent chunks (changes outputs)
    chunk_exact: bool = True
    #: distill: the teacher's forward under torch.no_grad, its parameters frozen
    teacher_no_grad: bool = False
    #: distill: the teacher's parameter dtype (None: the student's)
    teacher_dtype: str | None = None
    #: distill: the teacher's top-k logits per token precomputed offline and read
    #: back each step, instead of the teacher itself (0: off)
    teacher_topk: int = 0
    #: config attributes changed before the model is built (e.g. sliding_window)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: model surgery, in order (memprof.surgery): {"kind", ...options}
    model_transforms: list[dict[str, Any]] = field(default_factory=list)
    #: token lengths of the data sample (--data / --lengths): what dynamic padding batches
    data_lengths: list[int] = field(default_factory=list)
    #: dynamic padding's plan over the sample (memprof.data.PaddingPlan.to_dict), or None: fixed
    padding: dict[str, Any] | None = None
    #: the step runs on the checkpoint's trained weights (set by compare and apply from the
    #: model and engine): optimizations that replace layers with new random ones refuse it
    pretrained: bool = False
    #: the optimizations applied, in order: {"name", "options"}
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: config.json changes that persist in a checkpoint (memprof apply)
    config_updates: dict[str, Any] = field(default_factory=dict)
    #: transformers TrainingArguments fields for the training-loop changes
    training_args: dict[str, Any] = field(default_factory=dict)
    #: parameter sharding across ``workload.world_size`` ranks: "fsdp" (FSDP2's
    #: fully_shard per repeated block, then the root) or None
    shard: str | None = None
    #: FSDP2 reshard_after_forward: free each block's unsharded parameters after its
    #: forward (all-gathered again in backward); False keeps them to the backward
    reshard_after_forward: bool = True
    #: CUDA caching allocator settings (memprof.allocator.AllocatorSettings as plain
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
            model_transforms=[dict(t) for t in self.model_transforms],
            config_overrides=dict(self.config_overrides),
            padding=dict(self.padding) if self.padding is not None else None,
            steps=[dict(s) for s in self.steps],
            config_updates=dict(self.config_updates),
            training_args=dict(self.training_args),
            alloc_conf=dict(self.alloc_conf),
            notes=list(self.notes),
        )

    def update_workload(self, **changes: Any) -> None:
        self.workload = replace(self.workload, **changes)

    def validate(self) -> None:
        """Raise InputError listing what is wrong."""
        self.workload.validate()
        problems = []
        if self.micro_batches < 1:
            problems.append(f"micro-batches must be at least 1, got {self.micro_batches}")
        elif self.workload.batch_size % self.micro_batches:
            problems.append(
                f"batch size {self.workload.batch_size} does not split into {self.micro_batches} equal micro-batches"
            )
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            problems.append(f"optimizer implementation must be one of {', '.join(OPTIMIZER_IMPLS)}")
        if self.optimizer_in_backward and self.micro_batches > 1:
            problems.append("the optimizer cannot step in backward while gradients accumulate")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            problems.append(f"unknown teacher dtype {self.teacher_dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.teacher_topk < 0:
            problems.append(f"teacher top-k must be 0 or more, got {self.teacher_topk}")
        if self.workload.mode != "distill" and (
            self.teacher_no_grad or self.teacher_dtype or self.teacher_topk
        ):
            problems.append("teacher settings apply to distillation steps only")
        if self.shard and self.optimizer_in_backward:
            problems.append(
                "the optimizer cannot step in backward with FSDP2: it assigns the gradient shards after "
                "the reduce-scatter, where no gradient hook fires"
            )
        if self.optimizer_in_backward and self.grad_scaler:
            problems.append(
                "the optimizer cannot step in backward with a gradient scaler (unscaling needs all gradients)"
            )
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
        if problems:
            raise InputError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workload"] = self.workload.to_dict()
        d["data_lengths"] = len(self.data_lengths)  # the count: the lengths are the data's
        return d


OPTIMIZER_IMPLS = ("auto", "foreach", "fused", "for-loop")


@dataclass
class RunEnv:
    """What the engine tells the step runner about where it runs."""

    #: "cpu" or "cuda": the device tensors live on
    device_type: str = "cpu"
    #: the sim engine: CPU fake tensors standing for a CUDA GPU
    simulate_cuda: bool = False
    #: the engine's optimizer implementation for impl "auto" (None: torch's default)
    default_foreach: bool | None = None
    #: a context the checkpoint recomputation runs in (the sim engine re-enters its
    #: CUDA-semantics mode there: torch function modes do not follow into backward)
    recompute_context: Callable[[], Any] | None = None
    #: the device mesh of the ranks a sharded step runs on (memprof.sharding)
    mesh: Any = None


def make_optimizer(
    name: str,
    model: torch.nn.Module,
    *,
    foreach: bool | None,
    fused: bool | None = None,
    params: list[torch.nn.Parameter] | None = None,
) -> torch.optim.Optimizer | None:
    """The optimizer of a training step.

    Args:
        name: ``adamw``, ``sgd`` (momentum 0.9), ``adafactor`` (transformers; fixed
            learning rate, factored second moments), ``adamw8bit`` (torchao or
            bitsandbytes) or ``none``.
        model: its trainable parameters are optimized (unless ``params`` is given).
        foreach: the multi-tensor implementation; ``None`` lets torch choose for
            the device (the sim engine passes ``True``, CUDA's default).
        fused: the fused kernel (AdamW, SGD).
        params: optimize these parameters only.

    Raises:
        InputError: unknown name, or an implementation this optimizer or build lacks.
        EnvironmentProblem: the 8-bit optimizer's library is not installed.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if name == "none" or not params:
        return None
    impl: dict[str, Any] = {}
    if fused:
        impl["fused"] = True
    elif foreach is not None:
        impl["foreach"] = foreach
    try:
        if name == "adamw":
            return torch.optim.AdamW(params, lr=1e-5, **impl)
        if name == "sgd":
            return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **impl)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"optimizer {name} with {impl}: {str(e).splitlines()[0]}") from None
    if name == "adafactor":
        if fused:
            raise InputError("adafactor has no fused implementation")
        from transformers.optimization import Adafactor

        # A fixed learning rate: relative steps and parameter scaling compare tensors
        # with Python numbers, which fake tensors cannot answer (and the memory is the same).
        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw8bit":
        return _adamw8bit(params)
    raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _adamw8bit(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from memprof.surgery import quiet_imports

    try:
        with quiet_imports():
            from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-5)
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    except ImportError:
        pass
    raise EnvironmentProblem(
        "the adamw8bit optimizer needs torchao or bitsandbytes: pip install torchao (or bitsandbytes on a GPU)"
    )


class OptimizerInBackward:
    """One optimizer per parameter, stepped in the parameter's gradient hook.

    The full set of gradients never exists at once: each gradient is consumed
    and freed as soon as it is accumulated (the PyTorch tutorial
    "How to save memory by fusing the optimizer step into the backward pass").
    """

    def __init__(self, make: Any, params: list[torch.nn.Parameter]) -> None:
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for p in params:
            opt = make([p])
            if opt is None:
                continue
            self.optimizers[p] = opt
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        opt = self.optimizers[p]  # type: ignore[index]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _SimScaler:
    """The memory of torch.amp.GradScaler without its data-dependent branch.

    GradScaler.step reads found_inf with .item(), which fake tensors cannot
    answer; the tensors it creates (scale, found_inf, in-place unscaling) are
    the same here.
    """

    def __init__(self) -> None:
        self._scale: torch.Tensor | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            self._scale = torch.full((), 2.0**16, dtype=torch.float32, device=loss.device)
        return loss * self._scale

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        assert self._scale is not None
        inv = self._scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        optimizer.step()

    def update(self) -> None:
        pass


class StepRunner:
    """A built model prepared for a :class:`StepSetup`: optimizer, checkpointing, hooks.

    Use :meth:`step` for a training or inference step, :meth:`probe` for the
    quality check (an eval-mode forward without autograd), and :meth:`close`
    (or ``with``) to remove what was installed on the model. A distillation
    step needs its teacher first (:meth:`attach_teacher`); ``model`` is the
    student, and every setting but the ``teacher_*`` ones acts on it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        setup: StepSetup | Workload,
        env: RunEnv | None = None,
        *,
        build_optimizer: bool = True,
    ) -> None:
        self.model = model
        self.setup = StepSetup.of(setup)
        self.env = env or RunEnv()
        self.setup.validate()
        wl = self.setup.workload
        self.train = wl.training
        #: distillation: student, teacher and loss as one module (what the tracker watches)
        self.pair: DistillPair | None = None
        self._task: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.in_backward: OptimizerInBackward | None = None
        self.scaler: Any = None
        #: sim, sharded: the optimizer steps the rank's local shards (memprof.sharding.LocalShards)
        self.local_shards: Any = None
        for spec in self.setup.model_transforms:
            self.setup.notes.append(apply_transform(model, spec))
        if self.train and self.setup.checkpointing:
            enable_checkpointing(model, self.setup.checkpointing, self.env.recompute_context)
        if self.setup.shard == "fsdp":
            if self.env.mesh is None:
                raise InputError("a sharded step needs its ranks: the engine provides the device mesh")
            from memprof.sharding import shard_model

            mp = DTYPES[self.setup.autocast] if self.setup.autocast else None
            if mp is not None and mp == next(model.parameters()).dtype:
                mp = None  # the parameters are already in that dtype
            self.setup.notes.append(
                shard_model(
                    model,
                    self.env.mesh,
                    reshard_after_forward=self.setup.reshard_after_forward,
                    param_dtype=mp,
                    separate_head=bool(self.setup.loss_chunk),
                )
            )
        if self.train and build_optimizer:
            params = [p for p in model.parameters() if p.requires_grad]
            impl = self.setup.optimizer_impl
            foreach = {"foreach": True, "for-loop": False}.get(impl, self.env.default_foreach)
            fused = impl == "fused"

            def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
                return make_optimizer(wl.optimizer, model, foreach=foreach, fused=fused, params=ps)

            if self.setup.optimizer_in_backward:
                self.in_backward = OptimizerInBackward(make, params)
            elif self.setup.shard and self.env.simulate_cuda:
                from memprof.sharding import LocalShards

                self.local_shards = LocalShards(params)
                self.optimizer = make(self.local_shards.params)
                if self.optimizer is not None:
                    self.local_shards.attach(self.optimizer)
            else:
                self.optimizer = make(params)
            if self.setup.grad_scaler:
                self.scaler = (
                    _SimScaler() if self.env.simulate_cuda else torch.amp.GradScaler(self.env.device_type)
                )

    def attach_teacher(self, teacher: torch.nn.Module, inputs: dict[str, Any], task: str | None) -> str:
        """Give a distillation step its teacher (built in the teacher's dtype, on the device).

        With ``teacher_topk``, the teacher runs once here over ``inputs`` (each
        micro-batch), its top-k logits are written to disk, and the runner keeps
        no reference to it: drop yours and it is gone from memory.

        Returns:
            a note for the report.
        """
        s = self.setup
        teacher.train(False)  # no dropout: the teacher's targets are deterministic
        self._task = task
        if s.teacher_no_grad or s.teacher_topk:
            teacher.requires_grad_(False)
        if s.teacher_topk:
            parts = split_batch(inputs, s.micro_batches, s.workload.batch_size)
            with self._autocast():
                topk = TopkTeacher.write(
                    teacher,
                    parts,
                    s.teacher_topk,
                    task=task,
                    device=next(self.model.parameters()).device,
                    simulate=self.env.simulate_cuda,
                )
            side: torch.nn.Module = topk
            note = (
                f"teacher: top-{topk.k} logits per token precomputed in one offline pass (not measured), "
                f"{format_bytes(topk.stored_bytes())} on disk, read back each step; the KL is over the "
                "teacher's top-k renormalised (an approximation)"
            )
        else:
            side = teacher
            how = (
                "under torch.no_grad, parameters frozen"
                if s.teacher_no_grad
                else "as loaded (parameters require grad) under autograd, logits not detached: backward "
                "fills teacher gradients the student's optimizer never zeroes (the naive baseline)"
            )
            note = f"teacher: forward after the student's, {how}"
        wl = s.workload
        self.pair = DistillPair(self.model, side, DistillLoss(wl.temperature, wl.ce_weight))
        return note

    # what the tracker should watch
    @property
    def tracked(self) -> torch.nn.Module:
        """The module the tracker watches: the model, or student + teacher + loss."""
        return self.pair if self.pair is not None else self.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        if self.in_backward is not None:
            return list(self.in_backward.optimizers.values())
        return [self.optimizer] if self.optimizer is not None else []

    def close(self) -> None:
        if self.in_backward is not None:
            self.in_backward.remove()
        if self.pair is not None and isinstance(self.pair.teacher, TopkTeacher):
            self.pair.teacher.remove()
        if self.local_shards is not None:
            self.local_shards.remove()

    def __enter__(self) -> StepRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # contexts ------------------------------------------------------------
    def _autocast(self) -> Any:
        dt = self.setup.autocast
        if not dt:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device_type, dtype=DTYPES[dt])

    def _offload(self) -> Any:
        if not (self.setup.offload_activations and self.train):
            return contextlib.nullcontext()
        if self.env.simulate_cuda:
            # Host memory stands as the meta device: the tracker never counts it,
            # and the copy back in backward is a new device tensor, as on CUDA.
            def pack(t: torch.Tensor) -> Any:
                return (t.device, t.to("meta"))

            def unpack(packed: Any) -> torch.Tensor:
                dev, t = packed
                return t.to(dev)

            return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        return torch.autograd.graph.save_on_cpu(pin_memory=self.env.device_type == "cuda")

    def _with_cache_choice(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.setup.use_cache is not None and "__args__" not in inputs:
            return {**inputs, "use_cache": self.setup.use_cache}
        return inputs

    def _call(self, inputs: dict[str, Any]) -> Any:
        return call_model(self.model, self._with_cache_choice(inputs))

    def _loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The training loss of one (micro-)batch."""
        if self.setup.loss_chunk:
            return chunked_lm_loss(self.model, self._with_cache_choice(inputs), self.setup.loss_chunk)
        out = self._call(inputs)
        return InputBuilder.loss(out)

    def _distill_loss(self, inputs: dict[str, Any], part: int | None) -> tuple[torch.Tensor, Any]:
        """The distillation loss of micro-batch ``part`` (None: the whole batch), and the student's output."""
        pair = self.pair
        if pair is None:
            raise InputError("a distillation step needs its teacher (StepRunner.attach_teacher)")
        w = self.setup.workload.ce_weight
        student_in = inputs if w > 0 else {k: v for k, v in inputs.items() if k != "labels"}
        out = self._call(student_in)
        ce = InputBuilder.loss(out) if w > 0 else None
        teacher = pair.teacher
        t: Any
        if isinstance(teacher, TopkTeacher):
            t = teacher(part)
        else:
            grad_off = torch.no_grad() if self.setup.teacher_no_grad else contextlib.nullcontext()
            with grad_off:
                t = call_model(teacher, teacher_inputs(inputs, self._task)).logits
        loss = pair.loss(out.logits, t, ce)
        del t, ce
        return loss, out

    def _infer(self, inputs: dict[str, Any], keep_all_logits: bool = False) -> Any:
        """One inference forward (chunked when the setup says so)."""
        c = self.setup.prefill_chunk
        if c:
            return chunked_forward(
                self.model, inputs, c, exact=self.setup.chunk_exact, keep_all_logits=keep_all_logits
            )
        return self._call(inputs)

    # steps ---------------------------------------------------------------
    def step(
        self,
        inputs: dict[str, Any],
        tracker: Any = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        """Run one step; mark its phases on the tracker when given."""
        t = tracker if tracker is not None else _NoPhases()

        def enter(name: str) -> Any:
            if on_phase is not None:
                on_phase(name)
            return t.phase(name)

        wl = self.setup.workload
        if not self.train:
            grad_off = torch.inference_mode() if self.setup.inference_mode else torch.no_grad()
            with grad_off, self._autocast():
                if wl.decode_tokens:
                    _generate(self.model, inputs, wl.decode_tokens, enter, self.setup.prefill_chunk)
                else:
                    with enter("forward"):
                        out = self._infer(inputs)
                        del out
            return
        k = self.setup.micro_batches
        for i, part in enumerate(split_batch(inputs, k, wl.batch_size)):
            with enter("forward"):
                with self._offload(), self._autocast():
                    if wl.mode == "distill":
                        loss, out = self._distill_loss(part, i)
                        del out
                    else:
                        loss = self._loss(part)
                if k > 1:
                    loss = loss / k
                if self.scaler is not None:
                    loss = self.scaler.scale(loss)
            with enter("backward"):
                loss.backward()
                del loss
        with enter("optimizer"):
            if self.optimizer is not None:
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=self.setup.set_to_none)
                if self.local_shards is not None:
                    self.model.zero_grad(set_to_none=self.setup.set_to_none)  # the DTensor gradients
            elif self.in_backward is None:
                self.model.zero_grad(set_to_none=self.setup.set_to_none)

    def probe(self, inputs: dict[str, Any]) -> tuple[float | None, torch.Tensor | None]:
        """Loss and main output of an eval-mode forward without autograd (quality check).

        Eval mode turns dropout off, so two setups compare on the same function;
        the forward runs under the setup's autocast and in the model's dtype.
        """
        was = self.model.training
        self.model.train(False)
        try:
            with torch.no_grad(), self._autocast():
                if self.setup.workload.mode == "distill":
                    loss, out = self._distill_loss(inputs, None)
                elif self.train:
                    out = self._call(inputs)
                    loss = self._loss(inputs) if self.setup.loss_chunk else InputBuilder.loss(out)
                else:
                    out = self._infer(inputs, keep_all_logits=True)
                    loss = InputBuilder.loss(out.logits if self.setup.prefill_chunk else out)
                main = main_output(out)
        finally:
            self.model.train(was)
        return float(loss.float()), (main.detach().float().clone() if main is not None else None)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One vector per text of a real batch: the main output mean-pooled over its tokens.

        For a sentence encoder (MiniLM) that is its sentence embedding (mean
        pooling, as sentence-transformers does); for an LM, its pooled logits.
        """
        was = self.model.training
        self.model.train(False)
        try:
            with torch.no_grad(), self._autocast():
                main = main_output(self._call(batch))
        finally:
            self.model.train(was)
        mask = batch.get("attention_mask")
        if main is None or main.dim() != 3 or mask is None or main.shape[:2] != mask.shape:
            return None
        m = mask.to(main.device, torch.float32).unsqueeze(-1)
        return (main.float() * m).sum(1) / m.sum(1).clamp(min=1)


def main_output(out: Any) -> torch.Tensor | None:
    """The tensor a quality check compares: logits, else the last hidden state, else the first tensor."""
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
    """``k`` equal micro-batches of ``inputs`` (views along the batch dimension)."""
    if k <= 1:
        return [inputs]
    size = batch_size // k

    def part(v: Any, i: int) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size:
            return v[i * size : (i + 1) * size]
        if isinstance(v, list):
            return [part(x, i) for x in v]
        return v

    return [{key: part(v, i) for key, v in inputs.items()} for i in range(k)]


def enable_checkpointing(
    model: torch.nn.Module, every: int, recompute_context: Callable[[], Any] | None = None
) -> str:
    """Activation checkpointing (non-reentrant) of every ``every``-th repeated block.

    transformers models use their own switch; other modules get the blocks of
    their longest list of same-type children wrapped in ``torch.utils.checkpoint``.

    Returns:
        how it was done, for the report.

    Raises:
        InputError: the model has no repeated blocks to checkpoint.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if recompute_context is not None:
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), recompute_context())
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and getattr(model, "supports_gradient_checkpointing", False):
        enable(kwargs, every_n_layers=every)
        return "transformers activation_checkpointing_enable"
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if legacy is not None and getattr(model, "supports_gradient_checkpointing", False) and every == 1:
        legacy(gradient_checkpointing_kwargs=kwargs)
        return "transformers gradient_checkpointing_enable"
    blocks = repeated_blocks(model)
    if not blocks:
        raise InputError(f"{type(model).__name__} has no repeated blocks to checkpoint")
    from torch.utils.checkpoint import checkpoint

    for i, block in enumerate(blocks):
        if i % every:
            continue
        # An instance attribute: Module.__call__ (and its hooks) stays outside the checkpoint.
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), **kwargs)
    return "torch.utils.checkpoint around repeated blocks"


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ModuleList/Sequential of two or more children of one type."""
    best: list[torch.nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            kids = list(mod.children())
            if len(kids) >= 2 and len({type(c) for c in kids}) == 1 and len(kids) > len(best):
                best = kids
    return best


class _NoPhases:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def run_step(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    workload: Workload,
    optimizer: torch.optim.Optimizer | None,
    tracker: Any = None,
    on_phase: Callable[[str], None] | None = None,
) -> None:
    """One plain step of ``workload`` with a given optimizer (no optimizations).

    A shortcut for benchmarks and tests; engines use :class:`StepRunner`.
    """
    runner = StepRunner(model, workload, build_optimizer=False)
    runner.optimizer = optimizer
    runner.step(inputs, tracker=tracker, on_phase=on_phase)


def _generate(
    model: torch.nn.Module, inputs: dict[str, Any], n: int, enter: Callable[[str], Any], chunk: int = 0
) -> None:
    cache_kw = cache_keyword(model)
    with enter("prefill"):
        out = chunked_forward(model, inputs, chunk, exact=True) if chunk else model(**inputs, use_cache=True)
        past = output_cache(out)
        next_ids = out.logits[:, -1:].argmax(-1)
        del out
    mask = inputs.get("attention_mask")
    with enter("decode"):
        for _ in range(n):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=next_ids, attention_mask=mask, use_cache=True, **{cache_kw: past})
            past = output_cache(out)
            next_ids = out.logits[:, -1:].argmax(-1)
            del out
    del past
