"""The memory-regression gate: record a baseline of workloads, check a later run against it.

A baseline file (JSON, schema ``memprof.baseline/1``) holds, per workload, what
to run (model spec, workload, engine, optimizations) and the full profile it
gave, with the versions that produced it. :func:`check` runs every workload
again and compares: a peak above the baseline by more than the tolerance is a
regression (with the categories and modules that grew, from the two profiles),
one below it by more than the tolerance an improvement (refresh the baseline).
The sim engine is deterministic, so a CI runner without a GPU gets the same
bytes every time for the same code and versions.

Workloads come from the command line (one), from a YAML or TOML file, or from
the ``[tool.memprof]`` table of a pyproject.toml::

    workloads:
      - name: gpt2-train          # optional; default: model-mode-bB-sS
        model: gpt2
        mode: train               # and batch_size, seq_len, dtype, optimizer, attn,
        batch_size: 2             # task, decode_tokens as for `memprof analyze`
        seq_len: 128
        engine: sim               # default sim (deterministic, no GPU)
        recipe: low-memory-finetune   # optional: a recipe file or shipped name
        steps: [checkpointing]    # optional: --step items, after the recipe
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from memprof._version import __version__
from memprof.bounds import MAX_YAML_BYTES, load_yaml
from memprof.choices import EngineName, Task, values
from memprof.errors import InputError, MemprofError, ProblemsError
from memprof.gpus import lookup
from memprof.model_config import check_spec
from memprof.profile import Profile, write_atomic
from memprof.recipes import from_names, load
from memprof.units import format_bytes, parse_percent, parse_size
from memprof.workload import Workload

SCHEMA_NAME = "memprof.baseline"
SCHEMA_VERSION = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"
DEFAULT_TOLERANCE = "1%"
#: the largest byte count a baseline may hold (an int64, as other tools read JSON integers)
MAX_BYTES = 2**63 - 1

_WORKLOAD_KEYS = (
    "mode",
    "batch_size",
    "seq_len",
    "dtype",
    "optimizer",
    "attn",
    "task",
    "decode_tokens",
    "moe_routing",
    "experts",
)
#: workload keys whose value is a count (JSON 4, never 4.0, "4" or true)
_WHOLE_KEYS = ("batch_size", "seq_len", "decode_tokens")
#: workload keys a baseline may record as null (the model's own choice)
_NULLABLE = ("task",)
_ENTRY_KEYS = ("name", "model", "engine", "recipe", "steps", "gpu", *_WORKLOAD_KEYS)
#: the engines a workloads entry may name (sim, the deterministic one, first: the default)
ENGINES = ("sim", *(e for e in values(EngineName) if e != "sim"))

Progress = Callable[[str], None]


class GateError(ProblemsError):
    """A workloads or baseline file with problems (every one of them, like a recipe)."""


@dataclass
class GateWorkload:
    """One workload of a baseline: what to run, as plain data."""

    name: str
    model: str
    workload: Workload
    engine: str = "sim"
    recipe: str | None = None
    steps: list[str] = field(default_factory=list)
    #: a GPU preset name (``--gpu``): the sim engine projects onto it; None: the default projection
    gpu: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "model": self.model,
            "engine": self.engine,
            "recipe": self.recipe,
            "steps": list(self.steps),
            "workload": self.workload.to_dict(),
        }
        if self.gpu is not None:  # older baselines have no key: the default projection
            d["gpu"] = self.gpu
        return d

    @classmethod
    def from_entry(cls, entry: Any, where: str, problems: list[str]) -> GateWorkload | None:
        """An entry of a workloads file; problems are appended (with ``where``), None if unusable."""
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with a 'model', got {entry!r}")
            return None
        before = len(problems)
        for k in entry:
            if k not in _ENTRY_KEYS:
                problems.append(f"{where}: unknown key {k!r} (known: {', '.join(_ENTRY_KEYS)})")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            problems.append(f"{where}: missing 'model' (a MODEL spec, as for memprof analyze)")
        engine = entry.get("engine", "sim")
        if engine not in ENGINES:
            problems.append(f"{where}: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        recipe = entry.get("recipe")
        if recipe is not None and not isinstance(recipe, str):
            problems.append(f"{where}: 'recipe' must be a file or a shipped recipe name")
        gpu = entry.get("gpu")
        if gpu is not None:
            try:
                gpu = lookup(str(gpu)).name
            except InputError as e:
                problems.append(f"{where}: {e}")
        steps = entry.get("steps", [])
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            problems.append(f"{where}: 'steps' must be a list of NAME[:key=value,...] strings")
            steps = []
        kw = {k: entry[k] for k in _WORKLOAD_KEYS if k in entry}
        for k in _WHOLE_KEYS:  # YAML's true, 1.5 and .nan are not counts (nor TOML's inf)
            if k in kw and type(kw[k]) is not int:
                problems.append(f"{where}.{k}: must be a whole number, got {_shown(kw.pop(k))}")
        try:
            wl = Workload(**kw)
            wl.validate()
        except (TypeError, InputError) as e:
            problems.append(f"{where}: {e}")
            return None
        if len(problems) > before:
            return None
        name = entry.get("name") or default_name(str(model), wl)
        bad_name = name_problem(str(name))
        if bad_name:
            problems.append(f"{where}.name: {bad_name}")
            return None
        return cls(
            name=str(name), model=str(model), workload=wl, engine=engine, recipe=recipe, steps=steps, gpu=gpu
        )

    def problems(self) -> list[str]:
        """What is wrong with this workload's model, shapes and optimizations, found without building anything."""
        from memprof.models import resolve
        from memprof.prepare import check_positions

        try:
            rm = resolve(self.model, task=self.workload.task)
            check_positions(rm, self.workload)
            if self.recipe:
                load(self.recipe)
            if self.steps:
                from_names(self.steps)
        except InputError as e:
            return [f"{self.name}: {e}"]
        return []

    def run(self, *, progress: Progress | None = None) -> Profile:
        """Profile this workload (with its optimizations stacked, if any)."""
        from memprof.prepare import fake_model, prepare, stack

        rm, eng = prepare(
            self.model,
            self.workload,
            self.engine,
            task=self.workload.task,
            progress=progress,
            gpu=lookup(self.gpu) if self.gpu is not None else None,
        )
        # recorded as it ran: a baseline says "sdpa" or "eager", never "auto"
        self.workload = self.workload.for_model(rm)
        if self.recipe or self.steps:
            recipe = load(self.recipe) if self.recipe else from_names(self.steps)
            if self.recipe and self.steps:
                recipe.steps += from_names(self.steps).steps
            setup, _ = stack(
                recipe, self.workload, fake_model(rm, self.workload), pretrained=bool(rm.has_weights)
            )
            return eng.run(rm, setup, progress=progress)
        return eng.run(rm, self.workload, progress=progress)


