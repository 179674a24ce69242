"""What every HTML page shares: the styles, the render check script, tables, and :class:`Page`."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from memprof._version import __version__


def esc(x: Any) -> str:
    """``x`` as HTML text (attribute quotes escaped too)."""
    return html.escape(str(x), quote=True)


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


def table(
    rows: Sequence[Sequence[Any]], head: Sequence[str] | None = None, numeric: Sequence[int] = ()
) -> str:
    """An HTML table of already-escaped cells; ``numeric`` columns align right."""
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append(
            "<tr>"
            + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r))
            + "</tr>"
        )
    out.append("</table>")
    return "".join(out)


class Page:
    """One self-contained page: parts appended in order, plotly.js inlined once when a chart is drawn."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.parts: list[str] = []
        self.charts = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{esc(text)}</h2>")

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
            self.parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")

    def render(self) -> str:
        js = ""
        if self.charts:
            from plotly.offline import get_plotlyjs

            js = get_plotlyjs()
        return (
            "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{esc(self.title)}</title>"
            f"<style>{_CSS}</style><script>{_ERRORS_JS}</script>"
            + (f'<script type="text/javascript">{js}</script>' if js else "")
            + "</head>"
            f"<body data-expected-charts={self.charts}><h1>{esc(self.title)}</h1>"
            f"<p class=sub>{esc(self.subtitle)}</p>"
            + "".join(self.parts)
            + f"<footer>memprof {__version__}: every figure here was measured or traced from the model's code."
            " This file is self-contained: it needs no network.</footer>"
            f"<script>{_DONE_JS}</script></body></html>\n"
        )
