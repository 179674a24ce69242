"""``memprof recipes``: the optimizations and shipped recipes; ``memprof recipes validate FILE``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from memprof import optimizations, recipes
from memprof.cli.common import stdout_console
from memprof.errors import EnvironmentProblem, InputError

app = typer.Typer(
    help="List the optimizations and the shipped recipes; validate a recipe.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@app.callback(invoke_without_command=True)
def recipes_list(
    ctx: typer.Context,
    options: bool = typer.Option(False, "--options", help="Also list each optimization's options."),
) -> int:
    """List the optimizations and the shipped recipes, one line each."""
    if ctx.invoked_subcommand is not None:
        return 0
    c = stdout_console()
    t = Table(title="Optimizations", box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    t.add_column("name", style="cyan", no_wrap=True)
    t.add_column("modes")
    t.add_column("what it does")
    for name in optimizations.names():
        cls = optimizations.get(name)
        t.add_row(name, ",".join(cls.modes), cls.summary)
        if options:
            for opt, tp, default, help_ in optimizations.option_help(cls.Config):
                t.add_row("", "", f"[dim]{opt}: {tp} = {default!r}  {help_}[/dim]")
    c.print(t)
    r = Table(title="Shipped recipes", box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    r.add_column("name", style="cyan", no_wrap=True)
    r.add_column("steps")
    r.add_column("description")
    for path in recipes.shipped_recipes():
        try:
            rec = recipes.load(path)
            r.add_row(path.stem, " → ".join(s.describe() for s in rec.steps), rec.description)
        except InputError as e:
            r.add_row(path.stem, "[red]invalid[/red]", str(e))
        except EnvironmentProblem as e:  # a step whose library is not installed (lora without PEFT)
            r.add_row(path.stem, "[yellow]needs a library[/yellow]", str(e))
    c.print(r)
    c.print(
        "[dim]Use one: memprof compare MODEL --recipe NAME   ·   check your own: memprof recipes validate FILE[/dim]"
    )
    return 0


@app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., help="Recipe YAML files (or shipped recipe names)."),
) -> int:
    """Check recipes; report every problem of each file at once."""
    c = stdout_console()
    bad: list[recipes.RecipeError | InputError] = []
    for f in files:
        try:
            rec = recipes.load(str(f))
        except InputError as e:
            bad.append(e)
            continue
        c.print(
            f"[green]ok[/green]  {f}: {len(rec.steps)} steps: " + " → ".join(s.describe() for s in rec.steps)
        )
    if not bad:
        return 0
    if len(bad) == 1:
        raise bad[0]
    problems = [
        f"{Path(getattr(e, 'source', '')).name}: {p}" if getattr(e, "problems", None) else str(e)
        for e in bad
        for p in (getattr(e, "problems", None) or [str(e)])
    ]
    raise recipes.RecipeError(f"{len(bad)} of {len(files)} recipes", problems)
