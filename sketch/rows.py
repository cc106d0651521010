"""Row tables: many sketches of one level, stored column-wise.

A ``RowTable`` holds the sketches of many (key, node) pairs of one time level
as flat numpy arrays, sorted by ``code = key_id << 32 | node``:

    code     uint64[n]      sort key; ``node`` is the absolute node number at
                            this level (bucket >> level)
    off      int64[n + 1]   coupon offsets: row r's coupons are
                            ``coupons[off[r]:off[r + 1]]`` (empty if dense)
    dense    int32[n]       row into ``regs`` for a dense row, else -1;
                            dense rows appear in ``regs`` in row order
    coupons  uint32[...]    sparse rows' coupons, sorted, one per coupon index
    regs     uint8[d, R]    dense rows: this shard's R registers
    imp      int64[n]       impressions (level 0 only; rollups carry 0)

The layout is Arrow's list layout (offsets + values), so a table converts to
an Arrow record batch without copying the coupons.

``merge_into`` is the one merge kernel of the system: it folds any set of input
rows into output groups (the union of their visitors) fully vectorized.  It
serves the memtable flush (events -> level-0 rows), the rollups (level l ->
l + 1), compaction (runs -> one table) and queries.  A group's output is
sparse while it has at most ``dense_threshold`` coupons and no dense input,
dense otherwise (dense costs R bytes, a coupon 4, so this keeps whichever
is smaller).
"""

from __future__ import annotations

import numpy as np

from . import npx
from .hll import RANK_BITS, RegisterRange

KEY_SHIFT = np.uint64(32)
NODE_MASK = np.uint64(0xFFFFFFFF)
_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_LITTLE = np.little_endian
FOLDED_PER_TABLE = 4  # spans of coupons a table keeps folded into registers (``RowTable.folded``)


def make_code(key, node):
    """Row codes ``key << 32 | node``: sorting by code sorts by key, then time.
    Python ints give a Python int (the one-key lookups), arrays an array."""
    if isinstance(key, int) and isinstance(node, int):
        return (key << 32) | node
    return (np.asarray(key, dtype=np.uint64) << KEY_SHIFT) | np.asarray(node, dtype=np.uint64)


def code_keys(code: np.ndarray) -> np.ndarray:
    """The key ids of row codes."""
    return (code >> KEY_SHIFT).astype(np.int64)


def code_nodes(code: np.ndarray) -> np.ndarray:
    """The node numbers of row codes."""
    return (code & NODE_MASK).astype(np.int64)


def parent_codes(code: np.ndarray, up: int = 1) -> np.ndarray:
    """The codes of each row's ancestor ``up`` levels higher (same key)."""
    return (code & ~NODE_MASK) | ((code & NODE_MASK) >> np.uint64(up))


_EMPTIES: dict = {}  # (class, level, R) -> the empty table (``RowTable.empty``)