def check_workers() -> None:
    """A bad ``MEMPROF_WORKERS`` is refused before any workload runs (:func:`memprof.engines.pool.available_workers`)."""
    from memprof.engines.pool import available_workers

    available_workers()


def run_workloads(workloads: list[GateWorkload], say: Progress) -> list[Profile]:
    """Profile each workload, side by side in forked workers when all run in the sim engine.

    (:mod:`memprof.engines.pool`; ``MEMPROF_WORKERS=1`` runs them one by one.) Each
    workload's resolved shapes (``attn``) come back with its profile.

    Raises:
        The first error a workload raised, in the workloads' order.
    """
    from memprof.engines import pool

    n = len(workloads)

    def one(i: int, w: GateWorkload) -> tuple[Profile, Workload]:
        # a worker's status lines stay in it: the terminal is this process's
        quiet = pool.in_worker()
        return w.run(progress=None if quiet else _prefixed(say, f"[{i}/{n}] {w.name}: ")), w.workload

    out = pool.run_calls(
        [partial(one, i, w) for i, w in enumerate(workloads, 1)],
        parallel=all(w.engine == "sim" for w in workloads),
        stop_at_error=True,
        progress=lambda i, m: say(f"[{i + 1}/{n}] {workloads[i].name}: {m}"),
    )
    profiles = []
    for w, r in zip(workloads, out):
        if isinstance(r, BaseException):
            raise r
        profiles.append(r[0])
        w.workload = r[1]
    return profiles


