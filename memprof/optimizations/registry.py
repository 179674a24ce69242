"""The optimization registry: names -> small optimization classes with validated configs.

Each optimization is a subclass of :class:`Optimization` with a dataclass
``Config`` (its options, each field typed, with ranges and choices in the
field's metadata), registered by name with :func:`register`. The registry
rejects duplicate names and answers an unknown name with the known ones, like
PEFT's ``peft_types`` and torch's ``register_flop_formula``.

Options are validated where they enter (:func:`parse_options`): every problem
is collected, so a recipe with three mistakes gets three messages at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from memprof.errors import InputError

if typing.TYPE_CHECKING:
    import torch

    from memprof.workload import StepSetup


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
    :meth:`why_not` when more than the mode decides whether it applies.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    modes: ClassVar[tuple[str, ...]] = ("train",)

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


def _field_types(cls: type) -> dict[str, Any]:
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
    if problems:
        return None, problems
    config = config_cls(**values)
    check: Callable[[], list[str]] | None = getattr(config, "problems", None)
    if check is not None:
        problems.extend(check())
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
