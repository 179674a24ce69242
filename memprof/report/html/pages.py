"""The HTML pages of the commands: analyze, compare, plan and check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memprof.profile import Profile
from memprof.report.diagnosis import budget_html
from memprof.report.html.figures import (
    CAT_COLORS,
    allocator_figure,
    check_figure,
    modules_figure,
    pareto_figure,
    timeline_figure,
    waterfall_figure,
)
from memprof.report.html.page import Page, esc, table
from memprof.report.timeline import fragmentation_line, host_line, non_tensor_line, outside_allocator_line
from memprof.tracking import CATEGORIES
from memprof.units import format_bytes, format_count

if TYPE_CHECKING:
    from memprof.compare import Comparison
    from memprof.gate import CheckReport
    from memprof.plan import PlanResult


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
            esc(
                f"{m.get('name')} ({m.get('model_type', '')}, {format_count(int(m.get('parameters', 0)))} parameters)"
            ),
        ),
        ("Step", esc(_step_line(p))),
        ("Engine", esc(f"{p.engine} on {p.device}")),
        (
            "Peak allocated",
            f"<b>{esc(format_bytes(p.peak_bytes, 2))}</b>" + (f" in {esc(where)}" if where else ""),
        ),
    ]
    if p.optimizations:
        rows.insert(2, ("Optimizations", esc(", ".join(o["name"] for o in p.optimizations))))
    a = p.allocator or {}
    if p.peak_reserved_bytes is not None:
        how = "allocator model estimate" if a.get("source") == "model" else "measured"
        rows.append(("Peak reserved", esc(f"{format_bytes(p.peak_reserved_bytes, 2)} ({how})")))

    frag = fragmentation_line(a)
    if frag:
        rows.append(("At the allocated peak", esc(frag)))
    hint = (a.get("expandable_segments_hint") or {}).get("message")
    if hint:
        rows.append(("Allocator hint", esc(hint)))
    outside = outside_allocator_line(a)
    if outside:
        rows.append(("Outside the allocator", esc(outside)))
    host = host_line(p.host)
    if host:
        rows.append(("Host memory", esc(host + " (not in the peak)")))
    ov = p.overheads or {}
    if ov.get("non_tensor"):
        rows.append(("Not tensors", esc(non_tensor_line(ov["non_tensor"]))))
    elif ov.get("cublas_workspace_bytes") and not ov.get("included_in_peak", True):
        rows.append(
            (
                "Not in the peak",
                esc(f"cuBLAS workspace {format_bytes(ov['cublas_workspace_bytes'])}; the CUDA context"),
            )
        )
    if p.fit:
        f = p.fit
        verdict = "fits" if f["fits"] else "does not fit"
        left = f"{format_bytes(abs(f['headroom_bytes']))} {'left' if f['fits'] else 'short'}"
        rows.append(
            (
                "Fits?",
                esc(
                    f"{verdict}: reserved {format_bytes(f['reserved_bytes'])} + not tensors "
                    f"{format_bytes(f['non_tensor_bytes'])} = {format_bytes(f['need_bytes'])} of "
                    f"{f['against']}; {left}"
                ),
            )
        )
    return table([(f"<b>{k}</b>", v) for k, v in rows])


def _categories(p: Profile) -> str:
    peak = p.peak_bytes or 1
    rows = []
    for c in CATEGORIES:
        v = int(p.categories_at_peak.get(c, 0))
        rows.append(
            (
                f"<span class=swatch style='background:{CAT_COLORS[c]}'></span>{esc(c)}",
                esc(format_bytes(v)),
                f"{100 * v / peak:.1f}%",
            )
        )
    rows.append(("<b>total</b>", f"<b>{esc(format_bytes(p.peak_bytes))}</b>", "100%"))
    return table(rows, ("Category", "Bytes at the peak", "Share"), numeric=(1, 2))


def profile_page(p: Profile, title: str | None = None) -> Page:
    """The page of one profile (``memprof analyze --html``)."""
    page = Page(title or f"memprof analyze: {p.model.get('name')}", _step_line(p))
    page.raw(_summary(p))
    if p.budget:
        page.h2("Budget")

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
            table(
                [
                    (
                        esc(ph.name) + (" &#9664; peak" if ph.name == p.peak_phase else ""),
                        esc(format_bytes(ph.peak_bytes)),
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
    page = Page(f"memprof compare: {c.model}", f"{_step_line(c.baseline)}; {c.engine} engine")
    page.figure(waterfall_figure(c))
    rows = [("baseline", esc(format_bytes(c.baseline.peak_bytes, 2)), esc(_reserved(c.baseline)), "", "")]
    base = c.baseline.peak_bytes
    for s in c.steps:
        if s.profile is None or s.error:
            rows.append((esc(s.label), "", "", "", esc(s.skipped or s.error or "")))
            continue
        d = s.profile.peak_bytes - base
        flops = ""
        if s.flops and c.baseline_flops:
            flops = f"{100 * (s.flops / c.baseline_flops - 1):+.1f}%"
        rows.append(
            (
                esc(s.label),
                esc(format_bytes(s.profile.peak_bytes, 2)),
                esc(_reserved(s.profile)),
                f"{100 * d / base:+.1f}%" if base else "",
                esc(flops),
            )
        )
    page.raw(
        table(
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
    page = Page(
        f"memprof plan: {r.model}",
        f"budget {format_bytes(b.budget_bytes)} per GPU; usable {format_bytes(b.usable_bytes)} after the CUDA "
        f"context ({format_bytes(b.context_bytes)}, assumed) and the cuBLAS workspace",
    )
    chosen = r.chosen
    if chosen is not None:
        page.raw(
            f"<p>Cheapest plan that fits: <b>{esc(chosen.label)}</b>, needs "
            f"{esc(format_bytes(chosen.need_bytes))} of {esc(format_bytes(b.budget_bytes))} "
            f"(cost {100 * chosen.cost:.1f}%).</p>"
        )
    else:
        page.raw(f"<p class=bad>No plan fits {esc(format_bytes(b.budget_bytes))}.</p>")
        if r.dominant:
            page.notes(r.dominant)
    page.figure(pareto_figure(r))
    rows = [
        (
            esc(c.label),
            esc(c.status),
            esc(format_bytes(c.need_bytes) if c.need_bytes is not None else ""),
            f"{100 * c.cost:.1f}%",
            esc(c.source),
        )
        for c in r.candidates
        if c.source == "measured"
    ]
    page.h2("Combinations measured")
    page.raw(table(rows, ("Combination", "Status", "Needs", "Cost", "Source"), numeric=(2, 3)))
    page.h2("Notes")
    page.notes(r.notes)
    return page.render()


def check_html(rep: CheckReport) -> str:
    """The page of a regression check (``memprof check --html``)."""
    status = "passed" if not rep.regressions else f"{len(rep.regressions)} regression(s)"
    page = Page(f"memprof check: {status}", f"baseline {rep.baseline_path}; tolerance {rep.tolerance}")
    page.figure(check_figure(rep))
    rows = []
    for r in rep.results:
        cls = {"regression": "bad", "improvement": "good"}.get(r.status, "")
        rows.append(
            (
                esc(r.name),
                f"<span class='{cls}'>{esc(r.status)}</span>",
                esc(format_bytes(r.baseline_peak, 2)),
                esc(format_bytes(r.peak, 2)),
                esc(("+" if r.delta >= 0 else "-") + format_bytes(abs(r.delta), 2)),
                esc(", ".join(f"{c} {format_bytes(a)} -> {format_bytes(b2)}" for c, a, b2 in r.categories)),
            )
        )
    page.raw(
        table(
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
