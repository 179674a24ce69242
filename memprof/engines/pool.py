"""Several measured steps at once: worker processes forked from this one, one per core.

A sim run is Python dispatching fake tensors: it keeps one core busy and no more.
The rows of ``memprof compare`` (and the workloads of ``memprof check``) are
independent runs once their setups are known, so on a machine with more than one
core they can run side by side. Workers are forked from the command's process:
they inherit its imports, the resolved model and the fake-tensor dispatch cache
that the runs before warmed, so a worker starts in milliseconds, not seconds.

Only the sim engine's runs are spread out. A real step computes: a forked CUDA
context is unusable and a forked OpenMP pool can hang, and timed steps would
compete for the cores they are timing.

Each worker returns its :class:`RunResult` (a profile is plain data) or the error
the run raised, rebuilt in this process as the same class with the same message
and fields; an unexpected exception becomes an :class:`InternalError` carrying the
worker's traceback (``detail``: the crash file keeps it).

``MEMPROF_WORKERS=N`` caps the number of workers (1: every run in this process).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from memprof.errors import InputError, InternalError, MemprofError

if TYPE_CHECKING:
    from memprof.engines.base import Engine, Measure, RunResult
    from memprof.models import ResolvedModel
    from memprof.workload import StepSetup

T = TypeVar("T")

#: the environment variable that caps the workers
WORKERS_ENV = "MEMPROF_WORKERS"


def available_workers() -> int:
    """The cores this process may run on, capped by ``MEMPROF_WORKERS``.

    Raises:
        InputError: ``MEMPROF_WORKERS`` is not a whole number of at least 1.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    raw = os.environ.get(WORKERS_ENV)
    if raw is None or raw.strip() == "":
        return max(1, cores)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"{WORKERS_ENV} must be a whole number of at least 1, got {raw!r}")
    return n


@dataclass
class Job:
    """One measured step: the setup, and what to measure."""

    setup: StepSetup
    measure: Measure


#: what the forked workers read (set before the fork, cleared after)
_WORK: dict[str, Any] = {}


def _run_one(i: int) -> tuple[int, str, Any]:
    try:
        out = _WORK["calls"][i]()
    except MemprofError as e:
        if isinstance(e, InternalError):
            return i, "internal", (str(e), e.traceback_text())
        state = {k: v for k, v in vars(e).items() if k != "__traceback__"}
        return i, "error", (type(e), str(e), state)
    except Exception as e:  # a bug: its traceback goes back with it
        return i, "internal", (f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)))
    return i, "ok", out


def _rebuild(kind: str, payload: Any, where: dict[str, str | None]) -> BaseException:
    if kind == "error":
        cls, message, state = payload
        e = cls.__new__(cls)
        Exception.__init__(e, message)
        e.__dict__.update(state)
        return e
    message, detail = payload
    return InternalError(message=message, detail=detail, **where)  # type: ignore[arg-type]


#: True in a forked worker: its status lines stay there (the terminal is this process's)
_in_worker = False
#: True while :func:`run_beside` has a worker running beside this process
_beside = False


def in_worker() -> bool:
    """True in a forked worker (status lines printed there would garble this process's terminal)."""
    return _in_worker


def _child_init() -> None:
    global _in_worker
    import signal

    import torch

    _in_worker = True
    # The command's own handlers are not a worker's: the console script turns SIGTERM into
    # KeyboardInterrupt, which in a worker would unwind into multiprocessing's exit path
    # (joining threads forked mid-lock: a hang). A worker dies at once on SIGTERM (the pool's
    # terminate), and leaves Ctrl-C, which the terminal sends the whole group, to the command.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the terminal is the command's (its spinner's thread may have held the streams' locks at
    # the fork): a worker writes nothing there; its errors come back as results
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the worker's whole life

    torch.set_num_threads(1)  # a fake step computes nothing; the other workers need the cores


