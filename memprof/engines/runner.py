"""The step runner: a built model, its step setup's optimizations, one training or inference step.

:class:`StepRunner` runs a :class:`memprof.workload.StepSetup` on a built model: it
rebuilds the optimizations from ``setup.steps`` and calls their hooks
(:class:`memprof.optimizations.registry.Optimization`) at fixed points, with no
branch of its own per optimization; what an optimization does to the model or the
step lives in its own module. The engines drive it (:mod:`memprof.engines.base`);
the step's plain data (:class:`~memprof.workload.Workload`, ``StepSetup``) lives in
:mod:`memprof.workload`, below.

A training step is forward, loss, backward, optimizer step and zeroing of the
gradients (``set_to_none``). An inference step is a forward pass without autograd;
for causal LMs, ``decode_tokens > 0`` adds N decode steps on the KV cache after
the prefill. A distillation step is a training step of the student whose loss
compares its logits with a teacher's (:mod:`memprof.distill_loss`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from memprof.chunked import cache_keyword, output_cache
from memprof.distill_loss import DistillLoss, DistillPair, teacher_inputs
from memprof.errors import EnvironmentProblem, InputError
from memprof.inputs import InputBuilder, call_model
from memprof.optimizations.registry import check_setup, for_setup
from memprof.surgery.quantization import quiet_imports
from memprof.workload import (
    OPTIMIZERS,
    StepSetup,
    Workload,
    main_output,
    split_batch,
)


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
    simulate: bool = False,
) -> torch.optim.Optimizer | None:
    """The optimizer of a training step.

    Args:
        name: ``adamw``, ``sgd`` (momentum 0.9), ``adafactor`` (transformers; fixed
            learning rate, factored second moments), ``adamw8bit`` (bitsandbytes),
            ``paged_adamw8bit`` (bitsandbytes: 8-bit state in CUDA unified
            memory) or ``none``.
        model: its trainable parameters are optimized (unless ``params`` is given).
        foreach: the multi-tensor implementation; ``None`` lets torch choose for
            the device (the sim engine passes ``True``, CUDA's default).
        fused: the fused kernel (AdamW, SGD).
        params: optimize these parameters only.
        simulate: the sim engine (fake tensors standing for CUDA): unified memory
            stands as the meta device, which the tracker never counts.

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
        # the module imports PEFT, and PEFT bitsandbytes, where installed: imported quietly
        Adafactor = _optional("transformers.optimization").Adafactor

        # A fixed learning rate: relative steps and parameter scaling compare tensors
        # with Python numbers, which fake tensors cannot answer (and the memory is the same).
        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in ("adamw8bit", "paged_adamw8bit"):
        return _adamw8bit(params, paged=name == "paged_adamw8bit", simulate=simulate)
    raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


#: bitsandbytes pages a state buffer when it has at least this many elements
#: (``Optimizer8bit.get_state_buffer``: "> 1 MB"); smaller ones are ordinary device tensors
PAGED_MIN_NUMEL = 100_000


def _adamw8bit(params: list[torch.nn.Parameter], *, paged: bool, simulate: bool) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (fused kernels, a CPU backend, fake kernels): paged or not.

    bitsandbytes builds its quantization maps with ``.tolist()`` in the constructor:
    the optimizer is built outside fake mode, so the maps are real tensors (256
    floats each, shared by every parameter, on the device as on CUDA) and the step
    traces. It is built outside memprof's other modes too (the CUDA semantics, the
    fidelity checks, the tracker): the maps are host tensors, which none of them
    counts, and their few hundred small ops cost 6 ms an optimizer through the
    modes (1.7 s for the 291 optimizers of an 8B model stepped in backward).
    torchao's AdamW8bit is not used: it compiles its step with
    ``torch.compile(fullgraph=True)``, which refuses to run under memprof's tracker
    (a dispatch mode) on every engine.
    """
    bnb = _optional("bitsandbytes")
    if bnb is None:
        name = "paged_adamw8bit" if paged else "adamw8bit"
        raise EnvironmentProblem(
            f"the {name} optimizer needs bitsandbytes: pip install bitsandbytes (torchao's AdamW8bit compiles "
            "its step, which memprof's tracker cannot run under)"
        )
    from torch.utils._python_dispatch import _disable_current_modes

    # every torch-function and dispatch mode off, fake mode among them
    with torch._C.DisableTorchFunction(), _disable_current_modes():
        if not paged:
            return bnb.optim.AdamW8bit(params, lr=1e-5)
        if params[0].device.type == "cuda":
            return bnb.optim.PagedAdamW8bit(params, lr=1e-5)
        return _paged_stand_in(bnb)(params, unified="meta" if simulate else None)


def _optional(module: str) -> Any:
    """An optional library's module, or None where it is not installed (or fails to import).

    A module imported before is taken from ``sys.modules``, not imported again with the
    loggers quieted: ``optimizer_in_backward`` builds one optimizer per parameter, and each
    quieting clears every logger's cache (0.1 s of the 8B plan's runs).
    """
    import importlib
    import importlib.util
    import sys

    try:
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            return None
        if module in sys.modules:
            return sys.modules[module]
        with quiet_imports():
            return importlib.import_module(module)
    except ImportError:
        return None


def _paged_stand_in(bnb: Any) -> type:
    """bitsandbytes' PagedAdamW8bit where there is no CUDA unified memory (the cpu engine, the sim).

    The same 8-bit AdamW, with the buffers bitsandbytes would page (``get_paged``:
    at least :data:`PAGED_MIN_NUMEL` elements) marked ``is_paged`` as bitsandbytes
    marks its own, and in the sim placed on ``unified`` (the meta device: memory the
    tracker never counts, as the caching allocator never holds unified memory).
    On the cpu engine they stay ordinary CPU tensors (bitsandbytes itself falls
    back to non-paged buffers on the CPU).
    """

    class PagedAdamW8bitStandIn(bnb.optim.AdamW8bit):
        def __init__(self, params: Any, unified: str | None) -> None:
            super().__init__(params, lr=1e-5)
            self.unified = unified

        def get_state_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            if p.numel() < PAGED_MIN_NUMEL:
                return torch.zeros_like(p, dtype=dtype, device=p.device)
            buf = torch.zeros_like(p, dtype=dtype, device=self.unified or p.device)
            buf.is_paged = True  # type: ignore[attr-defined]  # as bitsandbytes marks get_paged's buffers
            return buf

    return PagedAdamW8bitStandIn


def paged_state_bytes(optimizers: list[Any]) -> int:
    """Bytes of the optimizers' state held in unified memory (tensors marked ``is_paged``)."""
    seen: set[int] = set()
    total = 0
    for opt in optimizers:
        for state in getattr(opt, "state", {}).values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and getattr(v, "is_paged", False) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.untyped_storage().nbytes()
    return total


