"""Rendering of a budget diagnosis (``Profile.budget``): placeholder until the diagnosis lands."""

from __future__ import annotations

from memprof.profile import Profile


def budget_html(p: Profile) -> str:
    return ""
