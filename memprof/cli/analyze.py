"""``memprof analyze MODEL``: the peak memory of one step, by category, phase and module."""

from __future__ import annotations

import typer

from memprof.cli import options as O
from memprof.cli.common import (
    check_outputs,
    model_input,
    on_stdout,
    recipe_input,
    spinner,
    stderr_console,
    stdout_console,
    write_output,
)
from memprof.cli.compare import load_recipe
from memprof.errors import InputError, OutOfMemory
from memprof.model_config import check_spec
from memprof.sharding import Launch


def analyze(
    model: str = O.MODEL,
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
    shard: O.Shard | None = O.SHARD,
    moe_routing: O.MoeRouting = O.MOE_ROUTING,
    experts: O.Experts = O.EXPERTS,
    gpu: str | None = O.GPU,
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        "-r",
        help="Apply a recipe's optimizations to the step first (YAML file or shipped name).",
    ),
    step: list[str] | None = typer.Option(
        None,
        "--step",
        help="Apply an optimization to the step first: NAME or NAME:key=value,... (repeatable).",
    ),
    top: int = typer.Option(15, "--top", help="Modules to list."),
    json_path: str | None = O.JSON,
    html_path: str | None = O.HTML,
    snapshot: str | None = typer.Option(
        None,
        "--snapshot",
        help="cuda or sim engine: write an allocator snapshot pickle for PyTorch's memory_viz "
        "(sim: the allocator model's).",
    ),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="GPU memory to check the step against (e.g. 8GiB): where it is crossed, what was live, "
        "the optimizations that would cut that peak most (exit 4 when it does not fit).",
    ),
    context_overhead: str | None = typer.Option(
        None,
        "--context-overhead",
        help="The CUDA context assumed (sim; no GPU to measure it): default the --gpu preset's estimate, "
        "else 512MiB.",
    ),
    fixes: int = typer.Option(3, "--fixes", help="With --budget: how many single optimizations to show."),
    force: bool = O.FORCE,
    allow_pickle: bool = O.ALLOW_PICKLE,
    trust_remote_code: bool = O.TRUST_REMOTE_CODE,
) -> int:
    """Measure the peak memory of one training or inference step."""
    preset = O.gpu(gpu)
    if top < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--top")
    check_outputs(
        force,
        json=json_path,
        html=html_path,
        snapshot=snapshot,
        not_streams=["snapshot"],
        inputs={**model_input(model), **model_input(teacher, "--teacher"), **recipe_input(recipe)},
    )
    budget_bytes = O.size(budget, "--budget", positive=True) if budget is not None else None
    context_bytes = O.size(context_overhead, "--context-overhead") if context_overhead is not None else None
    steps = load_recipe(recipe, step) if (recipe or step) else None
    launch = Launch.from_env() if shard else None
    # what the library checks before it resolves MODEL, in its order (a line with two
    # errors gets the message it got when the library answered both)
    if fixes < 0:
        raise InputError(f"--fixes must be 0 or more, got {fixes}")
    O.workload(
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
        launch.world_size if launch is not None and world_size == 1 else world_size,
        moe_routing,
        experts,
    )
    if shard is None and not (steps is not None and steps.steps and budget_bytes is not None):
        # --shard and --step with --budget are checked by the library first, with the
        # step machinery; the MODEL spec is then checked there too
        check_spec(model, trust_remote_code)
    # under torchrun only rank 0 reports: it holds every rank's profile
    quiet = launch is not None and launch.rank != 0
    partial = None
    # the library (torch, transformers) loads once the arguments are known to be good
    from memprof.api import analyze as run_analyze
    from memprof.report.terminal import render

    with spinner(enabled=not quiet) as progress:
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
                teacher=teacher,
                temperature=temperature,
                ce_weight=ce_weight,
                world_size=world_size,
                shard=shard.value if shard else None,
                moe_routing=moe_routing.value,
                experts=experts.value,
                engine=engine.value,
                snapshot=snapshot,
                budget=budget_bytes,
                context_overhead=context_bytes,
                fixes=fixes,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                progress=progress,
                recipe=steps,
                # a recipe's steps that do not apply are skipped, as compare does; --step items must apply
                skip_inapplicable=recipe is not None,
                gpu=preset,
            )
        except OutOfMemory as e:
            partial = e
            profile = e.profile  # type: ignore[assignment]
    if quiet:
        return 0
    if profile is not None:
        if json_path:
            write_output(json_path, profile.to_json())
        if html_path:
            from memprof.report.html import profile_html

            write_output(html_path, profile_html(profile))
        if not on_stdout(json_path, html_path):  # stdout holds the JSON or the HTML
            render(profile, stdout_console() if partial is None else stderr_console(), top=top)
    if partial is not None:
        raise partial
    if profile is not None and profile.budget and not profile.budget.get("fits", True):
        raise OutOfMemory(f"does not fit --budget {budget}: {profile.budget.get('cause')}", profile)
    return 0
