"""A deep stack's allocation trace, extended from three shallow traces: exact, or refused.

:mod:`memprof.engines.depth` traces a stack of identical blocks at three shallow
depths ``d``, ``d + p``, ``d + 2p`` and extrapolates the allocated figures of the
shallow traces' peak moment. The caching allocator's reserved memory needs more:
the whole step's allocations and frees, in order, with which allocation each
free releases. :func:`extend` builds that trace at the model's depth from the
shallow ones, and only when it can show that the trace is periodic in depth:

1. **The events.** Each event as ``(alloc or free, bytes, phase)``. The trace at
   ``d + p`` must be the one at ``d`` with runs of events inserted (one per place
   where a block's work happens: its parameters, its forward, its backward, its
   gradients' and optimizer's work...), and nothing changed or removed
   (:class:`difflib.SequenceMatcher`).
2. **Which allocation each free releases.** An event of the trace at ``d`` that
   releases the allocation of another of its events at ``d`` does so at ``d + p``
   too, or it releases the allocation of its rank among the live allocations of its
   size, counted from the newest (``n``) or the oldest (``o``), the same at both
   depths, or, where it releases one of the template's allocations at ``d`` and a run
   event's at ``d + p``, the newest or the oldest of those two events' allocations
   (where a run could be inserted at several places, the one where this holds is
   taken). An inserted event that releases an inserted event's allocation
   releases the newest live one that event made (a block's own temporaries, a stack
   of activations) or the oldest (a queue): the third depth tells which; one that
   releases one of the template's keeps its rank from the newest, or frees the
   oldest where that is what it does and the newest it is not, or, where the third
   depth shows it releasing a run event's allocation from the second period on, the
   newest or the oldest of that allocation and the run event's (a stack through the
   template's block, a chain of blocks).
3. **The check.** The rules of 1 and 2, learnt from the traces at ``d`` and
   ``d + p``, must give the trace at ``d + 2p`` exactly: every event, every free's
   allocation and every op counter. (One bit is read off that third trace rather
   than predicted: whether an inserted event's free takes the newest or the oldest
   allocation of another inserted event, or of a pool with the template's, which
   shows only from two periods on.)
   Then the trace at the model's depth is the template with each run repeated once
   per period.

Anything else (a change that is not an insertion, a rank that moves, a check that
fails) returns the reason, and the caller traces the whole model.
``tests/engines/test_depth_trace.py`` compares extended traces with whole ones
(every event, every pairing) for every bundled decoder and shipped recipe.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from memprof.tracking import TraceEvent

#: the longest shallow trace compared (events): past it the comparison is not worth its time
MAX_EVENTS = 200_000

Token = tuple[bool, int, "str | None"]
#: an event's origin in the template: ``(-1, index in the trace at d)`` for the template's
#: own events, ``(run, position in the run)`` for an inserted run's
Origin = tuple[int, int]
#: a free's rule: ``("n", rank, 0)``: the live allocation of its size of that rank from the
#: newest; ``("o", rank, 0)``: from the oldest; ``("k", run, position)``: the newest live
#: allocation made by that event of the template (run -1) or of a run; ``("q", run, position)``:
#: the oldest; ``("K" or "Q", run, position)``: the newest or oldest of the template's
#: allocation (``Template.base_partner``) and those of that run's event (a stack, a chain)
Rule = tuple[str, int, int]


def _token(e: TraceEvent) -> Token:
    return (e.alloc, e.nbytes, e.phase)


def _diff_tokens(t: Sequence[TraceEvent]) -> list[tuple[bool, int, str | None, bool, bool]]:
    """Each event's token, whether it is of the same op as the event before it, and whether
    it is of the same category.

    What the two shallow traces are aligned on: a multi-tensor op (the optimizer's
    ``_foreach`` ops over every adapter, each block's share a run of the same op) allocates
    one block's outputs after another's in one op, and the op after it frees them the same
    way. Without the first flag, an alignment can take one block's allocations and the next
    op's first frees as one run (a period split across two ops), which the third depth
    refutes. The second does the same for sections of one op: the tensors that exist when
    the step starts are recorded at one op counter, the parameters block after block, then
    the optimizer's state block after block (and QLoRA's quantization state between them);
    without it, one block's quantization state and the next section's first block can be
    taken as one run.
    """
    return [
        (e.alloc, e.nbytes, e.phase, i > 0 and e.op == t[i - 1].op, i > 0 and e.category == t[i - 1].category)
        for i, e in enumerate(t)
    ]


@dataclass
class _Pairs:
    """Each event's allocation (frees: the index of the allocation they release) and ranks."""

    partner: list[int]
    newest: list[int]
    oldest: list[int]