#: what a step keeps in host memory, by kind (``Profile.host["by_kind"]``)
HOST_KINDS = ("optimizer_state", "gradients", "parameters", "activations")


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
        check_setup(self.setup)
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
        self.optimizations = for_setup(self.setup)
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
                    wl.optimizer,
                    model,
                    foreach=settings["foreach"],
                    fused=settings["fused"],
                    params=ps,
                    simulate=self.env.simulate_cuda,
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

    def host_memory(self) -> dict[str, Any] | None:
        """What the optimizations kept in host memory in the last step (``Profile.host``), or None.

        ``bytes`` is the host memory held at once (the kinds added up); ``paged_bytes``
        (unified memory) is apart: where it lives depends on the GPU's memory pressure.
        """
        parts = [h for h in (opt.host_memory(self) for opt in self.optimizations) if h]
        if not parts:
            return None
        kinds = dict.fromkeys(HOST_KINDS, 0)
        pcie = paged = 0
        for h in parts:
            for k, v in (h.get("by_kind") or {}).items():
                kinds[k] += int(v)
            pcie += int(h.get("pcie_bytes_per_step", 0))
            paged += int(h.get("paged_bytes", 0))
        return {
            "bytes": sum(kinds.values()),
            "by_kind": kinds,
            "pcie_bytes_per_step": pcie,
            "paged_bytes": paged,
        }

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
            self._optimizer_step()

    def _optimizer_step(self, *, state_only: bool = False) -> None:
        """The step's optimizer phase: step (through the scaler), zero the gradients, the hooks after.

        ``state_only`` (the warm-up): torch's Adam/AdamW creates the state its step would,
        without the update's math (a step's worth of fake ops: ~1 s of Llama-3-8B's sim run).
        """
        if self.optimizer is not None:
            if state_only and self.scaler is None and _create_state(self.optimizer):
                pass  # the state is there; the update is not the warm-up's
            elif self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=self.set_to_none)
            for opt in self.optimizations:
                opt.after_optimizer_step(self, self.set_to_none)
        elif not any(opt.own_optimizers() for opt in self.optimizations):
            self.model.zero_grad(set_to_none=self.set_to_none)

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters a training step gives gradients (the student's, in distillation)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def full_warm_up_reason(self) -> str | None:
        """Why this step's warm-up must run a whole step (an optimization's reason), or None.

        None: :meth:`warm_up_state` leaves what a whole step leaves behind.
        """
        for opt in self.optimizations:
            why = opt.full_warm_up_reason(self)
            if why:
                return f"{opt.name}: {why}"
        return None

    def warm_up_state(self) -> None:
        """What a training step leaves behind, without its forward and backward.

        Each trainable parameter gets a zero gradient of its own shape and dtype
        through autograd (``torch.autograd.backward`` on the parameters themselves),
        so the gradient hooks fire as in a backward: the per-parameter optimizers of
        ``optimizer_in_backward`` create their state there (or step, where memprof
        cannot create it without an update: ``Optimization.warm_up_context``),
        ``optimizer_offload`` copies to its host side. Where no parameter has a hook
        (nor a tensor subclass of its own), the gradients are assigned directly, as
        autograd would leave them (0.2 s of Llama-3-8B's sim run saved). The loss
        scaler scales a zero loss (it creates its scale then). Then the
        step's own optimizer phase runs (:meth:`_optimizer_step`): the optimizer
        creates its state (moments, step counters, 8-bit and paged buffers, the
        offload's host state), the scaler unscales and updates, the gradients are
        freed as ``zero_grad`` frees them. Nothing of the model's forward runs: the
        driver keeps the whole warm-up step where that forward or backward leaves
        something behind (:meth:`full_warm_up_reason`, the engine's own reasons).
        """
        if not self.train:
            return
        if self.scaler is not None:
            dev = next(self.model.parameters()).device
            self.scaler.scale(torch.zeros((), device=dev))
        params = self.trainable()
        if params and all(_plain_leaf(p) for p in params):
            # nothing listens for these gradients: set them as autograd would (a zero
            # gradient of the parameter's shape, dtype and layout), without its engine
            for p in params:
                p.grad = torch.zeros_like(p)
        elif params:
            with contextlib.ExitStack() as stack:
                for opt in self.optimizations:
                    cm = opt.warm_up_context(self, _create_state)
                    if cm is not None:
                        stack.enter_context(cm)
                torch.autograd.backward(params, [torch.zeros_like(p) for p in params])
        self._optimizer_step(state_only=True)

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


def _plain_leaf(p: torch.Tensor) -> bool:
    """A parameter whose gradient nothing listens for: a plain (or fake) tensor without a
    gradient yet, with no hook on its gradient (the hooks of ``optimizer_in_backward`` and
    ``optimizer_offload`` are post-accumulate hooks) and no tensor subclass (FSDP2's DTensor
    accumulates through its own dispatch): assigning its zero gradient is what autograd does.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    return (
        p.grad is None
        and not p._backward_hooks
        and not getattr(p, "_post_accumulate_grad_hooks", None)
        and (type(p) in (torch.Tensor, torch.nn.Parameter) or isinstance(p, FakeTensor))
        and p.layout is torch.strided
        and p.is_contiguous()
    )


def _step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step of ``optimizer`` runs hooks (its own or global ones): a step would run them."""
    from torch.optim import optimizer as torch_optimizer

    return any(
        (
            optimizer._optimizer_step_pre_hooks,
            optimizer._optimizer_step_post_hooks,
            torch_optimizer._global_optimizer_pre_hooks,
            torch_optimizer._global_optimizer_post_hooks,
        )
    )


def _create_state(optimizer: torch.optim.Optimizer) -> bool:
    """The state an optimizer's first step creates, without the update, where memprof knows how; False: not.

    An optimizer that wraps others (``optimizer_offload``'s) creates theirs through its
    own ``create_state(create)``, which returns False where it cannot.
    """
    if _create_adam_state(optimizer) or _create_8bit_state(optimizer):
        return True
    create = getattr(optimizer, "create_state", None)
    return callable(create) and bool(create(_create_state))


def _create_adam_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Create the state torch's Adam or AdamW creates on its first step, as that step does; False: not one.

    Exactly those classes (a subclass may step differently), with no step hooks (a step
    would run them) and torch's own ``_init_group`` (the lazy initialisation its step
    calls first). ``tests/engines/test_warm_up.py`` compares the measured step after it
    with the one after a whole warm-up step, byte for byte.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    assert optimizer is not None
    if _step_hooks(optimizer) or not callable(getattr(optimizer, "_init_group", None)):
        return False
    adam = cast(torch.optim.Adam, optimizer)  # AdamW subclasses Adam: the same _init_group
    with torch.no_grad():
        for group in adam.param_groups:
            adam._init_group(group, [], [], [], [], [], [])
    return True


