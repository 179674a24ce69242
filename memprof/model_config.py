"""What a MODEL spec names; a model's config.json read into a transformers config, its sizes checked.

Part of resolving a MODEL spec (:mod:`memprof.models`). :func:`spec_kind` and
:func:`check_spec` need neither torch nor transformers (a Hub id's config.json is
fetched with huggingface_hub alone), so that the command line answers a spec that
names nothing, a config.json that is not one, or a Hub id it cannot fetch before they
load. A config that transformers accepts can still fail later, deep inside a
layer's forward; :func:`check_config` refuses it here, in one line that names the
attribute to change.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from memprof.bounds import MAX_LABELS, POSITIVE_INTS, approx, config_bound_problems, size_problem
from memprof.errors import EnvironmentProblem, InputError
from memprof.files import not_regular

#: a Hub id: ``org/name``
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

#: what ``memprof analyze FILE`` expects a config file to hold
CONFIG_FILE_EXPECTED = "a JSON object with a model_type"


def bundled_configs_dir() -> Path:
    """The folder of bundled model configs (``configs/models`` in the repository)."""
    env = os.environ.get("MEMPROF_CONFIGS")
    if env:
        return Path(env) / "models"
    return Path(__file__).resolve().parent.parent / "configs" / "models"


def bundled_models() -> list[str]:
    """Names of the bundled configs, for ``memprof analyze NAME``."""
    d = bundled_configs_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def looks_like_factory(spec: str) -> bool:
    """``package.module:factory``."""
    if ":" not in spec:
        return False
    mod, _, attr = spec.partition(":")
    return bool(re.match(r"^[A-Za-z_][\w.]*$", mod)) and bool(re.match(r"^[A-Za-z_]\w*$", attr))


def spec_kind(spec: str) -> str:
    """What a MODEL spec names, found without torch or transformers (nothing is read).

    Args:
        spec: the MODEL argument.

    Returns:
        ``directory`` (a model folder), ``config`` (a config.json file), ``factory``
        (``package.module:factory``), ``bundled`` (a config in ``configs/models``) or
        ``hub`` (an ``org/name`` id, not looked up here).

    Raises:
        InputError: a file that is not JSON, or nothing by that name.
    """
    if not spec.strip():  # Path("") is the current folder: never what was meant
        raise InputError(
            "an empty model name; give a model folder, a config.json, a bundled name or a Hub id"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return "directory"
    if path.is_file():
        if path.suffix != ".json":
            raise InputError(
                f"{spec}: expected a model directory or a config.json, got a {path.suffix or 'plain'} file"
            )
        return "config"
    kind = not_regular(path)
    if kind:  # /dev/null, a FIFO: it exists, so "no such file" would mislead
        raise InputError(f"{spec}: is {kind}, not a regular file; give a model folder or a config.json")
    if looks_like_factory(spec):
        return "factory"
    if (bundled_configs_dir() / f"{spec}.json").is_file():
        return "bundled"
    names = ", ".join(bundled_models()) or "none"
    if path.suffix == ".json" or spec.startswith(("./", "../", "/", "~")):
        # a path (a Hub id never ends in .json): say the file is missing, do not ask the Hub
        raise InputError(f"{spec}: no such file or directory (bundled configs: {names})")
    if HUB_ID.match(spec):
        return "hub"
    raise InputError(f"{spec}: no such file or directory, bundled config or Hub id (bundled: {names})")


def check_spec(spec: str, trust_remote_code: bool = False) -> str:
    """:func:`spec_kind`, and for a folder or a config file, what can be checked of its config without transformers.

    The checks :func:`memprof.models.resolve` makes first, with its messages: a
    folder has a config.json, which is a JSON object, asks to run no shipped code
    unless trusted, and has a model_type string; a Hub id's config.json is found in
    the cache or downloaded (:func:`hub_config_dir`) and checked so. Whether
    transformers knows that type, and the rest, is left to ``resolve``. A bundled
    config is shipped (and tested); a factory is not imported here.

    Returns:
        The kind of spec (see :func:`spec_kind`).

    Raises:
        InputError: as ``resolve`` would for these.
        EnvironmentProblem: a Hub id not cached while offline, or whose download failed.
    """
    kind = spec_kind(spec)
    path = Path(spec).expanduser()
    if kind == "directory":
        directory_config(spec, path, trust_remote_code)
    elif kind == "config":
        config_data(path, str(path), trust_remote_code, CONFIG_FILE_EXPECTED)
    elif kind == "hub":
        directory_config(spec, hub_config_dir(spec), trust_remote_code)
    return kind


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: nothing is downloaded from the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def hub_config_dir(spec: str) -> Path:
    """The local folder of a Hub model's config.json: from the cache, else downloaded (huggingface_hub only).

    Raises:
        EnvironmentProblem: not cached while offline (``HF_HUB_OFFLINE``), or the download
            failed (network, authentication, no such repository).
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise EnvironmentProblem("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(spec, allow_patterns=["config.json"], local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if hub_offline():
        raise EnvironmentProblem(
            f"{spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1, so no download was attempted "
            "(download it on a connected machine, or pass a local directory)"
        )
    try:
        return Path(snapshot_download(spec, allow_patterns=["config.json"]))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise EnvironmentProblem(
            f"{spec}: could not fetch config.json from the Hub ({type(e).__name__}: {e})"
        ) from None


def directory_config(spec: str, folder: Path, trust_remote_code: bool) -> tuple[Path, dict[str, Any]]:
    """The config.json of a model folder and its data (see :func:`config_data`).

    Raises:
        InputError: no config.json, or one :func:`config_data` refuses.
    """
    cfg_path = folder / "config.json"
    kind = not_regular(cfg_path)
    if kind:
        raise InputError(
            f"{spec}: its config.json is {kind}, not a regular file; give a folder whose config.json is a file"
        )
    if not cfg_path.is_file():
        raise InputError(f"{spec}: directory has no config.json")
    return cfg_path, config_data(cfg_path, spec, trust_remote_code)


def config_data(
    path: Path, where: str, trust_remote_code: bool, expected: str = "a JSON object"
) -> dict[str, Any]:
    """A config.json's data: a JSON object, no shipped code unless trusted, a model_type string.

    Args:
        where: names the model in the message about shipped code.

    Raises:
        InputError: see :func:`read_json`, :func:`refuse_remote_code`, :func:`check_model_type`.
    """
    data = read_json(path, expected)
    refuse_remote_code(data, where, trust_remote_code)
    check_model_type(data, str(path))
    return data


def check_model_type(data: Mapping[str, Any], where: str) -> None:
    """The config names its model type, as a string (whether transformers knows it is its own check).

    Raises:
        InputError: no model_type, or not a string.
    """
    model_type = data.get("model_type")
    if not model_type:
        raise InputError(f"{where}: no model_type in the config")
    if not isinstance(model_type, str):
        raise InputError(
            f'{where}: model_type must be a string (e.g. "llama"), got {type(model_type).__name__}'
        )


def load_config_file(path: Path, trust_remote_code: bool) -> Any:
    data = config_data(path, str(path), trust_remote_code, CONFIG_FILE_EXPECTED)
    return config_from_dict(data, str(path))


def refuse_remote_code(data: Mapping[str, Any], where: str, trust_remote_code: bool) -> None:
    """Refuse a config that asks to run code shipped with the model, unless trusted.

    Raises:
        InputError: ``auto_map`` is set and ``trust_remote_code`` is not.
    """
    if data.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"{where}: the config asks to run code shipped with the model (auto_map); "
            "pass --trust-remote-code if you trust it"
        )