def _pairs(trace: Sequence[TraceEvent]) -> _Pairs | str:
    live: dict[int, int] = {}
    by_size: dict[int, list[int]] = defaultdict(list)
    partner, newest, oldest = [-1] * len(trace), [-1] * len(trace), [-1] * len(trace)
    for i, e in enumerate(trace):
        if e.alloc:
            if e.storage in live:
                return f"event {i}: storage allocated twice"
            live[e.storage] = i
            by_size[e.nbytes].append(i)
            continue
        j = live.pop(e.storage, None)
        if j is None:
            return f"event {i}: a free of a storage not allocated"
        same = by_size[e.nbytes]
        k = same.index(j)
        partner[i], newest[i], oldest[i] = j, len(same) - 1 - k, k
        del same[k]
    return _Pairs(partner, newest, oldest)


@dataclass
class Template:
    """The trace at the first depth with the runs inserted once per period."""

    base: list[TraceEvent]
    #: where each run goes (an index of ``base``: before that event), in order
    at: list[int]
    #: each run's events (from the trace one period deeper)
    runs: list[list[TraceEvent]]
    #: each event's op counter step from the event before it, by origin, one period deeper
    gaps: dict[Origin, int]
    #: how much the template's own events' steps grow by period
    slopes: dict[Origin, int]
    #: each free's rule, by origin
    rules: dict[Origin, Rule]
    #: inserted frees that release one of the template's allocations one period deeper:
    #: which (a chain, when the next period releases the previous period's instead)
    base_partner: dict[Origin, int] = field(default_factory=dict)

    def origins(self, periods: int) -> list[Origin]:
        out: list[Origin] = []
        prev = 0
        for r, i in enumerate(self.at):
            out.extend((-1, k) for k in range(prev, i))
            run = [(r, k) for k in range(len(self.runs[r]))]
            for _ in range(periods):
                out.extend(run)
            prev = i
        out.extend((-1, k) for k in range(prev, len(self.base)))
        return out

    def event(self, o: Origin) -> TraceEvent:
        return self.base[o[1]] if o[0] < 0 else self.runs[o[0]][o[1]]

    def build(self, periods: int, limit: int | None = None) -> list[TraceEvent] | str:
        """The trace with ``periods`` more periods than the first depth's, or why not."""
        origins = self.origins(periods)
        if limit is not None and len(origins) > limit:
            return f"{len(origins)} events: more than {limit}"
        out: list[TraceEvent] = []
        live_by_size: dict[int, list[int]] = defaultdict(list)  # storage ids, oldest first
        live_of: dict[Origin, list[int]] = defaultdict(list)  # storage ids by the event that made them
        origin_of: dict[int, Origin] = {}
        op = 0
        for sid, o in enumerate(origins):
            e = self.event(o)
            op += self.gaps[o] + (periods - 1) * self.slopes.get(o, 0)
            if e.alloc:
                live_by_size[e.nbytes].append(sid)
                live_of[o].append(sid)
                origin_of[sid] = o
                out.append(TraceEvent(sid, e.nbytes, True, e.phase, op, e.category))
                continue
            kind, x, y = self.rules[o]
            same = live_by_size[e.nbytes]
            mine = same if kind in ("n", "o") else live_of[(x, y)]
            if kind in ("K", "Q"):  # the newest / oldest of the template's allocation and a run event's
                pool = live_of[(-1, self.base_partner[o])] + mine
                if not pool:
                    return f"a free's rule ({kind} {x} {y}) finds no allocation of {e.nbytes} bytes"
                freed = max(pool) if kind == "K" else min(pool)
                live_of[origin_of[freed]].remove(freed)
                if freed not in same:
                    return f"a free's rule ({kind} {x} {y}) finds an allocation of another size"
                same.remove(freed)
                out.append(TraceEvent(freed, e.nbytes, False, e.phase, op, e.category))
                continue
            k = len(mine) - 1 - x if kind == "n" else x if kind == "o" else -1 if kind == "k" else 0
            if not -len(mine) <= k < len(mine) or (kind == "n" and k < 0):
                return f"a free's rule ({kind} {x} {y}) finds no allocation of {e.nbytes} bytes"
            freed = mine[k]
            if kind in ("n", "o"):
                del same[k]
                live_of[origin_of[freed]].remove(freed)
            else:
                del mine[k]
                if freed not in same:
                    return f"a free's rule ({kind} {x} {y}) finds an allocation of another size"
                same.remove(freed)
            out.append(TraceEvent(freed, e.nbytes, False, e.phase, op, e.category))
        return out

    def periods_of(self, periods: int) -> list[int]:
        """Each event's period in :meth:`origins` (-1: the template's own events)."""
        out: list[int] = []
        prev = 0
        for r, i in enumerate(self.at):
            out.extend([-1] * (i - prev))
            for p in range(periods):
                out.extend([p] * len(self.runs[r]))
            prev = i
        out.extend([-1] * (len(self.base) - prev))
        return out

    def orient(self, trace: Sequence[TraceEvent], periods: int) -> str | None:
        """Learn from ``trace`` (``periods`` deeper) whether a run's free releases the newest or the
        oldest live allocation of another run's event (a stack or a queue); None, or why not."""
        origins, reps = self.origins(periods), self.periods_of(periods)
        if [_token(self.event(o)) for o in origins] != [_token(e) for e in trace]:
            return "other events"
        pairs = _pairs(trace)
        if isinstance(pairs, str):
            return pairs
        seen: dict[Origin, set[str]] = defaultdict(set)
        for i, o in enumerate(origins):
            rule = self.rules.get(o)
            if rule is None or rule[0] not in ("k", "q") or rule[1] in (-1, o[0]):
                continue
            j = pairs.partner[i]
            if origins[j] != (rule[1], rule[2]):
                return f"event {i} releases another event's allocation"
            seen[o].add("q" if reps[j] == reps[i] else "k")
        for o, kinds in seen.items():
            if len(kinds) != 1:
                return "a run's free releases allocations in no one order"
            _, x, y = self.rules[o]
            self.rules[o] = (kinds.pop(), x, y)
        self._pools(origins, pairs)
        return None

    def _pools(self, origins: list[Origin], pairs: _Pairs) -> None:
        """An inserted free that released one of the template's allocations one period deeper
        may, two periods deeper, release a run event's instead: the newest or the oldest of
        that pool (a stack or a chain of blocks), as the deeper trace shows."""
        found: dict[Origin, set[Origin]] = defaultdict(set)
        for i, o in enumerate(origins):
            if o in self.base_partner:
                found[o].add(origins[pairs.partner[i]])
        pool: dict[Origin, Origin] = {}
        for o, got in found.items():
            runs = {x for x in got if x[0] >= 0}
            if len(runs) == 1 and got <= runs | {(-1, self.base_partner[o])}:
                pool[o] = runs.pop()
        if not pool:
            return
        live: dict[Origin, list[int]] = defaultdict(list)
        kinds: dict[Origin, set[str]] = defaultdict(set)
        for i, o in enumerate(origins):
            if self.event(o).alloc:
                live[o].append(i)
                continue
            j = pairs.partner[i]
            if o in pool:
                both = live[(-1, self.base_partner[o])] + live[pool[o]]
                kinds[o].add("K" if j == max(both) else "Q" if j == min(both) else "?")
            live[origins[j]].remove(j)
        for o, ks in kinds.items():
            if len(ks) == 1 and "?" not in ks:
                self.rules[o] = (ks.pop(), *pool[o])


