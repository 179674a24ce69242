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

Known limitations: one stream and no CUDA graphs; events a real allocator waits
on (cross-stream uses) are ignored; the layout at the start is the replay of the
tensors alive when tracking began (the real one also has the warm-up step's
history); memory outside the allocator (CUDA context, cuBLAS workspace) is not
in it; ``roundup_power2_divisions`` and other settings are not modelled.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.errors import InputError
from memprof.units import CUDA_BLOCK_BYTES

MiB = 2**20
#: every block is a multiple of this (kMinBlockSize)
MIN_BLOCK = CUDA_BLOCK_BYTES
#: largest request served from the small pool (kSmallSize)
SMALL_SIZE = 1 * MiB
#: segment size of the small pool (kSmallBuffer)
SMALL_BUFFER = 2 * MiB
#: segment size for requests below MIN_LARGE_ALLOC (kLargeBuffer)
LARGE_BUFFER = 20 * MiB
#: from this size on a request gets its own segment (kMinLargeAlloc)
MIN_LARGE_ALLOC = 10 * MiB
#: own segments are rounded up to this (kRoundLarge)
ROUND_LARGE = 2 * MiB
#: how much larger than an oversize request a cached oversize block may be
MAX_NON_SPLIT_ROUNDING = LARGE_BUFFER
#: address space of one expandable segment: it never runs out in the model
_EXPANDABLE_VA = 2**46

#: the environment variable the settings go into (read when CUDA initialises)
ENV_VAR = "PYTORCH_CUDA_ALLOC_CONF"
#: its device-generic successor (PyTorch 2.8+), read first when set
GENERIC_ENV_VAR = "PYTORCH_ALLOC_CONF"


@dataclass(frozen=True)
class AllocatorSettings:
    """The caching allocator's settings memprof models (``PYTORCH_CUDA_ALLOC_CONF``).

    The defaults are PyTorch's: no expandable segments, no split limit, no
    garbage collection.
    """

    expandable_segments: bool = False
    #: blocks this large or larger are never split (0: unset; PyTorch requires > 20)
    max_split_size_mb: int = 0
    #: reclaim cached segments above this fraction of the capacity (0: off; 0 < t < 1)
    garbage_collection_threshold: float = 0.0

    def problems(self) -> list[str]:
        """What PyTorch would reject in these settings (it refuses them at CUDA init)."""
        out = []
        mb = self.max_split_size_mb
        if isinstance(mb, bool) or not isinstance(mb, int):
            out.append(f"max_split_size_mb must be an integer, got {mb!r}")
        elif mb != 0 and mb <= LARGE_BUFFER // MiB:
            out.append(f"max_split_size_mb must be 0 (unset) or more than {LARGE_BUFFER // MiB}, got {mb}")
        t = self.garbage_collection_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            out.append(f"garbage_collection_threshold must be a number, got {t!r}")
        elif t != 0 and not 0 < t < 1:
            out.append(f"garbage_collection_threshold must be 0 (off) or between 0 and 1, got {t}")
        if not isinstance(self.expandable_segments, bool):
            out.append(f"expandable_segments must be a boolean, got {self.expandable_segments!r}")
        return out

    @property
    def is_default(self) -> bool:
        return self == AllocatorSettings()

    @property
    def max_split_bytes(self) -> int | None:
        return self.max_split_size_mb * MiB if self.max_split_size_mb else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AllocatorSettings:
        """Settings from plain data (``StepSetup.alloc_conf``); empty or None: the defaults.

        Raises:
            InputError: an unknown key or a value PyTorch would reject.
        """
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown allocator settings {unknown}; known: {', '.join(sorted(known))}")
        settings = cls(**d)
        problems = settings.problems()
        if problems:
            raise InputError("allocator settings: " + "; ".join(problems))
        return settings


