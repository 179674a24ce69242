"""The allocator model's blocks, segments and pools, and the sizes it rounds requests to."""

from __future__ import annotations

import bisect
from typing import Any

from memprof.allocator_model.settings import (
    LARGE_BUFFER,
    MIN_BLOCK,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
)

#: address space of one expandable segment: it never runs out in the model
_EXPANDABLE_VA = 2**46


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
