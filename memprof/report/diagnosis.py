"""Rendering of a budget diagnosis (``Profile.budget``, :mod:`memprof.diagnose`): terminal and HTML."""

from __future__ import annotations

import html
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from memprof.profile import Profile
from memprof.units import format_bytes, format_count


def _need_line(b: dict[str, Any]) -> str:
    parts = [f"reserved {format_bytes(b['reserved_bytes'], 2)}"]
    if b.get("context_bytes"):
        parts.append(f"CUDA context {format_bytes(b['context_bytes'])} (assumed)")
    if b.get("cublas_workspace_bytes"):
        parts.append(f"cuBLAS workspace {format_bytes(b['cublas_workspace_bytes'])}")
    return f"needs {format_bytes(b['need_bytes'], 2)} = " + " + ".join(parts)


def _live(cats: dict[str, int]) -> str:
    items = sorted(((c, v) for c, v in cats.items() if v), key=lambda cv: -cv[1])
    return ", ".join(f"{c} {format_bytes(v)}" for c, v in items)


def _cost(f: dict[str, Any]) -> str:
    ov = f.get("flop_overhead")
    out = f"FLOPs {ov:+.0%}" if ov is not None else "FLOPs ?"
    if f.get("side_cost"):
        out += f"; side cost {f['side_cost']:.2f}"
    return out


def budget_panel(p: Profile, model: str | None = None) -> Panel | None:
    """The diagnosis as a panel: the verdict, where the budget is crossed, the fixes, the plan."""
    b = p.budget
    if not b or "need_bytes" not in b:
        return None
    fits = b.get("fits")
    title = f"Budget {format_bytes(b['budget_bytes'], 2)}: " + ("fits" if fits else "does not fit")
    lines: list[Any] = [Text(_need_line(b)), Text(b.get("cause", ""), style="bold" if not fits else "")]
    c = b.get("crossing")
    if c and not fits:
        at = f"op {format_count(int(c['op']))}, " if c.get("op") is not None else ""
        lines.append(
            Text(f"Live then ({at}{format_bytes(c.get('live_bytes'))}): {_live(c.get('categories') or {})}")
        )
        mods = c.get("modules") or []
        if mods:
            lines.append(
                Text(
                    "Modules holding most then: "
                    + ", ".join(f"{m['module']} {format_bytes(m['bytes'])}" for m in mods[:5])
                )
            )
    fixes = b.get("fixes") or []
    if fixes:
        t = Table(
            title="What would cut that peak most (each alone, projected in sim)",
            box=box.SIMPLE,
            title_justify="left",
        )
        t.add_column("#", justify="right")
        t.add_column("Optimization")
        t.add_column("Needs", justify="right")
        t.add_column("Cut", justify="right")
        t.add_column("Fits")
        t.add_column("Cost")
        for i, f in enumerate(fixes, 1):
            t.add_row(
                str(i),
                f["label"],
                format_bytes(f["need_bytes"], 2),
                "-" + format_bytes(f["cut_bytes"], 2),
                Text("yes", style="green") if f["fits"] else Text("no", style="red"),
                _cost(f),
            )
        lines.append(t)
    elif not fits:
        lines.append(Text("No single searched optimization cuts this step's need.", style="dim"))
    plan = b.get("plan")
    if plan and not fits:
        if plan.get("fits"):
            lines.append(
                Text.from_markup(
                    f"Cheapest stack that fits: [bold]{plan['label']}[/bold], needs "
                    f"{format_bytes(plan['need_bytes'], 2)} (cost {100 * (plan.get('cost') or 0):.1f}%)"
                )
            )
            spec = model or p.model.get("spec") or p.model.get("name")
            lines.append(
                Text(
                    f"Write it as a recipe: memprof plan {spec} --budget {format_bytes(b['budget_bytes']).replace(' ', '')} "
                    "--write-recipe plan.yaml (same step options)",
                    style="dim",
                )
            )
        else:
            closest = (
                f" the closest needs {format_bytes(plan['need_bytes'], 2)}" if plan.get("need_bytes") else ""
            )
            lines.append(Text(f"No searched stack fits;{closest}.", style="red"))
            for d in plan.get("dominant") or []:
                lines.append(Text(f"• {d}", style="dim"))
    if not fits:
        lines.append(Text(f"{b.get('runs', 0)} sim runs; {b.get('engine', '')}", style="dim"))
    return Panel(Group(*lines), title=title, title_align="left", border_style="green" if fits else "red")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def budget_html(p: Profile) -> str:
    """The diagnosis as an HTML fragment (the report's Budget section)."""
    b = p.budget
    if not b or "need_bytes" not in b:
        return ""
    fits = b.get("fits")
    out = [
        f"<div class='{'' if fits else 'box'}'><p><b>{'Fits' if fits else 'Does not fit'} "
        f"{_e(format_bytes(b['budget_bytes'], 2))}</b>: {_e(_need_line(b))}.</p><p>{_e(b.get('cause', ''))}</p>"
    ]
    c = b.get("crossing")
    if c and not fits:
        out.append(
            f"<p>Live then ({_e(format_bytes(c.get('live_bytes')))}): {_e(_live(c.get('categories') or {}))}</p>"
        )
        mods = c.get("modules") or []
        if mods:
            out.append(
                "<p>Modules holding most then: "
                + _e(", ".join(f"{m['module']} {format_bytes(m['bytes'])}" for m in mods[:5]))
                + "</p>"
            )
    fixes = b.get("fixes") or []
    if fixes:
        rows = "".join(
            f"<tr><td>{i}</td><td>{_e(f['label'])}</td><td class=n>{_e(format_bytes(f['need_bytes'], 2))}</td>"
            f"<td class=n>-{_e(format_bytes(f['cut_bytes'], 2))}</td><td>{'yes' if f['fits'] else 'no'}</td>"
            f"<td>{_e(_cost(f))}</td></tr>"
            for i, f in enumerate(fixes, 1)
        )
        out.append(
            "<p>What would cut that peak most (each alone, projected in sim):</p><table><tr><th>#</th>"
            "<th>Optimization</th><th>Needs</th><th>Cut</th><th>Fits</th><th>Cost</th></tr>"
            + rows
            + "</table>"
        )
    plan = b.get("plan")
    if plan and not fits:
        if plan.get("fits"):
            out.append(
                f"<p>Cheapest stack that fits: <b>{_e(plan['label'])}</b>, needs "
                f"{_e(format_bytes(plan['need_bytes'], 2))}.</p>"
            )
        else:
            out.append("<p class=bad>No searched stack fits.</p>")
    out.append("</div>")
    return "".join(out)
