"""Answering a range: the cover walk and the pieces it gathers.

A query for keys over buckets ``[b0, b1)`` walks the dyadic nodes of the
range (``timeindex.dyadic``) down the tiers (``tiers``) and gathers, for
every key, *pieces* whose union is exactly the key's visitors in the range:

* above the segments, the upper node's row of the key if the rule kept
  one (plus the base rows of loose slots beneath it, which that row may
  lack), else the node's two children;
* inside a slot, the built rollup row of the node if kept; else the key's
  base rows under the node if they are small (at most ``4 R`` bytes, i.e.
  about what one dense row costs), else the node's two children; plus the
  key's rows in the slot's runs;
* the memtable's events in the range.

Merging is a ``max``, so overlapping pieces are harmless, and every place
holds a complete answer for what it covers: the walk may take any pieces
that cover the range.

The walk is written once, for a *key set*: ``OneKey`` for the common
single-key question (scalar lookups: numpy calls on one-element arrays
cost more than the work) and ``ManyKeys`` for many (vector lookups).  Both
carry, per key, the rows found so far, and offer the same few operations
(find a node's row, take rows in a span, split by a mask, add to the
pieces), so the speed of either lives in those primitives, never in a
second copy of the walk.
"""

from __future__ import annotations

import numpy as np

from . import npx
from .hll import RANK_BITS, SPARSE_P, RegisterRange
from .rows import RowTable, make_code
from .tiers import Tiers
from .timeindex import dyadic


def _rows(t, keys, n0: int, n1: int) -> RowTable:
    """``t`` itself, or, for a sealed table (``sealed.BlockedTable``), its
    decoded rows of ``keys`` with nodes in ``[n0, n1)``."""
    if isinstance(t, RowTable):
        return t
    if isinstance(keys, ManyKeys):
        return t.view_keys(np.sort(keys.ids), n0, n1)
    return t.view(make_code(keys.id, n0), make_code(keys.id, max(n1 - 1, n0)))


SLICES_FROM = 64  # coupons a range on average from which ``add_gather`` takes slices rather than one gather


def _gather_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges ``[starts[i], ends[i])``."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offs[1:])
    return np.repeat(starts - offs[:-1], lengths) + np.arange(total, dtype=np.int64)


