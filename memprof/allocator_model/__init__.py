"""A model of PyTorch's CUDA caching allocator: replay allocations, estimate reserved memory.

The sim engine knows which tensors a step allocates and frees, in order (the
tracker's trace), but not what the caching allocator reserves from the driver
to serve them. :func:`replay` runs that trace through a model of
``c10/cuda/CUDACachingAllocator.cpp`` (DeviceCachingAllocator) and returns the
peak reserved memory, the peak allocated memory as the allocator counts it
(whole blocks, as ``torch.cuda.max_memory_allocated``), their difference
(fragmentation) and the number of segments it asked the driver for. It also
keeps the allocator's state when allocated and reserved first reach their
peaks (``AllocatorEstimate.at_peak``: reserved minus allocated, the largest
cached free block, the segments), allocated and reserved over the trace on
request (``AllocatorEstimate.timeline``, downsampled), and, on request, every
action in the order of a CUDA snapshot's device trace (``history``, which
:mod:`memprof.snapshot` turns into a snapshot). :func:`expandable_segments_hint`
compares a replay with one under ``expandable_segments``.

The rules modelled (one stream, PyTorch 2.x):

* requests are rounded up to 512 bytes; those of 1 MiB or less go to the small
  pool, served from 2 MiB segments; larger ones to the large pool, served from
  20 MiB segments below 10 MiB and from their own segment (rounded up to 2 MiB)
  from 10 MiB on;
* a request takes the smallest cached free block that fits (ties: the lowest
  address); a block is split when the remainder is at least 512 bytes (small
  pool) or more than 1 MiB (large pool); a freed block merges with its free
  neighbours in the same segment; when no cached block fits, a new segment is
  allocated (``cudaMalloc``);
* ``max_split_size_mb``: blocks of that size or larger are never split, a
  request below it never takes one, and a request at or above it takes a cached
  block at most 20 MiB (``max_non_split_rounding``) larger;
* ``garbage_collection_threshold``: when no cached block fits and the reserved
  memory is above threshold x capacity, whole free segments of the large pool
  whose age (block searches since they were freed) is at least the average are
  released, until enough is reclaimed. The real allocator does this only under
  a memory fraction (``torch.cuda.set_per_process_memory_fraction``): here only
  when a capacity is given;
* with a capacity, an allocation that does not fit first releases cached
  oversize blocks (with ``max_split_size_mb``), then every cached whole segment,
  and retries; if it still does not fit it is counted as an out-of-memory and
  allocated anyway, so the replay goes on;
* ``expandable_segments``: one segment per pool grows in pages (2 MiB in the
  small pool, 20 MiB in the large pool) mapped at its end; a request that fits
  in no cached block maps the pages it lacks after the free block at the end,
  so free space at the end is reused instead of stranded. Any remainder of at
  least 512 bytes is split off. Free pages are unmapped only under memory
  pressure (the out-of-memory retry), never by garbage collection.

The parts: :mod:`~memprof.allocator_model.settings` (constants, settings,
``PYTORCH_CUDA_ALLOC_CONF``), :mod:`~memprof.allocator_model.blocks` (blocks,
segments, pools, request sizes), :mod:`~memprof.allocator_model.model` (the
allocator), :mod:`~memprof.allocator_model.estimate` (what a replay finds, the
timeline), :mod:`~memprof.allocator_model.replay` (:func:`replay`, the hint).

Known limitations: one stream and no CUDA graphs; events a real allocator waits
on (cross-stream uses) are ignored; the layout at the start is the replay of the
tensors alive when tracking began (the real one also has the warm-up step's
history); memory outside the allocator (CUDA context, cuBLAS workspace) is not
in it; ``roundup_power2_divisions`` and other settings are not modelled.
"""

from memprof.allocator_model.blocks import round_size, segment_size
from memprof.allocator_model.estimate import AT_PEAK_KEYS, AllocatorEstimate, allocator_timeline
from memprof.allocator_model.model import CachingAllocatorModel
from memprof.allocator_model.replay import (
    HINT_MIN_BYTES,
    HINT_MIN_FRACTION,
    expandable_segments_hint,
    replay,
)
from memprof.allocator_model.settings import (
    ENV_VAR,
    GENERIC_ENV_VAR,
    LARGE_BUFFER,
    MAX_NON_SPLIT_ROUNDING,
    MIN_BLOCK,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorSettings,
    MiB,
    alloc_conf_string,
    settings_from_conf,
)

__all__ = [
    "AT_PEAK_KEYS",
    "ENV_VAR",
    "GENERIC_ENV_VAR",
    "HINT_MIN_BYTES",
    "HINT_MIN_FRACTION",
    "LARGE_BUFFER",
    "MAX_NON_SPLIT_ROUNDING",
    "MIN_BLOCK",
    "MIN_LARGE_ALLOC",
    "ROUND_LARGE",
    "SMALL_BUFFER",
    "SMALL_SIZE",
    "AllocatorEstimate",
    "AllocatorSettings",
    "CachingAllocatorModel",
    "MiB",
    "alloc_conf_string",
    "allocator_timeline",
    "expandable_segments_hint",
    "replay",
    "round_size",
    "segment_size",
    "settings_from_conf",
]