def config_from_dict(data: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    strict_config_error = _strict_config_error()
    check_model_type(data, where)
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING_NAMES:
        raise InputError(
            f"{where}: unknown model_type {model_type!r} (this transformers knows "
            f"{len(CONFIG_MAPPING_NAMES)} types, e.g. llama, gpt2, bert, t5, vit, whisper)"
        )
    archs = data.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise InputError(f'{where}: architectures must be a list of class names (e.g. ["LlamaForCausalLM"])')
    # before transformers builds it: some configs divide by the sizes in __init__, and name
    # every label in id2label; the values below fail only as the model is built or runs
    sizes = _size_problems(data, model_type) or _value_problems(data, model_type)
    if sizes:
        raise InputError(f"{where}: {sizes[0]}")
    kwargs = {k: v for k, v in data.items() if k != "model_type" and not k.startswith("_memprof")}
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError) as e:
        # transformers' own checks of the values given (a dtype it has no name for, a
        # rope_parameters without its keys...): the config's problem, not memprof's
        raise InputError(f"{where}: invalid {model_type} config ({e})") from None
    except strict_config_error as e:
        # transformers >= 5 validates configs as huggingface_hub strict dataclasses,
        # whose errors are no ValueError: "Class validation error for validator 'x':\n<why>"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__
        raise InputError(f"{where}: invalid {model_type} config ({why})") from None
    check_config(config, data, where)
    return config