def _rank_rule(pa: _Pairs, i: int, pb: _Pairs, j: int) -> Rule | None:
    if pa.newest[i] == pb.newest[j]:
        return ("n", pa.newest[i], 0)
    if pa.oldest[i] == pb.oldest[j]:
        return ("o", pa.oldest[i], 0)
    return None


def template(
    a: Sequence[TraceEvent], b: Sequence[TraceEvent], *, from_the_end: bool = False
) -> Template | str:
    """The template that turns the trace ``a`` into ``b`` (one period deeper), or why there is none.

    ``from_the_end``: the two traces aligned from their ends (the events of ``a`` matched to the
    last of their like in ``b``, where the alignment from the start takes the first).
    """
    ta, tb = _diff_tokens(a), _diff_tokens(b)
    pa, pb = _pairs(a), _pairs(b)
    if isinstance(pa, str) or isinstance(pb, str):
        return f"the shallow trace does not pair its frees ({pa if isinstance(pa, str) else pb})"
    if from_the_end:
        na, nb = len(ta), len(tb)
        ops = [
            (tag, na - i2, na - i1, nb - j2, nb - j1)
            for tag, i1, i2, j1, j2 in reversed(
                difflib.SequenceMatcher(None, ta[::-1], tb[::-1], autojunk=False).get_opcodes()
            )
        ]
    else:
        ops = difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes()
    if any(tag not in ("equal", "insert") for tag, *_ in ops):
        return "a deeper trace is not the shallower one with runs inserted"
    # match[i]: the event of b that event i of a is (before any shift)
    match = [-1] * len(a)
    inserts: list[list[int]] = []  # [i, j1, j2]: b[j1:j2] inserted before a[i]
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            for k in range(i2 - i1):
                match[i1 + k] = j1 + k
        else:
            inserts.append([i1, j1, j2])

    def gap(t: Sequence[TraceEvent], i: int) -> int:
        return t[i].op - (t[i - 1].op if i else 0)

    def bad(i: int, j: int) -> bool:
        """Event i of a is not b's event j: another gap in ops, or a free of another allocation."""
        if gap(a, i) != gap(b, j):
            return True
        if ta[i][0]:
            return False
        return match[pa.partner[i]] != pb.partner[j] and _rank_rule(pa, i, pb, j) is None

    # A run inserted among identical blocks can sit at several places: shift it to
    # where every event of a keeps a rank (what a block's own frees release)
    for n, (i, j1, j2) in enumerate(inserts):
        length = j2 - j1
        lo = inserts[n - 1][0] if n else 0
        hi = inserts[n + 1][0] if n + 1 < len(inserts) else len(a)
        right = 0  # a[i:i+right] == b[j1:j1+right]: the run may move right by that much
        while i + right < hi and right < length and ta[i + right] == tb[j1 + right]:
            right += 1
        left = 0  # a[i-left:i] == b[j2-left:j2]: or left
        while i - left > lo and left < length and ta[i - left - 1] == tb[j2 - left - 1]:
            left += 1

        if right == 0 and left == 0:
            continue

        def matched(x: int, s: int, i: int = i, j1: int = j1, j2: int = j2) -> int:
            """The event of b that event x of a is when the run goes before a[i + s]."""
            return (j1 if x < i + s else j2) + x - i

        window = range(i - left, i + right)
        shifts = range(-left, right + 1)
        # an event before the run is b's j1 + x - i, one after it b's j2 + x - i: the bad events
        # of each shift from two prefix sums over the window (not every event for every shift)
        before = [0]
        for x in window:
            before.append(before[-1] + bad(x, j1 + x - i))
        after = [0]
        for x in reversed(window):
            after.append(after[-1] + bad(x, j2 + x - i))
        after.reverse()  # after[k]: the bad events from window[k] on, the run before them
        # shift s: window[: s + left] before the run, the rest after it.
        # Ties: onto the run before (one period split by an event that only looks like the
        # template's: merged below), else the least moved
        ranked = [(before[s + left] + after[s + left], not (n and i + s == lo), abs(s), s) for s in shifts]
        best = min(ranked)[3]
        if best:
            for x in window:
                match[x] = matched(x, best)
            inserts[n] = [i + best, j1 + best, j2 + best]
    merged: list[list[int]] = []
    for ins in inserts:  # runs moved next to each other: one run
        if merged and merged[-1][0] == ins[0] and merged[-1][2] == ins[1]:
            merged[-1][2] = ins[2]
        else:
            merged.append(ins)
    inserts = merged
    origin_of_b: dict[int, Origin] = {j: (-1, i) for i, j in enumerate(match)}
    for r, (_, j1, j2) in enumerate(inserts):
        for k in range(j2 - j1):
            origin_of_b[j1 + k] = (r, k)
    # what each free releases: the same event's allocation, else one of the same rank
    rules: dict[Origin, Rule] = {}
    base_partner: dict[Origin, int] = {}

    def live_before(j: int, origin: Origin) -> list[int]:
        """The allocations made by ``origin``'s events in b that are live just before event j."""
        return [x for x in range(j) if tb[x][0] and origin_of_b[x] == origin and not (0 <= freed_at[x] < j)]

    freed_at = [-1] * len(b)
    for x in range(len(b)):
        if not tb[x][0]:
            freed_at[pb.partner[x]] = x
    for i, j in enumerate(match):
        if ta[i][0]:
            continue
        if origin_of_b[pb.partner[j]] == (-1, pa.partner[i]):
            rules[(-1, i)] = ("k", -1, pa.partner[i])
            continue
        rule = _rank_rule(pa, i, pb, j)
        if rule is None:
            # the template's allocation at d, a run event's at d + p: the newest or the oldest of
            # the two (a stack or a queue through the template's block), as one period deeper shows
            run, pos = origin_of_b[pb.partner[j]]
            if run >= 0 and origin_of_b[match[pa.partner[i]]] == (-1, pa.partner[i]):
                pool = live_before(j, (-1, pa.partner[i])) + live_before(j, (run, pos))
                if pb.partner[j] in (max(pool), min(pool)):
                    rules[(-1, i)] = ("K" if pb.partner[j] == max(pool) else "Q", run, pos)
                    base_partner[(-1, i)] = pa.partner[i]
                    continue
            return (
                f"event {i} of the shallowest trace releases an allocation of another rank one period deeper"
            )
        rules[(-1, i)] = rule
    for r, (_, j1, j2) in enumerate(inserts):
        for k in range(j2 - j1):
            j = j1 + k
            if tb[j][0]:
                continue
            run, pos = origin_of_b[pb.partner[j]]
            if run >= 0:
                # an allocation of a run: its own period's (a block's temporary), or another
                # run's, newest first (a stack) until the next depth says (Template.orient)
                rules[(r, k)] = ("k", run, pos)
            else:
                # one instance: the oldest when that is what it frees and not the newest
                # (a queue), else its rank from the newest; or a chain (Template.orient)
                rules[(r, k)] = ("o", 0, 0) if pb.oldest[j] == 0 and pb.newest[j] else ("n", pb.newest[j], 0)
                base_partner[(r, k)] = pos
    # an op counter step of the template's own events may grow by period (ops that
    # allocate nothing, once per block: a loop over the parameters); a run's is its own
    gaps = {origin_of_b[j]: gap(b, j) for j in range(len(b))}
    slopes = {(-1, i): gap(b, j) - gap(a, i) for i, j in enumerate(match)}
    return Template(
        base=list(a),
        at=[i for i, _, _ in inserts],
        runs=[list(b[j1:j2]) for _, j1, j2 in inserts],
        gaps=gaps,
        slopes=slopes,
        rules=rules,
        base_partner=base_partner,
    )


