"""Model surgery: functions that change a built model (pruning, quantization, gated MLPs).

One module per kind: :mod:`~memprof.surgery.pruning` (unstructured, feed-forward
neurons, attention heads, 2:4), :mod:`~memprof.surgery.quantization` and
:mod:`~memprof.surgery.glu`; :mod:`~memprof.surgery.common` holds what they share.
Each function carries out one change on a model (real or fake tensors) and returns a
line for the report with what it measured (sparsity, sizes). The
optimizations call them from their ``transform_model`` hook
(:mod:`memprof.optimizations.pruning`, ``quantization``, ``glu``); ``memprof
apply`` runs the same hooks on the loaded weights in the form a saved
checkpoint can hold (``StepSetup.checkpoint_form``).
"""