class RowTable:
    """Sketches of many (key, node) pairs of one level; see the module docstring.

    Tables are not changed after construction (every operation returns a new
    table or a view), so the prefix sums that queries read are computed here,
    once: ``imp_cs`` over impressions and ``dense_cs`` over dense rows.
    """

    __slots__ = ("level", "code", "off", "dense", "coupons", "regs", "imp", "imp_cs", "dense_cs", "_measure",
                 "_folded")

    def __init__(self, level, code, off, dense, coupons, regs, imp, measure=None):
        self.level = int(level)
        self.code = code
        self.off = off
        self.dense = dense
        self.coupons = coupons
        self.regs = regs
        self.imp = imp
        n = len(code)
        self.imp_cs = np.zeros(n + 1, np.int64)
        np.cumsum(imp, out=self.imp_cs[1:])
        self.dense_cs = np.zeros(n + 1, np.int64)
        np.cumsum(dense >= 0, out=self.dense_cs[1:])
        self._measure = measure  # from the merge kernel, which knows a dense row's coupon count
        self._folded: dict | None = None  # (c0, c1, lo, R) -> (registers, distinct at least): ``folded``

    def __reduce__(self):
        """Pickled as its columns (the prefix sums are derived again): what crosses to another process."""
        return RowTable, (self.level, self.code, self.off, self.dense, self.coupons, self.regs, self.imp,
                          self._measure)

    def copy(self) -> "RowTable":
        """The same rows in arrays of its own (not views of a buffer another owner frees or pins)."""
        return RowTable(self.level, self.code.copy(), self.off.copy(), self.dense.copy(), self.coupons.copy(),
                        self.regs.copy(), self.imp.copy(), None if self._measure is None else self._measure.copy())

    @classmethod
    def empty(cls, level: int, R: int) -> "RowTable":
        """A table of no rows: one per (level, R), shared (a question asks for rows that are not there
        many times, and each new one computed its prefix sums), its arrays read-only."""
        t = _EMPTIES.get((cls, level, R))
        if t is None:
            t = cls(level, np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.int32),
                    _EMPTY_U32, np.zeros((0, R), np.uint8), np.zeros(0, np.int64))
            for a in (t.code, t.off, t.dense, t.regs, t.imp, t.imp_cs, t.dense_cs):
                a.setflags(write=False)
            _EMPTIES[(cls, level, R)] = t
        return t

    # ------------------------------------------------------------ shape
    def __len__(self) -> int:
        return len(self.code)

    @property
    def keys(self) -> np.ndarray:
        return code_keys(self.code)

    @property
    def nodes(self) -> np.ndarray:
        return code_nodes(self.code)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.off)

    def row_bytes(self) -> np.ndarray:
        """Bytes of each row's sketch: 4 a coupon, R a dense row."""
        return np.where(self.dense >= 0, self.regs.shape[1], 4 * self.lengths)

    def measure(self) -> np.ndarray:
        """The rollup rule's size of each row: 4 bytes a coupon, at most R; R
        for a dense row whose coupons are unknown (see ``level_up``)."""
        if self._measure is not None:
            return self._measure
        return np.minimum(self.row_bytes(), self.regs.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.code, self.off, self.dense, self.coupons, self.regs, self.imp,
                                      self.imp_cs, self.dense_cs))

    # ------------------------------------------------------------ lookups
    def find(self, key: int, node: int) -> int:
        """Row of (key, node), or -1."""
        c = make_code(key, node)
        i = int(self.code.searchsorted(np.uint64(c)))
        return i if i < len(self.code) and int(self.code[i]) == c else -1

    def node_range(self, key: int, n0: int, n1: int) -> tuple[int, int]:
        """Rows of ``key`` with node in ``[n0, n1)``: a contiguous range."""
        k = make_code(key, 0)
        lo, hi = self.code.searchsorted(np.array([k | n0, k | n1], np.uint64))
        return int(lo), int(hi)

    def find_many(self, keys: np.ndarray, node: int) -> np.ndarray:
        """Rows of (key, node) for each of ``keys``, -1 where absent."""
        c = make_code(keys, node)
        i = np.searchsorted(self.code, c)
        ok = i < len(self.code)
        ok[ok] = self.code[i[ok]] == c[ok]
        return np.where(ok, i, -1)

    def node_range_many(self, keys: np.ndarray, n0: int, n1: int) -> tuple[np.ndarray, np.ndarray]:
        """For each key, its rows with node in ``[n0, n1)``."""
        return np.searchsorted(self.code, make_code(keys, n0)), np.searchsorted(self.code, make_code(keys, n1))

    def bytes_between(self, r0, r1):
        """Sketch bytes of rows ``[r0, r1)`` (ints, or arrays of row numbers)."""
        return 4 * (self.off[r1] - self.off[r0]) + self.regs.shape[1] * (self.dense_cs[r1] - self.dense_cs[r0])

    def folded(self, c0: int, c1: int, rr: RegisterRange) -> tuple[np.ndarray, int]:
        """Coupons ``[c0, c1)`` scattered into ``rr``'s registers (max), and a lower bound of their distinct
        coupon indices: the registers set, or, where those are within ``count_limit`` (always so from 8
        shards on, a range holding at most that many registers), the distinct indices counted.  Computed once
        per table and span (a table never changes), so a question that reads the same many coupons again
        (a busy key's rows in a run, while upkeep has not folded it) merges one row in their place.  At most
        ``FOLDED_PER_TABLE`` spans are kept a table, the newest."""
        key = (c0, c1, rr.lo, rr.R)
        cache = self._folded
        got = cache.get(key) if cache is not None else None
        if got is None:
            coupons = self.coupons[c0:c1]
            regs = rr.registers_from_coupons(coupons)
            n = int(np.count_nonzero(regs))
            if n <= rr.count_limit:
                n = len(npx.unique(coupons >> np.uint32(RANK_BITS)))
            got = (regs, n)
            cache = dict(cache or ())  # replaced whole: questions on other threads read it meanwhile
            while len(cache) >= FOLDED_PER_TABLE:
                del cache[next(iter(cache))]
            cache[key] = got
            self._folded = cache
        return got

    # ------------------------------------------------------------ reshaping
    def take(self, mask: np.ndarray) -> "RowTable":
        """The rows where ``mask`` is true, in order."""
        return self.take_rows(np.flatnonzero(mask))

    def take_rows(self, rows: np.ndarray) -> "RowTable":
        """The given rows, in the given order (the caller keeps codes sorted)."""
        lengths = self.lengths[rows]
        off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        if off[-1]:
            starts = self.off[:-1][rows]
            gather = np.repeat(starts - off[:-1], lengths) + np.arange(off[-1], dtype=np.int64)
            coupons = self.coupons[gather]
        else:
            coupons = _EMPTY_U32
        d = self.dense[rows]
        is_d = d >= 0
        regs = self.regs[d[is_d]]
        dense = np.full(len(rows), -1, np.int32)
        dense[is_d] = np.arange(int(is_d.sum()), dtype=np.int32)
        return RowTable(self.level, self.code[rows], off, dense, coupons, regs, self.imp[rows],
                        None if self._measure is None else self._measure[rows])

    def slice(self, r0: int, r1: int) -> "RowTable":
        """Rows ``[r0, r1)`` as a view."""
        d0, d1 = int(self.dense_cs[r0]), int(self.dense_cs[r1])
        dense = self.dense[r0:r1]
        dense = np.where(dense >= 0, dense - d0, -1).astype(np.int32)
        return RowTable(self.level, self.code[r0:r1], self.off[r0:r1 + 1] - self.off[r0], dense,
                        self.coupons[self.off[r0]:self.off[r1]], self.regs[d0:d1], self.imp[r0:r1],
                        None if self._measure is None else self._measure[r0:r1])


