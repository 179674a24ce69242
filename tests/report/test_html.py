"""HTML reports: self-contained pages whose charts hold the profile's numbers, drawn in a real browser.

The browser test runs headless Chromium (Debian's ``chromium`` package; ``.ci/run``
installs it) and is skipped where it is not installed. It loads each page from a
file (no network), waits for the scripts, and reads what the page recorded on
``<body>``: the charts drawn and the script errors caught. A broken page is
checked too, so the check itself is shown to fail when it should. Screenshots
are listed at the end of the test session's output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memprof import recipes
from memprof.api import analyze
from memprof.cli import main
from memprof.compare import compare
from memprof.profile import Profile
from memprof.report import html as H
from memprof.report.timeline import columns, totals
from memprof.tracking import CATEGORIES
from memprof.workload import Workload
from tests.conftest import tiny

MiB = 2**20


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(page: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file: no GPU, no sandbox (root in CI), no background traffic."""
    exe = chromium()
    assert exe is not None
    args = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def rendered(page: Path, screenshot: Path) -> dict[str, str]:
    """The attributes the page set on <body> once its scripts ran, the console errors; a screenshot."""
    proc = browse(
        page,
        "--virtual-time-budget=15000",
        "--window-size=1280,2000",
        f"--screenshot={screenshot}",
        "--dump-dom",
    )
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body is not None, proc.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "rror" in ln]
    attrs["console_errors"] = "\n".join(console)
    return attrs


@pytest.fixture(scope="module")
def sim_profile() -> Profile:
    return analyze(tiny("llama"), engine="sim", batch_size=2, seq_len=64)


# -- the numbers in the charts ---------------------------------------------------------------------


def test_timeline_chart_holds_the_profile_numbers_phases_and_peak(sim_profile):
    p = sim_profile
    fig = H.timeline_figure(p)
    unit, size = H.unit_for(max(totals(p.timeline)))
    assert unit == "MiB"
    stacked = [t for t in fig.data if t.stackgroup == "live"]
    assert {t.name for t in stacked} <= set(CATEGORIES)
    # stacked by category, the areas add up to the live total at every point, and to the peak at the peak
    sums = [sum(t.y[i] for t in stacked) * size for i in range(len(p.timeline["op"]))]
    assert max(sums) == pytest.approx(p.peak_bytes)
    assert list(stacked[0].x) == p.timeline["op"]
    # phases shaded in order, covering the step
    shapes = [s for s in fig.layout.shapes if s.type == "rect"]
    names = [a.text for a in fig.layout.annotations if a.text in ("forward", "backward", "optimizer")]
    assert names == ["forward", "backward", "optimizer"] and len(shapes) == 3
    assert shapes[0].x0 == 0 and shapes[-1].x1 == p.timeline["ops"]
    # the peak marked where it is, naming its phase and the categories live then
    peak = next(t for t in fig.data if t.name == "peak")
    k = p.timeline["peak_index"]
    assert peak.x[0] == p.timeline["op"][k] and peak.y[0] * size == pytest.approx(p.peak_bytes)
    note = next(a.text for a in fig.layout.annotations if a.text.startswith("<b>peak"))
    assert "backward" in note and "activations" in note


def test_the_page_is_self_contained(sim_profile):
    from plotly.offline import get_plotlyjs

    text = H.profile_html(sim_profile)
    js = get_plotlyjs()
    assert text.count(js) == 1  # plotly.js inlined once
    # apart from plotly.js itself (whose map styles name URLs it never loads here), nothing refers
    # to the network: no external script, stylesheet, image or font
    rest = text.replace(js, "")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", rest)
    assert "@import" not in rest and "url(" not in rest
    assert text.count('class="plotly-graph-div"') == 2
    assert "data-expected-charts=2" in text


def test_terminal_sparkline_peaks_where_the_profile_does(sim_profile):
    p = sim_profile
    cols = columns(p.timeline, 60)
    assert max(cols.highs) == p.peak_bytes == cols.highs[cols.peak_column]
    assert cols.phases[0] == "forward" and cols.phases[-1] == "optimizer"
    assert cols.phases[cols.peak_column] == p.peak_phase


