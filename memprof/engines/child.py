"""Run an engine's measurement in a child process with its own environment.

The CUDA caching allocator reads ``PYTORCH_CUDA_ALLOC_CONF`` once, when CUDA
initialises, so a step measured with other allocator settings needs a process
in which CUDA has not started yet. :func:`run_in_child` starts one with the
``spawn`` method (a fresh interpreter: nothing of the parent's CUDA state), sets
the variables in it before anything touches CUDA, runs the engine there and
sends the result back as plain data (the profile through ``to_dict``). The
parent's environment is never changed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from memprof.allocator_model import ENV_VAR, GENERIC_ENV_VAR, alloc_conf_string
from memprof.errors import EnvironmentProblem, InputError, InternalError, MemprofError, OutOfMemory
from memprof.profile import Profile

#: seconds between checks that the child is still alive while waiting for it
_POLL_S = 0.5


def child_env_updates(alloc_conf: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The environment changes for a child measuring with these allocator settings.

    Returns:
        ``PYTORCH_CUDA_ALLOC_CONF`` and ``PYTORCH_ALLOC_CONF`` (its successor,
        which recent PyTorch reads first) set to the settings' value; None
        (unset) for PyTorch's defaults, so a setting in the user's shell does
        not leak into a measurement that asked for the defaults.

    Raises:
        InputError: invalid settings.
    """
    conf = alloc_conf_string(alloc_conf or {}) or None
    return {ENV_VAR: conf, GENERIC_ENV_VAR: conf}


def apply_env_updates(updates: Mapping[str, str | None], env: dict[str, str] | Any = None) -> None:
    """Set (or, for None, remove) variables in ``env`` (default: this process's environment)."""
    target = os.environ if env is None else env
    for k, v in updates.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v


def _child_main(
    results: Any,
    env_updates: dict[str, str | None],
    engine_factory: Callable[[], Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """The child's entry point: environment first, then the engine (CUDA starts in there)."""
    apply_env_updates(env_updates)
    try:

        def progress(msg: str) -> None:
            results.put(("progress", msg))

        engine = engine_factory()
        r = engine.run_detailed(*args, progress=progress, **kwargs)
        output = r.output.detach().cpu() if r.output is not None else None
        payload = {
            "profile": r.profile.to_dict(),
            "flops": r.flops,
            "seconds": r.seconds,
            "loss_before": r.loss_before,
            "loss_after": r.loss_after,
            "output": output,
            "env": {k: os.environ.get(k) for k in env_updates},
        }
        results.put(("result", payload))
    except InternalError as e:  # its fields and the child's traceback, for the parent's crash report
        fields = {k: getattr(e, k) for k in ("model", "engine", "op", "op_raised", "module")}
        fields["message"] = e.what
        results.put(("error", ("InternalError", str(e), None, fields | {"detail": e.traceback_text()})))
    except MemprofError as e:
        profile = getattr(e, "profile", None)
        results.put(
            ("error", (type(e).__name__, str(e), profile.to_dict() if isinstance(profile, Profile) else None))
        )
    except BaseException as e:  # a bug or a crash of the library: report it, do not hang the parent
        what = InternalError(e).what
        fields = {"message": f"in the measurement child process: {what}", "detail": traceback.format_exc()}
        results.put(("error", ("InternalError", str(e), None, fields)))


def _raise_from_child(
    kind: str, message: str, profile: dict[str, Any] | None, fields: dict[str, Any] | None = None
) -> None:
    if kind == "OutOfMemory":
        raise OutOfMemory(message, Profile.from_dict(profile) if profile else None)
    if kind in ("InputError", "NotSupported", "ProblemsError"):
        raise InputError(message)
    if kind == "EnvironmentProblem":
        raise EnvironmentProblem(message)
    if kind == "InternalError":
        raise InternalError(**(fields or {"message": message}))
    raise MemprofError(f"the measurement child process failed: {message}")


def run_in_child(
    engine_factory: Callable[[], Any],
    env_updates: Mapping[str, str | None],
    *args: Any,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``engine_factory().run_detailed(*args, **kwargs)`` in a spawned child process.

    Args:
        engine_factory: a picklable callable (a class or module-level function)
            that builds the engine in the child.
        env_updates: environment variables set (None: removed) in the child
            before the engine is built.
        args, kwargs: passed to ``run_detailed`` (picklable: the resolved model,
            the setup, the measure).
        progress: receives the child's progress lines.

    Returns:
        plain data: ``profile`` (a :class:`Profile`), ``flops``, ``seconds``,
        ``loss_before``, ``loss_after``, ``output`` (a CPU tensor or None) and
        ``env`` (the variables as the child saw them).

    Raises:
        OutOfMemory, InputError, EnvironmentProblem: raised in the child.
        MemprofError: the child crashed or failed otherwise.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(
        target=_child_main,
        args=(results, dict(env_updates), engine_factory, args, kwargs),
        name="memprof-measure",
        daemon=True,
    )
    proc.start()
    try:
        while True:
            try:
                kind, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                if proc.is_alive():
                    continue
                try:  # it may have put its result just before exiting
                    kind, payload = results.get(timeout=_POLL_S)
                except queue.Empty:
                    raise InternalError(
                        message=f"the measurement child process exited (code {proc.exitcode}) without a result"
                    ) from None
            if kind == "progress":
                if progress is not None:
                    progress(payload)
                continue
            if kind == "error":
                _raise_from_child(*payload)
            payload["profile"] = Profile.from_dict(payload["profile"])
            return dict(payload)
    except KeyboardInterrupt:
        # Ctrl-C reaches the child too, SIGTERM only this process: stop it now, not after the wait below
        proc.terminate()
        raise
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        results.close()