def _prefixed(say: Progress, prefix: str) -> Progress:
    return lambda msg: say(prefix + msg)


def _control_characters(x: Any, where: str, limit: int = 5) -> list[str]:
    """Where strings of a baseline entry hold control characters or line breaks (the first ``limit``).

    memprof writes none; the reports print module, phase and note strings as they are,
    and a terminal acts on escape sequences in them.
    """
    out: list[str] = []

    def walk(v: Any, at: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(v, str):
            if name_problem(v):
                out.append(f"{at}: {name_problem(v)}")
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(k, f"{at} (a key)")
                walk(item, f"{at}.{k}")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, f"{at}[{i}]")

    walk(x, where)
    return out


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a workload, or None.

    A control character or a line break in a name would end up in the reports: a
    newline starts a forged line of a GitHub summary (``::warning ...``), and XML 1.0
    cannot hold most control characters at all (a JUnit file).
    """
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return f"must not hold control characters or line breaks, got {repr(name)[:80]}"
    return None


def default_name(model: str, wl: Workload) -> str:
    stem = Path(model).stem if ("/" in model or model.endswith(".json")) else model
    return f"{stem}-{wl.mode}-b{wl.batch_size}-s{wl.seq_len}"


def read_workloads(path: str | Path) -> list[GateWorkload]:
    """The workloads of a YAML/TOML file, or of the ``[tool.memprof]`` table of a pyproject.toml.

    Raises:
        GateError: every problem of the file at once.
    """
    p = Path(path)
    src = p.name
    text = _read_text(p, MAX_YAML_BYTES, "a workloads file")
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
            if p.name == "pyproject.toml":
                data = data.get("tool", {}).get("memprof")
                if data is None:
                    raise GateError(src, ["no [tool.memprof] table"])
        else:
            data = load_yaml(text, src)  # within the bounds: no anchors, at most 1 MiB
    except InputError as e:
        raise GateError(src, [str(e).removeprefix(f"{src}: ")]) from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise GateError(
            src, [f"not valid {'TOML' if p.suffix.lower() == '.toml' else 'YAML'}: {e}"]
        ) from None
    except (RecursionError, ValueError) as e:  # tomllib: deep nesting, a number of thousands of digits
        raise GateError(src, [f"not valid TOML: {_unreadable(e)}"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), list) or not data["workloads"]:
        raise GateError(src, ["expected a 'workloads' list of {model: ..., mode: ..., ...} entries"])
    problems: list[str] = []
    out = []
    for i, entry in enumerate(data["workloads"], 1):
        w = GateWorkload.from_entry(entry, f"workloads[{i}]", problems)
        if w is not None:
            out.append(w)
    names = [w.name for w in out]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"workload name {n!r} appears more than once; give each a 'name'")
    if problems:
        raise GateError(src, problems)
    return out


# --------------------------------------------------------------------------- baseline
def compact(p: Profile) -> dict[str, Any]:
    """A profile as a baseline keeps it: without the timelines (hundreds of points each).

    The check compares peaks, categories, phases and modules; a baseline file is
    committed to a repository, and its diffs should show those, not curves.
    """
    d = p.to_dict()
    d["timeline"] = None
    if isinstance(d.get("allocator"), dict) and "timeline" in d["allocator"]:
        d["allocator"] = {k: v for k, v in d["allocator"].items() if k != "timeline"}
    return d


@dataclass
class Baseline:
    """The recorded workloads and their profiles."""

    workloads: list[GateWorkload]
    profiles: list[Profile]
    versions: dict[str, str]
    created: str = ""
    memprof_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "memprof_version": self.memprof_version,
            "created": self.created,
            "versions": self.versions,
            "workloads": [
                {**w.to_dict(), "profile": compact(p)} for w, p in zip(self.workloads, self.profiles)
            ],
        }

    def write(self, path: str | Path) -> None:
        write_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def check_workloads(workloads: list[GateWorkload], source: str) -> None:
    """Check every workload's model, shapes and optimizations before the first one runs.

    Raises:
        GateError: every problem found.
    """
    problems = [p for w in workloads for p in w.problems()]
    if problems:
        raise GateError(source, problems)


def check_models(workloads: list[GateWorkload], source: str) -> None:
    """:func:`check_workloads` where every workload's MODEL names nothing, found without torch.

    A workload's first problem is its MODEL (see :meth:`GateWorkload.problems`), and
    the only one then; where every workload has one, they are every problem
    :func:`check_workloads` would report. Otherwise nothing is raised here: the
    others' problems need the model built.

    Raises:
        GateError: every workload's MODEL names nothing usable.
    """
    problems = []
    for w in workloads:
        if w.workload.task is not None and w.workload.task not in values(Task):
            return  # resolve refuses the task first
        try:
            check_spec(w.model)
        except InputError as e:
            problems.append(f"{w.name}: {e}")
        else:
            return
    if problems:
        raise GateError(source, problems)


def record(workloads: list[GateWorkload], *, progress: Progress | None = None) -> Baseline:
    """Profile every workload: the baseline (every workload checked first)."""
    from memprof.engines.base import versions

    check_workloads(workloads, "workloads")
    check_workers()

    say = progress or (lambda m: None)
    profiles = run_workloads(workloads, say)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Baseline(workloads=workloads, profiles=profiles, versions=versions(), created=created)


def _is_bytes(v: Any) -> bool:
    # JSON numbers: 1.0, 1e400 (inf) and NaN are floats; true is a bool, an int to Python
    return type(v) is int and 0 <= v <= MAX_BYTES


#: a baseline file: each workload's profile is a few KiB to a few hundred (its modules)
MAX_BASELINE_BYTES = 64 * 1024 * 1024


def _read_text(p: Path, limit: int, what: str) -> str:
    """A file's UTF-8 text, at most ``limit`` bytes.

    Raises:
        InputError: unreadable, larger than ``limit``, or not UTF-8 text (a binary file).
    """
    try:
        size = p.stat().st_size
        if size > limit:
            raise InputError(f"{p}: {size} bytes, more than memprof reads in {what} ({limit})")
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a text file (not UTF-8); expected {what}") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read it ({e.strerror or e})") from None


def _unreadable(e: BaseException) -> str:
    """Why a parser gave up on a file that is JSON or TOML in form: too deep, or a number too long."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if "integer string conversion" in str(e):
        # Python reads no integer of more digits (CVE-2020-10735); no byte count needs them
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    return str(e).split(";")[0][:200]