def test_cli_writes_the_page_atomically_and_refuses_a_directory(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["analyze", tiny("llama"), "--engine", "sim", "-b", "2", "-s", "32", "--html", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Memory over the step" in text
    assert "Memory over the step" in capsys.readouterr().out  # the terminal sparkline too
    assert main(["analyze", tiny("llama"), "--engine", "sim", "--html", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and len(err.strip().splitlines()) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["report.html"]  # nothing half-written beside it


# -- in a real browser ------------------------------------------------------------------------------


def _pages(tmp_path: Path, p: Profile) -> dict[str, Path]:
    """One page of each kind, from small sim runs; and a broken page (a script throws).

    The commands' own ``--html`` runs are tested in test_compare, tests/plan and
    test_gate; here the pages are built from the library's results, for the browser.
    """
    from memprof.errors import NoPlanFits
    from memprof.gate import CheckReport, WorkloadCheck
    from memprof.plan import plan

    pages = {"analyze": H.profile_html(p)}
    wl = Workload(batch_size=2, seq_len=32)
    c = compare(tiny("llama"), recipes.from_names(["checkpointing"]), wl, engine="sim")
    pages["compare"] = H.compare_html(c)
    # the search's two ends, neither fits: the page shows the frontier and the budget
    with pytest.raises(NoPlanFits) as e:
        wl_sgd = Workload(batch_size=1, seq_len=32, optimizer="sgd")
        plan(tiny("llama"), wl_sgd, 33 * MiB, context_overhead=0)
    pages["plan"] = H.plan_html(e.value.result)
    before, after = c.baseline, c.final
    row = WorkloadCheck("tiny", "improvement", before.peak_bytes, after.peak_bytes, 0, profile=after)
    pages["check"] = H.check_html(CheckReport("base.json", "1%", [row], {}))
    # a page whose script throws: the page must say so (no charts: no plotly.js to parse)
    pages["broken"] = (
        H.Page("broken").render().replace("<h1>", "<script>throw new Error('boom')</script><h1>", 1)
    )
    out = {}
    for name, text in pages.items():
        out[name] = tmp_path / f"{name}.html"
        out[name].write_text(text)
    return out


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_reports_render_in_headless_chromium_and_a_broken_page_is_caught(
    sim_profile, tmp_path, record_property
):
    pages = _pages(tmp_path, sim_profile)
    shots = {name: tmp_path / f"{name}.png" for name in pages}
    # the browsers run side by side: each takes seconds, mostly parsing plotly.js
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(pages, pool.map(lambda n: rendered(pages[n], shots[n]), pages)))
    broken = results.pop("broken")
    assert broken.get("data-errors") == "1" and "boom" in broken.get("data-error-text", ""), broken
    assert "boom" in broken["console_errors"]
    for name, attrs in results.items():
        assert attrs.get("data-errors") == "0", (name, attrs)
        assert attrs["console_errors"] == "", (name, attrs["console_errors"])
        assert int(attrs["data-charts"]) == int(attrs["data-expected-charts"]) >= 1, (name, attrs)
        assert shots[name].stat().st_size > 30_000, name  # a picture, not a blank page
        record_property("screenshot", str(shots[name]))  # listed at the end of the run (tests/conftest.py)


def test_the_modules_chart_holds_the_profile_bytes(sim_profile):
    # the figures embed the profile's bytes (scaled), not rounded labels
    fig = H.modules_figure(sim_profile)
    unit, size = H.unit_for(max(m.bytes_at_peak for m in sim_profile.modules if m.name != "<model>"))
    held = {y: a * size for y, a in zip(fig.data[0].y, fig.data[0].x)}
    first = max((m for m in sim_profile.modules if m.name != "<model>"), key=lambda m: m.bytes_at_peak)
    assert held[f"{first.name} ({first.type})"] == pytest.approx(first.activation_bytes)
