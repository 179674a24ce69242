"""Rich rendering of a PlanResult: the budget, the plans that fit, the frontier, the search."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from memprof import optimizations
from memprof.budget import nccl_buffers
from memprof.errors import InputError
from memprof.gpus import lookup
from memprof.plan import ESTIMATE_MARGIN, SIDE_COSTS, Candidate, PlanResult, compare_command
from memprof.units import format_bytes
from memprof.workload import Workload

#: rows of the frontier shown (the JSON has them all)
FRONTIER_ROWS = 5


def _steps(c: Candidate) -> Text:
    if not c.steps:
        return Text("as it is (no change)")
    return Text("\n".join(optimizations.make(s["name"], s["options"]).describe() for s in c.steps))


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "±0%" if abs(x) < 0.005 else f"{x:+.0%}"


def _signed(n: int) -> str:
    return ("+" if n > 0 else "-" if n < 0 else "±") + format_bytes(abs(n))


def _budget_source(budget_bytes: int, gpu: str | None) -> str:
    """Where the budget comes from: the ``--gpu`` preset's memory, or ``--budget`` (beside a preset)."""
    if gpu is None:
        return ""
    try:
        memory = lookup(gpu).memory_bytes
    except InputError:  # a preset of another memprof version, in a result read back
        memory = None
    if memory == budget_bytes:
        return f"the {gpu}'s memory (--gpu)"
    has = f" has {format_bytes(memory)}" if memory is not None else ""
    return f"--budget; the {gpu} (--gpu){has}"


def budget_table(r: PlanResult) -> Table:
    b = r.budget
    t = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
    t.add_column()
    t.add_column(justify="right")
    t.add_column(style="dim")
    per = " per rank" if b.world_size > 1 else ""
    t.add_row(f"budget{per}", format_bytes(b.budget_bytes), _budget_source(b.budget_bytes, b.gpu))
    t.add_row(
        "− CUDA context",
        format_bytes(b.context_bytes),
        b.context_source
        if b.context_source.startswith(("estimate", "measured"))
        else "assumed (--context-overhead): no GPU here; measure yours with memprof analyze --engine cuda",
    )
    t.add_row(
        "− cuBLAS workspace",
        format_bytes(b.cublas_workspace_bytes),
        "from the sim profile (one per cuBLAS handle: the forward's thread, and autograd's in training)",
    )
    if b.cudnn_workspace_bytes:
        t.add_row(
            "− cuDNN workspace",
            format_bytes(b.cudnn_workspace_bytes),
            "assumed: the model runs convolutions (memprof.budget.CUDNN_WORKSPACE_BYTES)",
        )
    if b.nccl_buffers_bytes:
        n = nccl_buffers(b.world_size)
        t.add_row("− NCCL buffers", format_bytes(b.nccl_buffers_bytes), f"assumed: {n['assumption']}")
    t.add_row(
        Text("= usable", style="bold"),
        Text(format_bytes(b.usable_bytes), style="bold"),
        "for the allocator's reserved memory: each step's allocations replayed through a model of the "
        "caching allocator (fragmentation included)",
    )
    return t


def plans_table(r: PlanResult, cands: list[Candidate], title: str, *, fits: bool) -> Table:
    per = " (per rank)" if r.budget.world_size > 1 else ""
    t = Table(
        title=title + per, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold", pad_edge=False
    )
    t.add_column("#", justify="right", style="dim")
    t.add_column("steps", no_wrap=True)
    t.add_column("peak", justify="right", no_wrap=True)
    t.add_column("reserved*", justify="right", no_wrap=True)
    t.add_column("needs", justify="right", no_wrap=True)
    t.add_column("headroom" if fits else "over by", justify="right", no_wrap=True)
    t.add_column("FLOPs", justify="right", no_wrap=True)
    t.add_column("side cost", justify="right", no_wrap=True)
    t.add_column("run", justify="right", style="dim", no_wrap=True)
    budget = r.budget.budget_bytes
    for i, c in enumerate(cands, 1):
        room = budget - (c.need_bytes or 0)
        shallow = c.source == "measured" and c.reserved_bytes is None and c.peak_bytes is not None
        t.add_row(
            str(i),
            _steps(c),
            # settled from shallow traces (memprof.engines.depth): the allocated peak is a lower bound
            ("≥ " if shallow else "") + format_bytes(c.peak_bytes),
            "not traced" if shallow else format_bytes(c.reserved_bytes),
            ("≥ " if shallow else "") + format_bytes(c.need_bytes),
            Text(format_bytes(room) if fits else format_bytes(-room), style="green" if fits else "red"),
            _pct(c.flop_overhead),
            f"{c.side_cost:.2f}" if c.side_cost else "-",
            str(c.run) if c.run else "est.",
        )
    return t