class _NeverRaised(Exception):
    """Never raised: a huggingface_hub without strict dataclasses."""


def _strict_config_error() -> type[Exception]:
    """huggingface_hub's StrictDataclassError (imported with transformers: it takes 0.2 s alone)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - huggingface_hub before strict dataclasses
        return _NeverRaised
    return StrictDataclassError


def _size_problems(data: Mapping[str, Any], name: str) -> list[str]:
    """Size fields of a config.json (and of its towers' dicts) that are not positive whole numbers."""
    problems = []
    for attr in POSITIVE_INTS:
        problem = size_problem(name, attr, data.get(attr))
        if problem:
            problems.append(problem)
    for sub in _SUB_CONFIGS:
        if isinstance(data.get(sub), Mapping):
            problems += _size_problems(data[sub], f"{name} {sub}")
    return problems


#: the config fields that name an activation function (transformers' ACT2FN)
_ACTIVATIONS = ("hidden_act", "activation_function", "hidden_activation", "dense_act_fn")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v: Any) -> str:
    """A config value as a message quotes it: a number as it is, anything else as its short repr."""
    if isinstance(v, int) and not isinstance(v, bool):
        return approx(v) if v.bit_length() >= 1000 else str(v)
    return repr(v)[:40]


def _is_probability(key: str) -> bool:
    """A config field that is a dropout probability (``attention_dropout``, ``resid_pdrop``, ``layerdrop``)."""
    return "dropout" in key or key.endswith("pdrop") or key == "layerdrop"


def _value_problems(data: Mapping[str, Any], name: str) -> list[str]:
    """Values of a config.json (and of its towers' dicts) that a model cannot be built or run with.

    transformers accepts them into the config and fails later, as the model is built
    (an activation it has no function for, a label per class) or inside its forward
    (a dropout probability past 1). RoPE parameters are checked once the config has
    read them (:func:`_rope_problems`).
    """
    from transformers.activations import ACT2FN

    problems = []
    for key in _ACTIVATIONS:
        act = data.get(key)
        if isinstance(act, str) and act not in ACT2FN:
            problems.append(
                f"{name} {key} {act[:40]!r} is not an activation transformers has "
                f"(e.g. {', '.join(sorted(ACT2FN)[:6])}...)"
            )
    for key, v in data.items():
        if not _is_probability(key) or v is None or isinstance(v, bool):
            continue
        if not (_number(v) and 0 <= v <= 1):
            problems.append(f"{name} {key} is a dropout probability: a number from 0 to 1, got {_shown(v)}")
    labels = data.get("num_labels")
    if labels is not None:
        problem = size_problem(name, "num_labels", labels)
        if problem:
            problems.append(problem)
        elif labels > MAX_LABELS:
            problems.append(
                f"{name} num_labels {approx(labels)} is more than memprof builds ({MAX_LABELS}: transformers "
                "names each label as it reads the config)"
            )
    for sub in _SUB_CONFIGS:
        if isinstance(data.get(sub), Mapping):
            problems += _value_problems(data[sub], f"{name} {sub}")
    return problems