def rows_of(t) -> RowTable:
    """A table's rows as a ``RowTable``: itself, or a sealed table's decoded (``sealed.BlockedTable``)."""
    return t if isinstance(t, RowTable) else t.materialize()


def table_keys(t) -> np.ndarray:
    """The distinct key ids with rows in a table (a sealed one knows them without decoding)."""
    return t.key_ids if not isinstance(t, RowTable) else npx.unique(code_keys(t.code))


def concat(tables: list[RowTable], level: int) -> RowTable:
    """Tables of one level whose codes follow one another, as one table (rows kept as they are)."""
    tables = [t for t in tables if len(t)]
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise ValueError("nothing to concatenate: pass at least one table")
    offs, dense, base_c, base_d = [np.zeros(1, np.int64)], [], 0, 0
    for t in tables:
        offs.append(t.off[1:] + base_c)
        dense.append(np.where(t.dense >= 0, t.dense + base_d, -1).astype(np.int32))
        base_c += int(t.off[-1])
        base_d += len(t.regs)
    return RowTable(level, np.concatenate([t.code for t in tables]), np.concatenate(offs), np.concatenate(dense),
                    np.concatenate([t.coupons for t in tables]), np.concatenate([t.regs for t in tables]),
                    np.concatenate([t.imp for t in tables]))


