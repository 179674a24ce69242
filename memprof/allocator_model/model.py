"""The caching allocator model itself: :class:`CachingAllocatorModel` (the rules are in :mod:`memprof.allocator_model`)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from memprof.allocator_model.blocks import (
    _EXPANDABLE_VA,
    _Block,
    _is_mapped,
    _Pool,
    _Segment,
    _segment_of,
    round_size,
    segment_size,
)
from memprof.allocator_model.estimate import AllocatorEstimate, _state_dict, allocator_timeline
from memprof.allocator_model.settings import (
    LARGE_BUFFER,
    MAX_NON_SPLIT_ROUNDING,
    MIN_BLOCK,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorSettings,
    alloc_conf_string,
)
from memprof.errors import InputError


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
        if size > _EXPANDABLE_VA:
            # no GPU has 64 TiB: a tensor this large is past memprof's bounds (memprof.bounds),
            # refused here too for shapes the bounds could not see (an eager attention's scores)
            raise InputError(
                f"the step asks the allocator for one block of {size / 2**40:.0f} TiB, past the allocator "
                "model's 64 TiB address space (no GPU holds it); lower --batch-size or --seq-len"
            )
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
