"""The console script's garbage collector, paused while the libraries import.

Importing torch, transformers and a model's module creates about a million
long-lived objects and no garbage to speak of; Python's automatic collector still
walks the growing heap about ten times on the way (0.6 to 1 s of an 8 s start on
2 cores, measured with ``gc.callbacks``). The console script pauses it before it
imports anything (:func:`pause`); the first step an engine runs turns it back on
(:func:`resume`, from :meth:`memprof.engines.base.Engine.run_detailed`), so no
step, measured or not, runs with it paused, and the command's end does too. A
library caller never pauses it: only the console script's own process calls
:func:`pause`.
"""

from __future__ import annotations

import gc

#: True while :func:`pause` holds the collector off
_paused = False


def pause() -> None:
    """Turn automatic collection off until :func:`resume` (a collector already off is left alone)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Turn automatic collection back on if :func:`pause` turned it off (else nothing)."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()


def paused() -> bool:
    """Whether :func:`pause` holds the collector off now."""
    return _paused


__all__ = ["pause", "paused", "resume"]
