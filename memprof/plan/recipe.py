"""The chosen plan as a YAML recipe, and the ``memprof compare`` command that confirms it."""

from __future__ import annotations

import dataclasses

import yaml

from memprof import optimizations, recipes
from memprof.errors import InputError
from memprof.plan.result import PlanResult
from memprof.units import format_bytes
from memprof.workload import Workload


def compare_command(spec: str, wl: Workload, path: str) -> str:
    """The ``memprof compare`` command that measures a plan's recipe step by step."""
    args = ["memprof", "compare", spec, "--recipe", path, "--engine", "sim"]
    d = Workload()
    if wl.mode != d.mode:
        args += ["--mode", wl.mode]
    args += ["-b", str(wl.batch_size), "-s", str(wl.seq_len)]
    if wl.dtype != d.dtype:
        args += ["--dtype", wl.dtype]
    if wl.optimizer != d.optimizer:
        args += ["--optimizer", wl.optimizer]
    if wl.attn not in (d.attn, "sdpa"):  # sdpa: what auto resolved to
        args += ["--attn", wl.attn]
    if wl.task:
        args += ["--task", wl.task]
    if wl.teacher:
        args += ["--teacher", wl.teacher]
    if wl.decode_tokens:
        args += ["--decode-tokens", str(wl.decode_tokens)]
    if wl.world_size > 1:
        args += ["--world-size", str(wl.world_size)]
    return " ".join(args)


def recipe_text(result: PlanResult, spec: str, path: str) -> str:
    """The chosen plan as a recipe (YAML), validated by :func:`memprof.recipes.parse`.

    Raises:
        InputError: the plan has no steps (the step fits as it is: no recipe).
        RecipeError: the recipe does not validate (a bug: please report it).
    """
    c = result.chosen
    if c is None or not c.steps:
        raise InputError("the step fits as it is: there is no recipe to write")
    b = result.budget
    wl = Workload(**{k: v for k, v in result.workload.items() if k in Workload.__dataclass_fields__})
    entries = []
    for st in c.steps:
        opt = optimizations.make(st["name"], st["options"])
        defaults = dataclasses.asdict(opt.Config())
        entries.append({"name": st["name"], **{k: v for k, v in opt.options.items() if defaults.get(k) != v}})
    over = f"FLOPs {c.flop_overhead:+.0%}" if c.flop_overhead is not None else "FLOPs not counted"
    header = [
        f"memprof plan: {result.model}, {wl.mode} b{wl.batch_size} s{wl.seq_len} {wl.dtype} {wl.optimizer}"
        + (f", per rank of {wl.world_size}" if wl.world_size > 1 else "")
        + f", budget {format_bytes(b.budget_bytes)}",
        f"sim run {c.run}: peak {format_bytes(c.peak_bytes)} allocated, {format_bytes(c.reserved_bytes)} reserved "
        f"(+ CUDA context {format_bytes(b.context_bytes)} assumed + cuBLAS {format_bytes(b.cublas_workspace_bytes)}"
        + (f" + cuDNN {format_bytes(b.cudnn_workspace_bytes)}" if b.cudnn_workspace_bytes else "")
        + (f" + NCCL {format_bytes(b.nccl_buffers_bytes)}" if b.nccl_buffers_bytes else "")
        + f" = {format_bytes(c.need_bytes)}); {over}",
        f"confirm: {compare_command(spec, wl, path)}",
    ]
    body = yaml.safe_dump(
        {
            "description": f"Fit {result.model} in {format_bytes(b.budget_bytes)} (memprof plan)",
            "optimizations": entries,
        },
        sort_keys=False,
    )
    text = "".join(f"# {h}\n" for h in header) + body
    recipes.parse(text, path)
    return text
