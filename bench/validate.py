"""Validation: measured peaks against the sim engine's projections, with accelerate's and DeepSpeed's figures beside them.

One command runs a zoo of workloads over the bundled architectures (causal LMs
with and without grouped-query attention, an encoder, an encoder-decoder, a
vision model; training and inference; float32, bfloat16 autocast and pure
bfloat16; with and without activation checkpointing) twice: on a measuring
engine and on the sim engine. It prints a Markdown section (measured peak,
projected peak, error) and writes it into ``docs/validation.md``.

* ``--engine cuda`` (the default when PyTorch sees a GPU): the measured peak is
  the cuda engine's, ``torch.cuda.max_memory_allocated`` of the measured step
  (after a warm-up step and a reset of the peak statistics); the projection is
  the sim engine as shipped. The zoo is the bundled configs at full size and
  realistic shapes.
* ``--engine cpu`` (the default without a GPU): the measured peak is the cpu
  engine's (a real step on the CPU, exact live-tensor bytes). This is *not* a
  GPU validation: the sim engine as shipped applies CUDA semantics (512-byte
  allocator blocks, CUDA's SDPA kernel choice, CUDA's autocast policy, foreach
  AdamW) that a CPU step does not have, so the table also shows the sim engine
  with CPU semantics (exact bytes, the CPU's AdamW, SDPA as the CPU dispatches
  it, the CPU's autocast policy): that column
  measures how faithfully the fake-tensor trace follows the real step. The zoo
  is small variants of the bundled configs (fewer layers, narrower), so the
  whole run takes a few minutes on two cores.

Beside the projection, each workload gets the figure two other tools give:

* accelerate's ``accelerate estimate-memory``, computed offline through its own
  functions (its ``gather_data`` with the Hub lookup replaced by the same empty
  ``AutoModel`` built from the local config): "Total Size" for inference,
  "Training using Adam" for training, in the row of the step's parameter dtype.
* DeepSpeed's documented model-states formula for one GPU (parameters,
  gradients and Adam's states; no activations).

Targets: median absolute error of the projection at most 2%, worst at most 5%.

Usage::

    .venv/bin/python bench/validate.py [--engine cuda|cpu] [--json PATH] [--only NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

DOC = C.REPO / "docs" / "validation.md"
HEADER = """# Validation: measured peaks against memprof's projections

`bench/validate.py` runs a zoo of workloads on a measuring engine and on the sim
engine, and puts accelerate's `estimate-memory` and DeepSpeed's model-states
formula beside them, each with its error against the measured peak. On a machine
with a CUDA GPU the measuring engine is the cuda engine (a real step,
`torch.cuda.max_memory_allocated`); without one it is the cpu engine, and the
section says so: that is a check of the simulation's trace against real CPU
steps, not a GPU validation.

