"""Rich rendering of a Profile. Display only: no measurement, no side effects but printing."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from memprof.optimizations.registry import describe_steps
from memprof.profile import Profile
from memprof.report.diagnosis import budget_panel
from memprof.report.timeline import (
    columns,
    fragmentation_line,
    host_line,
    non_tensor_line,
    outside_allocator_line,
)
from memprof.tracking import CATEGORIES
from memprof.units import format_bytes, format_count

_CAT_STYLE = {
    "parameters": "cyan",
    "buffers": "bright_black",
    "gradients": "magenta",
    "optimizer_state": "yellow",
    "activations": "green",
    "temporaries": "red",
    "inputs": "blue",
}


def _bar(frac: float, width: int = 24, style: str = "white") -> Text:
    frac = max(0.0, min(1.0, frac))
    full = int(round(frac * width))
    return Text("█" * full + "·" * (width - full), style=style)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "  n/a"


def moe_line(moe: dict) -> str:
    """The experts layers and the routing behind the numbers (mixture-of-experts models)."""
    line = (
        f"{moe.get('layers')} layers, top-{moe.get('top_k')} of {moe.get('num_experts')}, "
        f"{moe.get('implementation') or 'custom'} experts"
    )
    routing = moe.get("routing")
    if routing == "router":
        return line + "; the model's own router (measured)"
    line += f"; routing {routing} (assumed, --moe-routing)"
    other = moe.get("other")
    if other:
        line += f"; {other['routing']}: {format_bytes(int(other['peak_bytes']), 2)}"
    elif not moe.get("routing_dependent"):
        line += " [dim](no size depends on it: the other routing gives the same)[/dim]"
    return line


def parameters_line(params: dict[str, Any] | None) -> str | None:
    """Frozen and trainable parameters, when something is frozen (LoRA, QLoRA); else None."""
    if not params or not params.get("frozen"):
        return None
    kind = "LoRA adapters, " if params.get("adapters") else ""
    trainable, frozen = int(params["trainable"]), int(params["frozen"])
    return (
        f"{format_count(frozen)} frozen ({format_bytes(int(params['frozen_bytes']), 2)}) · "
        f"{format_count(trainable)} trainable ({trainable / (trainable + frozen):.2%}; "
        f"{kind}{format_bytes(int(params['trainable_bytes']))})"
    )


def summary_table(p: Profile) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    m, w = p.model, p.workload
    t.add_row(
        "Model",
        f"{m.get('name')}  ({m.get('model_type', '')}, {m.get('task', '')}, {format_count(int(m.get('parameters', 0)))} parameters)",
    )
    if w:
        step = f"{w.get('mode')}  batch {w.get('batch_size')} x seq {w.get('seq_len')}, {w.get('dtype')}, attn {w.get('attn')}"
        if any(n.startswith(f"attention: {w.get('attn')}, the model's default") for n in p.notes):
            step += " (the model's default)"
        if w.get("mode") in ("train", "distill"):
            step += f", optimizer {w.get('optimizer')}"
        if w.get("decode_tokens"):
            step += f", {w.get('decode_tokens')} decode tokens"
        if w.get("world_size", 1) > 1:
            step += f"; {w['world_size']} ranks (batch per rank)"
        t.add_row("Step", step)
        if p.optimizations:
            t.add_row("Applied", describe_steps(p.optimizations))
        params = parameters_line(p.parameters)
        if params:
            t.add_row("Parameters", params)
        if p.moe:
            t.add_row("Experts", moe_line(p.moe))
        teacher = m.get("teacher")
        if w.get("mode") == "distill" and teacher:
            t.add_row("Teacher", teacher_line(teacher, w))
    t.add_row(
        "Engine",
        f"{p.engine} on {p.device}" + (f"  [dim]({p.engine_reason})[/dim]" if p.engine_reason else ""),
    )
    where = ""
    if p.peak_phase:
        inside = p.peak_module if p.peak_module and p.peak_module != "<model>" else None
        where = f"  in {p.peak_phase}" + (f", inside {inside}" if inside else "")
    t.add_row("Peak allocated", f"[bold]{format_bytes(p.peak_bytes, 2)}[/bold]{where}")
    if p.peak_reserved_bytes is not None:
        alloc = p.allocator or {}
        how = (
            "estimate: the step replayed through a model of the caching allocator"
            if alloc.get("source") == "model"
            else "allocator cache included"
        )
        if alloc.get("conf"):
            how += f"; {alloc['conf']}"
        t.add_row("Peak reserved", format_bytes(p.peak_reserved_bytes, 2) + f"  [dim]({how})[/dim]")

        frag = fragmentation_line(alloc)
        if frag:
            t.add_row("At the peak", frag)
        hint = (alloc.get("expandable_segments_hint") or {}).get("message")
        if hint:
            t.add_row("Allocator hint", f"[yellow]{hint}[/yellow]")
        outside = outside_allocator_line(alloc)
        if outside:
            t.add_row("Outside allocator", outside)
    host = host_line(p.host)
    if host:
        t.add_row("Host memory", host + "  [dim](not in the peak)[/dim]")
    ov = p.overheads or {}
    if ov.get("cublas_workspace_bytes") and not ov.get("included_in_peak", True):
        proj = p.peak_bytes + int(ov["cublas_workspace_bytes"])
        named = ov.get("non_tensor")
        t.add_row(
            "Projected GPU",
            f"{format_bytes(proj, 2)} max_memory_allocated with the cuBLAS workspace "
            f"({format_bytes(ov['cublas_workspace_bytes'])})"
            + ("" if named else "; plus the CUDA context, not projected"),
        )
        if named:
            t.add_row("Not tensors", non_tensor_line(named))
    if p.fit:
        t.add_row("Fits?", fit_line(p.fit))
    if p.nvml:
        nv = p.nvml
        line = f"{nv.get('device_name')}: {format_bytes(nv.get('device_used_bytes'))} used of {format_bytes(nv.get('device_total_bytes'))}"
        if nv.get("process_used_bytes") is not None:
            line += f"; this process {format_bytes(nv['process_used_bytes'])} (nvidia-smi)"
        t.add_row("NVML", line)
        if ov.get("context_and_libraries_bytes") is not None:
            t.add_row(
                "",
                f"[dim]nvidia-smi - reserved = {format_bytes(ov['context_and_libraries_bytes'])} (CUDA context, libraries)[/dim]",
            )
    return t


_PHASE_STYLE = {"forward": "green", "backward": "magenta", "optimizer": "yellow"}
_BLOCKS = " ▁▂▃▄▅▆▇█"


def timeline_panel(p: Profile, width: int = 72, rows: int = 2) -> Panel | None:
    """The shape of memory over the step: a sparkline of the live total, coloured by phase.

    The bars run from the lowest total of the step (bottom) to the peak (top), so
    the shape shows even when parameters and optimizer state dominate.
    """

    tl = p.timeline
    cols = columns(tl, width) if tl else None
    if cols is None:
        return None
    lo, hi = min(cols.highs), max(cols.highs)
    span = hi - lo
    levels = rows * 8
    heights = [levels if not span else round((v - lo) / span * (levels - 1)) + 1 for v in cols.highs]
    lines = []
    for r in range(rows - 1, -1, -1):
        line = Text()
        for c, h in enumerate(heights):
            part = max(0, min(8, h - r * 8))
            line.append(_BLOCKS[part], style=_PHASE_STYLE.get(cols.phases[c] or "", "cyan"))
        lines.append(line)
    labels = Text()
    prev = None
    for c, ph in enumerate(cols.phases):
        if ph != prev and ph is not None and len(labels) <= c:
            labels.append(" " * (c - len(labels)))
            labels.append(ph[: max(1, width - c)], style=_PHASE_STYLE.get(ph, "cyan"))
        prev = ph
    marker = Text(" " * cols.peak_column + "▲", style="bold")
    where = p.peak_phase or ""
    if p.peak_module and p.peak_module != "<model>":
        where += f", inside {p.peak_module}"
    peak_op = tl["op"][tl["peak_index"]] if tl and 0 <= tl.get("peak_index", -1) < len(tl["op"]) else None
    caption = Text.from_markup(
        f"▲ peak [bold]{format_bytes(p.peak_bytes, 2)}[/bold]"
        + (f" at op {format_count(int(peak_op))} of {format_count(cols.ops)}" if peak_op is not None else "")
        + (f" ({where})" if where else "")
        + f"   [dim]bars from {format_bytes(lo)} to {format_bytes(hi)}; x: ops of the step[/dim]"
    )
    return Panel(
        Group(*lines, labels, marker, caption),
        title="Memory over the step",
        title_align="left",
        border_style="bright_black",
        expand=False,
    )


def teacher_line(teacher: dict[str, Any], w: dict[str, Any]) -> str:
    """The teacher, how it runs, and the loss: one line."""
    how = (
        f"top-{teacher['topk']} logits precomputed, read back each step"
        if teacher.get("topk")
        else ("no_grad" if teacher.get("no_grad") else "under autograd (naive)")
    )
    return (
        f"{teacher.get('name')}  ({teacher.get('model_type', '')}, "
        f"{format_count(int(teacher.get('parameters', 0)))} parameters, {teacher.get('dtype')}), {how}; "
        f"loss {w.get('ce_weight')} x CE + {1 - float(w.get('ce_weight', 0)):g} x KL at T={w.get('temperature')}"
    )


def split_table(p: Profile) -> Table:
    """Distillation: the memory at the peak by category (rows) and side (columns)."""
    t = Table(title="Memory at the peak, by side", box=box.SIMPLE_HEAVY, title_justify="left")
    t.add_column("Category")
    sides = list(p.split_at_peak)
    for side in sides:
        t.add_column(side, justify="right")
    for c in CATEGORIES:
        vals = [int(p.split_at_peak[side].get(c, 0)) for side in sides]
        if any(vals):
            t.add_row(Text(c, style=_CAT_STYLE[c]), *(format_bytes(v) if v else "·" for v in vals))
    totals = [sum(p.split_at_peak[side].values()) for side in sides]
    t.add_row(Text("total", style="bold"), *(Text(format_bytes(v), style="bold") for v in totals))
    t.add_row("share", *(_pct(v, p.peak_bytes).strip() for v in totals))
    return t


def categories_table(p: Profile) -> Table:
    t = Table(title="Memory at the peak, by category", box=box.SIMPLE_HEAVY, title_justify="left")
    t.add_column("Category")
    t.add_column("Bytes", justify="right")
    t.add_column("Share", justify="right")
    t.add_column("")
    peak = p.peak_bytes
    for c in CATEGORIES:
        v = int(p.categories_at_peak.get(c, 0))
        t.add_row(
            Text(c, style=_CAT_STYLE[c]),
            format_bytes(v),
            _pct(v, peak),
            _bar(v / peak if peak else 0, style=_CAT_STYLE[c]),
        )
    t.add_row(Text("total", style="bold"), Text(format_bytes(peak), style="bold"), "100.0%", "")
    return t


def phases_table(p: Profile) -> Table:
    t = Table(title="Peak of each phase", box=box.SIMPLE_HEAVY, title_justify="left")
    t.add_column("Phase")
    t.add_column("Peak", justify="right")
    t.add_column("")
    top = max((ph.peak_bytes for ph in p.phases), default=0)
    for ph in p.phases:
        mark = " ◀ peak" if ph.name == p.peak_phase else ""
        t.add_row(
            ph.name + mark, format_bytes(ph.peak_bytes), _bar(ph.peak_bytes / top if top else 0, style="cyan")
        )
    return t


def modules_table(p: Profile, top: int = 15) -> Table:
    t = Table(
        title=f"Top {top} modules by memory held at the peak (submodules included)",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    t.add_column("Module", min_width=18, overflow="fold")
    t.add_column("Type", style="dim", max_width=18, no_wrap=True)
    t.add_column("Held at peak", justify="right")
    t.add_column("Share", justify="right")
    t.add_column("Activations", justify="right")
    t.add_column("Running peak", justify="right")
    mods = [m for m in p.modules if m.name != "<model>"]
    mods.sort(key=lambda m: (-m.bytes_at_peak, -m.peak_bytes, m.name))
    for m in mods[:top]:
        t.add_row(
            m.name,
            m.type,
            format_bytes(m.bytes_at_peak),
            _pct(m.bytes_at_peak, p.peak_bytes),
            format_bytes(m.activation_bytes),
            format_bytes(m.peak_bytes),
        )
    return t


_ROLE_LABELS = {
    "sharded_parameters": "sharded parameters (this rank's shards)",
    "unsharded_parameters": "unsharded parameters (gathered blocks)",
    "unsharded_gradients": "unsharded gradients (before reduce-scatter)",
    "all_gather_buffers": "all-gather buffers",
    "reduce_scatter_buffers": "reduce-scatter buffers",
}


def sharding_table(p: Profile) -> Table:
    """FSDP2: the sharded step's storages by role at the peak, and DeepSpeed's ZeRO-3 formula beside it."""
    s = p.sharding or {}
    t = Table(
        title=f"Sharding: FSDP2 over {s.get('world_size')} ranks, rank {s.get('rank', 0)} "
        f"- {s.get('launcher', '')}",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    t.add_column("At the peak")
    t.add_column("Bytes", justify="right")
    t.add_column("Share", justify="right")
    for role, label in _ROLE_LABELS.items():
        v = int((s.get("at_peak") or {}).get(role, 0))
        t.add_row(label, format_bytes(v), _pct(v, p.peak_bytes))
    z = s.get("zero3_estimate")
    if z:
        zb = int(z["bytes"])
        t.add_section()
        t.add_row(
            "DeepSpeed ZeRO-3 formula (model states only)",
            format_bytes(zb),
            _pct(zb, p.peak_bytes),
        )
        t.add_row(
            Text(
                f"  {format_count(int(z['largest_layer_params']))} largest layer x 4 B + 18 B x "
                f"{format_count(int(z['parameters']))} params / {z['world_size']}",
                style="dim",
            ),
            "",
            "",
        )
        cats = p.categories_at_peak
        left_out = (
            int(cats.get("activations", 0)) + int(cats.get("temporaries", 0)) + int(cats.get("inputs", 0))
        )
        t.add_row(
            "measured: activations, temporaries and inputs (not in the formula)",
            format_bytes(left_out),
            _pct(left_out, p.peak_bytes),
        )
    return t


def ranks_table(p: Profile) -> Table:
    """torchrun: one row per rank (each rank measured itself)."""
    t = Table(title="Every rank (each measured its own step)", box=box.SIMPLE_HEAVY, title_justify="left")
    cols = {
        "parameters": "params",
        "gradients": "grads",
        "optimizer_state": "opt state",
        "activations": "activations",
        "temporaries": "temps",
    }
    t.add_column("Rank", justify="right")
    t.add_column("Peak", justify="right")
    for c, label in cols.items():
        t.add_column(label, justify="right", style=_CAT_STYLE[c])
    t.add_column("Phase")
    for i, r in enumerate(p.ranks or []):
        if "peak_bytes" not in r:
            t.add_row(str(i), Text(f"failed: {r.get('error', '?')}", style="red"))
            continue
        cats = r.get("categories_at_peak") or {}
        t.add_row(
            str((r.get("sharding") or {}).get("rank", i)),
            Text(format_bytes(int(r["peak_bytes"])), style="bold"),
            *(format_bytes(int(cats.get(c, 0))) for c in cols),
            str(r.get("peak_phase") or ""),
        )
    peaks = [int(r["peak_bytes"]) for r in p.ranks or [] if "peak_bytes" in r]
    if len(peaks) > 1 and min(peaks):
        t.caption = f"spread between ranks: {100.0 * (max(peaks) - min(peaks)) / min(peaks):.1f}%"
    return t


def render(p: Profile, console: Console, top: int = 15) -> None:
    """Print the whole report."""
    title = "memprof analyze" if p.engine != "track" else "memprof track"
    console.print(Panel(summary_table(p), title=title, title_align="left", border_style="cyan"))
    spark = timeline_panel(p, width=max(24, min(96, console.width - 8)))
    if spark is not None:
        console.print(spark)

    verdict = budget_panel(p)
    if p.oom:
        o = p.oom
        console.print(
            Panel(
                f"[bold red]Out of memory[/bold red] in the {o.get('phase')} phase"
                + (f", inside {o.get('module')}" if o.get("module") else "")
                + f"\n{o.get('message')}\nlive then: {format_bytes(o.get('live_bytes'))} "
                + ", ".join(
                    f"{k} {format_bytes(v)}" for k, v in (o.get("live_by_category") or {}).items() if v
                ),
                border_style="red",
            )
        )
    parts: list[Any] = [categories_table(p)]
    if p.phases:
        parts.append(phases_table(p))
    console.print(Group(*parts))
    if p.split_at_peak:
        console.print(split_table(p))
    if p.sharding:
        console.print(sharding_table(p))
    if p.ranks:
        console.print(ranks_table(p))
    if p.modules and top > 0:
        console.print(modules_table(p, top))
    for n in p.notes:
        console.print(f"[dim]• {n}[/dim]")
    if verdict is not None:  # last: the next step to take
        console.print(verdict)


def fit_line(f: dict[str, Any]) -> str:
    """Reserved + the non-tensor bytes against a GPU's memory (or a budget): fits or not, by how much."""
    sums = (
        f"reserved {format_bytes(f['reserved_bytes'])} + not tensors {format_bytes(f['non_tensor_bytes'])} "
        f"= {format_bytes(f['need_bytes'])} of {f['against']}"
    )
    if f["fits"]:
        return f"[green]fits[/green]: {sums}; {format_bytes(f['headroom_bytes'])} left"
    return f"[red]does not fit[/red]: {sums}; {format_bytes(-f['headroom_bytes'])} short"
