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
gradients (``set_to_none``). It is measured in steady state: the engine runs one
warm-up step first, so the optimizer state exists as in every step of a real run
but the first. An inference step is a forward pass without autograd; for causal
LMs, ``decode_tokens > 0`` adds N decode steps on the KV cache after the prefill.
A distillation step is a training step of the student whose loss compares its
logits with a teacher's (:mod:`memprof.distill_loss`): the teacher runs beside it,
or its top-k logits are read back from disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from memprof.allocator_model import AllocatorSettings
from memprof.choices import MORE_OPTIMIZERS, Attn, Experts, Mode, MoeRouting, Optim, values
from memprof.chunked import cache_keyword, output_cache
from memprof.distill_loss import DistillLoss, DistillPair, teacher_inputs
from memprof.errors import EnvironmentProblem, InputError
from memprof.models import DTYPES, InputBuilder, ResolvedModel, call_model

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

    def optimizations(self) -> list[Any]:
        """Fresh instances of the applied optimizations, in order (their hooks run the step)."""
        from memprof.optimizations.registry import from_steps

        return from_steps(self.steps)

    def config_overrides(self) -> dict[str, Any]:
        """Config attributes the optimizations change before the model is built."""
        out: dict[str, Any] = {}
        for opt in self.optimizations():
            out.update(opt.config_overrides(self))
        return out

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
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            problems.append(f"unknown teacher dtype {self.teacher_dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.teacher_topk < 0:
            problems.append(f"teacher top-k must be 0 or more, got {self.teacher_topk}")
        if self.workload.mode != "distill" and (
            self.teacher_no_grad or self.teacher_dtype or self.teacher_topk
        ):
            problems.append("teacher settings apply to distillation steps only")
        for opt in self.optimizations():
            problems.extend(opt.setup_problems(self))
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


class StepRunner:
    """A built model prepared for a :class:`StepSetup`: its optimizations' hooks, the optimizer.

    The runner rebuilds the setup's optimizations (``setup.steps``) and calls
    their hooks (:class:`memprof.optimizations.registry.Optimization`) at fixed
    points: it has no branch of its own per optimization. Use :meth:`step` for
    a training or inference step, :meth:`probe` for the quality check (an
    eval-mode forward without autograd), and :meth:`close` (or ``with``) to
    remove what was installed on the model. A distillation step needs its
    teacher first (:meth:`attach_teacher`); ``model`` is the student, and every
    optimization but ``distill_teacher`` acts on it.
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
        self.scaler: Any = None
        #: sim, sharded: the optimizer steps the rank's local shards (set by the fsdp optimization)
        self.local_shards: Any = None
        #: the setup's optimizations, fresh for this runner (their hooks run the step)
        self.optimizations = self.setup.optimizations()
        for opt in self.optimizations:
            self._note(opt.transform_model(model, self.setup))
        for opt in sorted(self.optimizations, key=lambda o: o.wrap_stage):
            self._note(opt.wrap_model(model, self))
        settings: dict[str, Any] = {"foreach": self.env.default_foreach, "fused": False, "set_to_none": True}
        for opt in self.optimizations:
            settings.update(opt.optimizer_settings(self))
        #: zero_grad(set_to_none=...) after the step
        self.set_to_none: bool = settings["set_to_none"]
        if self.train and build_optimizer:
            params = [p for p in model.parameters() if p.requires_grad]

            def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
                return make_optimizer(
                    wl.optimizer, model, foreach=settings["foreach"], fused=settings["fused"], params=ps
                )

            if not any(opt.build_optimizer(self, make, params) for opt in self.optimizations):
                self.optimizer = make(params)
            for opt in self.optimizations:
                scaler = opt.grad_scaler(self)
                if scaler is not None:
                    self.scaler = scaler

    def _note(self, note: str | None) -> None:
        if note:
            self.setup.notes.append(note)

    def attach_teacher(self, teacher: torch.nn.Module, inputs: dict[str, Any], task: str | None) -> str:
        """Give a distillation step its teacher (built in the teacher's dtype, on the device).

        The baseline keeps the teacher as loaded; an optimization may replace it
        (``distill_teacher``: frozen, or its top-k logits written to disk, the
        runner then keeping no reference to it: drop yours and it is gone).

        Returns:
            a note for the report.
        """
        teacher.train(False)  # no dropout: the teacher's targets are deterministic
        self._task = task
        side: torch.nn.Module = teacher
        note = (
            "teacher: forward after the student's, as loaded (parameters require grad) under autograd, "
            "logits not detached: backward fills teacher gradients the student's optimizer never zeroes "
            "(the naive baseline)"
        )
        for opt in self.optimizations:
            got = opt.attach_teacher(self, teacher, inputs, task)
            if got is not None:
                side, note = got
                break
        wl = self.setup.workload
        self.pair = DistillPair(self.model, side, DistillLoss(wl.temperature, wl.ce_weight))
        return note

    # what the tracker should watch
    @property
    def tracked(self) -> torch.nn.Module:
        """The module the tracker watches: the model, or student + teacher + loss."""
        return self.pair if self.pair is not None else self.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        own = [o for opt in self.optimizations for o in opt.own_optimizers()]
        return own + ([self.optimizer] if self.optimizer is not None else [])

    def close(self) -> None:
        for opt in self.optimizations:
            opt.close()

    def __enter__(self) -> StepRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # the hooks' parts of a forward -----------------------------------------
    @contextlib.contextmanager
    def contexts(self, kind: str) -> Iterator[None]:
        """The optimizations' forward contexts of ``kind``, entered in step order."""
        with contextlib.ExitStack() as stack:
            for opt in self.optimizations:
                cm = opt.forward_context(self, kind)
                if cm is not None:
                    stack.enter_context(cm)
            yield

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` with the optimizations' extra keyword arguments of the forward."""
        extra: dict[str, Any] = {}
        for opt in self.optimizations:
            extra.update(opt.model_kwargs(self))
        if extra and "__args__" not in inputs:
            return {**inputs, **extra}
        return inputs

    def _call(self, inputs: dict[str, Any]) -> Any:
        return call_model(self.model, self.model_inputs(inputs))

    def _hooked_loss(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        for opt in self.optimizations:
            loss = opt.loss(self, inputs)
            if loss is not None:
                return loss
        return None

    def _loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The training loss of one (micro-)batch."""
        loss = self._hooked_loss(inputs)
        if loss is not None:
            return loss
        out = self._call(inputs)
        return InputBuilder.loss(out)

    def _hooked_forward(self, inputs: dict[str, Any], keep_all_logits: bool = False) -> Any:
        for opt in self.optimizations:
            out = opt.forward(self, inputs, keep_all_logits=keep_all_logits)
            if out is not None:
                return out
        return None

    def _distill_loss(self, inputs: dict[str, Any], part: int | None) -> tuple[torch.Tensor, Any]:
        """The distillation loss of micro-batch ``part`` (None: the whole batch), and the student's output."""
        pair = self.pair
        if pair is None:
            raise InputError("a distillation step needs its teacher (StepRunner.attach_teacher)")
        w = self.setup.workload.ce_weight
        student_in = inputs if w > 0 else {k: v for k, v in inputs.items() if k != "labels"}
        out = self._call(student_in)
        ce = InputBuilder.loss(out) if w > 0 else None
        t: Any = None
        for opt in self.optimizations:
            t = opt.teacher_logits(self, part)
            if t is not None:
                break
        else:
            with self.contexts("teacher"):
                t = call_model(pair.teacher, teacher_inputs(inputs, self._task)).logits
        loss = pair.loss(out.logits, t, ce)
        del t, ce
        return loss, out

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
            with torch.no_grad(), self.contexts("infer"):
                if wl.decode_tokens:
                    _generate(self.model, inputs, wl.decode_tokens, enter, self._hooked_forward)
                else:
                    with enter("forward"):
                        out = self._hooked_forward(inputs)
                        if out is None:
                            out = self._call(inputs)
                        del out
            return
        k = self.setup.micro_batches
        for i, part in enumerate(split_batch(inputs, k, wl.batch_size)):
            with enter("forward"):
                with self.contexts("train"):
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
                self.optimizer.zero_grad(set_to_none=self.set_to_none)
                for opt in self.optimizations:
                    opt.after_optimizer_step(self, self.set_to_none)
            elif not any(opt.own_optimizers() for opt in self.optimizations):
                self.model.zero_grad(set_to_none=self.set_to_none)

    def probe(self, inputs: dict[str, Any]) -> tuple[float | None, torch.Tensor | None]:
        """Loss and main output of an eval-mode forward without autograd (quality check).

        Eval mode turns dropout off, so two setups compare on the same function;
        the forward runs under the setup's autocast and in the model's dtype.
        """
        was = self.model.training
        self.model.train(False)
        try:
            with torch.no_grad(), self.contexts("eval"):
                if self.setup.workload.mode == "distill":
                    loss, out = self._distill_loss(inputs, None)
                elif self.train:
                    out = self._call(inputs)
                    hooked = self._hooked_loss(inputs)
                    loss = hooked if hooked is not None else InputBuilder.loss(out)
                else:
                    out = self._hooked_forward(inputs, keep_all_logits=True)
                    if out is not None:
                        loss = InputBuilder.loss(out.logits)
                    else:
                        out = self._call(inputs)
                        loss = InputBuilder.loss(out)
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
            with torch.no_grad(), self.contexts("eval"):
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
    model: torch.nn.Module,
    inputs: dict[str, Any],
    n: int,
    enter: Callable[[str], Any],
    prefill: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """Prefill, then ``n`` greedy decode steps on the KV cache; ``prefill``: an optimization's own (None: its default)."""
    cache_kw = cache_keyword(model)
    with enter("prefill"):
        out = prefill(inputs) if prefill is not None else None
        if out is None:
            out = model(**inputs, use_cache=True)
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
