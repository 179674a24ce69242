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
"""

from __future__ import annotations

__version__ = "0.1.0"

from memprof.api import analyze, track
from memprof.plan import PlanResult, plan
from memprof.profile import Profile
from memprof.workload import Workload

__all__ = ["PlanResult", "Profile", "Workload", "__version__", "analyze", "plan", "track"]