Rerun with the command given in the section (from the repository root).
"""

#: the projection's targets, in percent of the measured peak
TARGET_MEDIAN_PCT = 2.0
TARGET_WORST_PCT = 5.0

#: how each precision is expressed in memprof: the parameter dtype, and autocast
PRECISIONS: dict[str, str] = {
    "fp32": "float32",
    "bf16-autocast": "float32 weights, bfloat16 autocast (the `mixed_precision` optimization)",
    "bf16": "pure bfloat16 (`--dtype bfloat16`: weights, gradients and AdamW state in bfloat16)",
}


@dataclass
class Case:
    """One workload of the zoo."""

    name: str
    #: a bundled config name, or a config path relative to the repository
    spec: str
    #: what it stands for in the zoo
    family: str
    mode: str
    #: a key of PRECISIONS
    precision: str
    checkpointing: bool = False
    batch_size: int = 1
    seq_len: int = 128
    #: config values changed before building (small variants of the bundled configs)
    overrides: dict[str, Any] = field(default_factory=dict)

    #: an image model: the config's image size, no sequence length
    images: bool = False

    def step(self) -> str:
        """A short description of the step."""
        parts = [self.mode, self.precision]
        if self.checkpointing:
            parts.append("checkpointing")
        shape = f"{self.batch_size} images" if self.images else f"{self.batch_size} x {self.seq_len}"
        return ", ".join(parts) + f", batch {shape}"


# What the zoo covers.
_FAMILIES = {
    "gpt2": "causal LM, multi-head attention, tied head",
    "qwen2.5-0.5b": "causal LM, grouped-query attention (14 heads / 2 KV), tied head",
    "llama-3.2-1b": "causal LM, grouped-query attention (32 heads / 8 KV), tied head",
    "bert-base": "encoder (masked LM)",
    "t5-small": "encoder-decoder",
    "vit-base": "vision (image classification)",
}

# The CPU zoo runs small variants of the same bundled configs: fewer layers and
# narrower. float32 variants keep the real vocabularies and image sizes (logits
# and patches are much of the activation memory). bfloat16 variants are smaller
# still (a 4096-token vocabulary, smaller images): a CPU without native bfloat16
# arithmetic runs bfloat16 matmuls some 50x slower than float32 (0.2 against
# 13 GFLOPS on the 2-core machine the published table comes from).
_SMALL: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 2, "n_embd": 256, "n_head": 4},
    "llama-3.2-1b": {
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
    },
    "bert-base": {
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "t5-small": {"num_layers": 2, "num_decoder_layers": 2, "d_model": 256, "d_ff": 1024, "num_heads": 4},
    "vit-base": {
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
}
_SMALL16: dict[str, dict[str, Any]] = {
    # 14 heads / 2 KV heads of dimension 8, as Qwen2.5-0.5B's 14 / 2 of 64
    "qwen2.5-0.5b": {
        "num_hidden_layers": 2,
        "hidden_size": 112,
        "intermediate_size": 304,
        "vocab_size": 4096,
    },
    "llama-3.2-1b": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 4096,
    },
    "bert-base": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 4096,
    },
    "t5-small": {
        "num_layers": 2,
        "num_decoder_layers": 2,
        "d_model": 128,
        "d_ff": 512,
        "num_heads": 4,
        "d_kv": 32,
        "vocab_size": 4096,
    },
    "vit-base": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "image_size": 96,
    },
}

# (name, bundled config, mode, precision, checkpointing, CPU batch x seq, CUDA batch x seq);
# image models take the config's image size, their seq is ignored
_ZOO: list[tuple[str, str, str, str, bool, tuple[int, int], tuple[int, int]]] = [
    ("gpt2-train-fp32", "gpt2", "train", "fp32", False, (2, 256), (8, 1024)),
    ("gpt2-train-fp32-ckpt", "gpt2", "train", "fp32", True, (2, 256), (8, 1024)),
    ("qwen-train-autocast", "qwen2.5-0.5b", "train", "bf16-autocast", False, (4, 128), (4, 1024)),
    ("qwen-infer-bf16", "qwen2.5-0.5b", "infer", "bf16", False, (8, 128), (8, 2048)),
    ("llama-train-bf16-ckpt", "llama-3.2-1b", "train", "bf16", True, (4, 128), (4, 2048)),
    ("llama-infer-fp32", "llama-3.2-1b", "infer", "fp32", False, (2, 256), (4, 2048)),
    ("bert-train-fp32", "bert-base", "train", "fp32", False, (4, 128), (32, 512)),
    ("bert-train-autocast-ckpt", "bert-base", "train", "bf16-autocast", True, (4, 64), (32, 512)),
    ("t5-train-fp32", "t5-small", "train", "fp32", False, (4, 128), (32, 512)),
    ("t5-train-bf16", "t5-small", "train", "bf16", False, (2, 64), (32, 512)),
    ("vit-train-autocast", "vit-base", "train", "bf16-autocast", False, (16, 1), (64, 1)),
    ("vit-infer-fp32", "vit-base", "infer", "fp32", False, (16, 1), (256, 1)),
]


def zoo(engine: str) -> list[Case]:
    """The zoo for a measuring engine: full-size configs on ``cuda``, small variants on ``cpu``."""
    out = []
    for name, spec, mode, precision, ckpt, cpu_shape, cuda_shape in _ZOO:
        b, s = cuda_shape if engine == "cuda" else cpu_shape
        small = _SMALL if precision == "fp32" else _SMALL16
        out.append(
            Case(
                name=name,
                spec=spec,
                family=_FAMILIES[spec],
                mode=mode,
                precision=precision,
                checkpointing=ckpt,
                batch_size=b,
                seq_len=s,
                overrides={} if engine == "cuda" else dict(small[spec]),
                images=spec == "vit-base",
            )
        )
    if engine == "cuda":
        # the inference rows first: a cuBLAS workspace stays for the process's life, and a
        # training row leaves two (the forward's thread and autograd's), an inference step one
        out.sort(key=lambda c: c.mode == "train")
    return out


# ---------------------------------------------------------------------- the step
def resolve_case(case: Case, tmp: Path) -> Any:
    """The case's model, resolved; a small variant is written as its own config.json first.

    Writing the changed config (rather than ``StepSetup.config_overrides``, which
    changes only the built model) keeps the synthetic inputs, the position limit
    and accelerate's empty model on the same values as the model itself.
    """
    from memprof.models import bundled_configs_dir, resolve

    path = C.REPO / case.spec
    if not path.is_file():
        path = bundled_configs_dir() / f"{case.spec}.json"
    if not case.overrides:
        return resolve(str(path))
    data = json.loads(path.read_text())
    data.update(case.overrides)
    data["_memprof_source"] = f"bench/validate.py: {case.spec} with {case.overrides}"
    out = tmp / f"{path.stem}-small" / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    return resolve(str(out))


def step_setup(case: Case) -> Any:
    """The StepSetup of a case: its workload, and the optimizations for autocast and checkpointing."""
    from memprof import optimizations
    from memprof.prepare import apply_step
    from memprof.workload import StepSetup, Workload

    wl = Workload(
        mode=case.mode,
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        dtype="bfloat16" if case.precision == "bf16" else "float32",
        optimizer="adamw",
        attn="sdpa",
    )
    setup = StepSetup.of(wl)
    steps: list[tuple[str, dict[str, Any]]] = []
    if case.precision == "bf16-autocast":
        steps.append(("mixed_precision", {"dtype": "bfloat16"}))
    if case.checkpointing:
        steps.append(("checkpointing", {}))
    for name, options in steps:
        # as memprof compare and plan do: check that it applies, apply, record it
        reason = apply_step(optimizations.make(name, options), None, setup)
        if reason:
            raise ValueError(f"{case.name}: {name} does not apply: {reason}")
    return setup


# ------------------------------------------------------------- other tools' figures
def accelerate_estimate(config: Any, case: Case) -> dict[str, Any]:
    """What ``accelerate estimate-memory`` prints for this model, computed offline through its functions.

    ``accelerate estimate-memory MODEL`` calls ``gather_data``, which builds the
    empty model with ``create_empty_model`` (a Hub lookup, then
    ``AutoModel.from_config(config, torch_dtype=torch.float32)`` under
    ``init_empty_weights``) and sizes it with ``calculate_maximum_sizes`` and
    ``estimate_training_usage``. Here ``gather_data`` runs as it is, with
    ``create_empty_model`` replaced by the same construction from the local
    config (no Hub). Its figures: "Total Size" (the weights) and "Training using
    Adam" (the largest of weights, gradients, Adam's states and the step, not
    their sum; float32: 4x the float32 size, float16: mixed precision, 2x the
    float32 size). It has no bfloat16 row; its float16 row is the 2-byte one.
    It covers no activations, and ``AutoModel`` is the headless base model.

    Returns:
        ``bytes`` (the figure compared), ``figure`` (which one), ``printed`` (as
        the command prints it) and the raw sizes.

    Raises:
        RuntimeError: accelerate is not installed.
    """
    try:
        import accelerate
        import torch
        from accelerate.commands import estimate
        from accelerate.utils import convert_bytes
        from transformers import AutoModel
    except ImportError as e:
        raise RuntimeError(
            "bench/validate.py compares with accelerate's estimate-memory: pip install accelerate "
            "(it is in memprof's dev extra: pip install -e '.[dev]')"
        ) from e

    cfg = copy.deepcopy(config)

    def offline_empty_model(
        model_name: str, library_name: str, trust_remote_code: bool = False, **kw: Any
    ) -> Any:
        # create_empty_model's transformers branch, from a local config instead of the Hub
        with accelerate.init_empty_weights():
            return AutoModel.from_config(cfg, torch_dtype=torch.float32, trust_remote_code=trust_remote_code)

    args = argparse.Namespace(
        model_name=case.spec,
        library_name="transformers",
        dtypes=["float32", "float16"],
        trust_remote_code=False,
    )
    from unittest import mock

    with mock.patch.object(estimate, "create_empty_model", offline_empty_model):
        data = estimate.gather_data(args)
    rows = {}
    for dtype, largest, total, training in data:
        usage = max(training.values())  # as estimate_command prints it
        rows[dtype] = {
            "largest_layer_bytes": int(largest),
            "total_size_bytes": int(total),
            "training_adam_bytes": int(usage) if usage != -1 else None,
        }
    row = "float16" if case.precision == "bf16" else "float32"
    if case.mode == "train" and case.precision != "fp32":
        row = "float16"  # accelerate's mixed-precision training figure
    if case.mode == "train":
        key, label = "training_adam_bytes", "Training using Adam"
    else:
        key, label = "total_size_bytes", "Total Size"
    value = rows[row][key]
    return {
        "bytes": value,
        "figure": f"{label}, {row} row",
        "printed": convert_bytes(value) if value is not None else "N/A",
        "rows": rows,
        "version": accelerate.__version__,
    }


# DeepSpeed's figures for one GPU, from its documentation ("Memory Requirements",
# docs/code-docs/source/memory.rst, https://deepspeed.readthedocs.io/en/latest/memory.html)
# and its estimator (deepspeed/runtime/zero/stage_1_and_2.py,
# estimate_zero2_model_states_mem_needs): with Adam, "16b for fp32: 4b params, 4b grads,
# 4b momentum and 4b variance per parameter"; mixed precision without offload,
# gpu_mem = 2 * total_params + int(18 * total_params / total_gpus) (16-bit parameters;
# 16-bit and 32-bit gradients, 32-bit master parameters, momentum and variance), the
# documentation's "4 * params + 16 * params / (total number of gpus)": 20 bytes per
# parameter on one GPU. ZeRO stages 1-3 shard across GPUs; on one GPU they change nothing.
DS_FP32_ADAM_BYTES_PER_PARAM = 4 + 4 + 4 + 4


def deepspeed_zero2_gpu_bytes(total_params: int, total_gpus: int = 1) -> int:
    """DeepSpeed's ``estimate_zero2_model_states_mem_needs(..., cpu_offload=False)`` GPU figure."""
    return 2 * total_params + int(18 * total_params / total_gpus)


