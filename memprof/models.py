"""Resolve a MODEL spec into a buildable model and an example-input builder.

A MODEL spec is one of:

* a Hugging Face model directory (``config.json``, with or without weights),
* a path to a single ``config.json``,
* the name of a bundled config (``memprof analyze gpt2``; see ``configs/models/``),
* a Hub id (``org/name``), resolved through the local Hugging Face cache,
* ``package.module:factory``, a callable returning an ``nn.Module`` and an
  input builder, for models that are not from transformers.

Nothing here runs a step or measures memory: it builds models and inputs, on
whichever device or tensor mode the engine has set up around the call.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memprof.choices import DType, Task, values
from memprof.errors import EnvironmentProblem, InputError

#: tasks memprof builds inputs for, with the transformers auto class of each
TASKS: dict[str, str] = {
    Task.causal_lm.value: "AutoModelForCausalLM",
    Task.masked_lm.value: "AutoModelForMaskedLM",
    Task.seq_classification.value: "AutoModelForSequenceClassification",
    Task.seq2seq_lm.value: "AutoModelForSeq2SeqLM",
    Task.speech_seq2seq.value: "AutoModelForSpeechSeq2Seq",
    Task.image_classification.value: "AutoModelForImageClassification",
    Task.feature_extraction.value: "AutoModel",
    # CLIP-style pairs of towers trained with a contrastive loss (transformers' example
    # of the same name); the auto class is the one that builds CLIPModel, SiglipModel...
    Task.contrastive_image_text.value: "AutoModelForZeroShotImageClassification",
    # a vision tower feeding a language model (LLaVA, Qwen2-VL, Gemma 3...)
    Task.image_text_to_text.value: "AutoModelForImageTextToText",
}
if set(TASKS) != set(values(Task)):  # pragma: no cover - a task added to one place only
    raise RuntimeError("memprof.models.TASKS and memprof.choices.Task disagree")

#: the tasks whose inputs pair images with text
IMAGE_TEXT_TASKS = ("contrastive-image-text", "image-text-to-text")

DTYPES: dict[str, torch.dtype] = {d.value: getattr(torch, d.value) for d in DType}

_SPEECH_TYPES = {"whisper", "speech_to_text", "speech_encoder_decoder"}
_VISION_TYPES = {"vit", "deit", "beit", "swin", "convnext", "dinov2", "vit_mae", "resnet", "mobilevit"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

try:
    from huggingface_hub.errors import StrictDataclassError as _StrictConfigError
except ImportError:  # pragma: no cover - huggingface_hub before strict dataclasses

    class _StrictConfigError(Exception):  # type: ignore[no-redef]
        """Never raised: this huggingface_hub has no strict dataclasses."""


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


@dataclass
class ResolvedModel:
    """A MODEL spec, resolved: where its config and weights are, and its task."""

    spec: str
    name: str
    source: str  # bundled | directory | config | hub | factory
    config: Any = None  # transformers PretrainedConfig, None for factories
    task: str | None = None
    weights_dir: Path | None = None  # folder holding *.safetensors (or *.bin)
    weight_format: str | None = None  # safetensors | pickle | None
    factory: Callable[..., Any] | None = None
    trust_remote_code: bool = False
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None  # the folder the config came from (tokenizer files live there)

    @property
    def model_type(self) -> str:
        if self.config is not None:
            return str(getattr(self.config, "model_type", "custom"))
        return "custom"

    @property
    def has_weights(self) -> bool:
        return self.weight_format is not None

    def model_class(self) -> type | None:
        """The transformers class built for the task (None: a factory, or code shipped with the model)."""
        if self.config is None or self.task not in TASKS:
            return None
        import transformers

        mapping = getattr(getattr(transformers, TASKS[self.task]), "_model_mapping", None)
        try:
            return mapping[type(self.config)] if mapping is not None else None
        except (KeyError, ValueError):
            return None

    def default_attn(self) -> str | None:
        """The attention implementation ``from_pretrained`` picks when none is asked for.

        transformers (``get_correct_attn_implementation(None)``) takes sdpa when the
        model class supports it, else eager (Gemma 2, BLOOM, gpt-oss, Mamba...).
        None when memprof cannot tell without building (factories, remote code).
        """
        cls = self.model_class()
        if cls is None:
            return None
        return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"

    def resolve_attn(self, attn: str) -> str:
        """``attn`` with ``auto`` replaced by :meth:`default_attn` (kept where that is unknown)."""
        if attn != "auto":
            return attn
        return self.default_attn() or attn

    def attn_note(self, attn: str) -> str | None:
        """A profile note when ``attn`` is the model's own and not sdpa (the usual default)."""
        if attn == "sdpa" or attn != self.default_attn():
            return None
        cls = self.model_class()
        return f"attention: {attn}, the model's default ({getattr(cls, '__name__', '?')} has no sdpa implementation)"

    def position_limit(self) -> int | None:
        """The longest sequence the model's positions allow, or None when unbounded."""
        c = self.config
        if c is None:
            return None
        if self.task == "speech-seq2seq":
            return getattr(c, "max_target_positions", None)
        # image-text models: the language side's positions
        for cfg in (c, getattr(c, "text_config", None)):
            for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
                v = getattr(cfg, attr, None)
                if isinstance(v, int) and v > 0:
                    return v
        return None


