"""bench/_common.write_section: a regenerated section replaces its own bytes and nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO


def common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "_common.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOC = """# Title

Intro.

<!-- BEGIN summary -->
## Summary

old summary
<!-- END summary -->

## A hand-written section

Its text, between two marked sections.

<!-- BEGIN plan_speed -->
## Plan

old plan
<!-- END plan_speed -->

## Another, at the end

kept too.
"""


def test_a_section_is_replaced_in_place_and_the_text_around_it_is_kept(tmp_path: Path):
    c = common()
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    new = c.section("summary", "Summary", "new summary")
    c.write_section("summary", new, doc=doc)
    assert doc.read_text() == DOC.replace("## Summary\n\nold summary", "## Summary\n\nnew summary")
    c.write_section("summary", c.section("summary", "Summary", "old summary"), doc=doc)
    assert doc.read_text() == DOC  # regenerated to the same bytes


def test_a_new_section_goes_where_the_order_puts_it(tmp_path: Path):
    c = common()
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    c.write_section("agreement", c.section("agreement", "Agreement", "body"), doc=doc)
    text = doc.read_text()
    # agreement comes after summary and before plan_speed; the hand-written text stays whole
    assert text.index("BEGIN summary") < text.index("BEGIN agreement") < text.index("BEGIN plan_speed")
    assert "Its text, between two marked sections." in text and text.endswith("kept too.\n")
    c.write_section("unlisted", c.section("unlisted", "Unlisted", "body"), doc=doc)
    assert doc.read_text().endswith("<!-- END unlisted -->\n")