def deepspeed_estimate(total_params: int, case: Case) -> dict[str, Any]:
    """DeepSpeed's model-states figure for the step on one GPU (no activations).

    Training: float32 Adam, 16 bytes per parameter; 16-bit training (autocast or
    bfloat16), DeepSpeed's mixed-precision figure, 20 bytes per parameter (it
    always keeps float32 master weights, which a pure-bfloat16 step has not).
    Inference: the parameters alone, 4 or 2 bytes each (DeepSpeed's estimator
    covers training; its per-parameter sizes give the inference figure).
    """
    if case.mode != "train":
        per = 2 if case.precision == "bf16" else 4
        return {"bytes": per * total_params, "formula": f"{per} B/param (parameters only)"}
    if case.precision == "fp32":
        return {
            "bytes": DS_FP32_ADAM_BYTES_PER_PARAM * total_params,
            "formula": "16 B/param (fp32 Adam: params, grads, momentum, variance)",
        }
    return {
        "bytes": deepspeed_zero2_gpu_bytes(total_params),
        "formula": "2P + 18P/GPUs = 20 B/param (mixed precision, fp32 master)",
    }


# --------------------------------------------------------------------- the runs
def error_pct(projected: int | None, measured: int | None) -> float | None:
    """Signed error of a projection, in percent of the measured peak."""
    if projected is None or not measured:
        return None
    return 100.0 * (projected - measured) / measured


