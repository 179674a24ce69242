"""memprof: GPU-memory profiler and optimizer for PyTorch and Hugging Face models.

Library entry points (the CLI is a thin layer over these)::

    import memprof

    # measure your own step
    with memprof.track(model, optimizer) as t:
        step()
    profile = t.profile()

    # measure a model spec the way `memprof analyze` does
    profile = memprof.analyze("gpt2", mode="train", batch_size=8, seq_len=512, engine="sim")

    # the least costly optimizations that make a step fit a budget (sim engine)
    result = memprof.plan("llama-3-8b", memprof.Workload(batch_size=1, seq_len=2048), 24 * 2**30)

The names are imported on first use (PEP 562), so ``import memprof`` (and the
pytest plugin, and ``memprof --help``) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from memprof._version import __version__

if TYPE_CHECKING:
    from memprof.api import analyze, track
    from memprof.plan import PlanResult, plan
    from memprof.profile import Profile
    from memprof.workload import Workload

#: public name -> the module that defines it
_LAZY = {
    "analyze": "memprof.api",
    "track": "memprof.api",
    "plan": "memprof.plan",
    "PlanResult": "memprof.plan",
    "Profile": "memprof.profile",
    "Workload": "memprof.workload",
}

__all__ = ["PlanResult", "Profile", "Workload", "__version__", "analyze", "plan", "track"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Face(types.ModuleType):
    """The package's module type: a public name is never shadowed by a submodule of that name.

    Importing a submodule binds it on its package (``memprof.plan = <module memprof.plan>``);
    ``memprof.plan`` is the function, as it was when this file imported everything eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            return  # __getattr__ binds the public name on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
