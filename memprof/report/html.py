"""Self-contained HTML reports with plotly charts: analyze, compare, plan and check.

One file, opened without a network: plotly.js is inlined once per page (about
4.5 MiB), every chart is a plotly figure drawn from the profile's plain data
(never hand-drawn). Display only: no measurement.

Each page records script errors (``window.onerror``) and, once the charts are
drawn, counts them into ``<body data-charts=N data-errors=M>``, so a headless
browser can check that the page rendered (``tests/test_html.py``).

Charts:

* the memory timeline of the step: live bytes stacked by category over the
  step's ops, the phases shaded, the peak marked with its module and the
  categories live then; the allocator's reserved memory over it where the sim
  engine modelled it (cuda: its own chart over the allocator's events), and the
  usable budget when one was given;
* modules by memory held at the peak (activations and the rest);
* compare: a waterfall of the recipe's steps (stacked) or a bar per step
  (``--separate``), and the baseline's and the last step's timelines;
* plan: the combinations measured, memory needed against cost, the Pareto
  frontier and the budget;
* check: each workload's peak against its baseline, and the tolerance.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memprof._version import __version__
from memprof.errors import EnvironmentProblem
from memprof.profile import Profile
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


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


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
    from memprof.report.timeline import totals

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
    from memprof.plan import pareto as frontier_of

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


# -- pages ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;color:#1b1f24;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px} table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{padding:4px 10px;border-bottom:1px solid #eef0f2;text-align:left;vertical-align:top} th{background:#f6f8fa}
td.n{text-align:right;font-variant-numeric:tabular-nums} .chart{margin:8px 0 20px}
.bad{color:#b42318;font-weight:600} .good{color:#1a7f37;font-weight:600} .box{border:1px solid #f1aeb5;background:#fff5f5;padding:10px 14px;border-radius:6px}
ul.notes{color:#57606a;font-size:13px} footer{color:#8c959f;font-size:12px;margin-top:32px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
"""

_ERRORS_JS = (
    "window.__memprofErrors=[];"
    "window.addEventListener('error',function(e){window.__memprofErrors.push(String(e.message||e));});"
)
_DONE_JS = """
(function(){function done(){var n=0;document.querySelectorAll('.js-plotly-plot').forEach(function(d){
if(d.querySelector('svg.main-svg')){n++;}});document.body.setAttribute('data-charts',String(n));
document.body.setAttribute('data-errors',String(window.__memprofErrors.length));
if(window.__memprofErrors.length){document.body.setAttribute('data-error-text',window.__memprofErrors.join(' | '));}}
if(document.readyState==='complete'){setTimeout(done,0);}else{window.addEventListener('load',function(){setTimeout(done,0);});}})();
"""


def _table(
    rows: Sequence[Sequence[Any]], head: Sequence[str] | None = None, numeric: Sequence[int] = ()
) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append(
            "<tr>"
            + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r))
            + "</tr>"
        )
    out.append("</table>")
    return "".join(out)


class _Page:
    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.parts: list[str] = []
        self.charts = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{_esc(text)}</h2>")

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure(self, fig: Any | None) -> None:
        if fig is None:
            return
        self.charts += 1
        self.parts.append(
            '<div class="chart">'
            + fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"chart{self.charts}",
                config={"displaylogo": False, "responsive": True},
            )
            + "</div>"
        )

    def notes(self, notes: Sequence[str]) -> None:
        if notes:
            self.parts.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")

    def render(self) -> str:
        js = ""
        if self.charts:
            from plotly.offline import get_plotlyjs

            js = get_plotlyjs()
        return (
            "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{_esc(self.title)}</title>"
            f"<style>{_CSS}</style><script>{_ERRORS_JS}</script>"
            + (f'<script type="text/javascript">{js}</script>' if js else "")
            + "</head>"
            f"<body data-expected-charts={self.charts}><h1>{_esc(self.title)}</h1>"
            f"<p class=sub>{_esc(self.subtitle)}</p>"
            + "".join(self.parts)
            + f"<footer>memprof {__version__}: every figure here was measured or traced from the model's code."
            " This file is self-contained: it needs no network.</footer>"
            f"<script>{_DONE_JS}</script></body></html>\n"
        )


