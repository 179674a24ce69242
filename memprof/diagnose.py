"""Out-of-memory diagnosis: where a step crosses a budget, what was live then, what would fix it.

``memprof analyze MODEL --budget 8GiB`` (or a real out-of-memory error on the
cuda or cpu engine) turns "it does not fit" into a next step:

* **where**: the tracker keeps the moment the step's live tensors first rose
  above the usable budget (the budget less the CUDA context and the cuBLAS
  workspace): the op, the phase, the module running, and what was live then
  by category and by module (:attr:`memprof.tracking.Tracker.crossing`). When
  the tensors never cross it but the allocator's reserved memory does, the
  culprit is fragmentation, and that is said instead;
* **fixes**: each searched lever of :func:`memprof.plan.plan` (the optimizations
  that keep the model's function) at its strongest level, alone on the step,
  measured in the sim engine and ranked by the memory it cuts; the first few
  are shown with their projected need and FLOP cost;
* **plan**: the same search then goes on to the cheapest stack that fits
  (reusing those runs), or says that nothing searched fits.

Every figure is a sim-engine run of the real model code; the CUDA context is
an assumption (``context_overhead``), as in ``memprof plan``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memprof.budget import Budget
from memprof.budget import check as check_budget
from memprof.errors import EnvironmentProblem, InputError, InternalError, OutOfMemory
from memprof.gpus import GpuPreset
from memprof.plan import single_fixes
from memprof.profile import Profile
from memprof.units import format_bytes
from memprof.workload import Workload

Progress = Callable[[str], None]

#: fixes shown by default
DEFAULT_FIXES = 3


def accounting(profile: Profile, budget_bytes: int, context_bytes: int) -> dict[str, Any]:
    """The budget against what the profiled step needs (reserved memory and the overheads)."""
    ov = profile.overheads or {}
    ws = int(ov.get("cublas_workspace_bytes") or 0) if not ov.get("included_in_peak", True) else 0
    reserved = profile.peak_reserved_bytes if profile.peak_reserved_bytes is not None else profile.peak_bytes
    named = ov.get("non_tensor") or {}
    world = int((profile.workload or {}).get("world_size") or 1)
    b = Budget(
        budget_bytes,
        context_bytes,
        ws,
        world_size=world if named else 1,
        cudnn_workspace_bytes=int(named.get("cudnn_workspace_bytes") or 0),
    )
    need = b.need(reserved)
    return {
        "budget_bytes": budget_bytes,
        "context_bytes": context_bytes,
        "context_source": "assumed (--context-overhead)",
        "cublas_workspace_bytes": ws,
        "cudnn_workspace_bytes": b.cudnn_workspace_bytes,
        "nccl_buffers_bytes": b.nccl_buffers_bytes,
        "usable_bytes": b.usable_bytes,
        "peak_bytes": profile.peak_bytes,
        "reserved_bytes": int(reserved),
        "reserved_source": (profile.allocator or {}).get("source", "peak allocated"),
        "need_bytes": need,
        "fits": need <= budget_bytes,
    }


def top_modules(modules: dict[str, int], n: int = 8) -> list[dict[str, Any]]:
    """The modules holding the most at the crossing, innermost first among equals.

    ``modules`` holds inclusive totals (a module with its submodules), so the
    root holds everything: the list skips a module whose bytes are all in one
    child already shown below it, and the root itself.
    """
    items = [(m, b) for m, b in modules.items() if m != "<model>" and b > 0]
    items.sort(key=lambda mb: (-mb[1], -mb[0].count("."), mb[0]))
    out: list[dict[str, Any]] = []
    for name, b in items:
        # a parent whose total equals a child's adds nothing: keep the deeper name
        if any(o["module"].startswith(name + ".") and o["bytes"] == b for o in out):
            continue
        out.append({"module": name, "bytes": b})
        if len(out) == n:
            break
    return out


def diagnose(
    spec: str,
    workload: Workload,
    profile: Profile,
    budget_bytes: int,
    *,
    context_bytes: int,
    fixes: int = DEFAULT_FIXES,
    max_runs: int = 16,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    gpu: GpuPreset | None = None,
) -> dict[str, Any]:
    """The budget diagnosis of a profiled step (``Profile.budget``).

    Args:
        spec: the MODEL spec the profile was made from.
        workload: its workload (the fixes are searched on it, in the sim engine).
        profile: the step's profile (any engine); its ``budget`` holds the crossing,
            when the tracker was given the usable budget.
        budget_bytes: the GPU memory.
        context_bytes: the CUDA context assumed.
        fixes: how many single optimizations to show.
        max_runs: the most sim runs for the fixes and the plan together.
        progress: called with a short line per run.
        gpu: the GPU preset the step was projected onto (``--gpu``): the fixes are
            searched on it too.

    Returns:
        Plain data: the accounting (``fits``, ``need_bytes``...), ``crossing``
        (or None), ``cause`` (a sentence), ``fixes`` and ``plan`` when it does not fit.

    Raises:
        InputError: a budget that leaves nothing, or a workload the search refuses.
    """

    say = progress or (lambda m: None)
    out = accounting(profile, budget_bytes, context_bytes)
    check_budget(budget_bytes, context_bytes, out["cublas_workspace_bytes"])  # raises when nothing is left
    crossing = dict((profile.budget or {}).get("crossing") or {}) or None
    if crossing is None and profile.oom:
        o = profile.oom  # a real out-of-memory error: the state when it was raised
        crossing = {
            "op": None,
            "live_bytes": o.get("live_bytes"),
            "phase": o.get("phase"),
            "module": o.get("module"),
            "categories": o.get("live_by_category") or {},
            "modules": o.get("live_by_module") or {},
        }
    if crossing is not None:
        crossing["modules"] = top_modules(crossing.get("modules") or {})
    out["crossing"] = crossing
    out["fixes"] = []
    out["plan"] = None
    if profile.oom:
        out["fits"] = False
        out["cause"] = f"out of memory in the {profile.oom.get('phase')} phase" + (
            f", inside {profile.oom.get('module')}" if profile.oom.get("module") else ""
        )
    elif out["fits"]:
        out["cause"] = (
            f"fits: needs {format_bytes(out['need_bytes'])} of {format_bytes(budget_bytes)} "
            f"({format_bytes(budget_bytes - out['need_bytes'])} to spare)"
        )
        return out
    elif crossing is not None:
        where = crossing.get("phase") or "?"
        if crossing.get("module") == "<model>":
            where += ", in the model's own code outside its submodules (its loss, or its output's upcast)"
        elif crossing.get("module"):
            where += f", inside {crossing['module']}"
        out["cause"] = (
            f"the live tensors first rise above the usable {format_bytes(out['usable_bytes'])} "
            f"in {where}, and peak at {format_bytes(out['peak_bytes'])}"
        )
    else:
        out["cause"] = (
            f"the tensors fit ({format_bytes(out['peak_bytes'])} at the peak) but the allocator reserves "
            f"{format_bytes(out['reserved_bytes'])}: fragmentation; try expandable segments"
        )
    try:
        found = single_fixes(
            spec,
            workload,
            budget_bytes,
            context_overhead=context_bytes,
            max_runs=max_runs,
            task=task,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=lambda m: say(f"fixes: {m}"),
            gpu=gpu,
        )
        singles = sorted(found.singles, key=lambda s: (s.candidate.need_bytes, s.candidate.cost))
        base_need = found.baseline.need_bytes or out["need_bytes"]
        for single in singles[:fixes]:
            c = single.candidate
            if c.need_bytes is None or c.need_bytes >= base_need:
                continue
            out["fixes"].append(
                {
                    "lever": single.lever,
                    "label": c.label,
                    "steps": c.steps,
                    "peak_bytes": c.peak_bytes,
                    "reserved_bytes": c.reserved_bytes,
                    "need_bytes": c.need_bytes,
                    "cut_bytes": base_need - c.need_bytes,
                    "fits": c.fits,
                    "flop_overhead": c.flop_overhead,
                    "side_cost": c.side_cost,
                    "side_notes": c.side_notes,
                }
            )
        result = found.result
        if result.chosen is not None:
            ch = result.chosen
            out["plan"] = {
                "label": ch.label,
                "steps": ch.steps,
                "need_bytes": ch.need_bytes,
                "cost": ch.cost,
                "flop_overhead": ch.flop_overhead,
                "fits": True,
            }
        else:
            closest = result.frontier[0] if result.frontier else None
            out["plan"] = {
                "label": closest.label if closest else None,
                "steps": closest.steps if closest else [],
                "need_bytes": closest.need_bytes if closest else None,
                "cost": closest.cost if closest else None,
                "fits": False,
                "dominant": result.dominant,
            }
    except (InputError, EnvironmentProblem, OutOfMemory, InternalError) as e:
        # the model cannot run in the sim engine (or the search refuses the step): say why. An
        # internal error of a sim run (one the engine does not know as a limit) is said too: the
        # fixes are a projection in another engine than the profile's, which stands without them
        out["fixes_error"] = f"no fixes projected: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return out
    out["runs"] = len(result.runs)
    out["engine"] = "sim (the fixes are projected: each a sim run of the real model code)"
    return out