def search_lines(r: PlanResult) -> list[str]:
    n = r.counts
    levers = [lv for lv in r.levers]
    shape = " x ".join(str(len(lv.levels)) for lv in levers)
    secs = sum(run.seconds for run in r.runs)
    skipped = [
        (
            n.get("pruned_nothing_fits", 0),
            "less aggressive than the most aggressive combination, whose allocated peak does not fit",
        ),
        (n.get("pruned_misfit", 0), "less aggressive than a combination whose allocated peak does not fit"),
        (n.get("pruned_plan", 0), "more aggressive than a cheaper plan measured to fit"),
        (
            n.get("pruned_state", 0),
            "parameters, gradients and optimizer state alone over the budget (rescaled)",
        ),
        (n.get("pruned_estimate", 0), f"estimated over the budget by more than {ESTIMATE_MARGIN:.0%}"),
        (n.get("pruned_overhead", 0), "FLOPs above --max-overhead"),
        (n.get("not_needed", 0), "not needed: costlier than the plans found"),
        (n.get("not_reached", 0), "not reached: the run limit came first"),
        (n.get("not_measurable", 0), "not measurable in the sim engine"),
    ]
    without = sum(k for k, _ in skipped)
    if r.plans and not r.plans[0].steps and n["runs"] == 1:
        return [
            f"Search: 1 sim run (the step as it is, {secs:.0f} s): it fits, so none of the other "
            f"{n['combinations'] - n['measured']} combinations was needed"
        ]
    first = r.plans[0].run if r.plans and r.plans[0].steps else None
    lines = [
        f"Search: {n['combinations']} combinations of {len(levers)} levers ({shape}"
        + (f", {n['incompatible']} incompatible left out" if n.get("incompatible") else "")
        + f"); {n['runs']} sim runs ({secs:.0f} s"
        + (f"; plan #1 from run {first}" if first else "")
        + f"); {without} without a run:",
    ]
    lines += [f"  {k} {what}" for k, what in skipped if k]
    lines.append(
        "  Measured: every row with a run number (peak, reserved, FLOPs counted); estimated: the skipped "
        "combinations (their numbers, in --json, are the estimator's)"
    )
    lines.append(
        "Levers: " + "; ".join(f"{lv.name} " + " → ".join(lvl.label for lvl in lv.levels) for lv in levers)
    )
    return lines


_TRAINS = {"full": "full fine-tune", "lora": "LoRA adapters", "qlora": "QLoRA (4-bit base + adapters)"}