# ---------------------------------------------------------------------- resolve
def resolve(
    spec: str,
    *,
    task: str | None = None,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve a MODEL spec.

    Args:
        spec: the MODEL argument.
        task: override the task picked from the config's ``architectures``.
        trust_remote_code: allow configs and models that ship their own code.

    Returns:
        The resolved model (config loaded, weights located, nothing built).

    Raises:
        InputError: the spec names nothing usable, or its config is invalid.
        EnvironmentProblem: a Hub id that is not cached while offline.
    """
    if task is not None and task not in TASKS:
        raise InputError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_directory(spec, path, task, trust_remote_code)
    if path.is_file():
        if path.suffix != ".json":
            raise InputError(
                f"{spec}: expected a model directory or a config.json, got a {path.suffix or 'plain'} file"
            )
        cfg = _load_config_file(path, trust_remote_code)
        name = path.parent.name if path.name == "config.json" else path.stem
        rm = ResolvedModel(spec, name, "config", cfg, trust_remote_code=trust_remote_code)
        rm.folder = path.parent.resolve()
        return _finish(rm, task)
    if _looks_like_factory(spec):
        return _from_factory(spec)
    bundled = bundled_configs_dir() / f"{spec}.json"
    if bundled.is_file():
        cfg = _load_config_file(bundled, False)
        return _finish(ResolvedModel(spec, spec, "bundled", cfg, folder=bundled.parent.resolve()), task)
    names = ", ".join(bundled_models()) or "none"
    if path.suffix == ".json" or spec.startswith(("./", "../", "/", "~")):
        # a path (a Hub id never ends in .json): say the file is missing, do not ask the Hub
        raise InputError(f"{spec}: no such file or directory (bundled configs: {names})")
    if _HUB_ID.match(spec):
        return _from_hub(spec, task, trust_remote_code)
    raise InputError(f"{spec}: no such file or directory, bundled config or Hub id (bundled: {names})")


def _looks_like_factory(spec: str) -> bool:
    if ":" not in spec:
        return False
    mod, _, attr = spec.partition(":")
    return bool(re.match(r"^[A-Za-z_][\w.]*$", mod)) and bool(re.match(r"^[A-Za-z_]\w*$", attr))


def _from_factory(spec: str) -> ResolvedModel:
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"{spec}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"{spec}: module {mod_name!r} has no callable {attr!r}")
    return ResolvedModel(spec, attr, "factory", None, task="custom", factory=fn)


def _load_config_file(path: Path, trust_remote_code: bool) -> Any:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with a model_type")
    return _config_from_dict(data, str(path))


def _config_from_dict(data: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = data.get("model_type")
    if not model_type:
        raise InputError(f"{where}: no model_type in the config")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise InputError(
            f"{where}: unknown model_type {model_type!r} (this transformers knows "
            f"{len(CONFIG_MAPPING_NAMES)} types, e.g. llama, gpt2, bert, t5, vit, whisper)"
        )
    kwargs = {k: v for k, v in data.items() if k != "model_type" and not k.startswith("_memprof")}
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: invalid {model_type} config ({e})") from None
    except _StrictConfigError as e:
        # transformers >= 5 validates configs as huggingface_hub strict dataclasses,
        # whose errors are no ValueError: "Class validation error for validator 'x':\n<why>"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__
        raise InputError(f"{where}: invalid {model_type} config ({why})") from None
    check_config(config, data, where)
    return config


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
    problems = _config_problems(config, data, getattr(config, "model_type", "?"))
    if problems:
        raise InputError(f"{where}: {problems[0]}")


_SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


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


_IMAGE_TOKENS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


def _from_directory(spec: str, path: Path, task: str | None, trust_remote_code: bool) -> ResolvedModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{spec}: directory has no config.json")
    data = _read_json(cfg_path)
    if data.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"{spec}: the config asks to run code shipped with the model (auto_map); pass --trust-remote-code if you trust it"
        )
    cfg = _config_from_dict(data, str(cfg_path))
    rm = ResolvedModel(spec, _folder_name(path), "directory", cfg, trust_remote_code=trust_remote_code)
    rm.folder = path.resolve()
    _locate_weights(rm, path)
    return _finish(rm, task)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a JSON object")
    return data


def _locate_weights(rm: ResolvedModel, path: Path) -> None:
    if list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        rm.weights_dir, rm.weight_format = path, "safetensors"
    elif list(path.glob("*.bin")) or (path / "pytorch_model.bin.index.json").is_file():
        rm.weights_dir, rm.weight_format = path, "pickle"


def _from_hub(spec: str, task: str | None, trust_remote_code: bool) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise EnvironmentProblem("huggingface_hub is not installed: pip install huggingface_hub") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        local = snapshot_download(spec, allow_patterns=["config.json"], local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        local = None
    if local is None:
        if offline:
            raise EnvironmentProblem(
                f"{spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1, so no download was attempted "
                "(download it on a connected machine, or pass a local directory)"
            )
        try:
            local = snapshot_download(spec, allow_patterns=["config.json"])
        except Exception as e:  # network, auth, missing repo: one line for the user
            raise EnvironmentProblem(
                f"{spec}: could not fetch config.json from the Hub ({type(e).__name__}: {e})"
            ) from None
    rm = _from_directory(spec, Path(local), task, trust_remote_code)
    rm.source = "hub"
    rm.name = spec
    return rm


def fetch_hub_weights(rm: ResolvedModel) -> None:
    """Locate (or, when online, download) a Hub model's safetensors weights."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    patterns = ["*.json", "*.safetensors"]
    try:
        local = snapshot_download(rm.spec, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:
        raise EnvironmentProblem(f"{rm.spec}: weights not available ({type(e).__name__})") from None
    _locate_weights(rm, Path(local))


def _finish(rm: ResolvedModel, task: str | None) -> ResolvedModel:
    rm.task = task or pick_task(rm.config)
    _fill_defaults(rm)
    auto_name = TASKS[rm.task]
    import transformers

    auto = getattr(transformers, auto_name)
    mapping = getattr(auto, "_model_mapping", None)
    if mapping is not None and type(rm.config) not in mapping:
        supported = [
            t
            for t, a in TASKS.items()
            if type(rm.config) in getattr(getattr(transformers, a), "_model_mapping", {})
        ]
        raise InputError(
            f"{rm.spec}: model type {rm.model_type!r} has no {rm.task} head "
            f"(tasks it supports here: {', '.join(supported) or 'none'})"
        )
    return rm


def _fill_defaults(rm: ResolvedModel) -> None:
    """Set what the config leaves out and the model reads anyway, as transformers would.

    transformers 5 keeps ``decoder_start_token_id`` in the generation config, so a
    T5 config.json without it builds a model whose training step (``labels`` shifted
    right) fails with an AttributeError. T5 starts decoding from the pad token, and
    ``generate`` falls back to it too.
    """
    c = rm.config
    if c is None or not getattr(c, "is_encoder_decoder", False):
        return
    if getattr(c, "decoder_start_token_id", None) is None and getattr(c, "pad_token_id", None) is not None:
        c.decoder_start_token_id = c.pad_token_id
        rm.notes.append(
            f"config: no decoder_start_token_id; the decoder starts from the pad token ({c.pad_token_id}), "
            "as transformers does"
        )


def pick_task(config: Any) -> str:
    """The task from the config's ``architectures`` (or its model type)."""
    from transformers.models.auto import modeling_auto

    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", "")
    image_text = model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    seq2seq = model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    contrastive = model_type in modeling_auto.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES
    for arch in archs:
        if "CausalLM" in arch or "LMHeadModel" in arch:
            return "causal-lm"
        if "MaskedLM" in arch or "ForPreTraining" in arch:
            return "masked-lm"
        if "SequenceClassification" in arch:
            return "seq-classification"
        if "ImageClassification" in arch:
            return "image-classification"
        if "ConditionalGeneration" in arch or "Seq2SeqLM" in arch:
            if model_type in _SPEECH_TYPES:
                return "speech-seq2seq"
            return "image-text-to-text" if image_text and not seq2seq else "seq2seq-lm"
        if "ImageTextToText" in arch:
            return "image-text-to-text"
        if arch.endswith("Model"):
            return "contrastive-image-text" if contrastive else "feature-extraction"
    if model_type in _SPEECH_TYPES:
        return "speech-seq2seq"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if contrastive:
        return "contrastive-image-text"
    if model_type in _VISION_TYPES:
        return "image-classification"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if image_text:
        return "image-text-to-text"
    return "feature-extraction"


# ------------------------------------------------------------------------ build
# folder names that say nothing about the model (a package's "model/", a run's "checkpoint/")
_GENERIC_FOLDERS = {"model", "models", "checkpoint", "final", "output", "weights", "hf", "snapshot"}


def _folder_name(path: Path) -> str:
    """The name a model folder is shown by: with its parent when its own name is generic."""
    p = path.resolve()
    if p.name.lower() in _GENERIC_FOLDERS and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_model(
    rm: ResolvedModel,
    *,
    dtype: str = "float32",
    attn: str = "auto",
    load_weights: bool = False,
    allow_pickle: bool = False,
    init_weights: bool = True,
    config_overrides: dict[str, Any] | None = None,
    experts: str = "auto",
) -> tuple[torch.nn.Module, InputBuilder]:
    """Build the model on the current device / tensor mode, and its input builder.

    Args:
        rm: the resolved model.
        dtype: parameter dtype name (``float32``, ``bfloat16``, ``float16``).
        attn: attention implementation for transformers models (``eager``, ``sdpa``, or
            ``auto``: the model's own, as ``from_pretrained`` picks it).
        load_weights: load the checkpoint's weights when it has some (real engines);
            otherwise the weights are randomly initialised from the config.
        allow_pickle: permit loading a pickle (``.bin``) checkpoint.
        init_weights: run the model's weight initialisation (the sim engine skips
            it: fake tensors have no values, and some initialisers read values).
        config_overrides: config attributes to change before building (on a copy).
        experts: mixture-of-experts models: transformers' experts implementation
            (``auto``: the library's own choice).

    Raises:
        InputError: the model cannot be built as asked.
    """
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    if rm.factory is not None:
        return _build_factory(rm, tdtype)
    import transformers

    auto = getattr(transformers, TASKS[rm.task or "feature-extraction"])
    attn = rm.resolve_attn(attn)
    if attn == "sdpa" and rm.default_attn() == "eager":
        cls = rm.model_class()
        raise InputError(
            f"{rm.spec}: --attn sdpa is not supported by this model ({getattr(cls, '__name__', '?')} has no sdpa "
            "implementation in transformers); use --attn eager, or auto (the model's own)"
        )
    # still "auto" (remote code): transformers picks, as from_pretrained does
    kw: dict[str, Any] = {_dtype_kwarg(): tdtype, "attn_implementation": None if attn == "auto" else attn}
    if experts != "auto":
        kw["experts_implementation"] = experts
    # A copy: from_config keeps the object it is given as model.config, and model
    # surgery (pruning) rewrites model.config; the resolved model builds again.
    config = copy.deepcopy(rm.config)
    if config_overrides:
        for k, v in config_overrides.items():
            setattr(config, k, v)
        kw["config"] = config
    if rm.trust_remote_code:
        kw["trust_remote_code"] = True
    try:
        if load_weights and rm.has_weights:
            if rm.weight_format == "pickle" and not allow_pickle:
                raise InputError(
                    f"{rm.spec}: only a pickle checkpoint (.bin) was found; pass --allow-pickle to load it "
                    "(unpickling can run arbitrary code), or convert it to safetensors"
                )
            model = auto.from_pretrained(
                str(rm.weights_dir), use_safetensors=rm.weight_format == "safetensors", **kw
            )
            rm.notes.append("weights: loaded from the checkpoint")
        else:
            with contextlib.nullcontext() if init_weights else _no_init_weights():
                model = auto.from_config(kw.pop("config", config), **kw)
            if not init_weights and hasattr(model, "tie_weights"):
                # transformers 5's no_init_weights replaces init_weights, where the weights
                # are also tied: without this a tied LM head (GPT-2, Qwen2.5, Llama-3.2, T5,
                # BERT) would be a second vocab x hidden matrix, with its gradient and state
                model.tie_weights()
            rm.notes.append(
                "weights: random initialisation from the config (memory does not depend on values)"
            )
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "attn_implementation" in msg or "scaled_dot_product_attention" in msg or "sdpa" in msg.lower():
            raise InputError(f"{rm.spec}: --attn {attn} is not supported by this model ({msg})") from None
        raise InputError(f"{rm.spec}: cannot build the model ({msg})") from None
    model.train(False)
    return model, InputBuilder(rm, dtype=tdtype)


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def _build_factory(rm: ResolvedModel, dtype: torch.dtype) -> tuple[torch.nn.Module, InputBuilder]:
    assert rm.factory is not None
    out = rm.factory()
    builder_fn = None
    if isinstance(out, tuple) and len(out) == 2:
        model, builder_fn = out
    else:
        model = out
        builder_fn = getattr(model, "example_inputs", None)
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"{rm.spec}: the factory must return an nn.Module (or (module, input_builder)), got {type(model).__name__}"
        )
    if builder_fn is None or not callable(builder_fn):
        raise InputError(
            f"{rm.spec}: no input builder: return (module, builder) where builder(batch_size, seq_len) gives the inputs, "
            "or give the module an example_inputs(batch_size, seq_len) method"
        )
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, InputBuilder(rm, custom=builder_fn, dtype=dtype)


class InputBuilder:
    """Synthetic inputs for a model's task, and the loss of a training step."""

    def __init__(
        self, rm: ResolvedModel, custom: Callable[..., Any] | None = None, dtype: torch.dtype = torch.float32
    ):
        self.rm = rm
        self.custom = custom
        self.dtype = dtype

    def validate(self, batch_size: int, seq_len: int) -> None:
        """Raise InputError on shapes the model cannot take."""
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if seq_len < 1:
            raise InputError(f"--seq-len must be at least 1, got {seq_len}")
        limit = self.rm.position_limit()
        if limit is not None and seq_len > limit and self.rm.task != "image-classification":
            raise InputError(
                f"--seq-len {seq_len} is past {self.rm.name}'s position limit of {limit}; use --seq-len {limit} or less"
            )
        if self.custom is None and self.rm.task == "image-text-to-text":
            self.image_plan(seq_len)

    def image_plan(self, seq_len: int) -> ImagePlan:
        """The image each sequence of an image-text-to-text step holds, and its tokens.

        Raises:
            InputError: a model whose image inputs memprof does not know, or a
                sequence too short for one image's tokens.
        """
        return image_plan(self.rm, seq_len)

    def build(
        self, batch_size: int, seq_len: int, device: torch.device | str, *, with_labels: bool = True
    ) -> dict[str, Any]:
        """The keyword inputs of one step, on ``device`` (call inside the engine's tensor mode)."""
        if self.custom is not None:
            raw = self.custom(batch_size, seq_len)
            return _to_device(raw, device, self.dtype)
        c = self.rm.config
        task = self.rm.task
        g = torch.Generator().manual_seed(0)
        B, L = batch_size, seq_len
        vocab = int(getattr(c, "vocab_size", 1000) or 1000)

        def ids(b: int, n: int) -> torch.Tensor:
            return torch.randint(0, vocab, (b, n), generator=g).to(device)

        inputs: dict[str, Any]
        if task in IMAGE_TEXT_TASKS or (task == "feature-extraction" and _image_text_pair(c)):
            return self._image_text(B, L, device, with_labels, g)
        if task == "image-classification":
            size = getattr(c, "image_size", 224)
            size = size if isinstance(size, int) else size[0]
            ch = getattr(c, "num_channels", 3)
            inputs = {
                "pixel_values": torch.randn(B, ch, size, size, generator=g).to(
                    device=device, dtype=self.dtype
                )
            }
            if with_labels:
                inputs["labels"] = torch.randint(
                    0, max(1, getattr(c, "num_labels", 2)), (B,), generator=g
                ).to(device)
            return inputs
        if task == "speech-seq2seq":
            frames = 2 * int(getattr(c, "max_source_positions", 1500))
            mels = int(getattr(c, "num_mel_bins", 80))
            inputs = {
                "input_features": torch.randn(B, mels, frames, generator=g).to(
                    device=device, dtype=self.dtype
                )
            }
            if with_labels:
                inputs["labels"] = ids(B, L)
            else:
                inputs["decoder_input_ids"] = ids(B, L)
            return inputs
        # No attention_mask: synthetic batches have no padding, and transformers
        # drops an all-ones mask itself on real tensors (it cannot tell under
        # fake tensors, and a mask would change CUDA's SDPA kernel choice).
        inputs = {"input_ids": ids(B, L)}
        if task in ("causal-lm", "masked-lm", "seq2seq-lm") and with_labels:
            inputs["labels"] = inputs["input_ids"].clone()
        elif task == "seq-classification" and with_labels:
            inputs["labels"] = torch.randint(0, max(1, getattr(c, "num_labels", 2)), (B,), generator=g).to(
                device
            )
        elif task == "seq2seq-lm" and not with_labels:
            inputs["decoder_input_ids"] = ids(B, L)
        return inputs

    def _image_text(
        self, B: int, L: int, device: torch.device | str, with_labels: bool, g: torch.Generator
    ) -> dict[str, Any]:
        c = self.rm.config
        text = getattr(c, "text_config", None) or c
        vocab = int(getattr(text, "vocab_size", 1000) or 1000)
        if self.rm.task != "image-text-to-text":
            # a pair of towers (CLIP): a batch of images and one caption each
            vc = c.vision_config
            size = _side(getattr(vc, "image_size", 224))
            ch = int(getattr(vc, "num_channels", 3))
            inputs: dict[str, Any] = {
                "input_ids": torch.randint(0, vocab, (B, L), generator=g).to(device),
                "pixel_values": torch.randn(B, ch, size, size, generator=g).to(
                    device=device, dtype=self.dtype
                ),
            }
            if with_labels and self.rm.task == "contrastive-image-text":
                inputs["return_loss"] = True  # the contrastive loss over the batch's pairs
            return inputs
        plan = self.image_plan(L)
        if plan.note not in self.rm.notes:
            self.rm.notes.append(plan.note)
        # text tokens never collide with the special ones: the model counts its image tokens
        specials = sorted(plan.special_ids)
        ids = torch.randint(0, vocab - len(specials), (B, L), generator=g)
        for sid in specials:
            ids = ids + (ids >= sid).long()
        ids = ids.to(device)
        start = 0
        if plan.start_id is not None:
            ids[:, 0] = plan.start_id
            start = 1
        ids[:, start : start + plan.tokens] = plan.image_id
        if plan.end_id is not None:
            ids[:, start + plan.tokens] = plan.end_id
        vision_end = start + plan.tokens + (plan.end_id is not None)
        inputs = {"input_ids": ids}
        if plan.kind == "grid":
            t, h, w = plan.grid
            inputs["pixel_values"] = torch.randn(B * t * h * w, plan.patch_values, generator=g).to(
                device=device, dtype=self.dtype
            )
            # A Python list: under fake tensors its values stay known (the vision tower reads them)
            inputs["image_grid_thw"] = torch.tensor([[t, h, w]] * B, device=device)
            inputs["position_ids"] = _mrope_positions(plan, B, L, device)
        else:
            inputs["pixel_values"] = torch.randn(B, plan.channels, plan.side, plan.side, generator=g).to(
                device=device, dtype=self.dtype
            )
        if with_labels:
            labels = ids.clone()
            labels[:, :vision_end] = -100  # as processors do: no loss on the image's tokens
            inputs["labels"] = labels
        return inputs

    @staticmethod
    def loss(output: Any) -> torch.Tensor:
        """The scalar a training step differentiates.

        The model's own loss when it returns one (labels were passed); else the
        output itself when scalar; else the mean square of the first output, a
        stand-in loss for headless models that keeps every activation in the graph.
        """
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
        if isinstance(output, torch.Tensor):
            return output if output.dim() == 0 else output.float().pow(2).mean()
        if isinstance(output, Mapping):
            first = next(iter(output.values()))
        elif isinstance(output, (tuple, list)):
            first = output[0]
        else:
            first = output
        if not isinstance(first, torch.Tensor):
            raise InputError("the model output has no tensor to derive a training loss from")
        return first.float().pow(2).mean()


# --------------------------------------------------------------- image-text inputs
#: image-text-to-text models whose vision tower takes flattened patches and a (t, h, w) grid
_GRID_VL_TYPES = {"qwen2_vl", "qwen2_5_vl"}
#: models whose every image becomes a fixed number of tokens, with how to count them
_FIXED_VL_TYPES = {"llava", "gemma3", "paligemma"}
#: the image side (pixels) of a grid model's synthetic image, as a processor would resize to
_GRID_IMAGE_SIDE = 448


@dataclass
class ImagePlan:
    """One synthetic image per sequence: its pixels and the tokens it takes in ``input_ids``."""

    kind: str  # "grid" (Qwen2-VL) | "fixed" (LLaVA)
    tokens: int  # image tokens in each sequence
    image_id: int
    start_id: int | None = None  # a token before the image's (Qwen2-VL's vision_start)
    end_id: int | None = None
    side: int = 0  # fixed: the image's side in pixels
    channels: int = 3
    grid: tuple[int, int, int] = (1, 1, 1)  # grid: (t, h, w) patches
    patch_values: int = 0  # grid: the values of one flattened patch
    merge: int = 1  # grid: patches merged per side into one token
    note: str = ""

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.image_id, self.start_id, self.end_id) if i is not None}


