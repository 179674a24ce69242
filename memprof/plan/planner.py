"""The planner's entry points: :func:`plan` (the ``memprof plan`` command) and :func:`single_fixes`.

See :mod:`memprof.plan` for what the search does.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from memprof import budget, optimizations
from memprof.budget import Budget
from memprof.engines.base import Engine
from memprof.engines.pool import available_workers
from memprof.engines.sim import SimEngine
from memprof.errors import InputError, NoPlanFits
from memprof.gpus import GpuPreset
from memprof.optimizations.registry import require_environment
from memprof.plan.levers import PEFT_CHOICES, build_levers
from memprof.plan.maximize import MAXIMIZE
from memprof.plan.maximize import maximize as maximize_with
from memprof.plan.recipe import recipe_text
from memprof.plan.result import PlanResult, SingleFixes
from memprof.plan.search import Progress, Search
from memprof.prepare import fake_model, prepare
from memprof.units import format_bytes
from memprof.workload import Workload

MiB = 2**20
#: the CUDA context assumed when none is given: recent drivers with lazy module
#: loading take 300-600 MiB per process on an H100 (measure yours with
#: ``memprof analyze --engine cuda``)
DEFAULT_CONTEXT_BYTES = budget.DEFAULT_CONTEXT_BYTES


def new_search(
    spec: str,
    wl: Workload,
    budget_bytes: int,
    *,
    context_overhead: int,
    engine: Engine | None,
    max_overhead: float | None,
    max_plans: int,
    max_runs: int,
    task: str | None,
    allow_pickle: bool,
    trust_remote_code: bool,
    say: Progress,
    peft: str | None = None,
    gpu: GpuPreset | None = None,
) -> Search:
    """The search over ``wl``'s levers, nothing measured yet (``left_out``: the levels left out, and why).

    Shared by :func:`plan` and :func:`single_fixes`. ``peft`` (``lora``, ``qlora``): every
    combination trains those adapters.

    Raises:
        InputError: a bad workload, or an engine other than sim.
    """
    wl.validate()
    available_workers()  # a bad MEMPROF_WORKERS is refused before any work
    default_context = gpu.context_bytes if gpu is not None else DEFAULT_CONTEXT_BYTES
    given = None if context_overhead == default_context else context_overhead
    eng = engine if engine is not None else SimEngine(gpu=gpu, context_bytes=given)
    if eng.name != "sim":
        raise InputError(f"memprof plan searches in the sim engine, not {eng.name}")
    rm, eng = prepare(spec, wl, eng, task=task, trust_remote_code=trust_remote_code, progress=say)
    wl = wl.for_model(rm)
    say("Building the model on fake tensors (its structure, for the levers)")
    model = fake_model(rm, wl)
    levers, left_out = build_levers(model, wl, derived_allocator=isinstance(eng, SimEngine), peft=peft)
    budget = Budget(
        budget_bytes, context_overhead, 0, wl.world_size, gpu=gpu.name if gpu is not None else None
    )
    if gpu is not None and context_overhead == gpu.context_bytes:
        budget.context_source = getattr(eng, "context_source", budget.context_source)
    return Search(
        rm,
        eng,
        wl,
        model,
        levers,
        budget,
        max_overhead=max_overhead,
        max_plans=max_plans,
        max_runs=max_runs,
        allow_pickle=allow_pickle,
        say=say,
        left_out=left_out,
    )


def plan(
    spec: str,
    workload: Workload,
    budget_bytes: int,
    *,
    world_size: int = 1,
    max_overhead: float | None = None,
    maximize: str | None = None,
    context_overhead: int = DEFAULT_CONTEXT_BYTES,
    engine: Engine | None = None,
    progress: Progress | None = None,
    max_plans: int = 3,
    max_runs: int = 12,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    recipe_path: str = "plan.yaml",
    peft: str | None = None,
    gpu: GpuPreset | None = None,
) -> PlanResult:
    """Find the least costly optimizations that make a step fit a GPU memory budget.

    Args:
        spec: a MODEL spec (directory, config.json, bundled name, Hub id, ``module:factory``).
        workload: the step as given (mode, batch size per rank, sequence length, dtype...).
        budget_bytes: the GPU's memory (per rank), e.g. ``memprof.units.parse_size("24GiB")``.
        world_size: ranks sharing the job; above 1, FSDP sharding is searched and every
            figure is per rank (the batch size is per rank).
        max_overhead: the most FLOP overhead a plan may add, as a fraction (0.4 for 40%);
            None: no limit.
        maximize: ``"batch-size"`` or ``"seq-len"``: also find the largest value that fits
            with the chosen plan (each probe a sim run).
        context_overhead: the CUDA context's bytes (assumed: there is no GPU to measure it).
        engine: a sim engine (default :class:`SimEngine`, which also replays each trace
            with expandable segments).
        progress: called with a short line naming the combination being measured.
        max_plans: stop once this many plans that fit are known to be the cheapest (plans
            that only add steps to a cheaper one are not counted).
        max_runs: the most sim runs of the search (the maximize probes not counted). The
            search is best-first, so the limit cuts alternatives first; the result notes
            when combinations cheaper than the first plan were left unmeasured.
        task: override the task picked from the config.
        allow_pickle: permit loading ``.bin`` checkpoints.
        trust_remote_code: permit models that ship their own code.
        recipe_path: the path named in the recipe's confirming command.
        peft: ``lora``, ``qlora`` or ``any``: also search stacks on top of those adapters
            (one search each; they change what is trained, so never by default). The full
            fine-tune's plan stays the answer when one fits; otherwise the first adapter
            kind that fits (LoRA before QLoRA). ``result.peft`` lists each kind's plan.
        gpu: a GPU preset (``--gpu``): the sim engine projects onto it (compute capability,
            memory for the allocator model); the caller passes its memory as ``budget_bytes``
            and its context estimate as ``context_overhead`` unless the user gave them.

    Returns:
        The search: budget accounting, every combination resolved, the plans that fit
        (cheapest first; the first with no steps when the step fits as it is), the frontier
        of those that do not, the chosen plan's recipe.

    Raises:
        InputError: a bad argument, model or workload.
        EnvironmentProblem: see :mod:`memprof.errors`.
        NoPlanFits: no searched combination fits; ``result`` holds the search.
        InternalError: a sim run raised something unexpected (a bug in memprof or in a
            library it drives); a run that ran out of memory, or that the sim engine
            knowingly cannot run, is recorded in the result instead.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    if world_size < 1:
        raise InputError(f"--world-size must be at least 1, got {world_size}")
    if max_overhead is not None and max_overhead < 0:
        raise InputError(f"--max-overhead must be 0% or more, got {max_overhead:.0%}")
    if maximize is not None and maximize not in MAXIMIZE:
        raise InputError(f"--maximize must be one of {', '.join(MAXIMIZE)}, got {maximize!r}")
    if max_plans < 1 or max_runs < 2:
        raise InputError("max_plans must be at least 1 and max_runs at least 2")
    if peft is not None and peft not in PEFT_CHOICES:
        raise InputError(f"--peft must be one of {', '.join(PEFT_CHOICES)}, got {peft!r}")
    kinds = PEFT_CHOICES[peft] if peft else ()
    if kinds and not workload.training:
        raise InputError(f"--peft trains adapters: it needs a training step, not --mode {workload.mode}")
    require_environment([optimizations.make(kind) for kind in kinds])
    budget.check(budget_bytes, context_overhead)
    wl = replace(workload, world_size=world_size) if world_size != 1 else workload

    def searched(kind: str | None) -> tuple[Search, PlanResult]:
        s = new_search(
            spec,
            wl,
            budget_bytes,
            context_overhead=context_overhead,
            engine=engine,
            max_overhead=max_overhead,
            max_plans=max_plans,
            max_runs=max_runs,
            task=task,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            say=say if kind is None else (lambda msg: say(f"{kind}: {msg}")),
            peft=kind,
            gpu=gpu,
        )
        s.run()
        return s, s.result()

    search, result = searched(None)
    if kinds:
        options: list[tuple[str, Search, PlanResult]] = [("full", search, result)]
        left_out: list[dict[str, Any]] = []
        for k in kinds:
            try:
                options.append((k, *searched(k)))
            except InputError as e:
                if peft != "any":
                    raise  # asked for by name: its reason is the answer
                # --peft any: a kind this model cannot train (QLoRA of GPT-2's Conv1D layers) is
                # left out, said in its row, and the others are searched
                left_out.append({**_peft_option(k, None), "not_applicable": str(e)})
        if result.chosen is None:
            search, result = next(((s, r) for _, s, r in options if r.chosen is not None), (search, result))
        result.peft = [_peft_option(k, r) for k, _, r in options] + left_out
    if result.chosen is not None:
        result.recipe = recipe_text(result, spec, recipe_path) if result.chosen.steps else None
        if maximize:
            result.maximize = maximize_with(search, result.chosen, maximize, say)
    result.seconds = time.perf_counter() - t0
    if result.chosen is None:
        closest = result.frontier[0] if result.frontier else None
        msg = f"no plan fits {format_bytes(budget_bytes)}"
        if result.counts.get("not_reached"):
            msg = (
                f"no plan found that fits {format_bytes(budget_bytes)} in {max_runs} sim runs "
                f"({result.counts['not_reached']} combinations not measured: raise --max-runs)"
            )
        elif closest is not None and closest.need_bytes is not None:
            msg += f": the closest needs {format_bytes(closest.need_bytes)} (run {closest.run})"
        raise NoPlanFits(msg, result)
    return result