def same_trace(x: Sequence[TraceEvent], y: Sequence[TraceEvent]) -> str | None:
    """Where two traces differ (events, pairings, op counters), or None when they are the same.

    Frees that follow one another at one op counter, in one phase (a burst: what an op's
    end or the end of backward releases at once) are compared as a set: which allocations
    they release, not in which order. The caching allocator's state after a burst does not
    depend on its order (each free merges its block with its free neighbours, and the
    merged blocks are the same in any order), nor does any peak (frees only lower what is
    live). The order within a burst is Python's: the end of QLoRA's backward under
    checkpointing releases the loss and the last gradients in an order that moves with
    the depth.
    """
    if len(x) != len(y):
        return f"{len(x)} events against {len(y)}"
    px, py = _pairs(x), _pairs(y)
    if isinstance(px, str) or isinstance(py, str):
        return px if isinstance(px, str) else str(py)
    i, n = 0, len(x)
    while i < n:
        e, f = x[i], y[i]
        if (e.alloc or f.alloc) and _token(e) != _token(f):
            return f"event {i}: {_token(e)} against {_token(f)}"
        if e.op != f.op:
            return f"event {i}: op {e.op} against {f.op}"
        if e.alloc:
            i += 1
            continue
        j, k = _burst_end(x, i), _burst_end(y, i)
        if j != k:
            return f"event {i}: a burst of {j - i} frees against {k - i}"
        bx = sorted((px.partner[m], _token(x[m])) for m in range(i, j))
        by = sorted((py.partner[m], _token(y[m])) for m in range(i, k))
        if bx != by:
            return f"event {i}: a burst of frees releases events {[b[0] for b in bx]}'s allocations against {[b[0] for b in by]}'s"
        i = j
    return None