def alloc_conf_string(settings: AllocatorSettings | Mapping[str, Any] | None) -> str:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` value of the settings ('' for PyTorch's defaults).

    >>> alloc_conf_string({"expandable_segments": True, "max_split_size_mb": 128})
    'expandable_segments:True,max_split_size_mb:128'

    Raises:
        InputError: invalid settings.
    """
    s = settings if isinstance(settings, AllocatorSettings) else AllocatorSettings.from_dict(settings)
    parts = []
    if s.expandable_segments:
        parts.append("expandable_segments:True")
    if s.max_split_size_mb:
        parts.append(f"max_split_size_mb:{s.max_split_size_mb}")
    if s.garbage_collection_threshold:
        parts.append(f"garbage_collection_threshold:{s.garbage_collection_threshold:g}")
    return ",".join(parts)


def round_size(nbytes: int) -> int:
    """The block size a request gets: a multiple of 512 bytes, at least 512."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes of the segment allocated for a (rounded) request no cached block serves."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass
class AllocatorEstimate:
    """What the allocator model found for a trace (plain data; bytes are integers)."""

    settings: dict[str, Any]
    #: the PYTORCH_CUDA_ALLOC_CONF value of the settings
    conf: str
    #: the memory the allocator could use (None: unlimited; no GC, no OOM retries)
    capacity_bytes: int | None
    #: highest reserved memory (torch.cuda.max_memory_reserved)
    peak_reserved_bytes: int = 0
    #: highest allocated memory, whole blocks (torch.cuda.max_memory_allocated)
    peak_allocated_bytes: int = 0
    #: highest sum of the requests, each rounded to 512 bytes (the tracker's peak)
    peak_requested_bytes: int = 0
    #: peak reserved minus peak allocated: what the cache holds beyond the tensors
    fragmentation_bytes: int = 0
    #: segments allocated (cudaMalloc calls; page mappings with expandable segments)
    segments: int = 0
    #: segments released (cudaFree or unmap calls: garbage collection, OOM retries)
    segments_released: int = 0
    reserved_at_end_bytes: int = 0
    allocated_at_end_bytes: int = 0
    #: allocations retried after releasing the whole cache (num_alloc_retries)
    alloc_retries: int = 0
    #: allocations that did not fit in the capacity even after the retries
    ooms: int = 0
    notes: list[str] = field(default_factory=list)
    #: allocated and reserved over the trace, downsampled (:func:`allocator_timeline`;
    #: ``x`` is ``"op"``); None unless the replay was asked for it
    timeline: dict[str, Any] | None = None
    #: the allocator's state when allocated first reached its peak (``"allocated"``) and
    #: when reserved did (``"reserved"``): see :data:`AT_PEAK_KEYS`; None: nothing allocated
    at_peak: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: {"allocated": None, "reserved": None}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Segment:
    __slots__ = ("expandable", "page")

    def __init__(self, expandable: bool, page: int) -> None:
        self.expandable = expandable
        self.page = page


class _Block:
    __slots__ = ("addr", "allocated", "gc_base", "mapped", "next", "pool", "prev", "requested", "seg", "size")

    def __init__(self, addr: int, size: int, pool: _Pool, seg: _Segment, mapped: bool = True) -> None:
        self.addr = addr
        self.size = size
        self.pool = pool
        self.seg = seg
        self.mapped = mapped
        self.allocated = False
        self.requested = 0
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.gc_base = 0

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    """Free mapped blocks ordered by (size, address), as the allocator's std::set."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[tuple[int, int], _Block] = {}
        # unmapped parts of expandable segments, by address
        self.unmapped_addrs: list[int] = []
        self.unmapped: dict[int, _Block] = {}
        # get_free_block calls (a free block's age is counted in them, for GC)
        self.searches = 0

    def insert(self, b: _Block) -> None:
        key = (b.size, b.addr)
        bisect.insort(self.keys, key)
        self.blocks[key] = b
        b.gc_base = self.searches

    def erase(self, b: _Block) -> None:
        key = (b.size, b.addr)
        del self.keys[bisect.bisect_left(self.keys, key)]
        del self.blocks[key]

    def insert_unmapped(self, b: _Block) -> None:
        bisect.insort(self.unmapped_addrs, b.addr)
        self.unmapped[b.addr] = b

    def erase_unmapped(self, b: _Block) -> None:
        del self.unmapped_addrs[bisect.bisect_left(self.unmapped_addrs, b.addr)]
        del self.unmapped[b.addr]


class CachingAllocatorModel:
    """A model of one device's caching allocator (one stream); see the module docstring.

    Args:
        settings: the allocator settings.
        capacity_bytes: the memory it may reserve (enables garbage collection and
            the out-of-memory retries); None: unlimited.
    """

    def __init__(self, settings: AllocatorSettings | None = None, capacity_bytes: int | None = None) -> None:
        self.settings = settings or AllocatorSettings()
        problems = self.settings.problems()
        if problems:
            raise InputError("allocator settings: " + "; ".join(problems))
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise InputError(f"allocator capacity must be positive, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._max_split = self.settings.max_split_bytes
        self._expandable = self.settings.expandable_segments
        self._gc = capacity_bytes is not None and self.settings.garbage_collection_threshold > 0
        self._small = _Pool(small=True)
        self._large = _Pool(small=False)
        self._next_addr = 1 << 20
        self.reserved = 0
        self.allocated = 0
        self.requested = 0
        #: segments reserved now (expandable segments: contiguous mapped ranges, as
        #: torch.cuda.memory_snapshot reports them)
        self.live_segments = 0
        #: the caller's clock, stamped on the states kept at the peaks: the index
        #: of the event being replayed, and the event (its 5th field is the op
        #: counter); :meth:`replay` sets them
        self.event = 0
        self.current: Sequence[Any] | None = None
        #: the blocks allocated by :meth:`replay`, by the trace's key
        self.live: dict[Any, _Block] = {}
        #: when a list: every action in the order the allocator takes it, as
        #: ``(action, addr, size, event)``, with the actions of a CUDA snapshot's
        #: device trace (alloc, free_requested, free_completed, segment_alloc,
        #: segment_free, segment_map, segment_unmap, oom: its addr is the bytes the
        #: capacity had left); :mod:`memprof.snapshot` reads it
        self.history: list[tuple[str, int, int, int]] | None = None
        self._at_peak_allocated: tuple[int, ...] | None = None
        self._at_peak_reserved: tuple[int, ...] | None = None
        self.est = AllocatorEstimate(
            settings=self.settings.to_dict(),
            conf=alloc_conf_string(self.settings),
            capacity_bytes=capacity_bytes,
        )

    # ------------------------------------------------------------ public API
    def malloc(self, nbytes: int) -> _Block:
        """Allocate ``nbytes`` (rounded up to 512); returns the block (pass it to :meth:`free`)."""
        size = round_size(nbytes)
        pool = self._small if size <= SMALL_SIZE else self._large
        block = self._get_free_block(pool, size)
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(pool, size)
            if block is None and self._release_available(pool, size):
                block = self._alloc_block(pool, size)
            if block is None and self.capacity is not None:
                # the last resort before out-of-memory: release the whole cache, retry
                self._release_cached()
                block = self._alloc_block(pool, size, retry=True)
            if block is None:
                # out of memory: counted, and allocated anyway so the replay goes on
                self.est.ooms += 1
                if self.history is not None:
                    free = max(0, (self.capacity or 0) - self.reserved)
                    self.history.append(("oom", free, size, self.event))
                block = self._alloc_block(pool, size, force=True)
                assert block is not None
        block = self._alloc_found(block, size)
        # The peaks are checked once the request is served: reserved only grows
        # inside malloc (releases come before the new segment), so its value now
        # is the highest of the call, and the state kept is a settled one.
        e = self.est
        allocated, reserved = self.allocated, self.reserved
        if allocated > e.peak_allocated_bytes or reserved > e.peak_reserved_bytes:
            # inline, not a method: a step's memory climbs, this runs for a quarter of its events
            sk, lk = self._small.keys, self._large.keys
            ev = self.current
            state = (
                self.event,
                ev[4] if ev is not None and len(ev) > 4 else self.event,
                allocated,
                reserved,
                max(sk[-1][0] if sk else 0, lk[-1][0] if lk else 0),
                self.live_segments,
            )
            if allocated > e.peak_allocated_bytes:
                e.peak_allocated_bytes = allocated
                self._at_peak_allocated = state
            if reserved > e.peak_reserved_bytes:
                e.peak_reserved_bytes = reserved
                self._at_peak_reserved = state
        if self.history is not None:
            self.history.append(("alloc", block.addr, size, self.event))
        return block

    def free(self, block: _Block) -> None:
        """Return a block to its pool (merged with free neighbours); the memory stays reserved."""
        if not block.allocated:
            return
        if self.history is not None:
            ev = self.event
            self.history.append(("free_requested", block.addr, block.requested, ev))
            self.history.append(("free_completed", block.addr, block.requested, ev))
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        for other in (block.prev, block.next):
            self._try_merge(block, other)
        block.pool.insert(block)

    def empty_cache(self) -> None:
        """Release every cached whole segment (``torch.cuda.empty_cache``)."""
        self._release_cached()

    def estimate(self) -> AllocatorEstimate:
        """The numbers so far."""
        e = self.est
        e.fragmentation_bytes = e.peak_reserved_bytes - e.peak_allocated_bytes
        e.reserved_at_end_bytes = self.reserved
        e.allocated_at_end_bytes = self.allocated
        e.at_peak = {
            "allocated": _state_dict(self._at_peak_allocated),
            "reserved": _state_dict(self._at_peak_reserved),
        }
        return e

    def layout(self) -> list[dict[str, Any]]:
        """The segments reserved now, in address order, with their blocks (plain data).

        Expandable segments count one segment per contiguous mapped range, as
        ``torch.cuda.memory_snapshot()`` reports them. Only the blocks
        :meth:`replay` allocated are found (with :meth:`malloc` called directly,
        a segment with no free block is missed).

        Returns:
            One dict per segment: ``address``, ``size``, ``small`` (the small
            pool's), ``expandable`` and ``blocks``: ``(address, size, requested,
            allocated)`` tuples in address order, covering the segment
            (``requested`` is 0 for free blocks).
        """
        blocks: list[_Block] = list(self.live.values())
        for pool in (self._small, self._large):
            blocks += pool.blocks.values()
            blocks += pool.unmapped.values()
        out: list[dict[str, Any]] = []
        for head in sorted((b for b in blocks if b.prev is None), key=lambda b: b.addr):
            run: list[_Block] = []
            b: _Block | None = head
            while b is not None:
                if b.mapped:
                    run.append(b)
                elif run:
                    out.append(_segment_of(run))
                    run = []
                b = b.next
            if run:
                out.append(_segment_of(run))
        return out

    def largest_free_block(self) -> int:
        """Bytes of the largest cached free block (mapped memory no tensor holds)."""
        sk, lk = self._small.keys, self._large.keys
        return max(sk[-1][0] if sk else 0, lk[-1][0] if lk else 0)

    def replay(
        self, events: Iterable[Any], *, timeline: bool = False, max_points: int = 800
    ) -> AllocatorEstimate:
        """Replay a trace on this allocator (see the module's :func:`replay`).

        Args:
            events: ``(key, nbytes, alloc)`` items, optionally with the phase and
                the op counter as 4th and 5th fields (:class:`~memprof.tracking.TraceEvent`).
            timeline: also keep allocated and reserved after every event
                (``AllocatorEstimate.timeline``, downsampled to about ``max_points``).
            max_points: the timeline's bound.

        Returns:
            The estimate so far.
        """
        live = self.live
        unmatched = 0
        ops: list[int] = []
        allocated: list[int] = []
        reserved: list[int] = []
        # bound once, as the model's methods: the loop runs for every event
        add_op, add_allocated, add_reserved = ops.append, allocated.append, reserved.append
        malloc, free = self.malloc, self.free
        recording = self.history is not None
        for i, ev in enumerate(events):
            key, nbytes, alloc = ev[0], ev[1], ev[2]
            if alloc:
                if nbytes <= 0:
                    continue
                # the clock is read where a peak can rise (malloc) or an action is recorded
                self.event = i
                self.current = ev
                old = live.pop(key, None)
                if old is not None:
                    free(old)
                live[key] = malloc(nbytes)
            else:
                b = live.pop(key, None)
                if b is None:
                    unmatched += 1
                    continue
                if recording:
                    self.event = i
                    self.current = ev
                free(b)
            if timeline:
                add_op(ev[4] if len(ev) > 4 else i)
                add_allocated(self.allocated)
                add_reserved(self.reserved)
        est = self.estimate()
        if unmatched:
            est.notes.append(f"{unmatched} frees of storages never allocated in the trace were ignored")
        if timeline:
            est.timeline = allocator_timeline("op", ops, allocated, reserved, max_points=max_points)
        return est

    # ------------------------------------------------------------- internals
    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        if self._gc:
            pool.searches += 1
        keys = pool.keys
        i = bisect.bisect_left(keys, (size, -1))
        if i == len(keys):
            return None
        block = pool.blocks[keys[i]]
        if block.seg.expandable:
            # for best fit, a block at the end of an expandable segment counts
            # with the unmapped space it can grow into
            def grown(b: _Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

            while i + 1 < len(keys) and grown(pool.blocks[keys[i + 1]]) < grown(block):
                i += 1
                block = pool.blocks[keys[i]]
        ms = self._max_split
        if ms is not None:
            # an oversize block never serves a smaller request, and an oversize
            # request only takes a block at most 20 MiB larger than itself
            if size < ms and block.size >= ms:
                return None
            if size >= ms and block.size >= size + MAX_NON_SPLIT_ROUNDING:
                return None
        pool.erase(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.small or self._expandable:
            return remaining >= MIN_BLOCK
        ms = self._max_split
        return (ms is None or size < ms) and remaining > SMALL_SIZE

    def _alloc_found(self, block: _Block, size: int) -> _Block:
        if self._should_split(block, size):
            rest = block
            block = _Block(rest.addr, size, rest.pool, rest.seg)
            block.prev = rest.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = rest
            rest.prev = block
            rest.addr += size
            rest.size -= size
            rest.pool.insert(rest)
        block.allocated = True
        block.requested = size
        self.allocated += block.size
        self.requested += size
        e = self.est
        if self.requested > e.peak_requested_bytes:
            e.peak_requested_bytes = self.requested
        return block

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _reserve(self, nbytes: int) -> None:
        # the peak is checked at the end of malloc, the only caller
        self.reserved += nbytes
        self.est.segments += 1

    def _alloc_block(self, pool: _Pool, size: int, retry: bool = False, force: bool = False) -> _Block | None:
        if retry:
            self.est.alloc_retries += 1
        if self._expandable:
            return self._alloc_expandable(pool, size, force)
        n = segment_size(size)
        if not force and not self._fits(n):
            return None
        block = _Block(self._next_addr, n, pool, _Segment(False, n))
        self._next_addr += n
        self._reserve(n)
        self.live_segments += 1
        if self.history is not None:
            self.history.append(("segment_alloc", block.addr, n, self.event))
        return block

    # expandable segments ---------------------------------------------------
    def _alloc_expandable(self, pool: _Pool, size: int, force: bool) -> _Block | None:
        cand = self._find_expandable(pool, size)
        page = cand.seg.page
        need = size - (cand.size if cand.mapped else 0)
        if not force and not self._fits(-(-need // page) * page):
            return None
        if not cand.mapped:
            self._map(cand, min(cand.size, size))
        while cand.size < size:
            nxt = cand.next
            assert nxt is not None
            self._map(nxt, min(size - cand.size, nxt.size))  # merges cand into nxt
            cand = nxt
        pool.erase(cand)
        return cand

    def _find_expandable(self, pool: _Pool, size: int) -> _Block:
        def free(b: _Block | None) -> bool:
            return b is not None and not b.allocated

        def room(b: _Block | None) -> int:
            n = 0
            while n < size and b is not None and free(b):
                n += b.size
                b = b.next
            return n

        for addr in pool.unmapped_addrs:
            c = pool.unmapped[addr]
            if free(c.prev):
                assert c.prev is not None
                c = c.prev
            if room(c) >= size:
                return c
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        base = -(-self._next_addr // page) * page
        self._next_addr = base + _EXPANDABLE_VA
        cand = _Block(base, _EXPANDABLE_VA, pool, _Segment(True, page), mapped=False)
        pool.insert_unmapped(cand)
        return cand

    def _map(self, b: _Block, size: int) -> None:
        """Map the pages covering the first ``size`` bytes of unmapped block ``b``."""
        page = b.seg.page
        n = min(-(-size // page) * page, b.size)
        pool = b.pool
        pool.erase_unmapped(b)
        b.mapped = True
        if n < b.size:
            rest = _Block(b.addr + n, b.size - n, pool, b.seg, mapped=False)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            pool.insert_unmapped(rest)
            b.size = n
        # a new mapped range, or one that joins the ranges on either side
        self.live_segments += 1 - _is_mapped(b.prev) - _is_mapped(b.next)
        if self.history is not None:
            self.history.append(("segment_map", b.addr, n, self.event))
        self._try_merge(b, b.prev)
        self._try_merge(b, b.next)
        pool.insert(b)
        self._reserve(n)

    def _unmap(self, b: _Block) -> None:
        """Unmap the whole pages inside free block ``b`` (it is in its pool)."""
        page = b.seg.page
        start = -(-b.addr // page) * page
        end = (b.addr + b.size) // page * page
        if end <= start:
            return
        pool = b.pool
        pool.erase(b)
        if start > b.addr:
            before = _Block(b.addr, start - b.addr, pool, b.seg)
            before.prev, before.next = b.prev, b
            if b.prev is not None:
                b.prev.next = before
            b.prev = before
            pool.insert(before)
        if end < b.addr + b.size:
            after = _Block(end, b.addr + b.size - end, pool, b.seg)
            after.prev, after.next = b, b.next
            if b.next is not None:
                b.next.prev = after
            b.next = after
            pool.insert(after)
        b.addr, b.size, b.mapped = start, end - start, False
        # the range loses these pages: it goes, shrinks or splits in two
        self.live_segments += _is_mapped(b.prev) + _is_mapped(b.next) - 1
        if self.history is not None:
            self.history.append(("segment_unmap", start, end - start, self.event))
        self._try_merge(b, b.prev)
        self._try_merge(b, b.next)
        pool.insert_unmapped(b)
        self.reserved -= end - start
        self.est.segments_released += 1

    # merging and releasing ---------------------------------------------------
    def _try_merge(self, dst: _Block, src: _Block | None) -> None:
        """Merge free neighbour ``src`` into ``dst`` (which is in no pool index)."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            src.pool.erase(src)
        else:
            src.pool.erase_unmapped(src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    def _release_block(self, b: _Block) -> None:
        """cudaFree a cached whole segment."""
        b.pool.erase(b)
        self.reserved -= b.size
        self.est.segments_released += 1
        self.live_segments -= 1
        if self.history is not None:
            self.history.append(("segment_free", b.addr, b.size, self.event))

    def _release_cached(self) -> None:
        """Release every cached whole segment; unmap free pages of expandable segments."""
        for pool in (self._large, self._small):
            to_unmap = []
            for key in list(pool.keys):
                b = pool.blocks.get(key)
                if b is None:
                    continue
                if b.seg.expandable:
                    to_unmap.append(b)
                elif not b.is_split:
                    self._release_block(b)
            for b in to_unmap:
                self._unmap(b)
                if not b.mapped and not b.is_split:
                    pool.erase_unmapped(b)  # the whole expandable segment goes

    def _release_available(self, pool: _Pool, size: int) -> bool:
        """Release cached oversize blocks, just enough for ``size`` (only with max_split_size_mb)."""
        ms = self._max_split
        if ms is None:
            return False
        want = max(size, ms)
        keys = pool.keys
        i = bisect.bisect_left(keys, (want, -1))
        if i < len(keys) and not pool.blocks[keys[i]].seg.expandable:
            b = pool.blocks[keys[i]]
            if b.is_split:
                return False
            self._release_block(b)
            return True
        # no single block is large enough: release oversize blocks, largest first
        released = 0
        for key in reversed(keys[:i]):
            if released >= want or key[0] < ms:
                break
            b = pool.blocks[key]
            if not b.seg.expandable and not b.is_split:
                released += b.size
                self._release_block(b)
        return released >= want

    def _garbage_collect(self) -> None:
        """Release old whole free segments of the large pool above the threshold."""
        assert self.capacity is not None
        threshold = int(self.settings.garbage_collection_threshold * self.capacity)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self._large

        def age(b: _Block) -> int:
            return pool.searches - b.gc_base

        freeable = [b for b in pool.blocks.values() if not b.is_split]
        total_age = sum(age(b) for b in freeable)
        count = len(freeable)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            limit = total_age / count
            freed = False
            for key in list(pool.keys):
                b = pool.blocks[key]
                if not b.is_split and not b.seg.expandable and age(b) >= limit:
                    freed = True
                    reclaimed += b.size
                    total_age -= age(b)
                    count -= 1
                    self._release_block(b)


def replay(
    events: Iterable[Any],
    settings: AllocatorSettings | Mapping[str, Any] | None = None,
    *,
    capacity_bytes: int | None = None,
    timeline: bool = False,
    max_points: int = 800,
) -> AllocatorEstimate:
    """Replay an allocation trace through the allocator model.

    Args:
        events: ``(storage, nbytes, alloc)`` items in order (the tracker's
            :class:`~memprof.tracking.TraceEvent` fits): ``alloc`` True allocates
            ``nbytes`` for ``storage``, False frees what ``storage`` holds.
            Zero-byte allocations take no memory (as on CUDA) and are skipped.
            A 5th field is the event's op counter (the timeline's x axis and the
            peaks' ``op``); without it, the event's index.
        settings: the allocator settings (None: PyTorch's defaults).
        capacity_bytes: the memory the allocator may reserve; None: unlimited.
        timeline: also return allocated and reserved over the events
            (``AllocatorEstimate.timeline``); it adds about a sixth to the replay's time.
        max_points: the timeline's bound (see :func:`allocator_timeline`).

    Returns:
        The estimate: peak reserved, peak allocated, fragmentation, segments, the
        state at the peaks, and the timeline when asked.

    Raises:
        InputError: invalid settings or capacity.
    """
    s = settings if isinstance(settings, AllocatorSettings) else AllocatorSettings.from_dict(settings)
    return CachingAllocatorModel(s, capacity_bytes).replay(events, timeline=timeline, max_points=max_points)


#: the keys of each state in ``AllocatorEstimate.at_peak``
AT_PEAK_KEYS = (
    # the event's index in the trace, and its op counter (None where there is none)
    "event",
    "op",
    "allocated_bytes",
    "reserved_bytes",
    # reserved minus allocated at that moment: what the cache holds beyond the blocks
    "fragmentation_bytes",
    # the largest cached free block: the largest request the cache could serve
    # without reserving more (in a segment of the right pool)
    "largest_free_block_bytes",
    # segments reserved (expandable segments: contiguous mapped ranges)
    "segments",
)


def _state_dict(state: tuple[int, ...] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    event, op, allocated, reserved, largest, segments = state
    return dict(zip(AT_PEAK_KEYS, (event, op, allocated, reserved, reserved - allocated, largest, segments)))


def _segment_of(run: list[_Block]) -> dict[str, Any]:
    first = run[0]
    return {
        "address": first.addr,
        "size": sum(b.size for b in run),
        "small": first.pool.small,
        "expandable": first.seg.expandable,
        "blocks": [(b.addr, b.size, b.requested if b.allocated else 0, b.allocated) for b in run],
    }


def _is_mapped(b: _Block | None) -> int:
    return 1 if b is not None and b.mapped else 0


def allocator_timeline(
    x_name: str, x: list[int], allocated: list[int], reserved: list[int], *, max_points: int = 800
) -> dict[str, Any]:
    """Allocated and reserved bytes over a trace, downsampled so that the peaks survive.

    As :meth:`memprof.tracking.Tracker.timeline`: past ``max_points`` rows, the
    rows are cut into buckets of consecutive rows and each bucket keeps the rows
    of its lowest and highest allocated and of its lowest and highest reserved
    (the first of equal ones), in order; the first and last rows are kept too.

    Args:
        x_name: what ``x`` counts (``"op"``: the tracker's op counter; ``"event"``:
            the index of the event in a CUDA snapshot's trace).
        x: the x value of each row.
        allocated: allocated bytes after each row's event.
        reserved: reserved bytes after each row's event.
        max_points: at most this many points are kept.

    Returns:
        Plain data: ``x`` (``x_name``), ``x_name`` (the x values kept),
        ``allocated``, ``reserved``, ``rows`` (before downsampling),
        ``peak_allocated_index`` and ``peak_reserved_index`` (the points of the
        first highest values; -1 without rows).

    Raises:
        InputError: the lists differ in length, or ``max_points`` is below 8.
    """
    n = len(x)
    if len(allocated) != n or len(reserved) != n:
        raise InputError(f"timeline lists differ in length: {n}, {len(allocated)}, {len(reserved)}")
    if max_points < 8:
        raise InputError(f"a timeline needs at least 8 points, got max_points={max_points}")
    # the first row of each peak: found from the buckets' own maxima (no extra pass)
    peak_a = peak_r = -1
    if n <= max_points:
        keep = list(range(n))
        if n:
            peak_a, peak_r = allocated.index(max(allocated)), reserved.index(max(reserved))
    else:
        buckets = (max_points - 2) // 4
        picked = {0, n - 1}
        best_a = best_r = -1
        for b in range(buckets):
            lo, hi = b * n // buckets, (b + 1) * n // buckets
            if lo >= hi:
                continue
            # slices, min, max and index run in C: a 100k-row trace takes milliseconds
            a, r = allocated[lo:hi], reserved[lo:hi]
            a_max, r_max = max(a), max(r)
            i_a, i_r = lo + a.index(a_max), lo + r.index(r_max)
            picked.update((lo + a.index(min(a)), i_a, lo + r.index(min(r)), i_r))
            if a_max > best_a:
                best_a, peak_a = a_max, i_a
            if r_max > best_r:
                best_r, peak_r = r_max, i_r
        keep = sorted(picked)
    return {
        "x": x_name,
        x_name: [x[i] for i in keep],
        "allocated": [allocated[i] for i in keep],
        "reserved": [reserved[i] for i in keep],
        "rows": n,
        "peak_allocated_index": bisect.bisect_left(keep, peak_a) if n else -1,
        "peak_reserved_index": bisect.bisect_left(keep, peak_r) if n else -1,
    }


#: expandable segments are suggested when they would save at least this fraction of
#: the reserved peak ...
HINT_MIN_FRACTION = 0.02
#: ... and at least these bytes (below both, the model's error is of the same order)
HINT_MIN_BYTES = 64 * MiB


def expandable_segments_hint(
    baseline: AllocatorEstimate,
    expandable: AllocatorEstimate,
    *,
    measured_reserved_bytes: int | None = None,
) -> dict[str, Any]:
    """Whether ``expandable_segments:True`` would cut the reserved peak of a trace.

    Args:
        baseline: the replay with the settings in effect (without expandable segments).
        expandable: the replay of the same trace with expandable segments on.
        measured_reserved_bytes: the peak reserved a GPU measured for the step (cuda
            engine): the saving is then applied to it and the thresholds compare with it.

    Returns:
        Plain data: ``conf`` (the ``PYTORCH_CUDA_ALLOC_CONF`` value with expandable
        segments), ``peak_reserved_bytes`` (the model's peak with it),
        ``baseline_peak_reserved_bytes`` (the model's peak without it),
        ``saved_bytes`` (their difference; negative: it would reserve more) and
        ``message``: one line when it saves at least :data:`HINT_MIN_FRACTION` of
        the reserved peak and at least :data:`HINT_MIN_BYTES`, else None.
    """
    from memprof.units import format_bytes

    conf = expandable.conf
    saved = baseline.peak_reserved_bytes - expandable.peak_reserved_bytes
    reference = (
        measured_reserved_bytes if measured_reserved_bytes is not None else baseline.peak_reserved_bytes
    )
    message = None
    if saved >= HINT_MIN_BYTES and saved >= HINT_MIN_FRACTION * reference:
        if measured_reserved_bytes is None:
            message = (
                f"{ENV_VAR}={conf} would reserve {format_bytes(expandable.peak_reserved_bytes)} instead of "
                f"{format_bytes(baseline.peak_reserved_bytes)} (-{format_bytes(saved)}): "
                "the allocator model replays the same allocations"
            )
        else:
            message = (
                f"{ENV_VAR}={conf} would reserve about {format_bytes(reference - saved)} instead of the "
                f"{format_bytes(reference)} measured (-{format_bytes(saved)}): the allocator model "
                "replays this step's allocations with and without it"
            )
    return {
        "conf": conf,
        "peak_reserved_bytes": expandable.peak_reserved_bytes,
        "baseline_peak_reserved_bytes": baseline.peak_reserved_bytes,
        "saved_bytes": saved,
        "message": message,
    }


def settings_from_conf(conf: str) -> tuple[AllocatorSettings, list[str]]:
    """The modelled settings in a ``PYTORCH_CUDA_ALLOC_CONF`` value, and the options not modelled.

    >>> settings_from_conf("expandable_segments:True,roundup_power2_divisions:4")
    (AllocatorSettings(expandable_segments=True, max_split_size_mb=0, garbage_collection_threshold=0.0), ['roundup_power2_divisions'])

    Args:
        conf: the variable's value ('' or unset: PyTorch's defaults).

    Returns:
        The settings, and the names of the options it does not model (ignored).

    Raises:
        InputError: a modelled option with a value PyTorch would reject.
    """
    d: dict[str, Any] = {}
    ignored: list[str] = []
    for part in (conf or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition(":")
        key, value = key.strip(), value.strip()
        try:
            if key == "expandable_segments":
                if value not in ("True", "False"):
                    raise ValueError(value)
                d[key] = value == "True"
            elif key == "max_split_size_mb":
                d[key] = int(value)
            elif key == "garbage_collection_threshold":
                d[key] = float(value)
            else:
                ignored.append(key)
        except ValueError:
            raise InputError(f"{ENV_VAR}: bad value {value!r} for {key}") from None
    return AllocatorSettings.from_dict(d), ignored