def _shown(v: Any) -> str:
    """A value as the JSON file spells it (null, true, Infinity, "text")."""
    try:
        return json.dumps(v)[:80]
    except (TypeError, ValueError):
        return repr(v)[:80]


def _bytes_problem(where: str, v: Any) -> str:
    return f"{where}: must be a whole number of bytes, 0 to 2**63-1, got {_shown(v)}"


def _profile_problems(prof: Any, where: str) -> list[str]:
    """What is wrong with the fields of a baseline's profile that the check reads (types, ranges).

    The rest (schema, categories) is :meth:`Profile.from_dict`'s to check.
    """
    if not isinstance(prof, dict):
        return [f"{where}: must be a memprof profile (a mapping), got {type(prof).__name__}"]
    out = []
    if "peak_bytes" not in prof:
        out.append(f"{where}.peak_bytes: missing")
    elif not _is_bytes(prof["peak_bytes"]):
        out.append(_bytes_problem(f"{where}.peak_bytes", prof["peak_bytes"]))
    v = prof.get("peak_reserved_bytes")
    if v is not None and not _is_bytes(v):
        out.append(_bytes_problem(f"{where}.peak_reserved_bytes", v))
    for k in ("engine", "device"):
        if not isinstance(prof.get(k), str):
            out.append(f"{where}.{k}: must be a string, got {_shown(prof.get(k))}")
    if prof.get("peak_phase") is not None and not isinstance(prof["peak_phase"], str):
        out.append(f"{where}.peak_phase: must be a phase name or null, got {_shown(prof['peak_phase'])}")
    cats = prof.get("categories_at_peak")
    if not isinstance(cats, dict):
        out.append(f"{where}.categories_at_peak: must be a mapping of category to bytes, got {_shown(cats)}")
    else:
        out += [
            _bytes_problem(f"{where}.categories_at_peak.{c}", v) for c, v in cats.items() if not _is_bytes(v)
        ]
    # list -> (its byte fields, the optional ones among them)
    fields = {
        "phases": (("peak_bytes",), ()),
        "modules": (("peak_bytes", "activation_bytes", "bytes_at_peak"), ("bytes_at_peak",)),
    }
    for key, (byte_keys, optional) in fields.items():
        rows = prof.get(key, [])
        if not isinstance(rows, list):
            out.append(f"{where}.{key}: must be a list, got {type(rows).__name__}")
            continue
        for j, row in enumerate(rows):
            at = f"{where}.{key}[{j}]"
            if not isinstance(row, dict):
                out.append(f"{at}: must be a mapping, got {_shown(row)}")
                continue
            if not isinstance(row.get("name"), str):
                out.append(f"{at}.name: must be a string, got {_shown(row.get('name'))}")
            out += [
                _bytes_problem(f"{at}.{k}", row.get(k))
                for k in byte_keys
                if (k in row or k not in optional) and not _is_bytes(row.get(k))
            ]
    return out