def _burst_end(t: Sequence[TraceEvent], i: int) -> int:
    """The index after the burst of frees that starts at ``t[i]`` (see :func:`same_trace`)."""
    e, j = t[i], i + 1
    while j < len(t) and not t[j].alloc and t[j].op == e.op and t[j].phase == e.phase:
        j += 1
    return j


def peaks(trace: Sequence[TraceEvent]) -> tuple[int, dict[str, int]]:
    """The live bytes' peak over a trace, and each phase's as the tracker keeps it.

    A phase's peak is the most live at its start (before its first event in a row
    of its events) or after one of its events, the tracker's rule for the events
    it records. ``extend``'s caller checks it against the shallow traces' profiles.
    """
    cur = peak = 0
    phases: dict[str, int] = {}
    prev: str | None = None
    for e in trace:
        ph = e.phase
        if ph is not None and ph != prev and cur > phases.get(ph, -1):
            phases[ph] = cur  # the phase (re)starts: what is live then
        cur += e.nbytes if e.alloc else -e.nbytes
        if cur > peak:
            peak = cur
        if ph is not None and cur > phases[ph]:
            phases[ph] = cur
        prev = ph
    return peak, phases


#: why :func:`extend` refuses a template the third depth refutes
REFUTED = "the trace two periods deeper is not the one the first two give"


