"""Renderers of a :class:`memprof.gate.CheckReport`: terminal, JUnit XML, GitHub annotations and summary."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprof.gate import CheckReport, WorkloadCheck
from memprof.units import format_bytes

_STYLE = {"ok": "green", "regression": "bold red", "improvement": "cyan"}


def _signed(n: int) -> str:
    return "±0 B" if n == 0 else ("+" if n > 0 else "-") + format_bytes(abs(n))


def _pct(r: WorkloadCheck) -> str:
    return f"{100 * r.delta / r.baseline_peak:+.2f}%" if r.baseline_peak else "n/a"


def why(r: WorkloadCheck, top: int = 3) -> str:
    """What moved, in one line: the categories and the modules that grew."""
    parts = []
    if r.categories:
        parts.append(", ".join(f"{c} {_signed(b - a)}" for c, a, b in r.categories[:top]))
    grew = [(m, a, b) for m, a, b in r.modules if b > a]
    if grew and r.status == "regression":
        parts.append("grew: " + ", ".join(f"{m} {_signed(b - a)}" for m, a, b in grew[:top]))
    if r.phase[0] != r.phase[1]:
        parts.append(f"peak moved from {r.phase[0]} to {r.phase[1]}")
    return "; ".join(parts)


def render_text(rep: CheckReport, console: Console) -> None:
    t = Table(
        title=f"memprof check  ·  {rep.baseline_path}  ·  tolerance {rep.tolerance}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        title_style="bold",
    )
    for col, just in (
        ("workload", "left"),
        ("baseline", "right"),
        ("now", "right"),
        ("change", "right"),
        ("", "right"),
        ("status", "left"),
        ("what moved", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rep.results:
        t.add_row(
            r.name,
            format_bytes(r.baseline_peak),
            format_bytes(r.peak),
            _signed(r.delta),
            _pct(r),
            Text(r.status, style=_STYLE[r.status]),
            why(r),
        )
    console.print(t)
    for r in rep.regressions:
        console.print(
            f"[bold red]✗ {r.name}[/bold red]: peak {_signed(r.delta)} ({_pct(r)}), above the "
            f"{format_bytes(r.allowed)} allowed"
        )
        for c, a, b in r.categories:
            console.print(f"    {c:<16} {format_bytes(a):>12} → {format_bytes(b):>12}  {_signed(b - a)}")
        for m, a, b in r.modules:
            console.print(
                f"    module {m}: {format_bytes(a)} → {format_bytes(b)} at the peak ({_signed(b - a)})"
            )
    if rep.improvements:
        console.print(
            "[cyan]• lower than the baseline by more than the tolerance: "
            + ", ".join(r.name for r in rep.improvements)
            + ". Refresh it: memprof baseline --update --output "
            + (rep.baseline_path or "BASELINE")
            + "[/cyan]"
        )
    for k, (was, now) in rep.version_changes.items():
        console.print(
            f"[yellow]• {k} differs from the baseline's ({was} → {now}): kernels and memory can move with versions "
            "(--strict-versions makes this fail)[/yellow]"
        )
    n = len(rep.regressions)
    console.print(
        f"[bold red]FAILED: {n} regression(s) of {len(rep.results)} workload(s)[/bold red]"
        if n
        else f"[bold green]passed: {len(rep.results)} workload(s) within {rep.tolerance}[/bold green]"
    )


def junit(rep: CheckReport) -> str:
    """A JUnit XML document: one test case a workload, a failure for each regression."""
    suite = ET.Element(
        "testsuite",
        name="memprof check",
        tests=str(len(rep.results)),
        failures=str(len(rep.regressions)),
        errors="0",
        skipped="0",
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="baseline", value=rep.baseline_path)
    ET.SubElement(props, "property", name="tolerance", value=rep.tolerance)
    for k, (a, b) in rep.version_changes.items():
        ET.SubElement(props, "property", name=f"version_change.{k}", value=f"{a} -> {b}")
    for r in rep.results:
        case = ET.SubElement(suite, "testcase", classname="memprof.check", name=r.name, time="0")
        out = ET.SubElement(case, "system-out")
        out.text = f"peak {r.baseline_peak} -> {r.peak} bytes ({_signed(r.delta)}, {_pct(r)}); status {r.status}; {why(r)}"
        if r.status == "regression":
            fail = ET.SubElement(
                case,
                "failure",
                type="MemoryRegression",
                message=f"peak {format_bytes(r.baseline_peak)} -> {format_bytes(r.peak)} ({_pct(r)})",
            )
            fail.text = "\n".join(
                [f"{c}: {a} -> {b}" for c, a, b in r.categories]
                + [f"module {m}: {a} -> {b}" for m, a, b in r.modules]
            )
    ET.indent(suite)
    # ElementTree escapes <, & and quotes but writes control characters as they are, which
    # XML 1.0 cannot hold (a module or phase name of a baseline file may carry them)
    text = _XML_FORBIDDEN.sub("\ufffd", ET.tostring(suite, encoding="unicode"))
    return '<?xml version="1.0" encoding="utf-8"?>\n' + text + "\n"


#: the characters XML 1.0 forbids (its Char production): C0 controls but tab, LF and CR; surrogates; FFFE, FFFF
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _escape_annotation(text: str) -> str:
    # GitHub workflow commands: %, CR and LF are escaped in the message
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _one_line(text: str) -> str:
    # a line break in a name (a workload's, a module's, a phase's) or a path read from the
    # baseline file would start a line of the summary: a forged `::warning` command, say
    return _CONTROL.sub(" ", text)


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def github(rep: CheckReport) -> tuple[str, str]:
    """GitHub Actions: annotation lines (stdout) and a Markdown job summary."""
    lines = []
    for r in rep.results:
        if r.status == "regression":
            msg = f"{r.name}: peak {format_bytes(r.baseline_peak)} -> {format_bytes(r.peak)} ({_pct(r)}); {why(r)}"
            lines.append(f"::error title=memprof: memory regression::{_escape_annotation(msg)}")
        elif r.status == "improvement":
            msg = f"{r.name}: peak {_pct(r)} below the baseline; refresh it with memprof baseline --update"
            lines.append(f"::notice title=memprof: lower memory::{_escape_annotation(msg)}")
    for k, (a, b) in rep.version_changes.items():
        lines.append(
            f"::warning title=memprof: versions::{_escape_annotation(f'{k} {a} -> {b} since the baseline')}"
        )
    md = [
        "## memprof check",
        "",
        f"Baseline `{_one_line(rep.baseline_path)}`, tolerance {rep.tolerance}: "
        + (f"**{len(rep.regressions)} regression(s)**" if rep.regressions else "**passed**"),
        "",
        "| workload | baseline | now | change | status | what moved |",
        "| :--- | ---: | ---: | ---: | :--- | :--- |",
    ]
    for r in rep.results:
        md.append(
            f"| {_cell(r.name)} | {format_bytes(r.baseline_peak)} | {format_bytes(r.peak)} | {_signed(r.delta)} "
            f"({_pct(r)}) | {r.status} | {_cell(why(r)) or '-'} |"
        )
    return "\n".join(lines) + ("\n" if lines else ""), "\n".join(md) + "\n"