def _beside(profile: Any) -> int:
    """What the sim names beside its peak that the caching allocator holds: the cuBLAS
    workspaces (one per handle) and its cuDNN workspace assumption (0 on measuring engines)."""
    named = (profile.overheads or {}).get("non_tensor") or {}
    return int(named.get("cublas_workspace_bytes") or 0) + int(named.get("cudnn_workspace_bytes") or 0)


def _peak(profile: Any) -> dict[str, Any]:
    return {
        "bytes": int(profile.peak_bytes),
        "beside_bytes": _beside(profile),
        "phase": profile.peak_phase,
        "parameters": int(profile.model["parameters"]),
        "categories": {k: int(v) for k, v in profile.categories_at_peak.items() if v},
        "overheads": profile.overheads,
    }


def measuring_engine(name: str) -> Any:
    from memprof.engines import get_engine

    return get_engine(name)


def projections(name: str) -> list[tuple[str, Callable[[], Any]]]:
    """The sim engines projecting the step: as shipped, and (cpu) with CPU semantics."""
    import torch

    if name == "cuda":
        # project the GPU measured (its compute capability picks the SDPA kernel)
        sm = torch.cuda.get_device_capability()[0]
        return [("sim", lambda: C.sim_engine(sm_major=sm))]
    return [
        ("sim", lambda: C.sim_engine()),
        (
            "sim_cpu_semantics",
            lambda: C.sim_engine(
                exact_bytes=True, cpu_optimizer=True, cuda_sdpa=False, cuda_autocast=False, cuda_dropout=False
            ),
        ),
    ]