def _step_line(p: Profile) -> str:
    w = p.workload or {}
    if not w:
        return ""
    s = f"{w.get('mode')}, batch {w.get('batch_size')} x seq {w.get('seq_len')}, {w.get('dtype')}"
    if w.get("mode") in ("train", "distill"):
        s += f", optimizer {w.get('optimizer')}"
    if (w.get("world_size") or 1) > 1:
        s += f", {w['world_size']} ranks (per rank)"
    return s


def _summary(p: Profile) -> str:
    m = p.model
    where = ", ".join(x for x in (p.peak_phase, p.peak_module if p.peak_module != "<model>" else None) if x)
    rows = [
        (
            "Model",
            _esc(
                f"{m.get('name')} ({m.get('model_type', '')}, {format_count(int(m.get('parameters', 0)))} parameters)"
            ),
        ),
        ("Step", _esc(_step_line(p))),
        ("Engine", _esc(f"{p.engine} on {p.device}")),
        (
            "Peak allocated",
            f"<b>{_esc(format_bytes(p.peak_bytes, 2))}</b>" + (f" in {_esc(where)}" if where else ""),
        ),
    ]
    if p.optimizations:
        rows.insert(2, ("Optimizations", _esc(", ".join(o["name"] for o in p.optimizations))))
    a = p.allocator or {}
    if p.peak_reserved_bytes is not None:
        how = "allocator model estimate" if a.get("source") == "model" else "measured"
        rows.append(("Peak reserved", _esc(f"{format_bytes(p.peak_reserved_bytes, 2)} ({how})")))
    from memprof.report.timeline import fragmentation_line

    frag = fragmentation_line(a)
    if frag:
        rows.append(("At the allocated peak", _esc(frag)))
    hint = (a.get("expandable_segments_hint") or {}).get("message")
    if hint:
        rows.append(("Allocator hint", _esc(hint)))
    ov = p.overheads or {}
    if ov.get("cublas_workspace_bytes") and not ov.get("included_in_peak", True):
        rows.append(
            (
                "Not in the peak",
                _esc(f"cuBLAS workspace {format_bytes(ov['cublas_workspace_bytes'])}; the CUDA context"),
            )
        )
    return _table([(f"<b>{k}</b>", v) for k, v in rows])


def _categories(p: Profile) -> str:
    peak = p.peak_bytes or 1
    rows = []
    for c in CATEGORIES:
        v = int(p.categories_at_peak.get(c, 0))
        rows.append(
            (
                f"<span class=swatch style='background:{CAT_COLORS[c]}'></span>{_esc(c)}",
                _esc(format_bytes(v)),
                f"{100 * v / peak:.1f}%",
            )
        )
    rows.append(("<b>total</b>", f"<b>{_esc(format_bytes(p.peak_bytes))}</b>", "100%"))
    return _table(rows, ("Category", "Bytes at the peak", "Share"), numeric=(1, 2))


def profile_page(p: Profile, title: str | None = None) -> _Page:
    """The page of one profile (``memprof analyze --html``)."""
    page = _Page(title or f"memprof analyze: {p.model.get('name')}", _step_line(p))
    page.raw(_summary(p))
    if p.budget:
        page.h2("Budget")
        from memprof.report.diagnosis import budget_html

        page.raw(budget_html(p))
    page.h2("Memory over the step")
    page.figure(timeline_figure(p))
    if p.timeline is None:
        page.raw("<p class=sub>This profile has no timeline (written before memprof kept one).</p>")
    page.figure(allocator_figure(p))
    page.h2("At the peak")
    page.raw(_categories(p))
    page.figure(modules_figure(p))
    if p.phases:
        page.raw(
            _table(
                [
                    (
                        _esc(ph.name) + (" &#9664; peak" if ph.name == p.peak_phase else ""),
                        _esc(format_bytes(ph.peak_bytes)),
                    )
                    for ph in p.phases
                ],
                ("Phase", "Peak"),
                numeric=(1,),
            )
        )
    page.h2("Notes")
    page.notes(p.notes)
    return page


def profile_html(p: Profile) -> str:
    """One self-contained HTML page for a profile."""
    return profile_page(p).render()


