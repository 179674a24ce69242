"""memprof's own regression gate: the bundled workloads of configs/baselines against the committed baseline.

A change to memprof that moves any of these numbers by one byte fails here.
When the change is intended, refresh the baseline (the command is in
configs/baselines/workloads.yaml). When torch or transformers differ from the
versions that recorded it, the numbers may move for reasons outside memprof:
the test then says so and skips instead of failing.
"""

from __future__ import annotations

import json

import pytest

from memprof.cli import main
from tests.conftest import REPO

BASELINE = REPO / "configs" / "baselines" / "memprof-baseline.json"


def test_memprof_numbers_match_the_committed_baseline(capsys):
    code = main(["check", "--baseline", str(BASELINE), "--tolerance", "0", "--format", "json"])
    rep = json.loads(capsys.readouterr().out)
    moved = [w["name"] for w in rep["workloads"] if w["status"] != "ok"]
    if moved and rep["version_changes"]:
        pytest.skip(
            f"versions differ from the baseline's ({rep['version_changes']}); {moved} moved: refresh it"
        )
    assert code == 0 and not moved, f"memprof's own numbers moved: {moved}; see {rep['workloads']}"
