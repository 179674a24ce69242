"""``memprof plan MODEL --budget 24GiB``: the least costly optimizations that make a step fit."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from memprof.budget import DEFAULT_CONTEXT_BYTES
from memprof.budget import check as check_budget
from memprof.cli import options as O
from memprof.cli.common import check_outputs, model_input, on_stdout, spinner, stdout_console, write_output
from memprof.errors import InputError, NoPlanFits
from memprof.model_config import check_spec
from memprof.units import format_bytes, parse_percent


class Maximize(str, Enum):
    batch_size = "batch-size"
    seq_len = "seq-len"


class Peft(str, Enum):
    lora = "lora"
    qlora = "qlora"
    any = "any"


def plan(
    model: str = O.MODEL,
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="GPU memory per rank: 24GiB, 80GB, 16384MiB (default: the --gpu preset's memory).",
    ),
    mode: O.Mode = O.MODE,
    batch_size: int = O.BATCH,
    seq_len: int = O.SEQ,
    dtype: O.DType = O.DTYPE,
    optimizer: O.Optim = O.OPTIM,
    attn: O.Attn = O.ATTN,
    task: O.Task | None = O.TASK,
    decode_tokens: int = O.DECODE,
    teacher: str | None = O.TEACHER,
    temperature: float = O.TEMPERATURE,
    ce_weight: float = O.CE_WEIGHT,
    world_size: int = O.WORLD_SIZE,
    moe_routing: O.MoeRouting = O.MOE_ROUTING,
    experts: O.Experts = O.EXPERTS,
    gpu: str | None = O.GPU,
    max_overhead: str | None = typer.Option(
        None, "--max-overhead", help="The most FLOP overhead a plan may add, e.g. 40% (default: no limit)."
    ),
    maximize: Maximize | None = typer.Option(
        None, "--maximize", help="Also find the largest batch size or sequence length that fits."
    ),
    peft: Peft | None = typer.Option(
        None,
        "--peft",
        help="Also search stacks that train adapters: lora, qlora (4-bit base) or any. They change what is "
        "trained, so never by default; the full fine-tune's plan stays the answer when one fits.",
    ),
    context_overhead: str | None = typer.Option(
        None,
        "--context-overhead",
        help="CUDA context per process (assumed: no GPU to measure it; memprof analyze --engine cuda does); "
        f"default the --gpu preset's estimate, else {format_bytes(DEFAULT_CONTEXT_BYTES, 0).replace(' ', '')}.",
    ),
    max_runs: int = typer.Option(12, "--max-runs", help="The most sim runs of the search."),
    plans: int = typer.Option(3, "--plans", help="Stop once this many cheapest plans that fit are known."),
    write_recipe: Path | None = typer.Option(
        None,
        "--write-recipe",
        dir_okay=False,
        help="Write the chosen plan as a recipe YAML (memprof compare/apply).",
    ),
    json_path: str | None = O.JSON,
    html_path: str | None = O.HTML,
    force: bool = O.FORCE,
    allow_pickle: bool = O.ALLOW_PICKLE,
    trust_remote_code: bool = O.TRUST_REMOTE_CODE,
) -> int:
    """Find the least costly optimizations that make a step fit a GPU memory budget (sim engine)."""
    preset = O.gpu(gpu)
    if budget is None and preset is None:
        raise InputError("give --budget SIZE or --gpu NAME (its memory is the budget)")
    if budget is not None:
        budget_bytes = O.size(budget, "--budget", positive=True)
    else:
        assert preset is not None
        budget_bytes = preset.memory_bytes
    check_outputs(
        force,
        write_recipe=write_recipe,
        json=json_path,
        html=html_path,
        inputs={**model_input(model), **model_input(teacher, "--teacher")},
    )
    if context_overhead is not None:
        context_bytes = O.size(context_overhead, "--context-overhead")
    else:
        context_bytes = preset.context_bytes if preset is not None else DEFAULT_CONTEXT_BYTES
    overhead = None
    if max_overhead is not None:
        try:
            overhead = parse_percent(max_overhead)
        except InputError as e:
            raise InputError(f"--max-overhead: {e}") from None
    if max_runs < 2:
        raise InputError(f"--max-runs must be at least 2, got {max_runs}")
    if plans < 1:
        raise InputError(f"--plans must be at least 1, got {plans}")
    wl = O.workload(
        mode,
        batch_size,
        seq_len,
        dtype,
        optimizer,
        attn,
        task,
        decode_tokens,
        teacher,
        temperature,
        ce_weight,
        world_size,
        moe_routing,
        experts,
    )
    if peft is None and (overhead is None or overhead >= 0):
        # the library's checks before it resolves MODEL, then MODEL (its --peft and a
        # negative --max-overhead come first: left to it, so that the message is the same)
        check_budget(budget_bytes, context_bytes)
        check_spec(model, trust_remote_code)
    failure: NoPlanFits | None = None
    # the library (torch, transformers) loads once the arguments are known to be good
    from memprof.plan import PlanResult, recipe_text
    from memprof.plan import plan as run_plan
    from memprof.report.plan import render_plan

    with spinner() as progress:
        try:
            result = run_plan(
                model,
                wl,
                budget_bytes,
                world_size=world_size,
                max_overhead=overhead,
                maximize=maximize.value if maximize else None,
                context_overhead=context_bytes,
                progress=progress,
                max_plans=plans,
                max_runs=max_runs,
                task=task.value if task else None,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                recipe_path=str(write_recipe) if write_recipe else "plan.yaml",
                peft=peft.value if peft else None,
                gpu=preset,
            )
        except NoPlanFits as e:
            failure = e
            result = e.result  # type: ignore[assignment]
    assert isinstance(result, PlanResult)
    written = None
    if write_recipe is not None and result.chosen is not None and result.chosen.steps:
        # validated by recipes.parse inside recipe_text; written whole or not at all
        write_output(str(write_recipe), recipe_text(result, model, str(write_recipe)))
        written = str(write_recipe)
    if json_path:
        write_output(json_path, json.dumps(result.to_dict(), indent=2))
    if html_path:
        from memprof.report.html import plan_html

        write_output(html_path, plan_html(result))
    if not on_stdout(write_recipe, json_path, html_path):  # stdout holds the recipe, the JSON or the HTML
        render_plan(
            result, stdout_console(), model=model, recipe_path=written, asked_recipe=write_recipe is not None
        )
    if failure is not None:
        raise failure
    return 0