def peft_table(r: PlanResult) -> Table:
    """``--peft``: the cheapest plan of each kind of training (one search each), full fine-tune first."""
    t = Table(title="What each kind of training takes (--peft)", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("trains")
    t.add_column("cheapest plan that fits (or the closest)")
    t.add_column("peak", justify="right")
    t.add_column("needs", justify="right")
    t.add_column("fits")
    t.add_column("cost", justify="right")
    t.add_column("runs", justify="right")
    for o in r.peft:
        if o.get("not_applicable"):
            why = escape(o["not_applicable"])
            t.add_row(
                _TRAINS.get(o["trains"], o["trains"]),
                f"does not apply: {why}",
                "-",
                "-",
                "-",
                "-",
                str(o["runs"]),
            )
            continue
        t.add_row(
            _TRAINS.get(o["trains"], o["trains"]),
            o["label"] or "-",
            format_bytes(o["peak_bytes"]) if o["peak_bytes"] is not None else "-",
            format_bytes(o["need_bytes"]) if o["need_bytes"] is not None else "-",
            "[green]yes[/green]" if o["fits"] else "[red]no[/red]",
            f"{o['cost']:.2f}" if o["cost"] is not None else "-",
            str(o["runs"]),
        )
    return t


def render_plan(
    r: PlanResult,
    console: Console,
    *,
    model: str | None = None,
    recipe_path: str | None = None,
    asked_recipe: bool = False,
) -> None:
    w = r.workload
    b = r.budget
    per = f"  ·  per rank of {b.world_size}" if b.world_size > 1 else ""
    console.print(
        f"[bold]memprof plan[/bold]  {r.model}  ·  {w.get('mode')} b{w.get('batch_size')} s{w.get('seq_len')} "
        f"{w.get('dtype')}"
        + (f" {w.get('optimizer')}" if w.get("mode") != "infer" else "")
        + f"  ·  {r.engine} engine{per}  ·  budget {format_bytes(b.budget_bytes)}"
    )
    console.print(budget_table(r))
    base = r.baseline
    if base.need_bytes is not None:
        room = b.budget_bytes - base.need_bytes
        verdict = (
            f"[green]fits, {format_bytes(room)} to spare[/green]"
            if room >= 0
            else f"[red]{format_bytes(-room)} over[/red]"
        )
        if base.reserved_bytes is None:  # settled from shallow traces (memprof.engines.depth)
            console.print(
                f"As it is: peak {format_bytes(base.peak_bytes)} allocated ({base.reason}) → needs at least "
                f"{format_bytes(base.need_bytes)}: {verdict}"
            )
        else:
            console.print(
                f"As it is: peak {format_bytes(base.peak_bytes)} allocated, {format_bytes(base.reserved_bytes)} "
                f"reserved → needs {format_bytes(base.need_bytes)}: {verdict}"
            )
    if r.plans:
        if r.plans[0].steps:
            console.print(plans_table(r, r.plans, "Plans that fit, cheapest first", fits=True))
            notes: dict[str, str] = {}
            for c in r.plans:
                for name, note in _side_notes(c):
                    notes.setdefault(name, note)
            for name, note in notes.items():
                console.print(f"[dim]• {name}: {note}[/dim]")
            console.print(
                "[dim]• cost = FLOP overhead (counted by the sim's FlopCounter) + side cost (a stated guess, in "
                "FLOP-overhead units, of what FLOPs do not show); ties: more headroom first[/dim]"
            )
        else:
            console.print("[green bold]The step fits as it is: no optimization needed.[/green bold]")
    frontier = [c for c in r.frontier if c.steps or not r.plans][:FRONTIER_ROWS]
    if frontier:
        title = (
            "Closest that do not fit (Pareto frontier: memory vs cost)"
            if not r.plans
            else ("Do not fit (Pareto frontier: memory vs cost)")
        )
        console.print(plans_table(r, frontier, title, fits=False))
    if not r.plans and r.counts.get("not_reached"):
        console.print(
            f"[red bold]No plan found that fits {format_bytes(b.budget_bytes)} within the run limit[/red bold] "
            f"({r.counts['not_reached']} combinations not measured: raise --max-runs)."
        )
    elif not r.plans:
        console.print(f"[red bold]No plan fits {format_bytes(b.budget_bytes)}.[/red bold]")
        if r.dominant:
            console.print("What dominates the closest plan's memory:")
        for line in r.dominant:
            console.print(f"  • {line}")
    if r.peft:
        console.print(peft_table(r))
    console.print(
        "[dim]* reserved: the caching-allocator model's estimate (sim engine), not a measurement[/dim]"
    )
    if any(run.depth for run in r.runs):
        console.print(
            "[dim]≥: traced at three shallow depths and extrapolated (memprof/engines/depth.py): the "
            "allocated peak is a lower bound, enough to rule the combination out; reserved not traced[/dim]"
        )
    extended = [str(run.index) for run in r.runs if run.extended]
    if extended:
        how = next(run.extended for run in r.runs if run.extended)
        console.print(
            f"[dim]Run{'s' if len(extended) > 1 else ''} {', '.join(extended)}: {how} (memprof/engines/"
            "depth_trace.py: every event and what each free releases, checked against the third depth), "
            "then replayed: the figures of a whole trace[/dim]"
        )
    for line in search_lines(r):
        console.print(f"[dim]{line}[/dim]")
    console.print("[dim]Not searched: " + "; ".join(r.not_searched) + "[/dim]")
    for n in r.notes:
        console.print(f"[dim]• {n}[/dim]")
    chosen = r.chosen
    if chosen is not None and chosen.steps:
        wl = Workload(**{k: v for k, v in w.items() if k in Workload.__dataclass_fields__})
        path = recipe_path or "plan.yaml"
        if recipe_path:
            console.print(
                f"Wrote the chosen plan (#1) to [bold]{recipe_path}[/bold]; confirm it step by step with:"
            )
        else:
            console.print("The chosen plan (#1) as a recipe (write it with --write-recipe PATH):")
            if r.recipe:
                for line in r.recipe.splitlines():
                    if not line.startswith("#"):
                        console.print(f"  {line}", markup=False)
            console.print("Confirm it step by step with:")
        console.print(f"  {compare_command(model or r.model, wl, path)}", markup=False)
    elif chosen is not None and asked_recipe:
        console.print("[dim]• no recipe written: the step fits as it is[/dim]")
    m = r.maximize
    if m is not None:
        what = "batch size" if m.dimension == "batch-size" else "sequence length"
        plan = "the chosen plan" if chosen is not None and chosen.steps else "the step as it is"
        line = f"Largest {what} that fits with {plan}: [bold]{m.best}[/bold]"
        if m.best_profile is not None:
            line += (
                f" (peak {format_bytes(m.best_profile.peak_bytes)}, reserved "
                f"{format_bytes(m.best_profile.peak_reserved_bytes)})"
            )
        line += f"; {m.limit}"
        console.print(line)
        probes = ", ".join(f"{p['value']} {'✓' if p['fits'] else '✗'}" for p in m.probes)
        console.print(f"[dim]  probes (each a sim run, from {m.start}): {probes}[/dim]")


def _side_notes(c: Candidate) -> list[tuple[str, str]]:
    """(step name, what it costs besides FLOPs) for each step of a plan."""
    out = []
    for s in c.steps:
        label = s["name"]
        if label == "optimizer" and s["options"].get("type"):
            label = f"optimizer {s['options']['type']}"
        key = _side_key(s)
        if key:
            out.append((label, SIDE_COSTS[key][1]))
        elif s["name"] == "checkpointing":
            out.append((label, "recomputes the checkpointed blocks' forward in backward (in the FLOPs)"))
        elif s["name"] == "chunking":
            out.append((label, "the LM head runs once more, chunk by chunk (in the FLOPs)"))
    return out


def _side_key(s: dict) -> str | None:
    n, o = s["name"], s["options"]
    if n == "optimizer":
        return o.get("type") if o.get("type") in SIDE_COSTS else None
    if n == "mixed_precision":
        return "pure_bf16" if o.get("pure") else "autocast"
    if n == "fsdp":
        return "fsdp" if o.get("reshard_after_forward", True) else "fsdp_keep"
    return {
        "grad_accumulation": "micro_batch",
        "activation_offload": "offload",
        "optimizer_in_backward": "in_backward",
        "allocator": "expandable",
        "optimizer_offload": "cpu_optimizer",
        "lora": "lora",
        "qlora": "qlora",
    }.get(n)


__all__ = ["render_plan"]