def _side(size: Any) -> int:
    return int(size if isinstance(size, int) else size[0])


def _image_text_pair(config: Any) -> bool:
    return (
        getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    )


def image_plan(rm: ResolvedModel, seq_len: int) -> ImagePlan:
    """The synthetic image of an image-text-to-text model (see :meth:`InputBuilder.image_plan`)."""
    c = rm.config
    mt = rm.model_type
    vc = getattr(c, "vision_config", None)
    image_id = getattr(c, "image_token_id", None)
    if vc is None or not isinstance(image_id, int) or mt not in _GRID_VL_TYPES | _FIXED_VL_TYPES:
        raise InputError(
            f"{rm.spec}: memprof does not build image inputs for {mt!r} yet "
            "(it knows LLaVA, Gemma 3, PaliGemma, Qwen2-VL and Qwen2.5-VL); "
            "profile it with a module:factory spec that builds its inputs"
        )
    if mt in _GRID_VL_TYPES:
        patch, merge = int(vc.patch_size), int(vc.spatial_merge_size)
        tp = int(getattr(vc, "temporal_patch_size", 1))
        ch = int(getattr(vc, "in_channels", getattr(vc, "num_channels", 3)))
        room = seq_len - 2  # vision_start, the image's tokens, vision_end
        side = max(merge, _GRID_IMAGE_SIDE // patch // merge * merge)  # patches per side
        if (side // merge) ** 2 > room:
            side = int(room**0.5) * merge
        if side < merge:
            raise InputError(
                f"--seq-len {seq_len} leaves no room for an image ({mt} needs 2 tokens around at least one image token)"
            )
        tokens = (side // merge) ** 2
        return ImagePlan(
            "grid",
            tokens,
            image_id,
            start_id=getattr(c, "vision_start_token_id", None),
            end_id=getattr(c, "vision_end_token_id", None),
            grid=(1, side, side),
            patch_values=ch * tp * patch * patch,
            merge=merge,
            note=f"inputs: one {side * patch}x{side * patch} image per sequence ({side}x{side} patches "
            f"of {patch} px, {tokens} image tokens) and {seq_len - tokens - 2} text tokens",
        )
    side = _side(vc.image_size)
    patch = _side(getattr(vc, "patch_size", 1))
    tokens = getattr(c, "mm_tokens_per_image", None) or getattr(vc, "num_image_tokens", None)
    if not isinstance(tokens, int):
        tokens = (side // patch) ** 2
        if getattr(c, "vision_feature_select_strategy", "default") == "full":
            tokens += 1  # the CLS token's feature too
    if tokens >= seq_len:
        raise InputError(
            f"--seq-len {seq_len} cannot hold {rm.name}'s {tokens} image tokens and a text token; "
            f"use --seq-len {tokens + 1} or more"
        )
    return ImagePlan(
        "fixed",
        tokens,
        image_id,
        side=side,
        channels=int(getattr(vc, "num_channels", 3)),
        note=f"inputs: one {side}x{side} image per sequence ({tokens} image tokens) "
        f"and {seq_len - tokens} text tokens",
    )


def _mrope_positions(plan: ImagePlan, B: int, L: int, device: torch.device | str) -> torch.Tensor:
    """Qwen2-VL's 3-D (time, height, width) positions of ``[start][image][end][text]``.

    What ``get_rope_index`` computes from ``input_ids``, built from the layout so
    that it runs under fake tensors (whose values are unknown) too.
    """
    _, h, w = plan.grid
    hh, ww = h // plan.merge, w // plan.merge
    first = torch.zeros(3, 1, dtype=torch.long)  # vision_start
    image = torch.stack(
        [
            torch.zeros(plan.tokens, dtype=torch.long),
            torch.arange(hh).repeat_interleave(ww),
            torch.arange(ww).repeat(hh),
        ]
    )
    text = torch.arange(L - 1 - plan.tokens).expand(3, -1) + (1 + max(hh, ww))
    pos = torch.cat([first, image + 1, text], dim=1)
    return pos.unsqueeze(1).expand(3, B, L).to(device)


def _to_device(raw: Any, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    def move(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() and dtype != torch.float32 else t
        return t

    if isinstance(raw, Mapping):
        return {k: move(v) for k, v in raw.items()}
    if isinstance(raw, (tuple, list)):
        return {"__args__": [move(v) for v in raw]}
    return {"__args__": [move(raw)]}


def call_model(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """Call the model with inputs from :class:`InputBuilder` (keywords or positional)."""
    if "__args__" in inputs:
        return model(*inputs["__args__"])
    return model(**inputs)
