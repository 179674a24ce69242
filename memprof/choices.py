"""Every closed set of choices, in one place: the command line's options and the data's checks read them here.

Each is a ``str`` Enum (Typer shows its values as the option's choices); the plain
tuples of values that the data layer validates against are derived from them.
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    train = "train"
    infer = "infer"
    distill = "distill"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Optim(str, Enum):
    """The step's optimizer (``--optimizer``); the ``optimizer`` optimization adds :data:`MORE_OPTIMIZERS`."""

    adamw = "adamw"
    sgd = "sgd"
    none = "none"


#: optimizers only the ``optimizer`` optimization selects (recipes), not ``--optimizer``
MORE_OPTIMIZERS = ("adafactor", "adamw8bit", "paged_adamw8bit")


class Attn(str, Enum):
    """Attention implementations; auto: the model's own, as from_pretrained picks it (sdpa where supported)."""

    auto = "auto"
    eager = "eager"
    sdpa = "sdpa"


class MoeRouting(str, Enum):
    """Mixture-of-experts routing assumptions of the sim engine (memprof.engines.moe)."""

    balanced = "balanced"
    worst = "worst"


class Experts(str, Enum):
    """transformers' experts implementations memprof runs (auto: the library's own choice)."""

    auto = "auto"
    grouped_mm = "grouped_mm"
    batched_mm = "batched_mm"
    eager = "eager"


class EngineName(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"
    sim = "sim"


class Shard(str, Enum):
    fsdp = "fsdp"


class Task(str, Enum):
    """The heads memprof builds inputs for (memprof.models.TASKS maps each to its auto class)."""

    causal_lm = "causal-lm"
    masked_lm = "masked-lm"
    seq_classification = "seq-classification"
    seq2seq_lm = "seq2seq-lm"
    speech_seq2seq = "speech-seq2seq"
    image_classification = "image-classification"
    feature_extraction = "feature-extraction"
    contrastive_image_text = "contrastive-image-text"
    image_text_to_text = "image-text-to-text"


#: the gate's activation of a gated MLP (the ``glu`` optimization): the model's own, or one named
GLU_ACTIVATIONS = ("model", "gelu", "silu")


def values(choices: type[Enum]) -> tuple[str, ...]:
    """The values of a choice Enum, in order."""
    return tuple(str(c.value) for c in choices)