def compare_html(c: Comparison) -> str:
    """The page of a comparison (``memprof compare --html``)."""
    page = _Page(f"memprof compare: {c.model}", f"{_step_line(c.baseline)}; {c.engine} engine")
    page.figure(waterfall_figure(c))
    rows = [("baseline", _esc(format_bytes(c.baseline.peak_bytes, 2)), _esc(_reserved(c.baseline)), "", "")]
    base = c.baseline.peak_bytes
    for s in c.steps:
        if s.profile is None or s.error:
            rows.append((_esc(s.label), "", "", "", _esc(s.skipped or s.error or "")))
            continue
        d = s.profile.peak_bytes - base
        flops = ""
        if s.flops and c.baseline_flops:
            flops = f"{100 * (s.flops / c.baseline_flops - 1):+.1f}%"
        rows.append(
            (
                _esc(s.label),
                _esc(format_bytes(s.profile.peak_bytes, 2)),
                _esc(_reserved(s.profile)),
                f"{100 * d / base:+.1f}%" if base else "",
                _esc(flops),
            )
        )
    page.raw(
        _table(
            rows,
            ("Step", "Peak allocated", "Peak reserved", "vs baseline", "FLOPs / note"),
            numeric=(1, 2, 3),
        )
    )
    page.h2("Memory over the step: the baseline")
    page.figure(timeline_figure(c.baseline, "Baseline"))
    final = c.final
    if final is not c.baseline and c.cumulative:
        page.h2("Memory over the step: after every step")
        page.figure(timeline_figure(final, "After every step of the recipe"))
    page.h2("Notes")
    page.notes(c.baseline.notes)
    return page.render()


def _reserved(p: Profile) -> str:
    return format_bytes(p.peak_reserved_bytes, 2) if p.peak_reserved_bytes is not None else ""


def plan_html(r: PlanResult) -> str:
    """The page of a plan search (``memprof plan --html``)."""
    b = r.budget
    page = _Page(
        f"memprof plan: {r.model}",
        f"budget {format_bytes(b.budget_bytes)} per GPU; usable {format_bytes(b.usable_bytes)} after the CUDA "
        f"context ({format_bytes(b.context_bytes)}, assumed) and the cuBLAS workspace",
    )
    chosen = r.chosen
    if chosen is not None:
        page.raw(
            f"<p>Cheapest plan that fits: <b>{_esc(chosen.label)}</b>, needs "
            f"{_esc(format_bytes(chosen.need_bytes))} of {_esc(format_bytes(b.budget_bytes))} "
            f"(cost {100 * chosen.cost:.1f}%).</p>"
        )
    else:
        page.raw(f"<p class=bad>No plan fits {_esc(format_bytes(b.budget_bytes))}.</p>")
        if r.dominant:
            page.notes(r.dominant)
    page.figure(pareto_figure(r))
    rows = [
        (
            _esc(c.label),
            _esc(c.status),
            _esc(format_bytes(c.need_bytes) if c.need_bytes is not None else ""),
            f"{100 * c.cost:.1f}%",
            _esc(c.source),
        )
        for c in r.candidates
        if c.source == "measured"
    ]
    page.h2("Combinations measured")
    page.raw(_table(rows, ("Combination", "Status", "Needs", "Cost", "Source"), numeric=(2, 3)))
    page.h2("Notes")
    page.notes(r.notes)
    return page.render()


def check_html(rep: CheckReport) -> str:
    """The page of a regression check (``memprof check --html``)."""
    status = "passed" if not rep.regressions else f"{len(rep.regressions)} regression(s)"
    page = _Page(f"memprof check: {status}", f"baseline {rep.baseline_path}; tolerance {rep.tolerance}")
    page.figure(check_figure(rep))
    rows = []
    for r in rep.results:
        cls = {"regression": "bad", "improvement": "good"}.get(r.status, "")
        rows.append(
            (
                _esc(r.name),
                f"<span class='{cls}'>{_esc(r.status)}</span>",
                _esc(format_bytes(r.baseline_peak, 2)),
                _esc(format_bytes(r.peak, 2)),
                _esc(("+" if r.delta >= 0 else "-") + format_bytes(abs(r.delta), 2)),
                _esc(", ".join(f"{c} {format_bytes(a)} -> {format_bytes(b2)}" for c, a, b2 in r.categories)),
            )
        )
    page.raw(
        _table(
            rows,
            ("Workload", "Status", "Baseline", "Now", "Change", "Categories that moved"),
            numeric=(2, 3, 4),
        )
    )
    for r in rep.results:
        if r.profile is not None and r.profile.timeline:
            page.h2(f"Memory over the step: {r.name}")
            page.figure(timeline_figure(r.profile, r.name))
    if rep.version_changes:
        page.notes([f"{k}: {a} -> {b2}" for k, (a, b2) in rep.version_changes.items()])
    return page.render()
