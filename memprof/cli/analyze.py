"""``memprof analyze MODEL``: the peak memory of one step, by category, phase and module."""

from __future__ import annotations

from enum import Enum

import typer

from memprof.api import analyze as run_analyze
from memprof.cli.common import spinner, stderr_console, stdout_console, write_output
from memprof.errors import OutOfMemory
from memprof.report.terminal import render


class Mode(str, Enum):
    train = "train"
    infer = "infer"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Optim(str, Enum):
    adamw = "adamw"
    sgd = "sgd"
    none = "none"


class Attn(str, Enum):
    eager = "eager"
    sdpa = "sdpa"


class EngineName(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"
    sim = "sim"


class Task(str, Enum):
    causal_lm = "causal-lm"
    masked_lm = "masked-lm"
    seq_classification = "seq-classification"
    seq2seq_lm = "seq2seq-lm"
    speech_seq2seq = "speech-seq2seq"
    image_classification = "image-classification"
    feature_extraction = "feature-extraction"


def analyze(
    model: str = typer.Argument(
        ..., help="Model directory, config.json, bundled name (e.g. gpt2), Hub id, or package.module:factory."
    ),
    mode: Mode = typer.Option(Mode.train, "--mode", help="Training step or inference step."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences (or images) per step."),
    seq_len: int = typer.Option(512, "--seq-len", "-s", help="Tokens per sequence."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Parameter dtype."),
    optimizer: Optim = typer.Option(Optim.adamw, "--optimizer", help="Optimizer of the training step."),
    attn: Attn = typer.Option(Attn.sdpa, "--attn", help="Attention implementation (transformers models)."),
    engine: EngineName = typer.Option(
        EngineName.auto, "--engine", "-e", help="cuda, cpu, sim (fake tensors), or auto."
    ),
    task: Task | None = typer.Option(
        None, "--task", help="Override the head picked from the config's architectures."
    ),
    decode_tokens: int = typer.Option(
        0, "--decode-tokens", help="Infer mode, causal LMs: decode steps after the prefill."
    ),
    top: int = typer.Option(15, "--top", help="Modules to list."),
    json_path: str | None = typer.Option(
        None, "--json", help="Write the profile as JSON to PATH ('-' for stdout)."
    ),
    snapshot: str | None = typer.Option(
        None, "--snapshot", help="cuda engine: write an allocator snapshot pickle (memory_viz)."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow loading .bin (pickle) checkpoints."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow models that ship their own code."
    ),
) -> int:
    """Measure the peak memory of one training or inference step."""
    if top < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--top")
    partial = None
    with spinner() as progress:
        try:
            profile = run_analyze(
                model,
                mode=mode.value,
                batch_size=batch_size,
                seq_len=seq_len,
                dtype=dtype.value,
                optimizer=optimizer.value,
                attn=attn.value,
                task=task.value if task else None,
                decode_tokens=decode_tokens,
                engine=engine.value,
                snapshot=snapshot,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
        except OutOfMemory as e:
            partial = e
            profile = e.profile  # type: ignore[assignment]
    if profile is not None:
        if json_path:
            write_output(json_path, profile.to_json())
        if json_path != "-":
            render(profile, stdout_console() if partial is None else stderr_console(), top=top)
    if partial is not None:
        raise partial
    return 0