def _create_8bit_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Create the state a bitsandbytes 8-bit optimizer creates on its first step, as that step does; False: not one.

    ``Optimizer8bit.step`` initialises itself once (``check_overrides``, ``to_gpu``), then
    calls ``init_state`` for each parameter with a gradient and no state yet, before its
    update; this calls the same, without the update. Only bitsandbytes' own 8-bit
    classes with their own ``step`` (memprof's paged stand-in among them), and no step
    hooks. ``tests/engines/test_warm_up.py`` compares the measured step after it with
    the one after a whole warm-up step, byte for byte.
    """
    bnb = sys.modules.get("bitsandbytes.optim.optimizer")
    base = getattr(bnb, "Optimizer8bit", None)
    # torch wraps each optimizer class's step for its profiler: compared unwrapped
    if (
        base is None
        or not isinstance(optimizer, base)
        or inspect.unwrap(type(optimizer).step) is not inspect.unwrap(base.step)
    ):
        return False
    if _step_hooks(optimizer):
        return False
    opt = cast(Any, optimizer)
    with torch.no_grad():
        if not opt.initialized:
            opt.check_overrides()
            opt.to_gpu()
            opt.initialized = True
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and len(opt.state[p]) == 0:
                    opt.init_state(group, p, gindex, pindex)
    return True


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
    """Prefill, then ``n`` greedy decode steps on the KV cache; ``prefill``: an optimization's own (None: its default).

    An encoder-decoder (T5, BART, Whisper) decodes as ``generate`` does: the encoder runs
    once, in the prefill, and each decode step feeds the decoder its last token with
    the encoder's output and the cache (self- and cross-attention), the encoder's
    attention mask unchanged.
    """
    cache_kw = cache_keyword(model)
    with enter("prefill"):
        out = prefill(inputs) if prefill is not None else None
        if out is None:
            out = model(**inputs, use_cache=True)
        past = output_cache(out)
        next_ids = out.logits[:, -1:].argmax(-1)
        encoded = getattr(out, "encoder_last_hidden_state", None)
        del out
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and encoded is not None:
        mask = inputs.get("attention_mask")
        with enter("decode"):
            for _ in range(n):
                out = model(
                    encoder_outputs=(encoded,),
                    attention_mask=mask,
                    decoder_input_ids=next_ids,
                    use_cache=True,
                    **{cache_kw: past},
                )
                past = output_cache(out)
                next_ids = out.logits[:, -1:].argmax(-1)
                del out
        del past, encoded
        return
    del encoded
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
