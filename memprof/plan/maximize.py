"""``--maximize batch-size|seq-len``: the largest batch size or sequence length that fits with a plan.

Grow by doubling until a value does not fit, then bisect; each probe is a sim run of
the step with the plan's steps (grad accumulation keeps its micro-batch count, so the
batch size grows in multiples of it).
"""

from __future__ import annotations

import math
from dataclasses import replace

from memprof.errors import EnvironmentProblem, InputError, OutOfMemory
from memprof.plan.levers import apply_steps
from memprof.plan.result import Candidate, Maximized
from memprof.plan.search import Progress, Search
from memprof.workload import StepSetup

MAXIMIZE = ("batch-size", "seq-len")


def maximize(search: Search, chosen: Candidate, dimension: str, say: Progress) -> Maximized:
    """The largest batch size or sequence length that fits with ``chosen``: grow, then bisect."""
    wl = search.wl
    start = wl.batch_size if dimension == "batch-size" else wl.seq_len
    # grad accumulation splits the batch: keep its micro-batch count, probe multiples of it
    step = 1
    for st in chosen.steps:
        if st["name"] == "grad_accumulation":
            step = int(st["options"].get("steps", 2))
    if dimension == "seq-len":
        step = max(1, 2 ** (int(math.log2(start)) - 5)) if start >= 64 else 1
    cap = None
    if dimension == "seq-len":
        cap = search.rm.position_limit()
    out = Maximized(dimension=dimension, start=start, best=start, first_misfit=None, limit="")
    budget = search.budget.budget_bytes
    max_probes = 14

    def probe(v: int) -> bool:
        w = replace(wl, batch_size=v) if dimension == "batch-size" else replace(wl, seq_len=v)
        setup = StepSetup.of(w)
        reason = apply_steps(chosen.steps, search.model, setup)
        if reason:
            out.probes.append({"value": v, "need_bytes": None, "fits": False, "error": reason})
            return False
        say(f"maximize {dimension}: probing {v}")
        try:
            r = search.eng.run_detailed(
                search.rm,
                setup,
                progress=lambda m: say(f"maximize {dimension}: {v}: {m}"),
                allow_pickle=search.allow_pickle,
                track_modules=False,
            )
        except (InputError, EnvironmentProblem, OutOfMemory) as e:
            out.probes.append({"value": v, "need_bytes": None, "fits": False, "error": str(e)})
            return False
        reserved = r.profile.peak_reserved_bytes or r.profile.peak_bytes
        need = search.need(reserved)
        ok = need <= budget
        out.probes.append(
            {
                "value": v,
                "peak_bytes": r.profile.peak_bytes,
                "reserved_bytes": reserved,
                "need_bytes": need,
                "fits": ok,
            }
        )
        if ok:
            out.best_profile = r.profile
        return ok

    lo, hi = start, None
    while len(out.probes) < max_probes:
        v = lo * 2
        if cap is not None and v > cap:
            v = cap
        if v <= lo:
            out.limit = f"the model's position limit ({cap})"
            break
        if probe(v):
            lo = v
        else:
            hi = v
            break
    while hi is not None and hi - lo > step and len(out.probes) < max_probes:
        mid = lo + max(step, ((hi - lo) // 2) // step * step)
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    out.best, out.first_misfit = lo, hi
    if hi is not None:
        out.limit = f"{hi} does not fit" + (
            "" if hi - lo <= step else f" (stopped after {max_probes} probes)"
        )
    elif not out.limit:
        out.limit = f"stopped after {max_probes} probes"
    return out
