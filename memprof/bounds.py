"""Bounds: what one run may cost, checked before any work starts.

No input may make a command run longer than its work needs, or end deep inside the
allocator model: sizes that no real model or GPU step has are refused here, in one
line that says how to proceed. The values and their reasons are listed in the README
("Bounds"); change them there too.

* :data:`MAX_PARAMETERS`: parameters of a model, counted cheaply from its config
  (:func:`min_parameters`, a lower bound from the config's arithmetic);
* :data:`MAX_LAYERS`: repeated blocks (each one is built and traced);
* :data:`MAX_POSITIONS`: a model's positions;
* :data:`MAX_BATCH_TOKENS` and :data:`MAX_BATCH_SIZE`: what one step carries;
* :data:`MAX_DECODE_TOKENS`: decode steps (each one is traced);
* :data:`MAX_WORLD_SIZE`: ranks of a sharded step;
* :data:`MAX_SAMPLES`: draws of a ``--lengths`` distribution;
* :data:`MAX_YAML_BYTES`, :data:`MAX_YAML_DEPTH` and no anchors or aliases: recipe and
  workloads files (:func:`load_yaml`);
* :data:`MAX_LABELS`: a classifier's labels;
* :data:`MAX_MESSAGE_CHARS`: an error line (:func:`cut`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from memprof.errors import InputError

#: parameters of one model: 2x the largest open models (about 1T); at 2T a float32 AdamW
#: step (16 bytes a parameter) already fills half the allocator model's 64 TiB address space
MAX_PARAMETERS = 2 * 10**12
#: repeated blocks of one model (or of one of its towers): 4x the deepest public LLM
#: (126, Llama 3.1 405B); each block is built and traced, so the time grows with them
MAX_LAYERS = 512
#: a model's positions (max_position_embeddings): 25x the longest public context (10M,
#: Llama 4 Scout); a learned position table of more is a parameter count past any GPU
MAX_POSITIONS = 2**28
#: sequences (or images) per step and rank
MAX_BATCH_SIZE = 2**20
#: batch x sequence tokens per step and rank (16M: 128 sequences of 128K tokens)
MAX_BATCH_TOKENS = 2**24
#: decode steps after the prefill: each one is a traced forward
MAX_DECODE_TOKENS = 2048
#: ranks of a sharded (or data-parallel) step: the sim projects one rank over a fake
#: process group, and its collectives' bookkeeping grows with the ranks
MAX_WORLD_SIZE = 4096
#: draws of a --lengths distribution (a million take about a second)
MAX_SAMPLES = 10**6
#: a recipe or workloads file (the shipped ones are under 4 KiB)
MAX_YAML_BYTES = 1024 * 1024
#: how deeply a recipe or workloads file's lists and mappings nest (the shipped ones: 4)
MAX_YAML_DEPTH = 32
#: a classifier's labels (num_labels): 40x ImageNet-21k's; transformers names each one in
#: id2label as it builds the config, so ten million take 24 s and 2.6 GB before any step
MAX_LABELS = 10**6
#: an error line on stderr (a problem of a list: each)
MAX_MESSAGE_CHARS = 500

# the config attributes of a model's width, depth, vocabulary and experts, by their names across families
_WIDTH = ("hidden_size", "d_model", "n_embd", "dim")
_FFN = ("intermediate_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "n_layers")
_VOCAB = ("vocab_size",)
_EXPERTS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
#: size fields that must be positive integers where a config has them
POSITIVE_INTS = (
    *_WIDTH,
    *_FFN,
    *_LAYERS,
    *_VOCAB,
    "num_attention_heads",
    "n_head",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_positions",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    # vision and audio inputs' shapes
    "image_size",
    "patch_size",
    "num_channels",
    "num_mel_bins",
    # T5's relative positions are bucketed: none divides by zero
    "relative_attention_num_buckets",
)


def cut(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters (cut ones end with ``...`` and the full length)."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) <= limit:
        return line
    suffix = f"... ({len(line)} characters in all)"
    return line[: max(0, limit - len(suffix))] + suffix


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _first(config: Any, names: tuple[str, ...]) -> int:
    for n in names:
        v = _int(getattr(config, n, None))
        if v is not None and v > 0:
            return v
    return 0


def layers(config: Any) -> int:
    """The config's repeated blocks: its layers (an encoder-decoder's both stacks)."""
    enc, dec = _int(getattr(config, "encoder_layers", None)), _int(getattr(config, "decoder_layers", None))
    if enc and dec and enc > 0 and dec > 0:
        return enc + dec
    return _first(config, _LAYERS)


def min_parameters(config: Any) -> int:
    """A lower bound of a config's parameters, from its arithmetic (nothing is built).

    The embedding (vocabulary x width) and, per layer, two width x width projections
    (attention's query and output) and two width x feed-forward ones (times the
    experts, for a mixture of experts). Real models have more (keys, values, norms,
    a head); a bound below is what a cap needs.
    """
    width = _first(config, _WIDTH)
    ffn = _first(config, _FFN) or 0
    experts = _first(config, _EXPERTS) or 1
    if experts > 1:  # the experts' own width where the config has one (Qwen3-MoE, DeepSeek)
        ffn = _first(config, ("moe_intermediate_size",)) or ffn
    return _first(config, _VOCAB) * width + layers(config) * (2 * width * width + 2 * width * ffn * experts)


def config_bound_problems(config: Any, name: str) -> list[str]:
    """Size fields that are not positive integers, and sizes past the bounds (one config, not its towers)."""
    problems = []
    for attr in POSITIVE_INTS:
        if attr not in _own_keys(config):
            continue
        problem = size_problem(name, attr, getattr(config, attr, None))
        if problem:
            problems.append(problem)
    if problems:
        return problems
    n_layers = layers(config)
    if n_layers > MAX_LAYERS:
        problems.append(
            f"{name} has {n_layers} layers, more than memprof traces ({MAX_LAYERS}; the deepest public "
            "models have about 130): each layer is built and traced; lower num_hidden_layers, and scale "
            "the per-layer memory up yourself"
        )
    for attr in ("max_position_embeddings", "n_positions"):
        positions = _int(getattr(config, attr, None))
        if positions is not None and positions > MAX_POSITIONS:
            problems.append(
                f"{name} {attr} {positions} is more than memprof models ({MAX_POSITIONS}: 25x the longest "
                "public context); set it to the context the model is trained for"
            )
            break
    n = min_parameters(config)
    if n > MAX_PARAMETERS:
        problems.append(
            f"{name} has at least {approx(n)} parameters, more than memprof projects ({MAX_PARAMETERS:.0e}: "
            "twice the largest public models; past it a step outgrows any GPU and the allocator model's "
            "address space); check hidden_size, intermediate_size, vocab_size and the layers"
        )
    return problems


def approx(n: int) -> str:
    """A whole number in three significant figures (``1.27e+09``), however many digits it has."""
    if n.bit_length() < 1000:  # a float holds it
        return f"{n:.3g}"
    # past a float, and maybe past the digits Python converts to text (4300)
    return f"about 2^{n.bit_length() - 1}"


def size_problem(name: str, attr: str, value: Any) -> str | None:
    """Why a size field's value is not a positive whole number (or a list of them, per stage: Swin's heads), or None."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if _int(v) is None:
            return f"{name} {attr} must be a whole number, got {str(value)[:40]!r}"
        if v < 1:
            return f"{name} {attr} must be at least 1, got {v if v.bit_length() < 1000 else approx(v)}"
    return None


