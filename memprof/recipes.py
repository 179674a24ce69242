"""Recipes: YAML lists of registered optimizations, validated entry by entry.

A recipe is data, never code: ``yaml.safe_load``, names looked up in the
optimization registry (no import paths), options checked against each
optimization's config. Every problem in a file is collected and reported at
once (:class:`RecipeError`), like torchtune's ``ConfigError``::

    description: Low-memory full fine-tune
    optimizations:
      - name: checkpointing
        every: 1
      - name: mixed_precision
        dtype: bfloat16
        pure: true

``RECIPE`` on the command line is a path to such a file or the name of a
shipped recipe in ``configs/recipes/`` (without ``.yaml``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memprof import optimizations
from memprof.bounds import is_key, load_yaml
from memprof.errors import InputError, ProblemsError
from memprof.files import not_regular
from memprof.optimizations.registry import Optimization, parse_options, unknown_name_message

_TOP_KEYS = ("description", "optimizations")


class RecipeError(ProblemsError):
    """A recipe with problems; ``problems`` lists every one."""


@dataclass
class Recipe:
    """A validated recipe: optimizations in the order they stack."""

    description: str
    steps: list[Optimization]
    source: str = ""
    header: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "optimizations": [{"name": s.name, **s.options} for s in self.steps],
        }


def recipes_dir() -> Path:
    """The folder of shipped recipes (``configs/recipes`` in the repository)."""
    env = os.environ.get("MEMPROF_CONFIGS")
    if env:
        return Path(env) / "recipes"
    return Path(__file__).resolve().parent.parent / "configs" / "recipes"


def shipped_recipes() -> list[Path]:
    d = recipes_dir()
    return sorted(d.glob("*.yaml")) if d.is_dir() else []


def resolve_path(spec: str | Path) -> Path:
    """A recipe path, or the shipped recipe of that name.

    Raises:
        InputError: neither a file nor a shipped recipe.
    """
    p = Path(spec)
    if p.is_file():
        return p
    if p.exists():
        raise InputError(f"{spec}: is {not_regular(p) or 'not a regular file'}, not a recipe file")
    shipped = recipes_dir() / f"{spec}.yaml"
    if "/" not in str(spec) and shipped.is_file():
        return shipped
    names = ", ".join(s.stem for s in shipped_recipes()) or "none"
    raise InputError(f"{spec}: no such recipe file or shipped recipe (shipped: {names})")


def load(spec: str | Path) -> Recipe:
    """Load and validate a recipe file (or a shipped recipe by name).

    Raises:
        InputError: the file is missing.
        RecipeError: not YAML, or one or more invalid entries (all listed).
    """
    path = resolve_path(spec)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{spec}: cannot read ({e})") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<recipe>", *, allow_repeats: bool = False) -> Recipe:
    """Validate a recipe's YAML text.

    ``allow_repeats``: an optimization may appear more than once (variants measured
    each alone, ``memprof compare --separate``); a stacked recipe lists each once.

    Raises:
        RecipeError: every problem found.
    """
    duplicates: list[str] = []
    try:
        # a SafeLoader subclass (no code runs), within the bounds: no anchors, at most 1 MiB
        data = load_yaml(text, source, _loader(duplicates))
    except InputError as e:
        raise RecipeError(source, [str(e).removeprefix(f"{source}: ")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(source, [f"not valid YAML{where}: {problem}"]) from None
    header = [
        line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#") and line.strip("# ")
    ]
    problems: list[str] = list(duplicates)
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise RecipeError(
            source, [f"a recipe is a mapping with 'description' and 'optimizations', got {kind}"]
        )
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(f"unknown key {key!r} (a recipe has: {', '.join(_TOP_KEYS)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append("'description' must be a string")
        description = ""
    entries = data.get("optimizations")
    steps: list[Optimization] = []
    if entries is None:
        problems.append("missing 'optimizations' (a list of {name: ..., options...})")
        entries = []
    elif not isinstance(entries, list):
        problems.append(f"'optimizations' must be a list, got {type(entries).__name__}")
        entries = []
    elif not entries:
        problems.append("'optimizations' is empty")
    for i, entry in enumerate(entries, 1):
        where = f"optimizations[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with a 'name', got {entry!r}")
            continue
        name = entry.get("name")
        if name is None:
            problems.append(f"{where}: missing 'name'")
            continue
        where = f"{where} ({name})"
        if not isinstance(name, str) or name not in optimizations.names():
            problems.append(f"{where}: {unknown_name_message(name)}")
            continue
        cls = optimizations.get(name)
        opts = {k: v for k, v in entry.items() if k != "name"}
        config, probs = parse_options(cls.Config, opts)
        problems.extend(f"{where}: {p}" for p in probs)
        if config is not None:
            steps.append(cls(config))
    seen: dict[str, int] = {}
    for s in steps:
        seen[s.name] = seen.get(s.name, 0) + 1
    for name, n in seen.items():
        if n > 1 and not allow_repeats and name not in ("grad_accumulation",):
            problems.append(
                f"{name} appears {n} times; list each optimization once (or compare variants with --separate)"
            )
    if problems:
        raise RecipeError(source, problems)
    return Recipe(description=description, steps=steps, source=source, header=header)


def _loader(duplicates: list[str]) -> type[yaml.SafeLoader]:
    """A SafeLoader that records duplicate keys (safe_load keeps the last one silently)."""

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not is_key(key):  # "? [a, b]": a complex key, which no recipe field has
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a name, got a {type(key).__name__}",
                    key_node.start_mark,
                )
            if key in seen:
                duplicates.append(
                    f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one entry"
                )
            seen.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def from_names(items: list[str], *, allow_repeats: bool = False) -> Recipe:
    """A recipe from ``--step name[:key=value,...]`` items (values parsed as YAML scalars).

    Raises:
        RecipeError: every problem found.
    """
    entries = []
    for item in items:
        name, _, rest = item.partition(":")
        entry: dict[str, Any] = {"name": name.strip()}
        for kv in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = kv.partition("=")
            try:
                entry[k.strip()] = load_yaml(v, "--step") if eq else True
            except (yaml.YAMLError, InputError) as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise RecipeError(
                    "--step", [f"{item}: {k.strip()}={v}: not a valid value ({problem})"]
                ) from None
        entries.append(entry)
    return parse(
        yaml.safe_dump({"description": "from the command line", "optimizations": entries}),
        "--step",
        allow_repeats=allow_repeats,
    )
