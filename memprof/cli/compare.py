"""``memprof compare MODEL --recipe R``: the baseline, then each recipe step stacked, in one table."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from memprof import recipes
from memprof.cli import options as O
from memprof.cli.common import (
    check_outputs,
    model_input,
    on_stdout,
    recipe_input,
    spinner,
    stdout_console,
    write_output,
)
from memprof.errors import InputError
from memprof.files import not_regular
from memprof.model_config import check_spec
from memprof.optimizations.registry import require_environment

#: untracked steps timed per row (a bound beside memprof.bounds': the median settles after a few)
MAX_TIMING_STEPS = 100

RECIPE = typer.Option(
    None, "--recipe", "-r", help="Recipe YAML file, or the name of a shipped recipe (see `memprof recipes`)."
)
STEP = typer.Option(
    None,
    "--step",
    help="An optimization instead of (or after) a recipe: NAME or NAME:key=value,... (repeatable).",
)


def load_recipe(
    recipe: str | None, steps: list[str] | None, *, allow_repeats: bool = False
) -> recipes.Recipe:
    """The recipe of ``--recipe`` and/or ``--step`` options (``allow_repeats``: ``--step`` variants measured alone)."""
    if not recipe and not steps:
        raise InputError("give a recipe (--recipe FILE or a shipped name) or at least one --step")
    kind = not_regular(recipe) if recipe else None
    if kind and kind != "a directory":  # recipes.resolve_path would call it a directory
        raise InputError(
            f"{recipe}: is {kind}, not a regular file; give a recipe YAML file or a shipped name"
        )
    r = recipes.load(recipe) if recipe else None
    extra = recipes.from_names(steps, allow_repeats=allow_repeats) if steps else None
    if r and extra:
        r.steps += extra.steps
    out: recipes.Recipe = r or extra  # type: ignore[assignment]
    # a missing optional library (peft, bitsandbytes, torchao): one line, before any work
    require_environment(out.steps)
    return out


def compare(
    model: str = O.MODEL,
    recipe: str | None = RECIPE,
    step: list[str] | None = STEP,
    mode: O.Mode = O.MODE,
    batch_size: int = O.BATCH,
    seq_len: int = O.SEQ,
    dtype: O.DType = O.DTYPE,
    optimizer: O.Optim = O.OPTIM,
    attn: O.Attn = O.ATTN,
    engine: O.EngineName = O.ENGINE,
    task: O.Task | None = O.TASK,
    decode_tokens: int = O.DECODE,
    teacher: str | None = O.TEACHER,
    temperature: float = O.TEMPERATURE,
    ce_weight: float = O.CE_WEIGHT,
    world_size: int = O.WORLD_SIZE,
    moe_routing: O.MoeRouting = O.MOE_ROUTING,
    experts: O.Experts = O.EXPERTS,
    gpu: str | None = O.GPU,
    timing_steps: int = typer.Option(
        2, "--timing-steps", help="Real engines: untracked steps timed per row."
    ),
    separate: bool = typer.Option(
        False, "--separate", help="Measure each step alone on the baseline instead of stacking them."
    ),
    data: Path | None = O.DATA,
    text_field: str = O.TEXT_FIELD,
    tokenizer: str | None = O.TOKENIZER,
    lengths: str | None = O.LENGTHS,
    samples: int = O.SAMPLES,
    json_path: str | None = O.JSON,
    html_path: str | None = O.HTML,
    force: bool = O.FORCE,
    allow_pickle: bool = O.ALLOW_PICKLE,
    trust_remote_code: bool = O.TRUST_REMOTE_CODE,
) -> int:
    """Profile the baseline, then each optimization of a recipe stacked: memory, FLOPs, time, quality."""
    preset = O.gpu(gpu)
    if timing_steps < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--timing-steps")
    if timing_steps > MAX_TIMING_STEPS:
        raise typer.BadParameter(
            f"{timing_steps} is more than memprof times ({MAX_TIMING_STEPS}): each is a whole step, "
            "and the median settles after a few",
            param_hint="--timing-steps",
        )
    check_outputs(
        force,
        json=json_path,
        html=html_path,
        inputs={
            **model_input(model),
            **model_input(teacher, "--teacher"),
            **recipe_input(recipe),
            "the data (--data)": data,
            "the tokenizer (--tokenizer)": tokenizer,
        },
    )
    r = load_recipe(recipe, step, allow_repeats=separate)
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
    # the library's first check after the workload (a folder, a config, a bundled name...)
    check_spec(model, trust_remote_code)
    data_spec = O.data_spec(data, text_field, tokenizer, lengths, samples)
    # the library (torch, transformers) loads once the arguments are known to be good
    from memprof.compare import compare as run_compare
    from memprof.report.compare import render_compare

    with spinner() as progress:
        result = run_compare(
            model,
            r,
            wl,
            engine=engine.value,
            task=task.value if task else None,
            timing_steps=timing_steps,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            cumulative=not separate,
            data=data_spec,
            progress=progress,
            gpu=preset,
        )
    if json_path:
        write_output(json_path, json.dumps(result.to_dict(), indent=2))
    if html_path:
        from memprof.report.html import compare_html

        write_output(html_path, compare_html(result))
    if not on_stdout(json_path, html_path):  # stdout holds the JSON or the HTML
        render_compare(result, stdout_console())
    return 0