def _header_problems(d: dict[str, Any]) -> list[str]:
    """What is wrong with a baseline's own fields (beside its workloads)."""
    out = []
    for k in ("memprof_version", "created"):
        if k in d and not isinstance(d[k], str):
            out.append(f"{k}: must be a string, got {_shown(d[k])}")
    v = d.get("versions", {})
    if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
        out.append(f"versions: must map package names to version strings, got {_shown(v)}")
    return out


def load_baseline(path: str | Path) -> Baseline:
    """Read a baseline file. A corrupt one never passes: every problem is an error.

    Raises:
        InputError: missing or unreadable file, not JSON, another schema, a newer version,
            a malformed entry or profile.
    """
    p = Path(path)
    src = p.name
    if not p.exists():
        raise InputError(f"{path}: no such baseline file (make one with memprof baseline)")
    text = _read_text(p, MAX_BASELINE_BYTES, "a baseline")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{src}: not valid JSON ({e.msg} at line {e.lineno}): a corrupt baseline") from None
    except (RecursionError, ValueError) as e:
        raise InputError(f"{src}: not valid JSON ({_unreadable(e)}): a corrupt baseline") from None
    if not isinstance(d, dict) or "schema" not in d:
        raise InputError(f"{src}: not a memprof baseline (no 'schema' key)")
    name, _, ver = str(d["schema"]).partition("/")
    if name != SCHEMA_NAME or not ver.isdigit():
        raise InputError(f"{src}: not a memprof baseline (schema {d['schema']!r})")
    if int(ver) > SCHEMA_VERSION:
        raise InputError(
            f"{src}: baseline schema {d['schema']} is newer than this memprof reads ({SCHEMA}); upgrade memprof"
        )
    entries = d.get("workloads")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{src}: malformed baseline: no workloads")
    problems: list[str] = _header_problems(d)
    workloads, profiles = [], []
    names: list[str] = []
    for i, item in enumerate(entries, 1):
        where = f"workloads[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("workload"), dict) or "profile" not in item:
            problems.append(f"{where}: malformed (needs 'workload' and 'profile')")
            continue
        if "name" in item and (not isinstance(item["name"], str) or not item["name"]):
            problems.append(f"{where}.name: must be a non-empty string, got {_shown(item['name'])}")
        # a module, phase or note string that would drive the terminal (the name: checked below)
        controls = _control_characters({k: v for k, v in item.items() if k != "name"}, where)
        if controls:
            problems += controls
            continue
        entry = {
            k: item.get(k)
            for k in ("name", "model", "engine", "recipe", "steps", "gpu")
            if item.get(k) is not None
        }
        for k, v in item["workload"].items():
            if k not in _WORKLOAD_KEYS or (v is None and k in _NULLABLE):
                continue
            if v is None or (k in _WHOLE_KEYS and type(v) is not int):
                # left out of the entry below: the problem is said once, here
                want = "must be a whole number" if k in _WHOLE_KEYS else "must not be null"
                problems.append(f"{where}.workload.{k}: {want}, got {_shown(v)}")
            else:
                entry[k] = v
        w = GateWorkload.from_entry(entry, where, problems)
        if w is not None:
            names.append(w.name)
        found = _profile_problems(item["profile"], f"{where}.profile")
        if found:
            problems += found
            continue
        try:
            prof = Profile.from_dict(item["profile"])
        except MemprofError as problem:
            problems.append(f"{where}: {problem}")
            continue
        if w is not None:
            workloads.append(w)
            profiles.append(prof)
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"workload name {n!r} appears more than once")
    if problems:
        raise GateError(f"{src}: malformed baseline", problems)
    return Baseline(
        workloads=workloads,
        profiles=profiles,
        versions=dict(d.get("versions") or {}),
        created=str(d.get("created", "")),
        memprof_version=str(d.get("memprof_version", "")),
    )


