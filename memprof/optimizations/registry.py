"""The optimization registry: names -> small optimization classes with validated configs.

Each optimization is a subclass of :class:`Optimization` with a dataclass
``Config`` (its options, each field typed, with ranges and choices in the
field's metadata), registered by name with :func:`register`. The registry
rejects duplicate names and answers an unknown name with the known ones, like
PEFT's ``peft_types`` and torch's ``register_flop_formula``.

Options are validated where they enter (:func:`parse_options`): every problem
is collected, so a recipe with three mistakes gets three messages at once.

An optimization owns its behaviour too. :meth:`Optimization.apply` records
what the step needs as plain data (``StepSetup``: the persisted config and
training-argument changes, the notes, the few settings several optimizations
or the engines read); the step runner (:class:`memprof.engines.runner.StepRunner`)
rebuilds the setup's optimizations from ``StepSetup.steps``
(:func:`from_steps`: one fresh instance per runner, so an instance may keep
per-run state) and calls their hooks at fixed points of the step, with no
per-optimization branches of its own. Every hook does nothing by default; an
optimization overrides the ones it needs:

=========================  =====================================================
hook                       when the runner calls it
=========================  =====================================================
``config_overrides``       before the model is built: config attributes to set
``transform_model``        after the build, in step order: rewrite layers or
                           weights (what ``memprof apply`` writes to disk)
``wrap_model``             after every transform, by ``wrap_stage``: runtime
                           wrappers (checkpointing, sharding)
``model_kwargs``           each forward: extra keyword arguments of the model
``forward_context``        around each forward (and loss): a context manager
``loss`` / ``forward``     compute the training loss / the inference forward
                           differently (the first optimization answering wins)
``attach_teacher``         distillation: what stands for the teacher (frozen,
                           its precomputed top-k logits)
``teacher_logits``         distillation: the teacher's logits without running it
``optimizer_settings``     how the optimizer is built (foreach, fused) and its
                           gradients freed (set_to_none)
``build_optimizer``        take over building the optimizers (per parameter,
                           over local shards)
``grad_scaler``            a loss scaler for the step
``after_optimizer_step``   after the optimizer's step and zero_grad
``full_warm_up_reason``    before the warm-up: why it must run a whole step
                           (the first forward leaves something behind)
``warm_up_context``        during the fast warm-up: its own optimizers create
                           their state without an update
``host_memory``            after the measured step: the host memory it kept
                           (the profile's ``host`` line)
``close``                  remove what the hooks installed
``setup_problems``         StepSetup.validate: conflicts with other settings
``environment_problem``    before any work: a missing optional library
=========================  =====================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from memprof.errors import EnvironmentProblem, InputError

if typing.TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

    from memprof.engines.runner import StepRunner
    from memprof.workload import StepSetup

#: a factory of one optimizer over some parameters (None: nothing to optimize)
MakeOptimizer = Callable[[list[Any]], Any]


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
) -> Any:
    """A config field with its help text, choices and range (read by :func:`parse_options`)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "min": min, "max": max}
    )