def run_case(case: Case, engine: str, tmp: Path, log: Callable[[str], None] = C.log) -> dict[str, Any]:
    """Measure one workload, project it, and put the other tools' figures beside it.

    Returns:
        the row, as plain data: ``measured_bytes``, ``projected_bytes``,
        ``error_pct`` (and ``*_cpu_semantics`` on cpu), ``accelerate_*``,
        ``deepspeed_*``, and what each engine saw.
    """
    row: dict[str, Any] = {**asdict(case), "step": case.step(), "measured_engine": engine}
    rm = resolve_case(case, tmp)
    setup = step_setup(case)
    row["model"] = rm.name
    timings: dict[str, float] = {}
    runs: dict[str, dict[str, Any]] = {}
    for label, make in [(engine, lambda: measuring_engine(engine)), *projections(engine)]:
        t0 = time.perf_counter()
        try:
            runs[label] = _peak(make().run(rm, setup))
        except Exception as e:  # a failed run is a row that says so, not a lost table
            runs[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        timings[label] = round(time.perf_counter() - t0, 2)
        log(
            f"  {case.name}: {label} {runs[label].get('bytes', runs[label].get('error'))} ({timings[label]:.1f} s)"
        )
    measured = runs[engine].get("bytes")
    row["measured_bytes"] = measured
    row["measured_phase"] = runs[engine].get("phase")
    row["parameters"] = runs[engine].get("parameters")
    row["projected_tensors_bytes"] = runs["sim"].get("bytes")
    row["projected_bytes"] = row["projected_tensors_bytes"]
    if engine == "cuda" and row["projected_bytes"] is not None:
        # max_memory_allocated counts the workspaces the sim reports beside its peak
        row["projected_bytes"] += runs["sim"]["beside_bytes"]
    row["error_pct"] = error_pct(row["projected_bytes"], measured)
    if "sim_cpu_semantics" in runs:
        row["projected_cpu_semantics_bytes"] = runs["sim_cpu_semantics"].get("bytes")
        row["error_cpu_semantics_pct"] = error_pct(row["projected_cpu_semantics_bytes"], measured)
    row["runs"] = runs
    row["seconds"] = timings

    t0 = time.perf_counter()
    acc = accelerate_estimate(rm.config, case)
    timings["accelerate"] = round(time.perf_counter() - t0, 2)
    row["accelerate_bytes"] = acc["bytes"]
    row["accelerate_error_pct"] = error_pct(acc["bytes"], measured)
    row["accelerate"] = acc
    if row["parameters"] is not None:
        ds = deepspeed_estimate(row["parameters"], case)
        row["deepspeed_bytes"] = ds["bytes"]
        row["deepspeed_error_pct"] = error_pct(ds["bytes"], measured)
        row["deepspeed_formula"] = ds["formula"]
    else:
        row["deepspeed_bytes"] = row["deepspeed_error_pct"] = row["deepspeed_formula"] = None
    return row


def run_zoo(cases: Sequence[Case], engine: str, log: Callable[[str], None] = C.log) -> list[dict[str, Any]]:
    """Every case of ``cases`` on the measuring ``engine`` (``cuda`` or ``cpu``) and the sim engine."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="memprof-validate-") as tmp:
        for i, case in enumerate(cases):
            log(f"[{i + 1}/{len(cases)}] {case.name}: {case.spec}, {case.step()}")
            rows.append(run_case(case, engine, Path(tmp), log))
            with contextlib.suppress(Exception):
                _free_device(engine)
    return rows


def _free_device(engine: str) -> None:
    import gc

    gc.collect()
    if engine == "cuda":
        import torch

        torch.cuda.empty_cache()


def targets(rows: Sequence[dict[str, Any]], key: str = "error_pct") -> dict[str, Any]:
    """Median and worst absolute error of ``key`` over the rows, against the targets.

    A row without the figure (a failed run) fails the targets: the zoo was not validated.
    """
    errors = [abs(r[key]) for r in rows if r.get(key) is not None]
    missing = sum(1 for r in rows if r.get(key) is None)
    median = statistics.median(errors) if errors else None
    worst = max(errors) if errors else None
    ok_median = median is not None and median <= TARGET_MEDIAN_PCT and not missing
    ok_worst = worst is not None and worst <= TARGET_WORST_PCT and not missing
    return {
        "key": key,
        "median_abs_pct": median,
        "worst_abs_pct": worst,
        "missing": missing,
        "median_ok": ok_median,
        "worst_ok": ok_worst,
        "ok": ok_median and ok_worst,
    }


# ------------------------------------------------------------------------ output
def config_path(spec: str) -> str:
    """Where a case's config lives, relative to the repository."""
    return spec if spec.endswith(".json") else f"configs/models/{spec}.json"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def _err(e: float | None) -> str:
    return "n/a" if e is None else f"{e:+.2f}%"


def _verdict(t: dict[str, Any]) -> str:
    def one(ok: bool, v: float | None, limit: float) -> str:
        shown = "n/a" if v is None else f"{v:.2f}%"
        return f"{shown} (target <= {limit:g}%: **{'pass' if ok else 'FAIL'}**)"

    out = f"median |error| {one(t['median_ok'], t['median_abs_pct'], TARGET_MEDIAN_PCT)}, worst |error| {one(t['worst_ok'], t['worst_abs_pct'], TARGET_WORST_PCT)}"
    if t["missing"]:
        out += f"; {t['missing']} workload(s) without a figure (failed runs)"
    return out


def _labels(engine: str) -> list[tuple[str, str, str]]:
    """(run key, error key, label) of the projections shown for a measuring engine."""
    out = [("sim", "error_pct", "sim as shipped")]
    if engine == "cpu":
        out.append(("sim_cpu_semantics", "error_cpu_semantics_pct", "sim, CPU semantics"))
    return out


def diagnose(row: dict[str, Any], engine: str, threshold_pct: float = 0.05) -> list[str]:
    """Where a projection differs from the measured step: parameters, and the categories at the peak.

    Args:
        row: a row of :func:`run_case`.
        engine: the measuring engine.
        threshold_pct: projections within this error are not explained.
    """
    measured = row["runs"].get(engine, {})
    if "bytes" not in measured:
        return []
    out = []
    for key, err_key, label in _labels(engine):
        err = row.get(err_key)
        proj = row["runs"].get(key, {})
        if err is None or abs(err) <= threshold_pct or "bytes" not in proj:
            continue
        parts = []
        if proj["parameters"] != measured["parameters"]:
            parts.append(
                f"it builds {proj['parameters'] / 1e6:.2f} M parameters, the measured step "
                f"{measured['parameters'] / 1e6:.2f} M"
            )
        cats = set(proj["categories"]) | set(measured["categories"])
        diffs = sorted(
            ((proj["categories"].get(c, 0) - measured["categories"].get(c, 0), c) for c in cats),
            key=lambda d: -abs(d[0]),
        )
        shown = [f"{c} {d / 2**20:+.2f} MiB" for d, c in diffs[:3] if d]
        if shown:
            parts.append("at the peak: " + ", ".join(shown))
        if proj["phase"] != measured["phase"]:
            parts.append(f"peak in {proj['phase']}, measured in {measured['phase']}")
        kernels = (proj.get("overheads") or {}).get("sdpa_kernels")
        if kernels:
            parts.append(
                "SDPA kernels projected: " + ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items()))
            )
        out.append(f"- `{row['name']}`, {label} {err:+.2f}%: " + "; ".join(parts) + ".")
    return out