class Pieces:
    """Sketch pieces gathered for K keys (key *positions* 0..K-1); ``finish``
    merges them into per-key histograms.

    Pieces are kept as chunks of coupons and of dense register rows, each
    chunk with the key position of every entry (not needed, and not kept,
    when K = 1).  The counters are what the index keeps small: ``rows``
    stored rows merged, ``reads`` contiguous reads, ``bytes`` sketch bytes.

    ``fold`` (the cover walk's, never the near-exact path's): a slice of a
    table upkeep has yet to fold holding more coupons than ``count_limit``
    is read as its registers (``RowTable.folded``, computed once per table)
    when those coupons alone hold more distinct indices than
    ``count_limit``: the key is then not counted whatever else it gets
    (``finish``: more registers set than the limit, or more coupons), so
    the answer is the same, and a busy key's runs that upkeep has not
    folded yet cost a row each, not their coupons, from the second
    question on.
    """

    __slots__ = ("K", "bytes", "ck", "cv", "dk", "dv", "fold", "reads", "rows")

    def __init__(self, K: int, fold: RegisterRange | None = None):
        self.K = K
        self.fold = fold
        self.rows = self.reads = self.bytes = 0
        self.ck: list[np.ndarray] = []  # key positions of coupons (K > 1)
        self.cv: list[np.ndarray] = []  # coupons
        self.dk: list[np.ndarray] = []  # key positions of dense rows (K > 1)
        self.dv: list[np.ndarray] = []  # dense rows (n, R)

    def add_slice(self, t: RowTable, p: int, r0: int, r1: int, raw: bool = False) -> None:
        """Rows ``[r0, r1)`` of ``t`` for key position ``p``: slices, no copies.  ``raw``: ``t`` holds
        rows upkeep has yet to fold (a run, or a leaf the upper index may lack), which ``fold`` may read
        as registers."""
        self.rows += r1 - r0
        self.reads += 1
        c0, c1 = int(t.off[r0]), int(t.off[r1])
        if c1 > c0 and not (raw and self._folded(t, p, c0, c1)):
            self.cv.append(t.coupons[c0:c1])
            self.bytes += 4 * (c1 - c0)
            if self.K > 1:
                self.ck.append(np.full(c1 - c0, p, np.int64))
        d0, d1 = int(t.dense_cs[r0]), int(t.dense_cs[r1])
        if d1 > d0:
            self.dv.append(t.regs[d0:d1])
            self.bytes += (d1 - d0) * t.regs.shape[1]
            if self.K > 1:
                self.dk.append(np.full(d1 - d0, p, np.int64))

    def _folded(self, t: RowTable, p: int, c0: int, c1: int) -> bool:
        """Coupons ``[c0, c1)`` of ``t`` added as their registers, if ``fold`` allows (see the class text)."""
        rr = self.fold
        if rr is None or c1 - c0 <= rr.count_limit:
            return False
        regs, distinct = t.folded(c0, c1, rr)
        if distinct <= rr.count_limit:
            return False
        self.dv.append(regs[None, :])
        self.bytes += len(regs)
        if self.K > 1:
            self.dk.append(np.full(1, p, np.int64))
        return True

    def add_gather(self, t: RowTable, pos: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> None:
        """Rows ``[r0[i], r1[i])`` of ``t`` for key position ``pos[i]``."""
        self.rows += int((r1 - r0).sum())
        self.reads += len(pos)
        c0, c1 = t.off[r0], t.off[r1]
        n = c1 - c0
        total = int(n.sum())
        if total:
            if total >= SLICES_FROM * len(n):  # long runs (a key's rows in a table): slices, joined once in
                cps = t.coupons                # ``_joined`` with every other piece, no index array, no copy here
                self.cv.extend([cps[a:b] for a, b in zip(c0.tolist(), c1.tolist()) if b > a])
            else:
                self.cv.append(t.coupons[_gather_ranges(c0, c1)])
            self.ck.append(np.repeat(pos, n))
            self.bytes += 4 * total
        d0, d1 = t.dense_cs[r0], t.dense_cs[r1]
        if (d1 > d0).any():
            self.dv.append(t.regs[_gather_ranges(d0, d1)])
            self.dk.append(np.repeat(pos, d1 - d0))
            self.bytes += self.dv[-1].nbytes

    def add_run(self, t: RowTable, r0: int, r1: int, pos: np.ndarray) -> None:
        """Consecutive rows ``[r0, r1)`` of ``t``, row ``r0 + i`` for position ``pos[i]``:
        slices of the table and one repeat, no gathers."""
        self.rows += r1 - r0
        self.reads += 1
        c0, c1 = int(t.off[r0]), int(t.off[r1])
        if c1 > c0:
            self.cv.append(t.coupons[c0:c1])
            self.ck.append(np.repeat(pos, np.diff(t.off[r0:r1 + 1])))
            self.bytes += 4 * (c1 - c0)
        d0, d1 = int(t.dense_cs[r0]), int(t.dense_cs[r1])
        if d1 > d0:
            self.dv.append(t.regs[d0:d1])
            self.dk.append(pos[np.diff(t.dense_cs[r0:r1 + 1]) > 0])
            self.bytes += (d1 - d0) * t.regs.shape[1]

    def add_coupons(self, pos: np.ndarray, coupons: np.ndarray) -> None:
        """Loose coupons (the memtable's), key position ``pos[i]`` each."""
        if len(coupons):
            self.reads += 1
            self.bytes += 4 * len(coupons)
            self.cv.append(coupons)
            if self.K > 1:
                self.ck.append(pos)

    def registers(self, rr: RegisterRange) -> np.ndarray:
        """(K, R) dense registers: the merge of every key's pieces."""
        K, R = self.K, rr.R
        regs = np.zeros((K, R), np.uint8)
        if self.dv:
            if K == 1:  # chunk by chunk: no joined copy of every dense row
                part = np.empty(R, np.uint8)
                for chunk in self.dv:
                    if len(chunk):
                        np.max(chunk, axis=0, out=part)
                        np.maximum(regs[0], part, out=regs[0])
            else:
                for dk, dv in zip(self.dk, self.dv):  # a chunk's rows of one key lie together
                    npx.max_rows(regs, dk, dv)
        if self.cv:
            cv, ck = self._joined()
            reg, rank = rr.coupon_registers(cv)
            if K > 1:
                reg = ck * R + reg
            np.maximum.at(regs.reshape(-1), reg, rank)
        return regs

    def _joined(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The coupons and their key positions (K > 1) each in one array, joined once (``registers`` and
        ``finish`` both read them)."""
        if len(self.cv) > 1:
            self.cv = [np.concatenate(self.cv)]
            if self.K > 1:
                self.ck = [np.concatenate(self.ck)]
        return self.cv[0], (self.ck[0] if self.K > 1 else None)

    def coupon_array(self) -> np.ndarray:
        return self._joined()[0] if self.cv else np.zeros(0, np.uint32)

    def dense_positions(self) -> np.ndarray:
        """Positions fed by at least one dense piece (a bool per position)."""
        dense = np.zeros(self.K, bool)
        if self.dv:
            dense[np.concatenate(self.dk) if self.K > 1 else 0] = True
        return dense

    def finish(self, rr: RegisterRange, limit: int | None = -1, regs: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(K, hist_len) register-value histograms and, per key, its distinct
        coupon count, or -1.

        With the default ``limit`` (``count_limit``) a key no dense piece fed
        is counted up to that many coupons, for the merge to decide on the
        sum (``answer.merge_answers``); ``limit=None`` counts every key no
        dense piece fed (the near-exact path: pieces gathered from level-0
        rows only, see ``gather_base``).
        """
        K, H = self.K, rr.prec.hist_len
        if limit == -1:
            limit = rr.count_limit
        if regs is None:
            regs = self.registers(rr)
        hist = np.empty((K, H), np.int64)
        for i in range(K):  # K small bincounts beat one over a K x R int64 copy
            hist[i] = np.bincount(regs[i], minlength=H)
        dense = self.dense_positions()
        if limit is not None:
            # more registers set than the limit (each needs a distinct coupon): no need to count those
            dense |= (rr.R - hist[:, 0]) > limit
        sparse = np.zeros(K, np.int64)
        if self.cv and not dense.all():
            cv, ck = self._joined()
            index = cv >> np.uint32(RANK_BITS)
            if K > 1:  # count per key: key position above the index, in one word
                if dense.any():
                    keep = ~dense[ck]
                    ck, index = ck[keep], index[keep]
                # this range's coupon indices span R << low_bits values: with few keys, a 32-bit word
                # (half the sort of a 64-bit one)
                width = (rr.R << rr.prec.low_bits).bit_length() - 1
                if (K - 1).bit_length() + width <= 32:
                    shift = np.uint32(width)
                    index = (ck.astype(np.uint32) << shift) | (index - np.uint32(rr.lo << rr.prec.low_bits))
                else:
                    shift = np.uint64(32)
                    index = (ck.astype(np.uint64) << shift) | index.astype(np.uint64)
            index = np.sort(index)
            new = np.empty(len(index), bool)
            new[:1] = True
            np.not_equal(index[1:], index[:-1], out=new[1:])
            if K > 1:
                sparse = np.bincount((index[new] >> shift).astype(np.int64), minlength=K)
            else:
                sparse[0] = np.count_nonzero(new)
        sparse[dense] = -1
        if limit is not None:
            sparse[sparse > limit] = -1
        return hist, sparse


# ---------------------------------------------------------------- key sets

class OneKey:
    """One key (id, position), with rows ``[r0, r1)`` of the table last asked about.

    ``find`` and ``within`` set those rows on the key itself and return it (a
    walk asks about one table at a time, and reads the rows right after it
    asked): the common one-key question then allocates nothing per node."""

    __slots__ = ("id", "pos", "r0", "r1")

    def __init__(self, kid: int, pos: int):
        self.id, self.pos, self.r0, self.r1 = kid, pos, 0, 0

    def __bool__(self) -> bool:
        return True

    def find(self, t: RowTable, node: int):
        """(keys with a row for ``node`` in ``t``, holding that row; the others)."""
        r = t.find(self.id, node)
        if r < 0:
            return NO_KEYS, self
        self.r0, self.r1 = r, r + 1
        return self, NO_KEYS

    def within(self, t: RowTable, n0: int, n1: int):
        """The keys with rows of nodes in ``[n0, n1)`` in ``t``, holding them."""
        self.r0, self.r1 = t.node_range(self.id, n0, n1)
        return self if self.r1 > self.r0 else NO_KEYS

    def split(self, mask):
        return (self, NO_KEYS) if mask else (NO_KEYS, self)

    def among(self, keys: tuple[frozenset, np.ndarray]):
        """(the keys in ``keys``, the others)."""
        return self.split(self.id in keys[0])

    def sizes(self, t: RowTable):
        return t.bytes_between(self.r0, self.r1)

    def add_to(self, pc: Pieces, t: RowTable, raw: bool = False) -> None:
        pc.add_slice(t, self.pos, self.r0, self.r1, raw)

    def match(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the entries of key ids ``k`` that are keys of the set, their positions)."""
        m = k == self.id
        return m, np.full(int(m.sum()), self.pos, np.int64)


class ManyKeys:
    """Keys (distinct ids, positions), with rows ``[r0[i], r1[i])`` of the table last asked about."""

    __slots__ = ("ids", "pos", "r0", "r1")

    def __init__(self, ids: np.ndarray, pos: np.ndarray, r0=None, r1=None):
        self.ids, self.pos, self.r0, self.r1 = ids, pos, r0, r1

    def __bool__(self) -> bool:
        return len(self.ids) > 0

    def find(self, t: RowTable, node: int):
        rows = t.find_many(self.ids, node)
        hit = rows >= 0
        return ManyKeys(self.ids[hit], self.pos[hit], rows[hit], rows[hit] + 1), ManyKeys(self.ids[~hit],
                                                                                          self.pos[~hit])

    def within(self, t: RowTable, n0: int, n1: int):
        r0, r1 = t.node_range_many(self.ids, n0, n1)
        some = r1 > r0
        return ManyKeys(self.ids[some], self.pos[some], r0[some], r1[some])

    def split(self, mask: np.ndarray):
        def sub(m):
            return ManyKeys(self.ids[m], self.pos[m], None if self.r0 is None else self.r0[m],
                            None if self.r1 is None else self.r1[m])
        return sub(mask), sub(~mask)

    def among(self, keys: tuple[frozenset, np.ndarray]):
        return self.split(np.isin(self.ids, keys[1], assume_unique=True))

    def sizes(self, t: RowTable):
        return t.bytes_between(self.r0, self.r1)

    def add_to(self, pc: Pieces, t: RowTable, raw: bool = False) -> None:
        pc.add_gather(t, self.pos, self.r0, self.r1)

    def match(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.ids)
        i = order[np.minimum(np.searchsorted(self.ids, k, sorter=order), len(self.ids) - 1)]
        m = self.ids[i] == k
        return m, self.pos[i[m]]


class _NoKeys:
    __slots__ = ()

    def __bool__(self) -> bool:
        return False


NO_KEYS = _NoKeys()


def key_set(ids: np.ndarray, pos: np.ndarray | None = None):
    """The key set of distinct key ids, at positions ``pos`` (default
    0..len(ids)-1; several keys at one position make that position their union)."""
    if pos is None:
        pos = np.arange(len(ids))
    return OneKey(int(ids[0]), int(pos[0])) if len(ids) == 1 else ManyKeys(np.asarray(ids, np.int64),
                                                                          np.asarray(pos, np.int64))


# ---------------------------------------------------------------- the walk

def gather(tiers: Tiers, memtable, rr: RegisterRange, ids: np.ndarray, b0: int, b1: int,
           pos: np.ndarray | None = None, K: int | None = None) -> Pieces:
    """The pieces of keys ``ids`` (distinct) over ``[b0, b1)``, key i at
    position ``pos[i]`` of ``K`` (default: position i of ``len(ids)``)."""
    pc = Pieces(len(ids) if K is None else K, fold=rr)
    if not len(ids):
        return pc
    keys = key_set(ids, pos)
    for lvl, j in dyadic(b0, b1):
        _node(tiers, rr, keys, lvl, j, pc)
    k, b, c = memtable.columns()
    if len(k):
        m = (b >= b0) & (b < b1)
        hit, pos = keys.match(k[m])
        pc.add_coupons(pos, c[m][hit])
    return pc


def _node(tiers: Tiers, rr: RegisterRange, keys, lvl: int, j: int, pc: Pieces) -> None:
    """Gather the pieces covering node (lvl, j) for ``keys``."""
    LF, LS = tiers.config.leaf_level, tiers.config.segment_level
    if lvl > LS:
        keys, below = keys.among(tiers.keys_above(lvl))
        if below:  # in no upper node of these levels: straight to the segments
            for js in range(j << (lvl - LS), (j + 1) << (lvl - LS)):
                _node(tiers, rr, below, LS, js, pc)
        if not keys:
            return
        t = tiers.upper_table(lvl, j)
        if t is not None and len(t):
            t = _rows(t, keys, j, j + 1)
            found, keys = keys.find(t, j)
            if found:
                found.add_to(pc, t)
                _loose(tiers, found, j << lvl, (j + 1) << lvl, pc)
        if keys:
            _node(tiers, rr, keys, lvl - 1, 2 * j, pc)
            _node(tiers, rr, keys, lvl - 1, 2 * j + 1, pc)
        return
    slot = tiers.slot_covering(lvl, j)
    if slot is None:
        if lvl > LF:  # spans several leaves of an unbuilt segment
            _node(tiers, rr, keys, lvl - 1, 2 * j, pc)
            _node(tiers, rr, keys, lvl - 1, 2 * j + 1, pc)
        return
    if slot.main:
        _built(slot.main, rr, keys, lvl, j, pc)
    lo, hi = j << lvl, (j + 1) << lvl
    for run in slot.runs:
        some = keys.within(run, lo, hi)
        if some:
            some.add_to(pc, run, raw=True)


def _built(tables, rr: RegisterRange, keys, lvl: int, j: int, pc: Pieces) -> None:
    """Node (lvl, j) inside a built slot: its kept rollup row, else the base
    rows beneath when small, else its children."""
    if 0 < lvl < len(tables) and len(tables[lvl]):
        t = _rows(tables[lvl], keys, j, j + 1)
        found, keys = keys.find(t, j)
        if found:
            found.add_to(pc, t)
        if not keys:
            return
    base = _rows(tables[0], keys, j << lvl, (j + 1) << lvl)
    keys = keys.within(base, j << lvl, (j + 1) << lvl)
    if not keys:
        return
    if lvl == 0:
        keys.add_to(pc, base)
        return
    small, big = keys.split(keys.sizes(base) <= 4 * rr.R)
    if small:
        small.add_to(pc, base)
    if big:
        _built(tables, rr, big, lvl - 1, 2 * j, pc)
        _built(tables, rr, big, lvl - 1, 2 * j + 1, pc)


def _loose(tiers: Tiers, keys, lo: int, hi: int, pc: Pieces) -> None:
    """Base rows in ``[lo, hi)`` that the upper index may not include yet."""
    for key in tiers.loose:
        slot = tiers.slots[key]
        if slot.end > lo and slot.start < hi:
            tables = list(slot.runs) + ([slot.main[0]] if slot.main and slot.level == tiers.config.leaf_level else [])
            for t in tables:
                t = _rows(t, keys, lo, hi)
                some = keys.within(t, lo, hi)
                if some:
                    some.add_to(pc, t, raw=True)


def gather_base(tiers: Tiers, memtable, rr: RegisterRange, ids: np.ndarray, b0: int, b1: int,
                pos: np.ndarray | None = None, K: int | None = None) -> Pieces:
    """``gather`` from level-0 rows only (base tables, runs, memtable): the
    near-exact path.  While a key's impressions over the range are few (they
    bound its level-0 coupons), reading them costs little more than the
    rollups, and they, unlike a dense rollup's registers, can be counted.
    A key-minute of the memtable holding more distinct coupons than
    ``dense_threshold`` counts as a dense piece, as it will be once sorted
    into a row, so whether an answer is counted does not depend on when
    the memtable was last flushed."""
    pc = Pieces(len(ids) if K is None else K)
    if not len(ids):
        return pc
    keys = key_set(ids, pos)
    for slot in tiers.slots_overlapping(b0, b1):
        for t in slot.base_tables():
            t = _rows(t, keys, b0, b1)
            some = keys.within(t, b0, b1)
            if some:
                some.add_to(pc, t)
    mem = memtable_part(memtable, keys, rr, b0, b1)
    if mem is not None:
        p, c, crowded = mem
        pc.add_coupons(p, c)
        if len(crowded):  # a crowded minute is a dense piece (marks only: a max with zeros changes nothing)
            pc.dk.append(crowded)
            pc.dv.append(np.zeros((len(crowded), rr.R), np.uint8))
    return pc


def memtable_part(memtable, keys, rr: RegisterRange, b0: int, b1: int):
    """The memtable's events of ``keys`` in ``[b0, b1)``: ``(positions, coupons,
    crowded)`` where ``crowded`` lists the positions with a key-minute of more
    distinct coupons than ``dense_threshold`` (a row that will be dense once
    sorted); None when there are none."""
    k, b, c = memtable.columns()
    if not len(k):
        return None
    m = (b >= b0) & (b < b1)
    hit, p = keys.match(k[m])
    if not hit.any():
        return None
    c = c[m][hit]
    crowded_keys, _ = crowded_minutes(k[m][hit], b[m][hit], c, rr)
    return p, c, npx.unique(keys.match(crowded_keys)[1]) if len(crowded_keys) else np.zeros(0, np.int64)


def crowded_minutes(k: np.ndarray, b: np.ndarray, c: np.ndarray, rr: RegisterRange) -> tuple[np.ndarray, np.ndarray]:
    """(key ids, buckets) of the key-minutes among events ``(k, b, c)`` holding more
    distinct coupons than ``dense_threshold``: rows that will be dense once sorted."""
    # key-minutes numbered, then (key-minute, coupon index) in one word: distinct coupons per key-minute
    minutes, cell = np.unique((k.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64), return_inverse=True)
    word = npx.unique((cell.reshape(-1).astype(np.uint64) << np.uint64(SPARSE_P))
                      | (c >> np.uint32(RANK_BITS)).astype(np.uint64))
    n = np.bincount((word >> np.uint64(SPARSE_P)).astype(np.int64), minlength=len(minutes))
    crowded = minutes[n > rr.dense_threshold]
    return (crowded >> np.uint64(32)).astype(np.int64), (crowded & np.uint64(0xFFFFFFFF)).astype(np.int64)


def impressions(tiers: Tiers, memtable, ids: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """Exact impressions of keys ``ids`` over ``[b0, b1)``: prefix sums over
    the level-0 rows, where each event is counted exactly once (a sealed
    table wholly inside the range answers from its per-key totals)."""
    total = np.zeros(len(ids), np.int64)
    if not len(ids):
        return total
    keys = key_set(ids)
    codes = None
    one = int(ids[0]) if len(ids) == 1 else None
    whole = 0  # one key's impressions in the sealed tables wholly in range
    for slot in tiers.slots_overlapping(b0, b1):
        inside = b0 <= slot.start and slot.end <= b1
        for t in slot.base_tables():
            if not isinstance(t, RowTable) and inside:  # sealed and wholly in range: the index's per-key totals
                if one is None:
                    total += t.key_impressions(ids)
                else:
                    whole += t.key_impression(one)
                continue
            if not isinstance(t, RowTable):  # sealed: the block index's running totals, not the rows
                if codes is None:
                    codes = np.r_[make_code(ids, b0), make_code(ids, b1)]
                before = t.imp_before(codes)
                total += before[len(ids):] - before[:len(ids)]
                continue
            some = keys.within(t, b0, b1)
            if some:
                total[some.pos] += t.imp_cs[some.r1] - t.imp_cs[some.r0]
    total[0] += whole
    k, b, _ = memtable.columns()
    if len(k):
        m = (b >= b0) & (b < b1)
        _, pos = keys.match(k[m])
        total += np.bincount(pos, minlength=len(total))
    return total


def impressions_by_key(tiers: Tiers, memtable, n_keys: int, b0: int, b1: int) -> np.ndarray:
    """Impressions of every key id over ``[b0, b1)`` (an array indexed by id)."""
    totals = np.zeros(n_keys, np.int64)
    for slot in tiers.slots_overlapping(b0, b1):
        for t in slot.base_tables():
            # a sealed table is read block by block, without filling the cache with a scan
            for part in ([t] if isinstance(t, RowTable) else t.scan(make_code(0, b0), make_code(n_keys, b1))):
                nodes = part.nodes
                m = (nodes >= b0) & (nodes < b1) & (part.imp > 0)
                if m.any():
                    totals += np.bincount(part.keys[m], weights=part.imp[m], minlength=n_keys).astype(np.int64)
    k, b, _ = memtable.columns()
    if len(k):
        m = (b >= b0) & (b < b1)
        totals += np.bincount(k[m].astype(np.int64), minlength=n_keys)
    return totals
