"""The plotly figures of the HTML reports, each drawn from a profile's (or a result's) plain data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memprof.errors import EnvironmentProblem
from memprof.plan import pareto as frontier_of
from memprof.profile import Profile
from memprof.report.timeline import totals
from memprof.tracking import CATEGORIES
from memprof.units import format_bytes, format_count

if TYPE_CHECKING:
    from memprof.compare import Comparison
    from memprof.gate import CheckReport
    from memprof.plan import PlanResult

#: category colours (the terminal's, as CSS colours)
CAT_COLORS = {
    "parameters": "#17becf",
    "buffers": "#7f7f7f",
    "gradients": "#d62ecf",
    "optimizer_state": "#e0b000",
    "activations": "#2ca02c",
    "temporaries": "#d62728",
    "inputs": "#1f77b4",
}
PHASE_COLORS = {"forward": "#2ca02c", "backward": "#9467bd", "optimizer": "#e0b000"}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise EnvironmentProblem(
            "--html needs plotly: pip install plotly (or: pip install -e . in a checkout)"
        ) from None
    return go


def unit_for(top: float) -> tuple[str, int]:
    """The binary unit that shows ``top`` bytes as a number of at least 1."""
    for name, size in _UNITS:
        if top >= size:
            return name, size
    return "B", 1


# -- figures -------------------------------------------------------------------------------------


def _layout(fig: Any, title: str, unit: str, *, height: int = 440, x_title: str = "") -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=height,
        margin={"l": 70, "r": 30, "t": 60, "b": 50},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.18},
        font={"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
    )
    fig.update_yaxes(title_text=unit, rangemode="tozero")
    if x_title:
        fig.update_xaxes(title_text=x_title)


def timeline_figure(p: Profile, title: str = "Memory over the step") -> Any | None:
    """Live bytes stacked by category over the step's ops; phases shaded; the peak marked.

    Returns:
        A plotly figure, or None when the profile has no timeline.
    """
    tl = p.timeline
    if not tl or not tl.get("op"):
        return None
    go = _go()

    ops = tl["op"]
    tot = totals(tl)
    alloc = p.allocator or {}
    reserved = alloc.get("timeline") if (alloc.get("timeline") or {}).get("x") == "op" else None
    budget = (p.budget or {}).get("usable_bytes")
    top = max([*tot, *(reserved or {}).get("reserved", []), budget or 0, 1])
    unit, size = unit_for(top)
    modules = tl.get("modules", [])
    where = [modules[m] if 0 <= m < len(modules) else "" for m in tl.get("module", [])]
    fig = go.Figure()
    first = True
    for cat in CATEGORIES:
        ys = tl["categories"].get(cat) or []
        if not any(ys):
            continue
        fig.add_trace(
            go.Scatter(
                x=ops,
                y=[v / size for v in ys],
                name=cat,
                mode="lines",
                stackgroup="live",
                line={"width": 0.6, "color": CAT_COLORS[cat], "shape": "hv"},
                customdata=where if first else None,
                hovertemplate=(
                    ("op %{x}<br>module: %{customdata}<br>" if first else "")
                    + f"{cat}: %{{y:.3f}} {unit}<extra></extra>"
                ),
            )
        )
        first = False
    for ph in tl.get("phases", []):
        if ph["end"] <= ph["start"]:
            continue
        fig.add_vrect(
            x0=ph["start"],
            x1=ph["end"],
            fillcolor=PHASE_COLORS.get(ph["name"], "#17becf"),
            opacity=0.07,
            layer="below",
            line_width=0,
            annotation_text=ph["name"],
            annotation_position="top left",
            annotation_font_size=11,
        )
    if reserved and reserved.get("op"):
        src = "allocator model" if alloc.get("source") == "model" else "allocator"
        fig.add_trace(
            go.Scatter(
                x=reserved["op"],
                y=[v / size for v in reserved["reserved"]],
                name=f"reserved ({src})",
                mode="lines",
                line={"color": "#444", "width": 1.4, "dash": "dot", "shape": "hv"},
                hovertemplate=f"reserved: %{{y:.3f}} {unit}<extra></extra>",
            )
        )
    if budget:
        fig.add_hline(
            y=budget / size,
            line={"color": "#d62728", "dash": "dash", "width": 1.5},
            annotation_text=f"usable budget {format_bytes(budget)}",
            annotation_position="top right",
        )
    crossing = (p.budget or {}).get("crossing") or {}
    if budget and crossing.get("op") is not None:
        inside = crossing.get("module") or ""
        fig.add_vline(
            x=crossing["op"],
            line={"color": "#d62728", "dash": "dot", "width": 1},
            annotation_text=f"budget crossed ({crossing.get('phase')}{', ' + inside if inside else ''})",
            annotation_position="bottom right",
            annotation_font_size=10,
        )
    k = tl.get("peak_index", -1)
    if 0 <= k < len(ops):
        live = {c: tl["categories"][c][k] for c in CATEGORIES if tl["categories"].get(c, [0] * (k + 1))[k]}
        mod = p.peak_module if p.peak_module and p.peak_module != "<model>" else None
        lines = [f"<b>peak {format_bytes(tot[k], 2)}</b>"]
        lines.append(", ".join(x for x in (p.peak_phase, mod) if x) or "")
        lines += [f"{c}: {format_bytes(v)}" for c, v in sorted(live.items(), key=lambda kv: -kv[1])[:4]]
        fig.add_trace(
            go.Scatter(
                x=[ops[k]],
                y=[tot[k] / size],
                mode="markers",
                name="peak",
                marker={"symbol": "triangle-down", "size": 13, "color": "#111"},
                hovertext=["<br>".join(lines)],
                hoverinfo="text",
                showlegend=False,
            )
        )
        fig.add_annotation(
            x=ops[k],
            y=tot[k] / size,
            text="<br>".join(x for x in lines if x),
            showarrow=True,
            arrowhead=2,
            ax=110,
            ay=-24,
            xanchor="left",
            align="left",
            bgcolor="rgba(255,255,255,0.85)",
            bordercolor="#111",
            borderwidth=1,
            font={"size": 11},
        )
    _layout(fig, title, unit, x_title=f"ops of the step ({format_count(int(tl.get('ops') or 0))})")
    # headroom above the peak for the phase labels and the peak's note
    fig.update_layout(hovermode="x unified", legend={"traceorder": "normal"})
    fig.update_yaxes(range=[0, 1.3 * top / size])
    return fig


def allocator_figure(p: Profile) -> Any | None:
    """Allocated against reserved over the allocator's own events (the cuda engine's history)."""
    a = p.allocator or {}
    tl = a.get("timeline") or {}
    if not tl.get("allocated") or tl.get("x") == "op":
        return None
    go = _go()
    xs = tl.get(tl.get("x", "event")) or list(range(len(tl["allocated"])))
    unit, size = unit_for(max([*tl.get("reserved", []), *tl["allocated"], 1]))
    fig = go.Figure()
    for key, color in (("allocated", "#1f77b4"), ("reserved", "#444")):
        if tl.get(key):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[v / size for v in tl[key]],
                    name=key,
                    mode="lines",
                    line={"color": color, "shape": "hv"},
                    hovertemplate=f"{key}: %{{y:.3f}} {unit}<extra></extra>",
                )
            )
    _layout(fig, "Allocated and reserved (caching allocator)", unit, height=340, x_title="allocator events")
    return fig


def modules_figure(p: Profile, top: int = 15) -> Any | None:
    """The modules holding the most memory at the peak (submodules included), activations apart."""
    mods = [m for m in p.modules if m.name != "<model>" and m.bytes_at_peak > 0]
    if not mods:
        return None
    go = _go()
    mods.sort(key=lambda m: (-m.bytes_at_peak, m.name))
    mods = mods[:top]
    unit, size = unit_for(max(m.bytes_at_peak for m in mods))
    names = [f"{m.name} ({m.type})" for m in mods]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            y=names,
            x=[m.activation_bytes / size for m in mods],
            name="activations",
            orientation="h",
            marker_color=CAT_COLORS["activations"],
            hovertemplate=f"%{{y}}<br>activations: %{{x:.3f}} {unit}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            y=names,
            x=[max(0, m.bytes_at_peak - m.activation_bytes) / size for m in mods],
            name="parameters, gradients, state, temporaries",
            orientation="h",
            marker_color="#9aa5b1",
            hovertemplate=f"%{{y}}<br>other: %{{x:.3f}} {unit}<extra></extra>",
        )
    )
    _layout(fig, f"Top {len(mods)} modules by memory held at the peak", unit, height=120 + 26 * len(mods))
    fig.update_layout(barmode="stack", margin={"l": 20})
    fig.update_yaxes(autorange="reversed", title_text="", automargin=True)
    fig.update_xaxes(title_text=unit)
    return fig


def waterfall_figure(c: Comparison) -> Any | None:
    """Each step's effect on the peak: a waterfall when stacked, a bar each when separate."""
    rows = [(s.label, s.profile.peak_bytes) for s in c.steps if s.profile is not None and not s.error]
    if not rows:
        return None
    go = _go()
    base = c.baseline.peak_bytes
    unit, size = unit_for(max([base, *(v for _, v in rows)]))
    if c.cumulative:
        prev = base
        deltas = []
        for _, v in rows:
            deltas.append(v - prev)
            prev = v
        fig = go.Figure(
            go.Waterfall(
                x=["baseline", *(lbl for lbl, _ in rows), "after all steps"],
                measure=["absolute", *(["relative"] * len(rows)), "total"],
                y=[base / size, *(d / size for d in deltas), 0],
                text=[
                    format_bytes(base),
                    *(f"{d:+,} B".replace(",", " ") for d in deltas),
                    format_bytes(prev),
                ],
                textposition="outside",
                decreasing={"marker": {"color": "#2ca02c"}},
                increasing={"marker": {"color": "#d62728"}},
                totals={"marker": {"color": "#1f77b4"}},
                hovertemplate=f"%{{x}}<br>%{{y:.3f}} {unit}<extra></extra>",
            )
        )
        fig.update_traces(
            text=[
                format_bytes(base),
                *(("-" if d < 0 else "+") + format_bytes(abs(d)) for d in deltas),
                format_bytes(prev),
            ]
        )
        title = "Peak allocated, step by step (each stacked on those before it)"
    else:
        fig = go.Figure(
            go.Bar(
                x=["baseline", *(lbl for lbl, _ in rows)],
                y=[base / size, *(v / size for _, v in rows)],
                text=[format_bytes(base), *(format_bytes(v) for _, v in rows)],
                textposition="outside",
                marker_color=["#1f77b4", *("#2ca02c" if v <= base else "#d62728" for _, v in rows)],
                hovertemplate=f"%{{x}}<br>%{{y:.3f}} {unit}<extra></extra>",
            )
        )
        title = "Peak allocated, each step alone against the baseline"
    _layout(fig, title, unit)
    fig.update_layout(showlegend=False)
    return fig