def explanations(rows: Sequence[dict[str, Any]], engine: str) -> list[str]:
    """What the known causes of the differences are, for the differences this run has."""
    import transformers

    out = []
    untied = [
        r["name"]
        for r in rows
        if "parameters" in r["runs"].get("sim", {})
        and r["parameters"] is not None
        and r["runs"]["sim"]["parameters"] > r["parameters"]
    ]
    if untied and int(transformers.__version__.split(".")[0]) >= 5:
        out.append(
            f"- Untied heads ({', '.join(f'`{n}`' for n in untied)}): the sim engine builds the model without "
            "weight initialisation (`memprof.models.build_model(..., init_weights=False)`, transformers' "
            "`no_init_weights`). From transformers 5 on, `no_init_weights` replaces `PreTrainedModel.init_weights`, "
            "which is also where `tie_weights` runs, so tied weights (the LM head and the input embeddings) come "
            "out as two matrices: one vocab x hidden matrix too many, with its gradient and AdamW state. A real "
            "build (cpu and cuda engines) ties them."
        )

    def more_activations(r: dict[str, Any]) -> bool:
        # the sim holds more activations or temporaries at the peak than the real step
        proj, meas = r["runs"].get("sim_cpu_semantics", {}), r["runs"].get(engine, {})
        if "categories" not in proj or "categories" not in meas:
            return False
        keys = ("activations", "temporaries")
        return sum(proj["categories"].get(c, 0) - meas["categories"].get(c, 0) for c in keys) > 0

    ckpt = [r["name"] for r in rows if r["checkpointing"] and more_activations(r)]
    if engine == "cpu" and ckpt:
        out.append(
            f"- Checkpointed causal LMs ({', '.join(f'`{n}`' for n in ckpt)}): checkpointing turns the KV cache off "
            "(`use_cache=False`), and without a cache or an attention mask transformers looks at the position ids "
            "for packed sequences (`masking_utils.find_packed_sequence_indices`). It cannot read fake tensors, so "
            "under the sim it keeps the packed-sequence mask and materialises a batch x 1 x seq x seq boolean "
            "causal mask that SDPA then gets instead of `is_causal=True` (the real step has none)."
        )
    beyond = [
        r["name"]
        for r in rows
        if ((r["runs"].get(engine) or {}).get("overheads") or {}).get("untracked_at_peak_bytes", 0) > 0
    ]
    if engine == "cuda" and beyond:
        ws = max(
            ((r["runs"].get("sim") or {}).get("overheads") or {}).get("cublas_workspace_bytes") or 0
            for r in rows
        )
        out.append(
            f"- Allocated beyond tensors ({', '.join(f'`{n}`' for n in beyond)}): `max_memory_allocated` counts "
            "blocks no tensor explains: the cuBLAS workspaces (allocated through the caching allocator on a "
            "thread's first matmul and kept: one for the forward's thread, one for autograd's; the sim projects "
            f"up to {ws / 2**20:.1f} MiB), and kernels' scratch. The sim reports the workspaces beside the peak "
            "(`overheads.non_tensor`), not in it; the projection here adds them. What it does not name (cuDNN's "
            "real workspace, other kernels' scratch) shows as a shortfall."
        )
    bigger = [
        r["name"]
        for r in rows
        if r.get("parameters")
        and r["accelerate"]["rows"]["float32"]["total_size_bytes"] > 4 * r["parameters"] * 1.01
    ]
    if bigger:
        out.append(
            f"- accelerate larger than the model ({', '.join(f'`{n}`' for n in bigger)}): its empty model, built "
            "under `init_empty_weights`, weighs more in float32 than the real model's parameters at 4 bytes each: "
            "the empty build leaves some tied weights untied (here, T5's encoder and decoder embeddings, with "
            f"transformers {transformers.__version__}), so `estimate-memory` counts the shared embedding more "
            "than once."
        )
    if engine == "cpu" and any(
        r.get("error_pct") is not None
        and r.get("error_cpu_semantics_pct") is not None
        and abs(r["error_pct"] - r["error_cpu_semantics_pct"]) > TARGET_MEDIAN_PCT
        for r in rows
    ):
        out.append(
            "- Sim as shipped against sim with CPU semantics: the CUDA semantics are the difference. CUDA's SDPA "
            "kernels (memory-efficient for float32 or with a mask, flash for 16-bit without one; math for "
            "float32 grouped-query attention, which keeps the scores) save the output "
            "and the log-sum-exp where the CPU's kernels save more (T5's position bias as a float mask sends the "
            "CPU to its math kernel, which keeps the attention probabilities); CUDA's fused dropout keeps a "
            "one-byte mask for backward where the CPU keeps a noise tensor of the input's dtype (the rows with "
            "dropout are lower); 512-byte blocks and the foreach AdamW's temporaries add the rest. Those are "
            "the GPU's behaviour, not a trace error: the GPU section above validates them."
        )
    return out