def _fold(comp, n_groups, dense_gid, dense_src, regs, rr: RegisterRange):
    """Fold sparse entries and dense rows into ``n_groups`` output rows.

    ``comp`` holds every sparse entry as ``gid << 32 | coupon``, sorted;
    ``dense_gid[i]`` is the output group of dense input ``regs[dense_src[i]]``.
    Returns (off, dense, coupons, regs, measure) of the output rows, where
    ``measure`` is each row's size for the rollup rule: ``min(R, 4 x distinct
    coupons)``, or R when a dense input (whose coupons are unknown) fed it.
    """
    R = rr.R
    if len(comp) > 1:
        # same group and coupon index: keep the last (largest rank) of each run
        hi = comp >> np.uint64(RANK_BITS)
        last = np.empty(len(comp), bool)
        np.not_equal(hi[1:], hi[:-1], out=last[:-1])
        last[-1] = True
        comp = comp[last]
    g = (comp >> KEY_SHIFT).view(np.int64)  # < 2**32: the same bits either way
    cnt = np.bincount(g, minlength=n_groups)
    is_dense = cnt > rr.dense_threshold
    measure = np.minimum(4 * cnt, R)
    if len(dense_gid):
        is_dense[dense_gid] = True
        measure[dense_gid] = R
    dgroups = np.flatnonzero(is_dense)
    out_dense = np.full(n_groups, -1, np.int32)
    out_dense[dgroups] = np.arange(len(dgroups), dtype=np.int32)
    out_regs = np.zeros((len(dgroups), R), np.uint8)
    if not len(dgroups):
        off = np.zeros(n_groups + 1, np.int64)
        np.cumsum(cnt, out=off[1:])
        return off, out_dense, _low32(comp), out_regs, measure
    if len(dense_gid):
        tgt = out_dense[dense_gid]
        order = np.argsort(tgt, kind="stable")
        t_sorted = tgt[order]
        if (t_sorted[1:] != t_sorted[:-1]).all():  # one dense input per output: a plain copy
            out_regs[t_sorted] = regs[dense_src[order]]
        else:
            npx.max_rows(out_regs, t_sorted, regs, dense_src[order])
    ent_dense = is_dense[g]
    if ent_dense.any():
        reg, rank = rr.coupon_registers(_low32(comp[ent_dense]))
        flat = out_dense[g[ent_dense]].astype(np.int64) * R + reg
        np.maximum.at(out_regs.reshape(-1), flat, rank)
    off = np.zeros(n_groups + 1, np.int64)
    np.cumsum(np.where(is_dense, 0, cnt), out=off[1:])
    return off, out_dense, _low32(comp[~ent_dense]), out_regs, measure


def _low32(comp: np.ndarray) -> np.ndarray:
    """The coupons (low 32 bits) of ``gid << 32 | coupon`` entries."""
    return np.ascontiguousarray(comp.view(np.uint32)[0::2] if _LITTLE else (comp & NODE_MASK).astype(np.uint32))


