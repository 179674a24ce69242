"""Optimizations: one small module each, registered by name (see :mod:`.registry`).

Importing this package registers the built-in optimizations::

    from memprof import optimizations
    opt = optimizations.make("checkpointing", {"every": 2})
    reason = opt.applies_to(model, setup)  # None when it applies
    opt.apply(setup)
    setup.steps.append({"name": opt.name, "options": opt.options})
    # StepRunner(model, setup) then calls the hooks of every optimization in setup.steps

A new optimization is one module: a registered :class:`~.registry.Optimization`
subclass with its ``Config``, ``apply`` and the hooks it needs (see
:mod:`.registry`).
"""

from __future__ import annotations

from memprof.optimizations import (  # noqa: F401  (imported to register them)
    activation_offload,
    allocator,
    attention,
    checkpointing,
    chunking,
    distill,
    dynamic_padding,
    fsdp,
    glu,
    grad_accumulation,
    inference_mode,
    local_attention,
    lora,
    mixed_precision,
    optimizer,
    optimizer_in_backward,
    optimizer_offload,
    pruning,
    qlora,
    quantization,
)
from memprof.optimizations.registry import (
    Optimization,
    get,
    make,
    names,
    option_help,
    parse_options,
    register,
)

__all__ = ["Optimization", "get", "make", "names", "option_help", "parse_options", "register"]
