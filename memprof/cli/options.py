"""Options shared by the commands that run a step (analyze, compare, apply)."""

from __future__ import annotations

from pathlib import Path

import typer

from memprof.choices import Attn, DType, EngineName, Experts, Mode, MoeRouting, Optim, Shard, Task
from memprof.data import DataSpec
from memprof.errors import InputError
from memprof.gpus import GpuPreset, lookup
from memprof.units import parse_size
from memprof.workload import Workload

# the choices live in memprof.choices (one place); re-exported for the commands
__all__ = ["Attn", "DType", "EngineName", "Experts", "Mode", "MoeRouting", "Optim", "Shard", "Task"]


MODEL = typer.Argument(
    ..., help="Model directory, config.json, bundled name (e.g. gpt2), Hub id, or package.module:factory."
)
MODE = typer.Option(
    Mode.train, "--mode", help="Training step, inference step, or distillation (train against --teacher)."
)
BATCH = typer.Option(8, "--batch-size", "-b", help="Sequences (or images) per step.")
SEQ = typer.Option(512, "--seq-len", "-s", help="Tokens per sequence.")
DTYPE = typer.Option(DType.float32, "--dtype", help="Parameter dtype.")
OPTIM = typer.Option(Optim.adamw, "--optimizer", help="Optimizer of the training step.")
ATTN = typer.Option(
    Attn.auto,
    "--attn",
    help="Attention implementation (transformers models); auto: the model's own, as from_pretrained "
    "picks it (sdpa where the model supports it, else eager).",
)
MOE_ROUTING = typer.Option(
    MoeRouting.balanced,
    "--moe-routing",
    help="Mixture-of-experts models, sim engine: tokens per expert assumed: balanced (tokens x top_k / experts "
    "each, a trained router's aim) or worst (every token to the same top_k experts). cpu/cuda use the real router.",
)
EXPERTS = typer.Option(
    Experts.auto,
    "--experts",
    help="Mixture-of-experts models: transformers' experts implementation (auto: its own choice, grouped_mm).",
)
ENGINE = typer.Option(EngineName.auto, "--engine", "-e", help="cuda, cpu, sim (fake tensors), or auto.")
TASK = typer.Option(None, "--task", help="Override the head picked from the config's architectures.")
DECODE = typer.Option(0, "--decode-tokens", help="Infer mode, causal LMs: decode steps after the prefill.")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading .bin (pickle) checkpoints.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Allow models that ship their own code.")
TEACHER = typer.Option(
    None, "--teacher", help="--mode distill: the teacher's MODEL spec (same vocabulary as the student)."
)
TEMPERATURE = typer.Option(1.0, "--temperature", help="--mode distill: softmax temperature of the KL.")
CE_WEIGHT = typer.Option(
    0.5, "--ce-weight", help="--mode distill: weight of the student's cross-entropy (the KL gets the rest)."
)
WORLD_SIZE = typer.Option(
    1,
    "--world-size",
    help="Ranks (GPUs) running the step; --batch-size is per rank. Under torchrun: its world size.",
)
SHARD = typer.Option(
    None,
    "--shard",
    help="fsdp: shard with FSDP2 over --world-size ranks (sim: projected; under torchrun: measured per rank).",
)
JSON = typer.Option(None, "--json", help="Write the result as JSON to PATH ('-' for stdout).")
FORCE = typer.Option(
    False,
    "--force",
    help="Replace existing output files (--json, --html...); without it an existing file is refused "
    "before any work. Files are written atomically either way.",
)
HTML = typer.Option(
    None, "--html", help="Write a self-contained HTML report with charts to PATH (opens without a network)."
)
DATA = typer.Option(
    None,
    "--data",
    exists=True,
    dir_okay=False,
    help="Sample texts: a text file (one a line) or JSONL; tokenized with the model's tokenizer "
    "(for dynamic padding, and the quality check on real engines).",
)
TEXT_FIELD = typer.Option("text", "--text-field", help="JSONL: the field holding the text.")
TOKENIZER = typer.Option(
    None, "--tokenizer", help="Tokenizer folder for --data (default: the model's own folder)."
)
LENGTHS = typer.Option(
    None,
    "--lengths",
    help="Sample token lengths instead of --data: 120,340,88 or uniform(MIN,MAX), normal(MEAN,SD), "
    "lognormal(MU,SIGMA).",
)
SAMPLES = typer.Option(1000, "--samples", help="Draws of a --lengths distribution.")
GPU = typer.Option(
    None,
    "--gpu",
    help="Project the step onto this GPU (sim engine): its compute capability, memory and CUDA context "
    "estimate, e.g. t4, a100-80gb, h100, rtx4090 (memprof gpus lists them).",
)


def gpu(name: str | None) -> GpuPreset | None:
    """The preset of ``--gpu`` (None when not given).

    Raises:
        InputError: an unknown name (one line listing the known ones).
    """
    return lookup(name) if name is not None else None


def data_spec(
    data: Path | None, text_field: str, tokenizer: str | None, lengths: str | None, samples: int
) -> DataSpec | None:
    """The DataSpec of the data options (None when none was given)."""
    spec = DataSpec(
        path=str(data) if data else None,
        text_field=text_field,
        tokenizer=tokenizer,
        lengths=lengths,
        samples=samples,
    )
    spec.validate()
    return spec if (data is not None or lengths is not None) else None


def workload(
    mode: Mode,
    batch_size: int,
    seq_len: int,
    dtype: DType,
    optimizer: Optim,
    attn: Attn,
    task: Task | None,
    decode_tokens: int = 0,
    teacher: str | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    world_size: int = 1,
    moe_routing: MoeRouting = MoeRouting.balanced,
    experts: Experts = Experts.auto,
) -> Workload:
    """The Workload of the shared options (validated)."""
    wl = Workload(
        mode=mode.value,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype.value,
        optimizer=optimizer.value,
        attn=attn.value,
        task=task.value if task else None,
        decode_tokens=decode_tokens,
        teacher=teacher,
        temperature=temperature,
        ce_weight=ce_weight,
        world_size=world_size,
        moe_routing=moe_routing.value,
        experts=experts.value,
    )
    wl.validate()
    return wl


def size(text: str, flag: str, *, positive: bool = False) -> int:
    """A size option ("24GiB", "512MiB", bytes), parsed once for every command.

    Raises:
        InputError: not a size, a negative one, or 0 where ``positive``.
    """
    try:
        n = parse_size(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    if n < 0 or (positive and n == 0):
        raise InputError(f"{flag}: must be {'more than' if positive else 'at least'} 0, got {text!r}")
    return n