class Optimization:
    """One optimization: a validated config, an applicability check, and its change to the step.

    Subclasses set ``name``, ``summary``, ``Config`` (a dataclass of options),
    ``modes`` (the workload modes it applies to), implement :meth:`apply`, and
    :meth:`why_not` when more than the mode decides whether it applies. What
    the optimization does to the model and the step lives in the hooks below
    (see the module docstring for when the runner calls each); the runner
    passes itself (``runner``: its ``model``, ``setup``, ``env``, ``train``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    modes: ClassVar[tuple[str, ...]] = ("train",)
    #: :meth:`transform_model` rewrites layers or weights (``memprof apply`` writes the result)
    rewrites_model: ClassVar[bool] = False
    #: order of :meth:`wrap_model` among the optimizations (lower first; ties in step order)
    wrap_stage: ClassVar[int] = 0
    #: the step calls the model's LM head itself, outside the model's forward (a chunked loss)
    calls_head_directly: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def options(self) -> dict[str, Any]:
        """The config as plain data (round-trips through :func:`parse_options`)."""
        return dataclasses.asdict(self.config)

    def applies_to(self, model: torch.nn.Module | None, setup: StepSetup) -> str | None:
        """Why this optimization does not apply to the model and step, or None when it does.

        Args:
            model: the model as built (on the meta device or fake tensors is enough), or
                None when only the workload is known.
            setup: the step as configured by the baseline and the steps before this one.
        """
        if setup.workload.mode not in self.modes:
            modes = (
                ", ".join(self.modes[:-1]) + " and " + self.modes[-1]
                if len(self.modes) > 1
                else self.modes[0]
            )
            return f"applies to {modes} workloads, not {setup.workload.mode}"
        return self.why_not(model, setup)

    def why_not(self, model: torch.nn.Module | None, setup: StepSetup) -> str | None:
        """Subclasses: why not, beyond the workload mode (checked first by :meth:`applies_to`)."""
        return None

    def apply(self, setup: StepSetup) -> None:
        """Change the step (its workload fields, its step settings) in place."""
        raise NotImplementedError

    # hooks: the step runner calls these; each does nothing unless overridden --------
    def config_overrides(self, setup: StepSetup) -> dict[str, Any]:
        """Model config attributes to set before the model is built."""
        return {}

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        """Change the built model in place (after the build, in step order); a note for the report.

        ``setup.checkpoint_form``: the change in the form a saved checkpoint holds
        (``memprof apply`` sets it). Set :attr:`rewrites_model` when it changes
        layers or weights.
        """
        return None

    def checkpoint_problem(self) -> str | None:
        """Why a saved checkpoint cannot hold what :meth:`transform_model` did, or None."""
        return None

    def wrap_model(self, model: torch.nn.Module, runner: StepRunner) -> str | None:
        """Wrap the transformed model for the run (after every transform, by :attr:`wrap_stage`); a note or None."""
        return None

    def model_kwargs(self, runner: StepRunner) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward (not for positional-only inputs)."""
        return {}

    def forward_context(self, runner: StepRunner, kind: str) -> AbstractContextManager[Any] | None:
        """A context entered around each forward (and loss), or None.

        Args:
            kind: ``train`` (forward and loss of a training (micro-)batch), ``infer``
                (the inference step, inside ``torch.no_grad``), ``eval`` (the quality
                probe and embeddings, inside ``torch.no_grad``), ``teacher`` (the
                distillation teacher's forward, inside the ``train`` contexts) or
                ``teacher_pass`` (the teacher's offline top-k pass).
        """
        return None

    def loss(self, runner: StepRunner, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The training loss of a (micro-)batch, when this optimization computes it; else None."""
        return None

    def forward(self, runner: StepRunner, inputs: dict[str, Any], *, keep_all_logits: bool) -> Any:
        """The inference forward (the prefill before decoding), when this optimization runs it; else None.

        ``keep_all_logits``: the caller reads every position's logits (the quality check).
        """
        return None

    def attach_teacher(
        self, runner: StepRunner, teacher: torch.nn.Module, inputs: dict[str, Any], task: str | None
    ) -> tuple[torch.nn.Module, str] | None:
        """Distillation: what stands for the teacher in the step, and a note; None keeps it as loaded.

        The first optimization answering wins.
        """
        return None

    def teacher_logits(self, runner: StepRunner, part: int | None) -> torch.Tensor | None:
        """Distillation: the teacher's logits of micro-batch ``part`` (None: the whole batch)
        when this optimization supplies them (read back from disk); None runs the teacher."""
        return None

    def optimizer_settings(self, runner: StepRunner) -> dict[str, Any]:
        """Changes to how the optimizer runs: ``foreach``, ``fused`` (bools), ``set_to_none``."""
        return {}

    def build_optimizer(self, runner: StepRunner, make: MakeOptimizer, params: list[Any]) -> bool:
        """Build the step's optimizers instead of the runner; True when done.

        Set ``runner.optimizer`` for one optimizer the runner steps, or keep the
        optimizers and step them yourself (list them in :meth:`own_optimizers`).
        """
        return False

    def own_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers this optimization steps itself (the runner neither steps nor zeroes for them)."""
        return []

    def grad_scaler(self, runner: StepRunner) -> Any:
        """A loss scaler (``scale``, ``step``, ``update``, as torch.amp.GradScaler), or None."""
        return None

    def after_optimizer_step(self, runner: StepRunner, set_to_none: bool) -> None:
        """After the runner's optimizer step and ``zero_grad``."""

    def full_warm_up_reason(self, runner: StepRunner) -> str | None:
        """Why the warm-up before the measured step must run a whole step, or None.

        By default the driver creates what a step leaves behind (optimizer state,
        the scaler's) without a forward and backward
        (:meth:`~memprof.engines.runner.StepRunner.warm_up_state`). An optimization
        whose first forward or backward creates something that persists answers why.
        """
        return None

    def warm_up_context(
        self, runner: StepRunner, create_state: Callable[[torch.optim.Optimizer], bool]
    ) -> AbstractContextManager[Any] | None:
        """A context around the fast warm-up's gradients, or None.

        An optimization whose own optimizers step where the gradients arrive (in a
        gradient hook) makes them call ``create_state(optimizer)`` there instead of
        stepping: it creates the state the optimizer's first step creates, without the
        update, and returns False where it cannot (the optimizer then steps).
        """
        return None

    def host_memory(self, runner: StepRunner) -> dict[str, Any] | None:
        """The host memory this optimization kept in the last step, or None.

        Measured from the tensors it kept on the host side (their sizes), never from a
        formula: ``by_kind`` (``optimizer_state``, ``gradients``, ``parameters``,
        ``activations`` -> bytes), ``pcie_bytes_per_step`` and ``paged_bytes``, each
        optional (the runner adds the optimizations' answers up).
        """
        return None

    def close(self) -> None:
        """Remove what the hooks installed (handles, files)."""

    def setup_problems(self, setup: StepSetup) -> list[str]:
        """What conflicts with this optimization in the final setup (StepSetup.validate)."""
        return []

    def environment_problem(self) -> str | None:
        """Why it cannot run on this machine (a missing optional library), with the install hint; or None."""
        return None

    def describe(self) -> str:
        """A short label with the options that differ from the defaults."""
        defaults = dataclasses.asdict(self.Config())
        diff = {k: v for k, v in self.options.items() if defaults.get(k) != v}
        if not diff:
            return self.name
        return self.name + "(" + ", ".join(f"{k}={v}" for k, v in diff.items()) + ")"


_REGISTRY: dict[str, type[Optimization]] = {}


def register(cls: type[Optimization]) -> type[Optimization]:
    """Class decorator: add an optimization to the registry under ``cls.name``.

    Raises:
        ValueError: the name is empty, already registered, or the Config is not a dataclass.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(
            f"optimization {cls.name!r} is already registered (by {_REGISTRY[cls.name].__qualname__})"
        )
    if not dataclasses.is_dataclass(cls.Config):
        raise ValueError(f"{cls.__name__}.Config must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered optimization names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[Optimization]:
    """The optimization class registered as ``name``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(unknown_name_message(name)) from None


def from_steps(steps: list[dict[str, Any]]) -> list[Optimization]:
    """Fresh optimizations for a setup's ``steps`` (``{"name", "options"}``), in order.

    Raises:
        InputError: an unknown name or invalid options.
    """
    if steps:
        import memprof.optimizations  # noqa: F401  (registers the built-in optimizations)
    return [make(s["name"], s["options"]) for s in steps]


def unknown_name_message(name: Any) -> str:
    close = difflib.get_close_matches(str(name), names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown optimization {name!r}{hint}; known: {', '.join(names())}"


def make(name: str, options: dict[str, Any] | None = None) -> Optimization:
    """Build an optimization from its name and options, validating both.

    Raises:
        InputError: unknown name or invalid options (every problem listed).
    """
    cls = get(name)
    config, problems = parse_options(cls.Config, options or {})
    if problems:
        raise InputError(f"{name}: " + "; ".join(problems))
    return cls(config)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A config class's field types, resolved once per class (the plan makes thousands of setups)."""
    return typing.get_type_hints(cls)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Any:
        return True
    if origin in (dict,):
        return isinstance(value, dict)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def parse_options(config_cls: type, options: dict[str, Any]) -> tuple[Any, list[str]]:
    """Validate ``options`` against a config dataclass.

    Returns:
        (config, problems): the config (None when there are problems) and every
        problem found, one message each.
    """
    problems: list[str] = []
    if not isinstance(options, dict):
        return None, [f"options must be a mapping, got {type(options).__name__}"]
    hints = _field_types(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key in options:
        if key not in fields:
            known = ", ".join(fields) or "none"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown option {key!r}{hint}; options: {known}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in options:
            continue
        v = options[name]
        tp = hints[name]
        meta = f.metadata
        if not _type_ok(v, tp):
            problems.append(f"option {name!r} must be {_type_name(tp)}, got {v!r}")
            continue
        if isinstance(v, float) and not math.isfinite(v):  # YAML's .nan and .inf are floats
            problems.append(f"option {name!r} must be a finite number, got {v!r}")
            continue
        choices = meta.get("choices")
        if choices is not None and v not in choices:
            problems.append(f"option {name!r} must be one of {', '.join(map(str, choices))}, got {v!r}")
            continue
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo:
                problems.append(f"option {name!r} must be at least {lo}, got {v!r}")
                continue
            if hi is not None and v > hi:
                problems.append(f"option {name!r} must be at most {hi}, got {v!r}")
                continue
        if tp is float and isinstance(v, int):
            v = float(v)
        values[name] = v
    # the config's own checks (relations between options) run on the valid options, the rest at
    # their defaults, so that every problem is listed at once; those about an option already
    # reported (at its default now) are left out
    bad = [n for n in fields if n in options and n not in values]
    config = config_cls(**values)
    check: Callable[[], list[str]] | None = getattr(config, "problems", None)
    if check is not None:
        problems.extend(p for p in check() if not any(f"'{n}'" in p for n in bad))
    return (None if problems else config), problems


def option_help(config_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each option of a config class."""
    hints = _field_types(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        extra = ""
        if meta.get("choices"):
            extra = " (" + "|".join(map(str, meta["choices"])) + ")"
        out.append((f.name, _type_name(hints[f.name]) + extra, f.default, meta.get("help", "")))
    return out


def describe_steps(steps: list[dict[str, Any]]) -> str:
    """Steps (``{"name", "options"}``) as one label, options that differ from the defaults:
    ``lora(rank=64) + checkpointing``. A step this version does not know (a profile written by
    another) is shown with its options as recorded."""
    out = []
    for s in steps:
        try:
            out.append(make(s["name"], s.get("options") or {}).describe())
        except InputError:
            opts = ", ".join(f"{k}={v}" for k, v in (s.get("options") or {}).items())
            out.append(f"{s['name']}({opts})" if opts else s["name"])
    return " + ".join(out)


def require_environment(steps: list[Optimization]) -> None:
    """EnvironmentProblem with the first missing library's install hint, before any work.

    Raises:
        EnvironmentProblem: a step's optional library (peft, bitsandbytes) is not installed.
    """
    missing = [why for s in steps if (why := s.environment_problem())]
    if missing:
        raise EnvironmentProblem(missing[0])


def for_setup(setup: StepSetup) -> list[Optimization]:
    """Fresh instances of a setup's applied optimizations, in order (their hooks run the step)."""
    return from_steps(setup.steps)


def config_overrides(setup: StepSetup) -> dict[str, Any]:
    """Config attributes the setup's optimizations change before the model is built."""
    out: dict[str, Any] = {}
    for opt in for_setup(setup):
        out.update(opt.config_overrides(setup))
    return out


def check_setup(setup: StepSetup) -> None:
    """Raise InputError listing everything wrong with a setup: its plain data, then what its optimizations find."""
    problems = setup.problems()
    for opt in for_setup(setup):
        problems.extend(opt.setup_problems(setup))
    if problems:
        raise InputError("; ".join(problems))
