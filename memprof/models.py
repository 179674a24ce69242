"""Resolve a MODEL spec into a buildable model, and build it with its example-input builder.

A MODEL spec is one of:

* a Hugging Face model directory (``config.json``, with or without weights),
* a path to a single ``config.json``,
* the name of a bundled config (``memprof analyze gpt2``; see ``configs/models/``),
* a Hub id (``org/name``), resolved through the local Hugging Face cache,
* ``package.module:factory``, a callable returning an ``nn.Module`` and an
  input builder, for models that are not from transformers.

Nothing here runs a step or measures memory: it builds models, on whichever
device or tensor mode the engine has set up around the call. The synthetic
inputs of each task are in :mod:`memprof.inputs`; reading and checking a
config.json is in :mod:`memprof.model_config`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memprof.choices import DType, Task, values
from memprof.errors import EnvironmentProblem, InputError
from memprof.inputs import InputBuilder, users_failure

# what a MODEL spec names is found without torch, in model_config (bundled configs still named from here)
from memprof.model_config import bundled_configs_dir as bundled_configs_dir
from memprof.model_config import bundled_models as bundled_models
from memprof.model_config import (
    config_from_dict,
    directory_config,
    hub_config_dir,
    hub_offline,
    load_config_file,
    spec_kind,
)

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

DTYPES: dict[str, torch.dtype] = {d.value: getattr(torch, d.value) for d in DType}

_SPEECH_TYPES = {"whisper", "speech_to_text", "speech_encoder_decoder"}
_VISION_TYPES = {"vit", "deit", "beit", "swin", "convnext", "dinov2", "vit_mae", "resnet", "mobilevit"}


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
    kind = spec_kind(spec)  # a spec that names nothing is refused here
    path = Path(spec).expanduser()
    if kind == "directory":
        return _from_directory(spec, path, task, trust_remote_code)
    if kind == "config":
        cfg = load_config_file(path, trust_remote_code)
        name = path.parent.name if path.name == "config.json" else path.stem
        rm = ResolvedModel(spec, name, "config", cfg, trust_remote_code=trust_remote_code)
        rm.folder = path.parent.resolve()
        return _finish(rm, task)
    if kind == "factory":
        return _from_factory(spec)
    if kind == "bundled":
        bundled = bundled_configs_dir() / f"{spec}.json"
        cfg = load_config_file(bundled, False)
        return _finish(ResolvedModel(spec, spec, "bundled", cfg, folder=bundled.parent.resolve()), task)
    return _from_hub(spec, task, trust_remote_code)


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


def _from_directory(spec: str, path: Path, task: str | None, trust_remote_code: bool) -> ResolvedModel:
    cfg_path, data = directory_config(spec, path, trust_remote_code)
    cfg = config_from_dict(data, str(cfg_path))
    rm = ResolvedModel(spec, _folder_name(path), "directory", cfg, trust_remote_code=trust_remote_code)
    rm.folder = path.resolve()
    _locate_weights(rm, path)
    return _finish(rm, task)


def _locate_weights(rm: ResolvedModel, path: Path) -> None:
    if list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        rm.weights_dir, rm.weight_format = path, "safetensors"
    elif list(path.glob("*.bin")) or (path / "pytorch_model.bin.index.json").is_file():
        rm.weights_dir, rm.weight_format = path, "pickle"


def _from_hub(spec: str, task: str | None, trust_remote_code: bool) -> ResolvedModel:
    rm = _from_directory(spec, hub_config_dir(spec), task, trust_remote_code)
    rm.source = "hub"
    rm.name = spec
    return rm


def fetch_hub_weights(rm: ResolvedModel) -> None:
    """Locate (or, when online, download) a Hub model's safetensors weights."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        local = snapshot_download(rm.spec, allow_patterns=patterns, local_files_only=hub_offline())
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
    """Unique parameters (tied weights counted once; a packed 4-bit weight by the values it holds)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += logical_numel(p)
    return total


def logical_numel(p: torch.Tensor) -> int:
    """The values a parameter holds: a bitsandbytes 4-bit weight packs two in each byte of its
    storage; its quantization state keeps the original shape."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