@functools.cache
def _rope_types(model_type: str) -> frozenset[str]:
    """The RoPE types a model type may name: transformers' shared ones and its own defaults' (SAM2's axial)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    types = {"default", *ROPE_INIT_FUNCTIONS}

    def collect(d: Any) -> None:
        if isinstance(d, Mapping):
            for k, v in d.items():
                if k in ("rope_type", "type") and isinstance(v, str):
                    types.add(v)
                collect(v)

    try:
        collect(CONFIG_MAPPING[model_type]().to_dict())
    except Exception:  # a class whose defaults do not build: the shared types only
        pass
    return frozenset(types)


def _rope_problems(params: Any, name: str, model_type: str) -> list[str]:
    """A config's RoPE parameters as it has read them (``rope_scaling`` and ``rope_theta``
    standardized into ``rope_parameters``): a type the model may name, and numbers (or
    lists of them) for the rest. One set, or one per layer type (Gemma 3:
    ``sliding_attention`` and ``full_attention``).
    """
    if not isinstance(params, Mapping):
        return [f"{name} must be a mapping of RoPE parameters (rope_type, rope_theta, ...)"]
    problems = []
    kind = params.get("rope_type", params.get("type"))
    if kind is not None and (not isinstance(kind, str) or kind not in _rope_types(model_type)):
        types = ", ".join(sorted(_rope_types(model_type)))
        problems.append(f"{name} rope_type {_shown(kind)} is not one transformers has for it ({types})")
    for k, v in params.items():
        if k in ("rope_type", "type") or v is None or isinstance(v, bool):
            continue
        if isinstance(v, Mapping):
            problems += _rope_problems(v, f"{name} {k}", model_type)
            continue
        items = v if isinstance(v, list) else [v]
        if not all(_number(x) for x in items):
            problems.append(f"{name} {k} must be a number (or a list of numbers), got {_shown(v)}")
        elif k == "rope_theta" and not v > 0:
            problems.append(f"{name} rope_theta must be positive, got {v}")
    return problems


def check_config(config: Any, data: Mapping[str, Any], where: str) -> None:
    """Refuse configs whose sizes do not fit together, before anything is built.

    transformers checks some relations itself; the ones here fail later, inside a
    layer, with an AssertionError or a shape mismatch deep in a forward. Sub-configs
    (``text_config``, ``vision_config``...) are checked too.

    Args:
        config: the transformers config built from ``data``.
        data: the config.json as read (what was given, as opposed to the class defaults).
        where: the file or spec, for the message.

    Raises:
        InputError: the first relation that does not hold, in one line.
    """
    name = getattr(config, "model_type", "?")
    with _global_values(config):
        # sizes first: the relations below divide by them
        problems = _bound_problems(config, name) or _config_problems(config, data, name)
    if problems:
        raise InputError(f"{where}: {problems[0]}")


@contextlib.contextmanager
def _global_values(config: Any) -> Iterator[None]:
    """A heterogeneous config's global values readable (Gemma 4's per-layer ``head_dim``...).

    transformers refuses to read an attribute that may vary by layer from the config
    itself (``per_layer_config[i]`` has each layer's). The checks read the config's
    global values, the ones given at its top level, as for every other model; the
    config and its sub-configs are left as they were.
    """
    configs = [config, *(getattr(config, sub, None) for sub in _SUB_CONFIGS)]
    flag = "allow_global_per_layer_attribute_access"
    changed = [c for c in configs if c is not None and hasattr(type(c), flag) and not getattr(c, flag)]
    for c in changed:
        setattr(c, flag, True)
    try:
        yield
    finally:
        for c in changed:
            setattr(c, flag, False)


_SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


def _bound_problems(config: Any, name: str) -> list[str]:
    """Sizes that are not positive whole numbers, or past memprof's bounds, in the config and its towers."""
    problems = config_bound_problems(config, name)
    for sub in _SUB_CONFIGS:
        sub_cfg = getattr(config, sub, None)
        if sub_cfg is not None and sub_cfg is not config and hasattr(sub_cfg, "to_dict"):
            problems += config_bound_problems(sub_cfg, f"{name} {sub}")
    return problems


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _config_problems(config: Any, data: Mapping[str, Any], name: str) -> list[str]:
    problems: list[str] = []
    given = data if isinstance(data, Mapping) else {}

    aliases = getattr(config, "attribute_map", None) or {}

    def origin(attr: str) -> str:
        names = {attr, aliases.get(attr, attr)} | {k for k, v in aliases.items() if v == attr}
        if names & set(given):
            return ""
        return f" ({name}'s default: the config does not set {attr})"

    vocab = _int(getattr(config, "vocab_size", None))
    # token ids the model looks up in its embedding: padding, and the decoder's first token
    for attr in ("pad_token_id", "decoder_start_token_id"):
        token = _int(getattr(config, attr, None))
        if vocab is not None and token is not None and not 0 <= token < vocab:
            problems.append(
                f"{name} {attr} {token} is outside the vocabulary of {vocab} tokens{origin(attr)}; "
                f"set {attr} below vocab_size"
            )
    hidden = _int(getattr(config, "hidden_size", None))
    heads = _int(getattr(config, "num_attention_heads", None))
    head_dim_keys = {"head_dim", aliases.get("head_dim", "head_dim")}
    if hidden is not None and heads:
        head_dim = getattr(config, "head_dim", None)
        derived = not (head_dim_keys & set(given)) and head_dim in (None, hidden // heads)
        if derived and hidden % heads:
            problems.append(
                f"{name} hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                "(each head gets hidden_size / heads dimensions; or set head_dim)"
            )
    kv = _int(getattr(config, "num_key_value_heads", None))
    if heads and kv is not None:
        if getattr(config, "kv_lora_rank", None) is not None and kv != heads:
            # multi-head latent attention (DeepSeek-V2/V3) expands its latent to every head
            problems.append(
                f"{name} num_key_value_heads {kv} must equal num_attention_heads {heads}: "
                "latent attention (kv_lora_rank) gives every head its own keys and values"
            )
        elif kv < 1 or heads % kv:
            problems.append(
                f"{name} num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, Mapping):
        problems += _rope_problems(rope, f"{name} rope_parameters", str(getattr(config, "model_type", "")))
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        # a window of no positions leaves a token nothing to attend to (Qwen2-MoE writes 0
        # for "no window", with use_sliding_window false)
        problem = size_problem(name, "sliding_window", window)
        if problem:
            problems.append(f"{problem} (or null: no window)")
    patch, image = getattr(config, "patch_size", None), getattr(config, "image_size", None)
    patches, images = (
        [v] * 2 if _int(v) is not None else list(v) if isinstance(v, (list, tuple)) else []
        for v in (patch, image)
    )
    if len(patches) == len(images) == 2 and any(p > i for p, i in zip(patches, images)):
        problems.append(
            f"{name} patch_size {patch} is larger than image_size {image}: an image must hold one patch at least"
        )
    experts = next((e for e in map(_int, (getattr(config, a, None) for a in _EXPERT_COUNTS)) if e), None)
    top_k = _int(getattr(config, "num_experts_per_tok", None))
    if experts and top_k and top_k > experts:
        problems.append(
            f"{name} num_experts_per_tok {top_k} is more than the {experts} experts; route each token to "
            "at most as many experts as there are"
        )
    for sub in _SUB_CONFIGS:
        sub_cfg = getattr(config, sub, None)
        if sub_cfg is not None and sub_cfg is not config and hasattr(sub_cfg, "to_dict"):
            sub_data = given.get(sub)
            problems += _config_problems(
                sub_cfg, sub_data if isinstance(sub_data, Mapping) else {}, f"{name} {sub}"
            )
    text = getattr(config, "text_config", None)
    text_vocab = _int(getattr(text, "vocab_size", None)) if text is not None else None
    for attr in _IMAGE_TOKENS:  # the special tokens memprof writes into image-text inputs
        token = _int(getattr(config, attr, None))
        if token is not None and text_vocab is not None and not 0 <= token < text_vocab:
            problems.append(
                f"{name} {attr} {token} is outside the text vocabulary of {text_vocab} tokens"
                f"{origin(attr)}; set {attr} below text_config.vocab_size"
            )
    return problems


_EXPERT_COUNTS = ("num_local_experts", "n_routed_experts", "num_experts")
_IMAGE_TOKENS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


#: a config.json memprof reads (the largest public ones are a few hundred KiB)
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_json(p: Path, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON object from a file.

    Raises:
        InputError: unreadable, too large, not UTF-8 text, not JSON, or not an object.
    """
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(
                f"{p}: {p.stat().st_size} bytes, too large for a config ({MAX_CONFIG_BYTES} at most)"
            )
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a text file (not UTF-8); expected {expected}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{p}: JSON nested too deeply") from None
    except ValueError as e:  # a number of more digits than Python reads (4300)
        raise InputError(f"{p}: not a config memprof reads ({str(e).split(':')[0]})") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected {expected}")
    return data