def gpu_lines(engine: str) -> list[str]:
    """The GPU and driver (NVML), for the section's header."""
    if engine != "cuda":
        return ["- GPU: none; measuring engine: cpu (a real step on the CPU, exact bytes)"]
    import torch

    from memprof.engines.cuda import nvml_snapshot

    nv = nvml_snapshot(0) or {}
    name = nv.get("device_name") or torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    total = nv.get("device_total_bytes")
    return [
        f"- GPU: {name} (sm {major}.{minor}{f', {total / 2**30:.1f} GiB' if total else ''}); driver "
        f"{nv.get('driver_version', 'unknown (no NVML)')}; CUDA {torch.version.cuda}; measuring engine: cuda"
    ]


def render(rows: Sequence[dict[str, Any]], engine: str, seconds: float) -> tuple[str, str, dict[str, Any]]:
    """The section's title and body, and the targets' verdicts."""
    cpu = engine == "cpu"
    verdicts = {"sim": targets(rows)}
    if cpu:
        verdicts["sim_cpu_semantics"] = targets(rows, "error_cpu_semantics_pct")
    verdicts["accelerate"] = targets(rows, "accelerate_error_pct")
    verdicts["deepspeed"] = targets(rows, "deepspeed_error_pct")

    measured = "cpu engine" if cpu else "cuda engine"
    headers = ["workload", "model", "step", f"measured ({measured}), MiB", "sim as shipped, MiB", "error"]
    if cpu:
        headers += ["sim, CPU semantics, MiB", "error"]
    else:
        headers += ["measured beyond tensors, MiB", "sim beside its peak, MiB"]
    headers += ["accelerate, MiB", "error", "DeepSpeed, MiB", "error"]
    table = []
    for r in rows:
        m = r["measured_bytes"]
        line = [
            f"`{r['name']}`",
            f"`{r['spec']}`" + (" (small)" if r["overrides"] else ""),
            r["step"],
            _mib(m) if m is not None else f"error: {r['runs'][engine].get('error')}",
            _mib(r["projected_bytes"]),
            _err(r["error_pct"]),
        ]
        if cpu:
            line += [_mib(r.get("projected_cpu_semantics_bytes")), _err(r.get("error_cpu_semantics_pct"))]
        else:
            over = r["runs"][engine].get("overheads") or {}
            line.append(_mib(over.get("untracked_at_peak_bytes")))
            line.append(_mib(r["runs"]["sim"].get("beside_bytes")))
        line += [
            _mib(r["accelerate_bytes"]),
            _err(r["accelerate_error_pct"]),
            _mib(r["deepspeed_bytes"]),
            _err(r["deepspeed_error_pct"]),
        ]
        table.append(line)
    align = "lll" + "r" * (len(headers) - 3)

    zoo_rows = []
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "as bundled"
        zoo_rows.append(
            [
                f"`{r['name']}`",
                r["family"],
                f"`{config_path(r['spec'])}`: {ov}",
                f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else "n/a",
                r["accelerate"]["figure"],
                r["deepspeed_formula"] or "n/a",
            ]
        )
    zoo_table = C.md_table(
        ["workload", "what it covers", "config", "parameters", "accelerate figure", "DeepSpeed formula"],
        zoo_rows,
        "llllll",
    )

    if cpu:
        title = "Validation: cpu engine vs sim engine (no GPU: NOT a GPU validation)"
        intro = [
            "**This is not a GPU validation.** No CUDA GPU was available, so the measured peak is memprof's "
            "cpu engine: a real training or inference step on the CPU, its live tensor bytes counted exactly. "
            "The sim engine as shipped projects a CUDA GPU (512-byte allocator blocks, CUDA's SDPA kernel "
            "choice, CUDA's autocast policy, foreach AdamW, fused dropout), which a CPU step does not have, so its error here "
            "mixes trace fidelity with CUDA semantics; the column *sim, CPU semantics* (exact bytes, the CPU's "
            "AdamW, SDPA as the CPU dispatches it, the CPU's autocast policy, the CPU's dropout) isolates how faithfully the "
            "fake-tensor trace follows the real step. Under autocast the two policies differ: on CUDA, "
            "cross_entropy runs log_softmax in the logits' bfloat16 and nll_loss casts its input to float32, "
            "where CPU autocast casts the logits to float32 first; layer_norm, softmax and pow run in float32 "
            "on CUDA only (the autocast rows' *sim as shipped* error includes that, on purpose). Run "
            "`bench/validate.py` on a machine with a CUDA GPU for the GPU validation (the cuda engine's "
            "`torch.cuda.max_memory_allocated` against the sim as shipped, on the full-size configs).",
            "",
            "Zoo: small variants of the bundled configs (see the zoo table), each written as its own "
            "config.json before resolving, so the model, its synthetic inputs and accelerate's empty model "
            "share the values: fewer layers and narrower; the float32 variants keep the real vocabularies and "
            "image sizes, the bfloat16 ones have a 4096-token vocabulary and 96-pixel images, because a CPU "
            "without native bfloat16 arithmetic runs bfloat16 matmuls some 50x slower than float32.",
        ]
    else:
        title = "Validation: cuda engine (GPU) vs sim engine"
        intro = [
            "Measured peak: the cuda engine's `torch.cuda.max_memory_allocated` of the measured step (a "
            "warm-up step first, then the peak statistics reset), which counts what no tensor explains "
            "(the cuBLAS workspaces, kernels' scratch: *measured beyond tensors*). Projected peak: the sim "
            "engine as shipped, projecting this GPU's compute capability, plus what it names beside its peak "
            "that the caching allocator holds (*sim beside its peak*: a cuBLAS workspace per handle, two in "
            "training, and its cuDNN workspace assumption for convolutions). All rows run in one process, "
            "inference rows first: workspaces stay for the process's life. Zoo: the bundled configs at full "
            "size.",
        ]
    lines = [
        C.header_lines(gpu_lines(engine)),
        "",
        *intro,
        "",
        "Error = (figure - measured) / measured. Every step: AdamW for training, attn sdpa, synthetic "
        "inputs, steady state (one warm-up step first for training).",
        "",
        C.md_table(headers, table, align),
        "",
        f"- Sim as shipped: {_verdict(verdicts['sim'])}.",
    ]
    if cpu:
        lines.append(f"- Sim, CPU semantics (trace fidelity): {_verdict(verdicts['sim_cpu_semantics'])}.")
    lines += [
        f"- accelerate `estimate-memory` (for comparison, same targets): {_verdict(verdicts['accelerate'])}.",
        f"- DeepSpeed model states (for comparison, same targets): {_verdict(verdicts['deepspeed'])}.",
    ]
    found = [line for r in rows for line in diagnose(r, engine)]
    if found:
        lines += [
            "",
            "Where the projections differ from the measured step (category differences at the peak):",
            "",
            *found,
        ]
    known = explanations(rows, engine)
    if known:
        lines += ["", "Why:", "", *known]
    lines += [
        "",
        "What the other tools cover: accelerate's `estimate-memory` (version "
        f"{rows[0]['accelerate']['version'] if rows else '?'}, through its `gather_data` with the Hub lookup "
        "replaced by the same empty `AutoModel` built from the local config) sizes the headless base model: "
        '"Total Size" for inference, and for training "Training using Adam", the *largest* of weights, '
        "gradients, Adam's states and the step (float32: 16 B/param; its float16 row, mixed precision: 8 B/param; "
        "it has no bfloat16 row, so 2-byte steps use the float16 row). DeepSpeed's formula counts model states "
        "on one GPU: parameters, gradients, Adam's momentum and variance (and float32 master weights for 16-bit "
        "training). Neither counts activations, the logits, the loss or temporaries.",
        "",
        "### The zoo",
        "",
        zoo_table,
        "",
        f"Whole script: {seconds:.0f} s.",
    ]
    return title, "\n".join(lines), verdicts


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--engine",
        choices=("cuda", "cpu"),
        default=default,
        help=f"measuring engine (default here: {default})",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help="run these workloads only (the doc is not written)"
    )
    ap.add_argument("--no-write", action="store_true", help=f"do not write {DOC.relative_to(C.REPO)}")
    args = ap.parse_args(argv)
    if args.engine == "cuda" and not torch.cuda.is_available():
        ap.error("--engine cuda needs a CUDA GPU that PyTorch sees (without one: --engine cpu)")
    C.quiet()
    from memprof.cli.common import quiet_libraries

    quiet_libraries()
    cases = zoo(args.engine)
    if args.only:
        unknown = set(args.only) - {c.name for c in cases}
        if unknown:
            ap.error(
                f"unknown workload(s): {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in cases)}"
            )
        cases = [c for c in cases if c.name in args.only]
    t0 = time.perf_counter()
    rows = run_zoo(cases, args.engine)
    seconds = time.perf_counter() - t0
    title, body, verdicts = render(rows, args.engine, seconds)
    # the GPU validation and the CPU trace check are sections of their own (each run refreshes its own)
    name = "validate-cuda" if args.engine == "cuda" else "validate"
    C.publish(name, title, body, write=not args.no_write and not args.only, doc=DOC, header=HEADER)
    if args.json:
        out = {
            "measured_engine": args.engine,
            "gpu_validation": args.engine == "cuda",
            "command": C.command(),
            "date": C.today(),
            "machine": C.machine(),
            "code": C.source(),
            "seconds": round(seconds, 1),
            "targets": {"median_abs_pct": TARGET_MEDIAN_PCT, "worst_abs_pct": TARGET_WORST_PCT},
            "verdicts": verdicts,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        C.log(f"wrote {args.json}")
    key = "sim" if args.engine == "cuda" else "sim_cpu_semantics"
    return 0 if verdicts[key]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