def _group(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique codes, group of each code); skips the sort when already sorted."""
    if len(codes) < 2 or bool(np.all(codes[1:] >= codes[:-1])):
        new = np.empty(len(codes), bool)
        new[:1] = True
        np.not_equal(codes[1:], codes[:-1], out=new[1:])
        return codes[new], np.cumsum(new) - 1
    out, gid = np.unique(codes, return_inverse=True)
    return out, gid.reshape(-1)


def merge_into(tables: list[RowTable], target_codes: list[np.ndarray], level: int, rr: RegisterRange,
               impressions: bool = True) -> tuple[RowTable, np.ndarray]:
    """Merge the rows of ``tables`` into level-``level`` rows keyed by
    ``target_codes`` (one array per table, one code per row).  Returns
    (table, gid) where ``gid`` maps every input row, tables concatenated, to
    its output row.  Impressions of rows merged together are added, or, with
    ``impressions=False`` (rollups: prefix sums over level 0 count them), dropped."""
    if not tables:
        return RowTable.empty(level, rr.R), np.zeros(0, np.int64)
    codes = np.concatenate(target_codes) if len(target_codes) > 1 else target_codes[0]
    out_code, gid = _group(codes)
    lengths = np.concatenate([t.lengths for t in tables]) if len(tables) > 1 else tables[0].lengths
    coupons = np.concatenate([t.coupons for t in tables]) if len(tables) > 1 else tables[0].coupons
    comp = np.repeat(gid.astype(np.uint64) << KEY_SHIFT, lengths)
    comp |= coupons
    comp.sort()
    dense_gid, dense_src, base = [], [], 0
    row_base = 0
    for t in tables:
        rows = np.flatnonzero(t.dense >= 0)
        dense_gid.append(gid[row_base + rows])
        dense_src.append(t.dense[rows].astype(np.int64) + base)
        base += len(t.regs)
        row_base += len(t)
    regs = np.concatenate([t.regs for t in tables]) if len(tables) > 1 else tables[0].regs
    off, dense, cps, rg, measure = _fold(comp, len(out_code), np.concatenate(dense_gid), np.concatenate(dense_src),
                                         regs, rr)
    imp = np.zeros(len(out_code), np.int64)
    if impressions:
        all_imp = np.concatenate([t.imp for t in tables]) if len(tables) > 1 else tables[0].imp
        if all_imp.any():
            np.add.at(imp, gid, all_imp)
    return RowTable(level, out_code, off, dense, cps, rg, imp, measure), gid


def merge(tables: list[RowTable], rr: RegisterRange, level: int | None = None, impressions: bool = True) -> RowTable:
    """Union of same-level tables: rows with equal (key, node) are merged and
    their impressions added (or dropped, see ``merge_into``)."""
    nonempty = [t for t in tables if len(t)]
    level = (tables[0].level if tables else 0) if level is None else level
    if not nonempty:
        return RowTable.empty(level, rr.R)
    if len(nonempty) == 1 and nonempty[0].level == level and (impressions or not nonempty[0].imp.any()):
        return nonempty[0]
    return merge_into(nonempty, [t.code for t in nonempty], level, rr, impressions)[0]


def level_up(tables: list[RowTable], rr: RegisterRange, level: int) -> tuple[RowTable, RowTable]:
    """Merge level ``level - 1`` rows into their parents at ``level``.

    Returns (full, kept): ``full`` has every parent (the complete merge, used
    to build the next level); ``kept`` only the parents worth storing under the
    rollup rule: a parent is kept when it is at most half the size of its
    children together, sizes measured as ``min(R, 4 x distinct coupons)``.

    Why that bounds the index: under that measure a merge never grows
    (``size(N) <= sum of its children's``).  Summed over the nodes of level l,
    ``sum(children) - size(N)`` is ``F(l-1) - F(l)``, where ``F(l)`` is the
    measure of all level-l merges; a kept node has ``size(N) <= sum(children) -
    size(N)``, every other node ``0 <= sum(children) - size(N)``.  So the kept
    nodes of level l measure at most ``F(l-1) - F(l)``, and all levels together
    at most ``F(0)``: the base.  A stored dense row costs at most twice its
    measure (it turns dense past R/8 coupons, i.e. 4 x coupons >= R/2), so
    the stored index is at most twice the base.  The rule keeps nothing for
    keys whose visitors never repeat, where a rollup would only copy the base.
    """
    tables = [t for t in tables if len(t)]
    if not tables:
        return RowTable.empty(level, rr.R), RowTable.empty(level, rr.R)
    full, gid = merge_into(tables, [parent_codes(t.code) for t in tables], level, rr, impressions=False)
    child_size = np.concatenate([t.measure() for t in tables]).astype(np.float64)
    children = np.bincount(gid, weights=child_size, minlength=len(full))
    kept = full.take(2 * full.measure() <= children)
    return full, kept


def rows_from_events(keys: np.ndarray, buckets: np.ndarray, coupons: np.ndarray, rr: RegisterRange) -> RowTable:
    """Level-0 rows from events (one coupon each), impressions counted.

    One 64-bit sort does the work when key ids and the batch's bucket span
    fit in 32 bits together (``key << bits | bucket offset`` above the
    coupon), which covers any realistic flush; otherwise a general path.
    """
    n = len(keys)
    if n == 0:
        return RowTable.empty(0, rr.R)
    keys = np.asarray(keys, np.uint64)
    buckets = np.asarray(buckets, np.int64)
    b_min = int(buckets.min())
    bb = (int(buckets.max()) - b_min).bit_length()
    kb = int(keys.max()).bit_length()
    if kb + bb > 32:
        codes = make_code(keys, buckets)
        out_code, gid = _group(codes)
        comp = (gid.astype(np.uint64) << KEY_SHIFT) | np.asarray(coupons, np.uint64)
        comp.sort()
        imp = np.bincount(gid, minlength=len(out_code)).astype(np.int64)
    else:
        comp = (keys << np.uint64(bb + 32)) | ((buckets - b_min).astype(np.uint64) << KEY_SHIFT) \
            | np.asarray(coupons, np.uint64)
        comp.sort()
        hi = comp >> KEY_SHIFT
        new = np.empty(n, bool)
        new[0] = True
        np.not_equal(hi[1:], hi[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        group_hi = hi[starts]
        out_code = make_code(group_hi >> np.uint64(bb), (group_hi & np.uint64((1 << bb) - 1)).astype(np.int64) + b_min)
        gid = np.cumsum(new) - 1
        imp = np.diff(np.r_[starts, n]).astype(np.int64)
        comp = (gid.astype(np.uint64) << KEY_SHIFT) | (comp & NODE_MASK)
    empty = np.zeros(0, np.int64)
    off, dense, cps, rg, measure = _fold(comp, len(out_code), empty, empty, None, rr)
    return RowTable(0, out_code, off, dense, cps, rg, imp, measure)


def split_by_node(t: RowTable, shift: int) -> list[tuple[int, RowTable]]:
    """Cut a table into one table per ``node >> shift`` (each still sorted)."""
    if not len(t):
        return []
    part = t.nodes >> shift
    if part.min() == part.max():
        return [(int(part[0]), t)]
    order = np.argsort(part, kind="stable")
    part = part[order]
    cuts = np.r_[0, np.flatnonzero(part[1:] != part[:-1]) + 1, len(part)]
    # each piece in arrays of its own: a view would keep the whole batch alive while one piece lives
    return [(int(part[a]), t.take_rows(order[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]


def build_levels(base: RowTable, top: int, rr: RegisterRange, summary: bool = True) -> tuple[list[RowTable], RowTable | None]:
    """Rollups of a level-0 table for levels 1..``top``, and its full merge at ``top``.

    Returns (tables, summary): ``tables[l]`` holds the level-l nodes kept by
    the rollup rule (``tables[0]`` is ``base``); ``summary`` every level-top
    node, fully merged (None unless asked for).

    Deciding which nodes to keep needs every node's size, i.e. its number of
    distinct coupons.  Rather than merging every level to count (a sort of
    all coupons per level), the coupons are sorted once by (key, coupon
    index, bucket): a coupon is then new in its level-l node exactly when
    the key or index changed or ``bucket >> l`` did, so every level's counts
    are a few vector passes.  Only the kept nodes (and the summary) are then
    merged, each from its kept children when all of them were kept, else
    from the base rows beneath it.
    """
    n = len(base)
    R = rr.R
    if n == 0:
        return [base] + [RowTable.empty(lvl, R) for lvl in range(1, top + 1)], \
            (RowTable.empty(top, R) if summary else None)
    code = base.code
    key_part = code & ~NODE_MASK
    node0 = code_nodes(code)
    lengths = base.lengths
    b_lo = (int(node0.min()) >> top) << top
    bb = (int(node0.max()) - b_lo).bit_length()
    new_key = np.r_[True, key_part[1:] != key_part[:-1]]
    key_rank = np.cumsum(new_key) - 1
    kb = int(key_rank[-1]).bit_length()
    if kb + (32 - RANK_BITS) + bb > 64:  # cannot pack the sort key: merge level by level
        tables, full = _build_levels_by_merging(base, top, rr)
        return tables, (full if summary else None)

    # group ids of every row at every level (rows are sorted by key, bucket)
    gids, codes_at, starts = [np.arange(n)], [code], [np.arange(n)]
    for lvl in range(1, top + 1):
        c = parent_codes(code, lvl)
        new = np.r_[True, c[1:] != c[:-1]]
        gids.append(np.cumsum(new) - 1)
        codes_at.append(c[new])
        starts.append(np.flatnonzero(new))  # each level-l node's first row

    # distinct coupon counts per node at every level, from one sort
    counts = [lengths.astype(np.int64)]
    if len(base.coupons):
        # each coupon as (key rank, coupon index, bucket) in one word; a row is a (key, bucket), so the word
        # also names the row (sorting the words alone is several times faster than sorting rows by them)
        ib = 32 - RANK_BITS
        row_word = (key_rank.astype(np.uint64) << np.uint64(ib + bb)) | (node0 - b_lo).astype(np.uint64)
        s_comp = np.repeat(row_word, lengths)
        s_comp |= (base.coupons >> np.uint32(RANK_BITS)).astype(np.uint64) << np.uint64(bb)
        s_comp.sort()
        # a coupon is new in its level-l node unless the one before it has the same key and index and a bucket
        # differing from its own in none of the bits from l up (the bucket is the word's low ``bb`` bits): so it
        # repeats at level l exactly when the two words differ below bit min(l, bb) only.  Most coupons are new
        # at every level; a node's count is its coupons less its repeats.
        x = s_comp[1:] ^ s_comp[:-1]
        again = np.flatnonzero(x < np.uint64(1 << min(top, bb)))
        again_x = x[again]
        w = s_comp[again + 1]
        high = np.uint64(ib + bb)
        again_row = np.searchsorted(row_word, ((w >> high) << high) | (w & np.uint64((1 << bb) - 1)))
        for lvl in range(1, top + 1):
            rep = again_row[again_x < np.uint64(1 << min(lvl, bb))]
            counts.append(_per_node(base.off, starts[lvl]) - np.bincount(gids[lvl][rep], minlength=len(starts[lvl])))
    else:
        counts += [np.zeros(len(codes_at[lvl]), np.int64) for lvl in range(1, top + 1)]

    sizes = [base.row_bytes().astype(np.int64)]  # a dense base row measures R: its coupons are unknown
    kept_masks = [np.ones(n, bool)]
    tables = [base]
    for lvl in range(1, top + 1):
        g, G = gids[lvl], len(codes_at[lvl])
        # the size a node is judged by: its coupons (4 bytes each), at most R,
        # and R where a dense base row lies beneath (its coupons are unknown).
        # Unlike stored bytes this never grows under merging, which is what
        # makes the rule's bound hold (see level_up).
        has_dense = _per_node(base.dense_cs, starts[lvl]) > 0
        size = np.where(has_dense, R, np.minimum(R, 4 * counts[lvl]))
        parent_of_child = g[starts[lvl - 1]]  # level l-1 group -> level l group
        children = np.bincount(parent_of_child, weights=sizes[-1], minlength=G)
        kept = 2 * size <= children
        sizes.append(size)
        if lvl == 1:
            all_kids_kept = np.zeros(G, bool)  # level 0 is the base itself
        else:
            all_kids_kept = np.bincount(parent_of_child, weights=~kept_masks[-1], minlength=G) == 0
        tables.append(_materialize(base, tables[-1], kept_masks[-1], parent_of_child, g, codes_at[lvl],
                                   kept & all_kids_kept, kept & ~all_kids_kept, lvl, rr))
        kept_masks.append(kept)
    if not summary:
        return tables, None
    # the summary: kept top nodes as they are, the others merged from the base
    rest = ~kept_masks[-1]
    rows = np.flatnonzero(rest[gids[top]])
    merged = merge_into([base.take_rows(rows)], [codes_at[top][gids[top][rows]]], top, rr,
                        impressions=False)[0] if len(rows) else RowTable.empty(top, R)
    full = merge([tables[-1], merged], rr, top, impressions=False)
    return tables, full


def _per_node(prefix: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per node, the sum of what ``prefix`` (a prefix sum over rows, 0 first) counts over its rows; a node's
    rows are a run starting at ``starts``."""
    return np.diff(np.r_[prefix[starts], prefix[-1]])


def _materialize(base, prev, prev_kept, parent_of_child, g, codes, from_kids, from_base, lvl, rr):
    """Level-``lvl`` rows for the kept nodes: from the kept children (``prev``
    holds exactly the kept level-(l-1) nodes, in order) where all were kept,
    else from the base rows beneath."""
    parts, targets = [], []
    if from_kids.any():
        kid_groups = np.flatnonzero(prev_kept)  # prev's rows, as level l-1 group ids
        use = from_kids[parent_of_child[kid_groups]]
        if use.any():
            parts.append(prev.take(use))
            targets.append(codes[parent_of_child[kid_groups[use]]])
    if from_base.any():
        rows = np.flatnonzero(from_base[g])
        parts.append(base.take_rows(rows))
        targets.append(codes[g[rows]])
    if not parts:
        return RowTable.empty(lvl, rr.R)
    return merge_into(parts, targets, lvl, rr, impressions=False)[0]


def _build_levels_by_merging(base: RowTable, top: int, rr: RegisterRange) -> tuple[list[RowTable], RowTable]:
    """The same result as ``build_levels``, one merge per level (for tables
    whose keys and buckets cannot share one 64-bit sort key)."""
    tables, cur = [base], base
    for lvl in range(1, top + 1):
        cur, kept = level_up([cur], rr, lvl)
        tables.append(kept)
    return tables, cur