def run_calls(
    calls: Sequence[Callable[[], T]],
    *,
    parallel: bool,
    workers: int | None = None,
    stop_at_error: bool = False,
    progress: Callable[[int, str], None] | None = None,
    where: dict[str, str | None] | None = None,
) -> list[T | BaseException]:
    """Call each; the results in order (a :class:`MemprofError` a call raised in its place).

    ``parallel``: the calls may run in forked workers (sim runs only: see the module);
    they then do when there is more than one call and more than one worker (default
    :func:`available_workers`). A call's result must pickle. ``progress(i, message)``:
    from workers, when call ``i`` is queued and when it ends. ``stop_at_error``: in
    this process, no call runs after one that raised (the list ends there); workers
    run every call. ``where``: the model and engine an unexpected error names.
    """
    say = progress or (lambda i, msg: None)
    n = min(workers or available_workers(), len(calls)) if parallel else 1
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        out: list[T | BaseException] = []
        for call in calls:
            try:
                out.append(call())
            except MemprofError as e:
                out.append(e)
                if stop_at_error:
                    break
        return out
    for i in range(len(calls)):
        say(i, f"queued for one of {n} worker processes")
    results: list[Any] = [None] * len(calls)
    _WORK["calls"] = list(calls)
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_child_init)
    try:
        futures = {pool.submit(_run_one, i): i for i in range(len(calls))}
        for future in as_completed(futures):
            try:
                i, kind, payload = future.result()
            except BrokenProcessPool as e:  # a worker killed (out of host memory, a signal, a crash)
                i = futures[future]
                kind, payload = "internal", (f"a worker process died while running it ({e})", "")
            results[i] = payload if kind == "ok" else _rebuild(kind, payload, where or {})
            say(i, "done")
        pool.shutdown(wait=True)  # every result is in: the workers exit on their own
    except BaseException:
        _kill(pool)
        raise
    finally:
        _WORK.clear()
    return results


def _kill(pool: ProcessPoolExecutor) -> None:
    """An interrupt or an error here: the workers are killed, not waited for (they ignore Ctrl-C)."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_beside(
    side: Callable[[], T],
    here: Sequence[Callable[[], Any]],
    *,
    where: dict[str, str | None] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[T | BaseException, list[Any]]:
    """``side`` in one forked worker while ``here`` runs in this process, one call after another.

    For the shallow depths of one sim run (:func:`memprof.engines.depth.shallow_run`):
    the calls here keep warming this process's fake-tensor dispatch cache, which the
    runs after them inherit (a worker's is lost with it). ``side`` runs in this process
    after ``here`` when there is one core, no ``fork``, or this is a worker already.
    ``where``: the model and engine an unexpected error names. ``meanwhile``: called
    here once ``here`` is done if the worker is still running (this process would only
    wait): work the caller would do next anyway, whose result must not depend on when
    it runs; not called where nothing runs beside.

    Returns:
        ``side``'s result (the :class:`MemprofError` it raised, in its place) and
        ``here``'s results, in order.

    Raises:
        What a call of ``here`` raises (the worker is stopped first).
    """
    global _beside
    if (
        _in_worker
        or _beside
        or available_workers() < 2
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        done = [call() for call in here]
        try:
            return side(), done
        except MemprofError as e:
            return e, done
    _WORK["calls"] = [side]
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=_child_init)
    try:
        future = pool.submit(_run_one, 0)
        _beside = True  # the cores are taken: a call here runs its own parts one by one
        try:
            done = [call() for call in here]
            if meanwhile is not None and not future.done():
                meanwhile()
        finally:
            _beside = False
        try:
            _, kind, payload = future.result()
        except BrokenProcessPool as e:  # a worker killed (out of host memory, a signal, a crash)
            kind, payload = "internal", (f"a worker process died while running it ({e})", "")
        pool.shutdown(wait=True)
    except BaseException:
        _kill(pool)
        raise
    finally:
        _WORK.clear()
    return (payload if kind == "ok" else _rebuild(kind, payload, where or {})), done


def run_many(
    engine: Engine,
    rm: ResolvedModel,
    jobs: Sequence[Job],
    *,
    allow_pickle: bool = False,
    workers: int | None = None,
    stop_at_error: bool = False,
    progress: Callable[[int, str], None] | None = None,
) -> list[RunResult | BaseException]:
    """Measure each job on ``engine``: :func:`run_calls`, in workers where the engine is simulated.

    In this process each job's own status lines go to ``progress(i, message)``.
    """

    def say(i: int, msg: str) -> None:
        if progress is not None and not _in_worker:
            progress(i, msg)

    calls = [
        partial(
            engine.run_detailed,
            rm,
            job.setup,
            allow_pickle=allow_pickle,
            measure=job.measure,
            progress=partial(say, i),
        )
        for i, job in enumerate(jobs)
    ]
    return run_calls(
        calls,
        parallel=engine.simulated,
        workers=workers,
        stop_at_error=stop_at_error,
        progress=progress,
        where={"model": rm.name, "engine": engine.name},
    )


__all__ = ["WORKERS_ENV", "Job", "available_workers", "in_worker", "run_beside", "run_calls", "run_many"]