def _own_keys(config: Any) -> set[str]:
    """The attributes a config has (its own and its aliases'), without the sub-configs'."""
    keys = set(vars(config)) if hasattr(config, "__dict__") else set()
    aliases = getattr(config, "attribute_map", None) or {}
    return keys | {k for k, v in aliases.items() if v in keys}


def workload_bound_problems(batch_size: int, seq_len: int, decode_tokens: int, world_size: int) -> list[str]:
    """Shapes past the bounds (the workload's own checks come first: these assume positive values)."""
    problems = []
    if batch_size > MAX_BATCH_SIZE:
        problems.append(
            f"--batch-size {batch_size} is more than memprof measures ({MAX_BATCH_SIZE}, per rank): "
            "measure a smaller batch; memory grows with it about linearly"
        )
    elif batch_size >= 1 and seq_len >= 1 and batch_size * seq_len > MAX_BATCH_TOKENS:
        problems.append(
            f"--batch-size x --seq-len is {batch_size * seq_len} tokens, more than memprof measures in one "
            f"step ({MAX_BATCH_TOKENS}, per rank): lower either; activations grow with the tokens about linearly"
        )
    if decode_tokens > MAX_DECODE_TOKENS:
        problems.append(
            f"--decode-tokens {decode_tokens} is more than memprof traces ({MAX_DECODE_TOKENS}: each decode "
            "step is a traced forward); for the KV cache of a long generation, measure a prefill of "
            "--seq-len PROMPT+NEW tokens (the cache holds as many)"
        )
    if world_size > MAX_WORLD_SIZE:
        problems.append(
            f"--world-size {world_size} is more than memprof projects ({MAX_WORLD_SIZE}): the sim projects one "
            "rank over a fake process group; with FSDP a rank holds 1/N of the parameters, gradients and "
            f"optimizer state, so project {MAX_WORLD_SIZE} or fewer ranks and scale that share down"
        )
    return problems


def load_yaml(text: str, source: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """A recipe's or a workloads file's YAML, within the bounds: no anchors or aliases, at most 1 MiB and 32 levels deep.

    Anchors and aliases let a few hundred bytes expand to billions of nodes (the
    "billion laughs"); memprof's files never need them.

    Raises:
        InputError: past the size or depth bound, or an anchor or alias (the line named).
        yaml.YAMLError: not valid YAML (the caller reports it as its file's problem).
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise InputError(
            f"{source}: {size} bytes, more than memprof reads in a recipe or workloads file ({MAX_YAML_BYTES})"
        )
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark is not None else 0
                raise InputError(
                    f"{source}: line {line}: lists and mappings nested more than {MAX_YAML_DEPTH} deep; "
                    "memprof's files nest a few levels"
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            line = event.start_mark.line + 1 if event.start_mark is not None else 0
            raise InputError(
                f"{source}: line {line}: YAML anchors and aliases (&name, *name) are not accepted; "
                "write each entry out"
            )
    return yaml.load(text, Loader=loader)


def is_key(value: Any) -> bool:
    """True for a mapping key memprof's files can have: a plain, hashable value."""
    return not isinstance(value, (list, dict, Mapping, set))


__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_BATCH_TOKENS",
    "MAX_DECODE_TOKENS",
    "MAX_LABELS",
    "MAX_LAYERS",
    "MAX_MESSAGE_CHARS",
    "MAX_PARAMETERS",
    "MAX_POSITIONS",
    "MAX_SAMPLES",
    "MAX_WORLD_SIZE",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "approx",
    "config_bound_problems",
    "cut",
    "load_yaml",
    "min_parameters",
    "size_problem",
    "workload_bound_problems",
]
