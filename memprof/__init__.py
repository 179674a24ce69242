"""memprof: GPU-memory profiler and optimizer for PyTorch and Hugging Face models.

Library entry points (the CLI is a thin layer over these)::

    import memprof

    # measure your own step
    with memprof.track(model, optimizer) as t:
        step()
    profile = t.profile()

    # measure a model spec the way `memprof analyze` does
    profile = memprof.analyze("gpt2", mode="train", batch_size=8, seq_len=512, engine="sim")
"""

from __future__ import annotations

__version__ = "0.1.0"

from memprof.api import analyze, track
from memprof.profile import Profile

__all__ = ["Profile", "__version__", "analyze", "track"]
