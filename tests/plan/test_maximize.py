"""memprof plan --maximize: the largest batch size that fits, checked by direct sim runs."""

from __future__ import annotations

import json

from memprof.workload import Workload
from tests.conftest import tiny
from tests.plan.helpers import MiB, need_of, run


def test_e_maximize_batch_size_finds_the_edge(capsys):
    spec, budget = tiny("llama"), 72 * MiB
    args = ["--budget", "72MiB", "-b", "4", "-s", "64", "--context-overhead", "0"]
    code, out, err = run(capsys, "plan", spec, *args, "--maximize", "batch-size", "--json", "-")
    assert code == 0, err
    m = json.loads(out)["maximize"]
    b = m["best"]
    assert m["dimension"] == "batch-size" and b > 4 and m["first_misfit"] == b + 1
    assert len(m["probes"]) <= 8
    # checked by direct sim runs, outside the search
    fits, _ = need_of(spec, Workload(batch_size=b, seq_len=64), None)
    over, _ = need_of(spec, Workload(batch_size=b + 1, seq_len=64), None)
    assert fits <= budget < over
