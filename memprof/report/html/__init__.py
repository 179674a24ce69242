"""Self-contained HTML reports with plotly charts: analyze, compare, plan and check.

One file, opened without a network: plotly.js is inlined once per page (about
4.5 MiB), every chart is a plotly figure drawn from the profile's plain data
(never hand-drawn). Display only: no measurement.

Each page records script errors (``window.onerror``) and, once the charts are
drawn, counts them into ``<body data-charts=N data-errors=M>``, so a headless
browser can check that the page rendered (``tests/report/test_html.py``).

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

from memprof.report.html.figures import (
    CAT_COLORS,
    PHASE_COLORS,
    allocator_figure,
    check_figure,
    modules_figure,
    pareto_figure,
    timeline_figure,
    unit_for,
    waterfall_figure,
)
from memprof.report.html.page import Page
from memprof.report.html.pages import check_html, compare_html, plan_html, profile_html, profile_page

__all__ = [
    "CAT_COLORS",
    "PHASE_COLORS",
    "Page",
    "allocator_figure",
    "check_figure",
    "check_html",
    "compare_html",
    "modules_figure",
    "pareto_figure",
    "plan_html",
    "profile_html",
    "profile_page",
    "timeline_figure",
    "unit_for",
    "waterfall_figure",
]