# --------------------------------------------------------------------------- check
@dataclass(frozen=True)
class Tolerance:
    """How far a peak may move: a fraction of the baseline's peak, or bytes."""

    fraction: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str, what: str = "--tolerance") -> Tolerance:
        """``2%`` or ``50MiB`` (or plain bytes): finite and not negative.

        Args:
            text: the tolerance as given.
            what: how the message names it (the option, or the marker's argument).

        Raises:
            InputError: neither, or a negative or non-finite one.
        """
        # "--tolerance '2'", "tolerance='2'" (a marker's, a call's argument)
        shown = f"{what}{'' if what.endswith('=') else ' '}{text!r}"
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{shown}: give a percentage (2%) or a size (50MiB)")
        t = text.strip()
        try:
            if t.endswith("%"):
                f = parse_percent(t)
                if f < 0:
                    raise InputError("negative")
                return cls(fraction=f)
            n = parse_size(t)
            if n < 0:
                raise InputError("negative")
            return cls(bytes=n)
        except InputError:
            raise InputError(
                f"{shown}: give a percentage (2%) or a size (50MiB), not negative, finite"
            ) from None

    def allowed(self, baseline_peak: int) -> int:
        if self.fraction is not None:
            allowed = baseline_peak * self.fraction
            # a huge percentage of a large peak overflows a float: it allows any growth
            return int(allowed) if math.isfinite(allowed) else MAX_BYTES
        return int(self.bytes or 0)

    def __str__(self) -> str:
        if self.fraction is not None and self.fraction >= 10**4:  # 1e300%: not 300 digits
            return f"{self.fraction * 100:.3g}%"
        return (
            f"{self.fraction:.2%}".replace(".00%", "%")
            if self.fraction is not None
            else format_bytes(self.bytes)
        )


@dataclass
class WorkloadCheck:
    """One workload: baseline against now."""

    name: str
    status: str  # "ok", "regression", "improvement"
    baseline_peak: int
    peak: int
    allowed: int
    categories: list[tuple[str, int, int]] = field(
        default_factory=list
    )  # (category, before, after) that moved
    modules: list[tuple[str, int, int]] = field(
        default_factory=list
    )  # (module, before, after) that grew most
    phase: tuple[str | None, str | None] = (None, None)
    profile: Profile | None = None

    @property
    def delta(self) -> int:
        return self.peak - self.baseline_peak

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "baseline_peak_bytes": self.baseline_peak,
            "peak_bytes": self.peak,
            "delta_bytes": self.delta,
            "allowed_bytes": self.allowed,
            "peak_phase": {"baseline": self.phase[0], "now": self.phase[1]},
            "categories": [{"category": c, "baseline_bytes": a, "bytes": b} for c, a, b in self.categories],
            "modules": [{"module": m, "baseline_bytes": a, "bytes": b} for m, a, b in self.modules],
        }