def pareto_figure(r: PlanResult) -> Any | None:
    """Every measured combination: memory needed against cost; the frontier and the budget."""
    cands = [c for c in r.candidates if c.source == "measured" and c.need_bytes is not None]
    if not cands:
        return None
    go = _go()
    budget = r.budget.budget_bytes
    unit, size = unit_for(max([budget, *(c.need_bytes or 0 for c in cands)]))
    fig = go.Figure()
    groups: dict[str, list[Any]] = {}
    for c in cands:
        groups.setdefault("fits" if c.fits else c.status, []).append(c)
    colors = {"fits": "#2ca02c", "does not fit": "#d62728", "over max overhead": "#e0b000"}
    for status, cs in groups.items():
        fig.add_trace(
            go.Scatter(
                x=[c.cost * 100 for c in cs],
                y=[(c.need_bytes or 0) / size for c in cs],
                mode="markers",
                name=status,
                marker={
                    "size": 10,
                    "color": colors.get(status, "#7f7f7f"),
                    "line": {"width": 1, "color": "#333"},
                },
                text=[c.label for c in cs],
                hovertemplate=f"%{{text}}<br>cost %{{x:.1f}}%<br>needs %{{y:.3f}} {unit}<extra></extra>",
            )
        )

    # the frontier over every plan measured, those that fit and those that do not, by cost
    pareto = sorted(frontier_of([*r.frontier, *r.plans]), key=lambda c: c.cost)
    if len(pareto) > 1:
        fig.add_trace(
            go.Scatter(
                x=[c.cost * 100 for c in pareto],
                y=[(c.need_bytes or 0) / size for c in pareto],
                mode="lines",
                name="Pareto frontier",
                line={"color": "#555", "dash": "dot", "shape": "hv"},
                hoverinfo="skip",
            )
        )
    chosen = r.chosen
    if chosen is not None and chosen.need_bytes is not None:
        fig.add_trace(
            go.Scatter(
                x=[chosen.cost * 100],
                y=[chosen.need_bytes / size],
                mode="markers",
                name="chosen plan",
                marker={
                    "symbol": "star",
                    "size": 18,
                    "color": "#1f77b4",
                    "line": {"width": 1, "color": "#111"},
                },
                text=[chosen.label],
                hovertemplate=f"chosen: %{{text}}<br>needs %{{y:.3f}} {unit}<extra></extra>",
            )
        )
    fig.add_hline(
        y=budget / size,
        line={"color": "#d62728", "dash": "dash"},
        annotation_text=f"budget {format_bytes(budget)}",
        annotation_position="top right",
    )
    _layout(
        fig,
        "Plans measured: memory needed against cost",
        unit,
        x_title="cost (FLOP overhead + side costs, %)",
    )
    return fig