def _peft_option(kind: str, r: PlanResult | None) -> dict[str, Any]:
    """One line of ``result.peft``: what training ``kind`` (full, lora, qlora) takes under the budget
    (``r`` None: not searched, the model cannot train it)."""
    best = (r.chosen or (r.frontier[0] if r.frontier else None)) if r is not None else None
    return {
        "trains": kind,
        "fits": r is not None and r.chosen is not None,
        "steps": best.steps if best else [],
        "label": best.label if best else None,
        "peak_bytes": best.peak_bytes if best else None,
        "need_bytes": best.need_bytes if best else None,
        "cost": best.cost if best else None,
        "source": best.source if best else None,
        "runs": len(r.runs) if r is not None else 0,
    }


def single_fixes(
    spec: str,
    workload: Workload,
    budget_bytes: int,
    *,
    context_overhead: int,
    max_runs: int = 16,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    gpu: GpuPreset | None = None,
) -> SingleFixes:
    """Each lever's strongest level alone on the step, then the search on to the cheapest stack that fits.

    The runs of the single levers are reused by the search: when one of them fits, only
    cheaper stacks are looked for (no run of the most aggressive combinations). Unlike
    :func:`plan`, nothing fitting is an answer, not an error (``result.chosen`` is None).

    Args:
        spec: a MODEL spec.
        workload: the step as given.
        budget_bytes: the GPU's memory.
        context_overhead: the CUDA context's bytes (assumed).
        max_runs: the most sim runs, the single levers and the search together.
        gpu: a GPU preset (``--gpu``): the sim engine projects onto it.
        task: override the task picked from the config.
        allow_pickle: permit loading ``.bin`` checkpoints.
        trust_remote_code: permit models that ship their own code.
        progress: called with a short line per run.

    Returns:
        The step as given, each lever alone (in lever order, those measured), and the
        search's result (no recipe, no maximize).

    Raises:
        InputError: a bad workload, or a step as given the sim engine cannot run.
        EnvironmentProblem: see :mod:`memprof.errors`.
        OutOfMemory: the model does not fit the sim engine's limits while it is built.
    """
    search = new_search(
        spec,
        workload,
        budget_bytes,
        context_overhead=context_overhead,
        engine=None,
        gpu=gpu,
        max_overhead=None,
        max_plans=1,
        max_runs=max_runs,
        task=task,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        say=progress or (lambda m: None),
    )
    singles = search.levers_alone()
    if any(s.candidate.fits for s in singles):
        # a single fix fits already: look only for cheaper stacks (no "most aggressive" runs)
        search.best_first()
    else:
        search.run()
    return SingleFixes(
        baseline=search.candidate(search.combinations.zero), singles=singles, result=search.result()
    )