@dataclass
class CheckReport:
    """Every workload's result, and what differs in the environment."""

    baseline_path: str
    tolerance: str
    results: list[WorkloadCheck]
    version_changes: dict[str, tuple[str, str]]

    @property
    def regressions(self) -> list[WorkloadCheck]:
        return [r for r in self.results if r.status == "regression"]

    @property
    def improvements(self) -> list[WorkloadCheck]:
        return [r for r in self.results if r.status == "improvement"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "memprof.check/1",
            "baseline": self.baseline_path,
            "tolerance": self.tolerance,
            "passed": not self.regressions,
            "version_changes": {k: {"baseline": a, "now": b} for k, (a, b) in self.version_changes.items()},
            "workloads": [r.to_dict() for r in self.results],
        }


def diff(
    before: Profile, after: Profile, top: int = 5
) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """The categories at the peak that moved, and the modules whose memory at the peak grew most.

    Modules are compared by what they held at the global peak (``bytes_at_peak``).
    A module is named only when the modules inside it do not explain its growth
    (the innermost that grew), and repeated blocks are folded into one row
    (``h.*.mlp.c_fc (x12)``: the sums over the blocks).
    """
    from memprof.tracking import CATEGORIES

    cats = [
        (c, before.categories_at_peak.get(c, 0), after.categories_at_peak.get(c, 0))
        for c in CATEGORIES
        if before.categories_at_peak.get(c, 0) != after.categories_at_peak.get(c, 0)
    ]
    cats.sort(key=lambda t: -abs(t[2] - t[1]))
    old = {m.name: m.bytes_at_peak for m in before.modules}
    new = {m.name: m.bytes_at_peak for m in after.modules}
    # the root holds everything: it always grows, and says nothing
    grown = {n: (old.get(n, 0), b) for n, b in new.items() if b > old.get(n, 0) and n not in ("", "<model>")}

    def explained(n: str, growth: int) -> bool:
        # a parent is explained when the modules directly inside it grew by at least half as much
        kids = [
            qb - qa for q, (qa, qb) in grown.items() if q.startswith(n + ".") and "." not in q[len(n) + 1 :]
        ]
        return sum(kids) * 2 >= growth

    # the innermost modules that grew, repeated blocks folded into one row: h.0.mlp, h.1.mlp -> h.*.mlp (x2)
    rows: dict[str, list[Any]] = {}
    for n, (a, b) in grown.items():
        if explained(n, b - a):
            continue
        key = re.sub(r"\.\d+(?=\.|$)", ".*", n)
        r = rows.setdefault(key, [0, 0, 0, n])
        r[0] += a
        r[1] += b
        r[2] += 1
    named = [(first if c == 1 else f"{k} (x{c})", a, b) for k, (a, b, c, first) in rows.items()]
    named.sort(key=lambda t: (-(t[2] - t[1]), t[0]))
    picked = named[:top]
    return cats, picked


def check(
    baseline: Baseline,
    tolerance: Tolerance,
    *,
    baseline_path: str = "",
    progress: Progress | None = None,
) -> CheckReport:
    """Run every workload of ``baseline`` again and compare its peak with the recorded one."""
    from memprof.engines.base import versions

    check_workloads(baseline.workloads, Path(baseline_path).name or "baseline")
    check_workers()

    say = progress or (lambda m: None)
    now = versions()
    changes = {
        k: (baseline.versions.get(k, "?"), v)
        for k, v in now.items()
        if k in ("torch", "transformers", "memprof") and baseline.versions.get(k) != v
    }
    results = []
    afters = run_workloads(baseline.workloads, say)
    for w, before, after in zip(baseline.workloads, baseline.profiles, afters):
        allowed = tolerance.allowed(before.peak_bytes)
        d = after.peak_bytes - before.peak_bytes
        status = "regression" if d > allowed else ("improvement" if -d > allowed else "ok")
        cats, mods = diff(before, after)
        results.append(
            WorkloadCheck(
                name=w.name,
                status=status,
                baseline_peak=before.peak_bytes,
                peak=after.peak_bytes,
                allowed=allowed,
                categories=cats,
                modules=mods,
                phase=(before.peak_phase, after.peak_phase),
                profile=after,
            )
        )
    return CheckReport(
        baseline_path=baseline_path, tolerance=str(tolerance), results=results, version_changes=changes
    )
