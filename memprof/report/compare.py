"""Rich rendering of a Comparison: the savings ladder and the categories before/after."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprof.compare import Comparison
from memprof.profile import Profile
from memprof.report.terminal import _CAT_STYLE
from memprof.report.timeline import host_line
from memprof.tracking import CATEGORIES
from memprof.units import format_bytes


def _signed_bytes(n: int) -> str:
    if n == 0:
        return "±0 B"
    return ("+" if n > 0 else "-") + format_bytes(abs(n))


def _flops(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}"


def _pct_change(new: float | None, old: float | None) -> str:
    if new is None or old is None or old == 0:
        return ""
    d = 100.0 * (new - old) / old
    return f"{d:+.0f}%" if abs(d) >= 0.5 else "±0%"


_SHORT = {
    "parameters": "params",
    "buffers": "buffers",
    "gradients": "grads",
    "optimizer_state": "optim state",
    "activations": "activations",
    "temporaries": "temps",
    "inputs": "inputs",
}


def _label(s: Any) -> Text:
    """The optimization's name, and below it (dim) the options that differ from the defaults."""
    label = s.label
    if "(" in label:
        name, _, opts = label.partition("(")
        return Text(name + "\n") + Text(opts.rstrip(")"), style="dim")
    return Text(label)


def moved(prev: Profile, cur: Profile, top: int = 2) -> str:
    """The categories whose bytes at the peak changed most, signed."""
    deltas = [(c, cur.categories_at_peak[c] - prev.categories_at_peak[c]) for c in CATEGORIES]
    deltas = [d for d in deltas if abs(d[1]) >= max(1, prev.peak_bytes // 200)]
    deltas.sort(key=lambda d: -abs(d[1]))
    return "\n".join(f"{_SHORT[c]} {_signed_bytes(v)}" for c, v in deltas[:top]) or "-"


def _quality(q: dict[str, Any] | None) -> str:
    """``output rel diff / loss diff / loss diff after two steps`` (see the column header)."""
    if not q:
        return "n/a"

    def f(v: Any) -> str:
        return "-" if v is None else ("0" if v == 0 else f"{v:.0e}")

    text = " / ".join(
        f(q.get(k)) for k in ("output_max_rel_diff", "loss_abs_diff", "loss_after_steps_abs_diff")
    )
    if q.get("text_cosine_mean") is not None:
        text += f"\ncos {q['text_cosine_mean']:.4f} (min {q['text_cosine_min']:.4f})"
    return text


def _secs(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def ladder_table(c: Comparison) -> Table:
    """One row per step: peak, its change, FLOPs and time (change from the row above), quality, what moved."""
    real = c.baseline_seconds is not None
    quality = c.baseline_quality is not None
    # reserved memory: measured (cuda) or modelled (sim); it is what the allocator step moves
    reserved = c.baseline.peak_reserved_bytes is not None
    t = Table(
        title="Savings ladder: each step stacked on the ones above"
        if c.cumulative
        else "Each step alone against the baseline",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        title_style="bold",
        pad_edge=False,
    )
    t.add_column("#", justify="right", style="dim", no_wrap=True, min_width=1)
    t.add_column("step", no_wrap=True)
    for name in ("peak", "change", "vs base") + (("reserved",) if reserved else ()) + ("FLOPs",):
        t.add_column(name, justify="right", no_wrap=True)
    if real:
        t.add_column("time", justify="right", no_wrap=True)
    if quality:
        t.add_column("Δ quality*", no_wrap=True)
    t.add_column("moved at the peak", no_wrap=True)
    blanks = len(t.columns) - 4  # columns between "peak" and the last one

    base = c.baseline
    row: list[Any] = ["0", "baseline", format_bytes(base.peak_bytes), "", "1.00x"]
    if reserved:
        row.append(format_bytes(base.peak_reserved_bytes))
    row.append(_flops(c.baseline_flops))
    if real:
        row.append(_secs(c.baseline_seconds))
    if quality and c.baseline_quality:
        row.append(f"loss {c.baseline_quality['loss']:.4f}")
    t.add_row(*row, "", style="bold")
    prev, prev_flops, prev_s = base, c.baseline_flops, c.baseline_seconds
    for i, s in enumerate(c.steps, 1):
        if s.skipped or s.profile is None or s.error:
            what = Text(
                ("OOM" if s.error.startswith("out of memory") else "failed") if s.error else "skipped",
                style="red" if s.error else "dim",
            )
            reason = Text(s.error or s.skipped or "", style="red" if s.error else "dim")
            t.add_row(str(i), Text(s.label, style="dim"), what, *([""] * blanks), reason)
            t.columns[-1].no_wrap = False
            continue
        p = s.profile
        delta = p.peak_bytes - prev.peak_bytes
        ratio = base.peak_bytes / p.peak_bytes if p.peak_bytes else float("inf")
        row = [
            str(i),
            _label(s),
            format_bytes(p.peak_bytes),
            Text(_signed_bytes(delta), style="green" if delta < 0 else ("red" if delta > 0 else "")),
            f"{ratio:.2f}x",
        ]
        if reserved:
            row.append(format_bytes(p.peak_reserved_bytes))
        row.append(_pct_change(s.flops, prev_flops) or "n/a")
        if real:
            row.append(_pct_change(s.seconds, prev_s) or "n/a")
        if quality:
            row.append(_quality(s.quality))
        t.add_row(*row, moved(prev, p))
        if c.cumulative:
            prev, prev_flops, prev_s = p, s.flops, s.seconds
    return t


def no_saving(c: Comparison) -> list[str]:
    """The steps that ran and did not lower the peak (against the row above, or the baseline)."""
    out = []
    prev = c.baseline
    for s in c.steps:
        if s.profile is None or s.error:
            continue
        d = s.profile.peak_bytes - prev.peak_bytes
        if d >= 0:
            out.append(f"{s.label} ({_signed_bytes(d)})")
        if c.cumulative:
            prev = s.profile
    return out


def categories_before_after(c: Comparison) -> Table:
    base, final = c.baseline, c.final
    t = Table(title="At the peak, by category", box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    t.add_column("category")
    t.add_column("baseline", justify="right")
    t.add_column("final", justify="right")
    t.add_column("change", justify="right")
    for cat in CATEGORIES:
        a, b = base.categories_at_peak[cat], final.categories_at_peak[cat]
        if not a and not b:
            continue
        d = b - a
        t.add_row(
            Text(cat, style=_CAT_STYLE[cat]),
            format_bytes(a),
            format_bytes(b),
            Text(_signed_bytes(d), style="green" if d < 0 else ("red" if d > 0 else "")),
        )
    t.add_row(
        Text("total (peak)", style="bold"),
        format_bytes(base.peak_bytes),
        format_bytes(final.peak_bytes),
        _signed_bytes(final.peak_bytes - base.peak_bytes),
    )
    return t


def sides_before_after(c: Comparison) -> Table:
    """Distillation: memory at the peak by side (student, teacher, loss, other), baseline and final."""
    base, final = c.baseline, c.final
    t = Table(title="At the peak, by side", box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    t.add_column("side")
    t.add_column("baseline", justify="right")
    t.add_column("final", justify="right")
    t.add_column("change", justify="right")
    for side in base.split_at_peak:
        a = sum(base.split_at_peak[side].values())
        b = sum(final.split_at_peak.get(side, {}).values())
        d = b - a
        t.add_row(
            side,
            format_bytes(a),
            format_bytes(b),
            Text(_signed_bytes(d), style="green" if d < 0 else ("red" if d > 0 else "")),
        )
    return t


def render_compare(c: Comparison, console: Console) -> None:
    b = c.baseline
    w = b.workload
    desc = c.recipe.get("description") or "recipe"
    console.print(
        f"[bold]memprof compare[/bold]  {c.model}  ·  {desc}  ·  {c.engine} engine  ·  "
        f"{w.get('mode')} b{w.get('batch_size')} s{w.get('seq_len')} {w.get('dtype')} {w.get('optimizer')}"
        + (f"  ·  teacher {b.model['teacher']['name']}" if b.model.get("teacher") else "")
        + (f"  ·  {w['world_size']} ranks, per-rank memory" if w.get("world_size", 1) > 1 else "")
    )
    console.print(ladder_table(c))
    ran = [s for s in c.steps if s.profile is not None and not s.error]
    if c.cumulative:
        console.print(categories_before_after(c))
        if c.baseline.split_at_peak and c.final.split_at_peak:
            console.print(sides_before_after(c))
        final = c.final
        ratio = b.peak_bytes / final.peak_bytes if final.peak_bytes else float("inf")
        last = ran[-1] if ran else None
        flops = _pct_change(last.flops, c.baseline_flops) if last else ""
        console.print(
            f"Peak {format_bytes(b.peak_bytes)} → [bold]{format_bytes(final.peak_bytes)}[/bold] "
            f"({ratio:.2f}x less)" + (f", FLOPs {flops}" if flops else "")
        )
    elif ran:
        best = min(ran, key=lambda s: s.profile.peak_bytes)  # type: ignore[union-attr]
        low = best.profile.peak_bytes  # type: ignore[union-attr]
        console.print(
            f"Lowest peak alone: [bold]{best.label}[/bold], {format_bytes(b.peak_bytes)} → "
            f"[bold]{format_bytes(low)}[/bold] ({b.peak_bytes / low if low else float('inf'):.2f}x less)"
        )
    shown = None
    for s in ran:
        host = host_line(s.profile.host)  # type: ignore[union-attr]
        if host and (host != shown or not c.cumulative):  # stacked rows keep the rows above' host side
            console.print(f"Host memory of {s.label}: {host} (not in its peak)")
            shown = host
    flat = no_saving(c)
    if flat:
        console.print(
            "[yellow]• no memory saved by: "
            + "; ".join(flat)
            + " (what they do instead is in the notes)[/yellow]"
        )
    seen = set(b.notes)
    extra: list[str] = []
    for s in ran:
        for n in s.profile.notes:  # type: ignore[union-attr]
            if n not in seen:
                seen.add(n)
                extra.append(n)
    skipped = [s for s in c.steps if s.skipped]
    for n in extra:
        console.print(f"[dim]• {n}[/dim]")
    if skipped:
        console.print(
            f"[dim]• {len(skipped)} step(s) skipped: they do not apply here (reason in the table)[/dim]"
        )
    console.print(
        "[dim]• FLOPs and time of a step: its change from "
        + ("the row above" if c.cumulative else "the baseline")
        + "[/dim]"
    )
    if c.engine == "sim":
        console.print(
            "[dim]• sim engine: FLOPs are counted; step time and quality need a real engine (cpu, cuda); "
            "reserved is the caching-allocator model's estimate[/dim]"
        )
    else:
        console.print(
            "[dim]• *Δ quality against the baseline, same inputs and seed: max relative difference of the "
            "output / absolute loss difference (eval-mode forward) / loss difference after two training steps[/dim]"
        )
        texts = next((s.quality.get("texts") for s in c.steps if s.quality and s.quality.get("texts")), None)
        if texts:
            console.print(
                f"[dim]• cos: cosine similarity of each text's mean-pooled output to the baseline's, over the "
                f"first {texts} texts of the data (mean, and the lowest)[/dim]"
            )