def extend(
    traces: Sequence[Sequence[TraceEvent]], depths: tuple[int, int, int], full: int
) -> list[TraceEvent] | str:
    """The trace at depth ``full`` from the traces at ``depths`` (``d``, ``d + p``, ``d + 2p``), or why not.

    The template is learnt from the first two traces and must give the third exactly
    (see the module); where the third refutes it, the two are aligned from their ends
    (:func:`template`'s ``from_the_end``) and that template must give the third exactly.
    The result has fresh storage ids (one per allocation), the events, the pairings and
    the op counters the whole trace has when it is periodic.
    """
    a, b, c = traces
    d, p = depths[0], depths[1] - depths[0]
    if p <= 0 or depths[2] - depths[1] != p or (full - d) % p:
        return f"depths {depths} do not step evenly to {full}"
    if max(len(t) for t in traces) > MAX_EVENTS:
        return f"shallow traces of more than {MAX_EVENTS} events"
    periods = (full - d) // p
    out = _extended(a, b, c, periods)
    if isinstance(out, str) and out.startswith(REFUTED):
        # a period inserted among events like its own can be aligned at several places: the
        # alignment from the ends, checked the same way
        again = _extended(a, b, c, periods, from_the_end=True)
        return out if isinstance(again, str) else again
    return out


def _extended(
    a: Sequence[TraceEvent],
    b: Sequence[TraceEvent],
    c: Sequence[TraceEvent],
    periods: int,
    *,
    from_the_end: bool = False,
) -> list[TraceEvent] | str:
    """:func:`extend`'s work: the template from ``a`` and ``b``, checked on ``c``, built ``periods`` on."""
    t = template(a, b, from_the_end=from_the_end)
    if isinstance(t, str):
        return t
    why = t.orient(c, 2)
    if why is not None:
        return f"{REFUTED} ({why})"
    third = t.build(2)
    if isinstance(third, str):
        return f"one period deeper still: {third}"
    diff = same_trace(third, c)
    if diff is not None:
        return f"{REFUTED} ({diff})"
    return t.build(periods, limit=MAX_EVENTS * (periods + 1))


__all__ = ["MAX_EVENTS", "Template", "extend", "peaks", "same_trace", "template"]
