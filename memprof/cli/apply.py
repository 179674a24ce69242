"""``memprof apply MODEL --recipe R --output DIR``: write an optimized checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from memprof.cli import options as O
from memprof.cli.common import check_outputs, model_input, recipe_input, spinner, stdout_console, write_output
from memprof.cli.compare import RECIPE, STEP, load_recipe
from memprof.errors import InputError
from memprof.files import check_output_folder, leftovers
from memprof.model_config import check_spec
from memprof.units import format_bytes


def apply(
    model: str = O.MODEL,
    output: str = typer.Option(
        ..., "--output", "-o", help="Folder to write (must not exist, unless --force)."
    ),
    recipe: str | None = RECIPE,
    step: list[str] | None = STEP,
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing output folder (and --json file). The old folder stays whole at DIR "
        "until the new one is complete, then both are exchanged in one step (Linux; elsewhere two renames, "
        "repaired by the next apply if killed between them).",
    ),
    mode: O.Mode = O.MODE,
    batch_size: int = O.BATCH,
    seq_len: int = O.SEQ,
    dtype: O.DType = O.DTYPE,
    optimizer: O.Optim = O.OPTIM,
    attn: O.Attn = O.ATTN,
    engine: O.EngineName = O.ENGINE,
    task: O.Task | None = O.TASK,
    world_size: int = O.WORLD_SIZE,
    no_profile: bool = typer.Option(False, "--no-profile", help="Skip the before/after profiles."),
    data: Path | None = O.DATA,
    text_field: str = O.TEXT_FIELD,
    tokenizer: str | None = O.TOKENIZER,
    lengths: str | None = O.LENGTHS,
    samples: int = O.SAMPLES,
    json_path: str | None = O.JSON,
    allow_pickle: bool = O.ALLOW_PICKLE,
    trust_remote_code: bool = O.TRUST_REMOTE_CODE,
) -> int:
    """Write an optimized checkpoint (safetensors, config.json, tokenizer, memprof.json, README)."""
    if mode is O.Mode.distill:
        raise InputError(
            "memprof apply writes one model; profile a distillation step with analyze or compare"
        )
    # every output before any work (the library checks --output first): one line, not a lost run
    # (and none inside DIR, which is written whole, nor replacing or deleting an input)
    check_outputs(
        force,
        json=json_path,
        folder=("--output", output),
        inputs={
            **model_input(model),
            **recipe_input(recipe),
            "the data (--data)": data,
            "the tokenizer (--tokenizer)": tokenizer,
        },
    )
    r = load_recipe(recipe, step)
    wl = O.workload(mode, batch_size, seq_len, dtype, optimizer, attn, task, world_size=world_size)
    # the library checks --output, then MODEL; it answers a bad --output itself (with what it
    # repaired of killed runs beside it, which the command line does not touch)
    out = Path(output).expanduser().resolve()
    if not leftovers(out):
        check_output_folder(output, "--output", force=force)
        check_spec(model, trust_remote_code)
    # the library (torch, transformers) loads once the arguments are known to be good
    from memprof.apply import apply as run_apply

    with spinner() as progress:
        res = run_apply(
            model,
            r,
            output,
            wl,
            force=force,
            engine=engine.value,
            task=task.value if task else None,
            profile=not no_profile,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            data=O.data_spec(data, text_field, tokenizer, lengths, samples),
            progress=progress,
        )
    if json_path:
        write_output(json_path, (res.output / "memprof.json").read_text())
    if json_path == "-":
        return 0
    c = stdout_console()
    c.print(f"[bold]Wrote[/bold] {res.output}  ({', '.join(res.files)})")
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Applied", " → ".join(s["name"] for s in res.setup.steps))
    for s in res.skipped:
        t.add_row("Skipped", f"[dim]{s}[/dim]")
    t.add_row("Storage dtype", res.setup.workload.dtype)
    if res.before and res.after:
        ratio = res.before.peak_bytes / res.after.peak_bytes if res.after.peak_bytes else float("inf")
        t.add_row(
            "Peak",
            f"{format_bytes(res.before.peak_bytes)} → {format_bytes(res.after.peak_bytes)} "
            f"({ratio:.2f}x less, {res.after.engine} engine)",
        )
    v = res.verification
    if v and v.get("compared"):
        t.add_row(
            "Verified",
            f"from_pretrained reload ({v['reloaded_dtype']}): output max abs diff {v['output_max_abs_diff']:.3g} "
            f"({v['output_max_rel_diff']:.1e} relative, cosine >= {v['output_min_cosine']:.4f}) vs the source",
        )
    if res.setup.training_args:
        t.add_row("Training args", json.dumps(res.setup.training_args))
    for n in res.notes:
        t.add_row("Note", f"[dim]{n}[/dim]")
    c.print(t)
    return 0
