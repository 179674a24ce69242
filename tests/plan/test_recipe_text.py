"""The recipe memprof plan writes for its chosen plan."""

from __future__ import annotations

import importlib

import pytest

from memprof import recipes
from memprof.errors import InputError
from memprof.workload import Workload
from tests.plan.helpers import WORKSPACE

P = importlib.import_module("memprof.plan")  # the package (memprof.plan is also the function)


def test_recipe_text_refuses_an_empty_plan_and_validates():
    r = P.PlanResult(
        model="m",
        workload=Workload().to_dict(),
        engine="sim",
        budget=P.Budget(2**30, 0, WORKSPACE),
        max_overhead=None,
        levers=[],
        not_searched=[],
        baseline=P.Candidate(levels=(), steps=[], label="as it is", status="fits"),
        candidates=[],
        runs=[],
        counts={},
    )
    r.plans = [r.baseline]
    with pytest.raises(InputError, match="fits as it is"):
        P.recipe_text(r, "m", "plan.yaml")
    r.plans = [
        P.Candidate(
            levels=(1,),
            steps=[{"name": "checkpointing", "options": {"every": 2}}],
            label="checkpointing(every=2)",
            status="fits",
            run=2,
            peak_bytes=1,
            reserved_bytes=2,
            need_bytes=3,
            flop_overhead=0.12,
        )
    ]
    text = P.recipe_text(r, "m", "x.yaml")
    assert recipes.parse(text).steps[0].options == {"every": 2}
    assert "# confirm: memprof compare m --recipe x.yaml --engine sim -b 8 -s 512" in text