def _device_bytes(p: torch.Tensor) -> int:
    """A parameter's bytes on this device: a sharded (DTensor) one's local shard, a packed 4-bit one's quantization state."""
    local = getattr(p, "_local_tensor", p)
    n = local.numel() * local.element_size()
    state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: absmax, code (nested for double quant)
    while state is not None:
        n += sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
        state = getattr(state, "state2", None)
    return n


def parameter_split(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and frozen parameters (counts and device bytes, tied weights once) and the adapters' count.

    The ``parameters`` field of a training profile (:mod:`memprof.profile`). Adapters
    are PEFT's LoRA parameters (``lora_A``, ``lora_B``, DoRA's ``lora_magnitude_vector``);
    ``adapters`` is None when the model has none.
    """
    seen: set[int] = set()
    out: dict[str, Any] = {"trainable": 0, "frozen": 0, "trainable_bytes": 0, "frozen_bytes": 0}
    adapters = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        side = "trainable" if p.requires_grad else "frozen"
        out[side] += logical_numel(p)
        out[side + "_bytes"] += _device_bytes(p)
        if ".lora_" in name or name.startswith("lora_"):
            adapters += p.numel()
    out["adapters"] = adapters or None
    return out


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
            try:
                with warnings.catch_warnings():
                    # a foreign pickle: torch warns of its protocol, then refuses it (one line below)
                    warnings.filterwarnings("ignore", message="Detected pickle protocol")
                    model = auto.from_pretrained(
                        str(rm.weights_dir), use_safetensors=rm.weight_format == "safetensors", **kw
                    )
            except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
                why = _unloadable_pickle(rm, e)
                if why is None:
                    raise
                raise InputError(why) from None
            rm.notes.append("weights: loaded from the checkpoint")
        else:
            with contextlib.nullcontext() if init_weights else _no_init_weights():
                model = auto.from_config(kw.pop("config", config), **kw)
            if not init_weights:
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


def _unloadable_pickle(rm: ResolvedModel, e: BaseException) -> str | None:
    """The one-line message for a pickle checkpoint torch.load refused (None: ``e`` is something else).

    A garbage file, an empty or cut one, or one holding objects other than
    tensors (``weights_only`` unpickling refuses them, and a malicious file
    with them): the user's input, not a bug.
    """
    if rm.weight_format != "pickle" or rm.weights_dir is None:
        return None
    text = str(e)
    if isinstance(e, RuntimeError) and not any(
        s in text for s in ("PytorchStreamReader", "zip archive", "magic number")
    ):
        return None  # a size mismatch, a bug: not the file's format
    if isinstance(e, OSError) and "checkpoint" not in text.lower():
        return None
    # torch's weights-only message wraps the reason in advice (load it with
    # weights_only=False, file an issue, read the docs): wrong for a corrupt or hostile file
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [
        ln.strip().removeprefix("WeightsUnpickler error:").strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.strip().startswith(advice)
    ]
    lines = [ln for ln in lines if ln]
    # the first sentence: torch's zip reader goes on about miniz and file issues
    detail = lines[0].split(". ")[0][:200] if lines else "the file is empty or cut short"
    bins = sorted(Path(rm.weights_dir).glob("*.bin"))
    where = str(bins[0]) if len(bins) == 1 else f"{rm.weights_dir} (its .bin files)"
    return (
        f"{where}: cannot load this pickle checkpoint ({type(e).__name__}: {detail}); "
        "it is corrupt, cut short, or holds objects other than tensors"
    )


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def _build_factory(rm: ResolvedModel, dtype: torch.dtype) -> tuple[torch.nn.Module, InputBuilder]:
    if rm.factory is None:  # pragma: no cover - only factory models come here
        raise InputError(f"{rm.spec}: not a module:factory model")
    try:
        out = rm.factory()
    except Exception as e:  # the user's code: its failure is the input's, reported in one line
        if not users_failure(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"{rm.spec}: the factory raised {type(e).__name__}" + (f": {first}" if first else "")
        ) from None
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