def check_figure(rep: CheckReport) -> Any | None:
    """Each workload's peak now against its baseline, with the tolerance above the baseline."""
    rows = rep.results
    if not rows:
        return None
    go = _go()
    unit, size = unit_for(max([1, *(max(r.baseline_peak + r.allowed, r.peak) for r in rows)]))
    names = [r.name for r in rows]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=names,
            y=[r.baseline_peak / size for r in rows],
            name="baseline",
            marker_color="#9aa5b1",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [r.allowed / size for r in rows],
                "arrayminus": [0] * len(rows),
            },
            hovertemplate=f"%{{x}}<br>baseline %{{y:.3f}} {unit}<extra></extra>",
        )
    )
    colors = {"ok": "#2ca02c", "regression": "#d62728", "improvement": "#1f77b4"}
    fig.add_trace(
        go.Bar(
            x=names,
            y=[r.peak / size for r in rows],
            name="now",
            marker_color=[colors.get(r.status, "#7f7f7f") for r in rows],
            text=[r.status for r in rows],
            textposition="outside",
            hovertemplate=f"%{{x}}<br>now %{{y:.3f}} {unit}<extra></extra>",
        )
    )
    _layout(fig, f"Peak against the baseline (error bars: the tolerance, {rep.tolerance})", unit)
    fig.update_layout(barmode="group")
    return fig
