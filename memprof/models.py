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

from memprof.errors import EnvironmentProblem, InputError

#: tasks memprof builds inputs for, with the transformers auto class of each
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-classification": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "image-classification": "AutoModelForImageClassification",
    "feature-extraction": "AutoModel",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_SPEECH_TYPES = {"whisper", "speech_to_text", "speech_encoder_decoder"}
_VISION_TYPES = {"vit", "deit", "beit", "swin", "convnext", "dinov2", "vit_mae", "resnet", "mobilevit"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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

    def position_limit(self) -> int | None:
        """The longest sequence the model's positions allow, or None when unbounded."""
        c = self.config
        if c is None:
            return None
        if self.task == "speech-seq2seq":
            return getattr(c, "max_target_positions", None)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(c, attr, None)
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
        return AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: invalid {model_type} config ({e})") from None


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


def pick_task(config: Any) -> str:
    """The task from the config's ``architectures`` (or its model type)."""
    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", "")
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
            return "speech-seq2seq" if model_type in _SPEECH_TYPES else "seq2seq-lm"
        if arch.endswith("Model"):
            return "feature-extraction"
    if model_type in _SPEECH_TYPES:
        return "speech-seq2seq"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if model_type in _VISION_TYPES:
        return "image-classification"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
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
    attn: str = "sdpa",
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
        attn: attention implementation for transformers models (``eager``, ``sdpa``).
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
    kw: dict[str, Any] = {_dtype_kwarg(): tdtype, "attn_implementation": attn}
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
