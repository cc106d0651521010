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

``combine`` is the one merge kernel of the system: it folds any set of input
rows into output groups (the union of their visitors) fully vectorized.  It
serves the memtable flush (events -> level-0 rows), the rollups (level l ->
l + 1), compaction (runs -> one table) and queries.  A group's output is
sparse while it has at most ``dense_threshold`` coupons and no dense input,
dense otherwise (dense costs R bytes, a coupon 4, so this keeps whichever
is smaller).
"""

from __future__ import annotations

import numpy as np

from .hll import RANK_BITS, Precision

KEY_SHIFT = np.uint64(32)
NODE_MASK = np.uint64(0xFFFFFFFF)
_EMPTY_U32 = np.zeros(0, dtype=np.uint32)


def make_code(key: np.ndarray | int, node: np.ndarray | int) -> np.ndarray:
    return (np.asarray(key, dtype=np.uint64) << KEY_SHIFT) | np.asarray(node, dtype=np.uint64)


class RowTable:
    __slots__ = ("level", "code", "off", "dense", "coupons", "regs", "imp", "_imp_cs", "_dense_cs")

    def __init__(self, level, code, off, dense, coupons, regs, imp):
        self.level = int(level)
        self.code = code
        self.off = off
        self.dense = dense
        self.coupons = coupons
        self.regs = regs
        self.imp = imp
        self._imp_cs = None
        self._dense_cs = None

    @classmethod
    def empty(cls, level: int, R: int) -> "RowTable":
        return cls(level, np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.int32),
                   _EMPTY_U32, np.zeros((0, R), np.uint8), np.zeros(0, np.int64))

    # ------------------------------------------------------------ shape
    def __len__(self) -> int:
        return len(self.code)

    @property
    def keys(self) -> np.ndarray:
        return (self.code >> KEY_SHIFT).astype(np.int64)

    @property
    def nodes(self) -> np.ndarray:
        return (self.code & NODE_MASK).astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.off)

    @property
    def imp_cs(self) -> np.ndarray:
        if self._imp_cs is None:
            cs = np.zeros(len(self.code) + 1, np.int64)
            np.cumsum(self.imp, out=cs[1:])
            self._imp_cs = cs
        return self._imp_cs

    @property
    def dense_cs(self) -> np.ndarray:
        if self._dense_cs is None:
            cs = np.zeros(len(self.code) + 1, np.int64)
            np.cumsum(self.dense >= 0, out=cs[1:])
            self._dense_cs = cs
        return self._dense_cs

    def row_bytes(self) -> np.ndarray:
        """Size model used by the rollup rule: 4 bytes a coupon, R a dense row."""
        return np.where(self.dense >= 0, self.regs.shape[1], 4 * self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.code, self.off, self.dense, self.coupons, self.regs, self.imp))

    # ------------------------------------------------------------ lookups
    def find(self, key: int, node: int) -> int:
        """Row of (key, node), or -1."""
        c = (key << 32) | node
        i = int(np.searchsorted(self.code, np.uint64(c)))
        return i if i < len(self.code) and int(self.code[i]) == c else -1

    def node_range(self, key: int, n0: int, n1: int) -> tuple[int, int]:
        """Rows of ``key`` with node in ``[n0, n1)``: a contiguous range."""
        lo, hi = np.searchsorted(self.code, np.array([(key << 32) | n0, (key << 32) | n1], np.uint64))
        return int(lo), int(hi)

    def bytes_between(self, r0: int, r1: int) -> int:
        return 4 * int(self.off[r1] - self.off[r0]) + self.regs.shape[1] * int(self.dense_cs[r1] - self.dense_cs[r0])

    def impressions_between(self, r0: int, r1: int) -> int:
        return int(self.imp_cs[r1] - self.imp_cs[r0])

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
        return RowTable(self.level, self.code[rows], off, dense, coupons, regs, self.imp[rows])

    def slice(self, r0: int, r1: int) -> "RowTable":
        """Rows ``[r0, r1)`` as a view."""
        d0, d1 = int(self.dense_cs[r0]), int(self.dense_cs[r1])
        dense = self.dense[r0:r1]
        dense = np.where(dense >= 0, dense - d0, -1).astype(np.int32)
        return RowTable(self.level, self.code[r0:r1], self.off[r0:r1 + 1] - self.off[r0], dense,
                        self.coupons[self.off[r0]:self.off[r1]], self.regs[d0:d1], self.imp[r0:r1])


def _kernel(gid, n_groups, lengths, coupons, dense_idx, regs, imp, prec: Precision):
    """Fold input rows into ``n_groups`` output rows (see module docstring).

    gid[i] is input row i's output group; ``lengths``/``coupons`` its sparse
    coupons (None lengths = one coupon per row); ``dense_idx`` its dense row
    in ``regs`` or -1.  Returns (off, dense, coupons, regs, imp).
    """
    R = prec.R
    ent_gid = gid if lengths is None else np.repeat(gid, lengths)
    comp = (ent_gid.astype(np.uint64) << KEY_SHIFT) | coupons.astype(np.uint64)
    comp.sort()
    if len(comp) > 1:
        # same group and coupon index: keep the last (largest rank) of each run
        hi = comp >> np.uint64(RANK_BITS)
        last = np.empty(len(comp), bool)
        np.not_equal(hi[1:], hi[:-1], out=last[:-1])
        last[-1] = True
        comp = comp[last]
    g = (comp >> KEY_SHIFT).astype(np.int64)
    cnt = np.bincount(g, minlength=n_groups)
    is_dense = cnt > prec.dense_threshold
    has_dense_in = dense_idx >= 0 if dense_idx is not None else None
    if has_dense_in is not None and has_dense_in.any():
        is_dense[gid[has_dense_in]] = True
    dgroups = np.flatnonzero(is_dense)
    out_dense = np.full(n_groups, -1, np.int32)
    out_dense[dgroups] = np.arange(len(dgroups), dtype=np.int32)
    out_regs = np.zeros((len(dgroups), R), np.uint8)
    if len(dgroups):
        if has_dense_in is not None and has_dense_in.any():
            rows = np.flatnonzero(has_dense_in)
            tgt = out_dense[gid[rows]]
            order = np.argsort(tgt, kind="stable")
            t_sorted = tgt[order]
            src = regs[dense_idx[rows[order]]]
            starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]])
            out_regs[t_sorted[starts]] = np.maximum.reduceat(src, starts, axis=0)
        ent_dense = is_dense[g]
        if ent_dense.any():
            reg, rank = prec.coupon_registers((comp[ent_dense] & NODE_MASK).astype(np.uint32))
            flat = out_dense[g[ent_dense]].astype(np.int64) * R + reg
            np.maximum.at(out_regs.reshape(-1), flat, rank)
        keep = ~ent_dense
        out_coupons = (comp[keep] & NODE_MASK).astype(np.uint32)
        cnt = np.where(is_dense, 0, cnt)
    else:
        out_coupons = (comp & NODE_MASK).astype(np.uint32)
    off = np.zeros(n_groups + 1, np.int64)
    np.cumsum(cnt, out=off[1:])
    out_imp = np.zeros(n_groups, np.int64)
    if imp is not None and len(imp):
        np.add.at(out_imp, gid, imp)
    return off, out_dense, out_coupons, out_regs, out_imp


def combine(tables: list[RowTable], target_codes: list[np.ndarray], level: int, prec: Precision):
    """Merge the rows of ``tables`` into rows keyed by ``target_codes``
    (one array per table, one code per row).  Returns (table, gid) where
    ``gid`` maps every input row, tables concatenated, to its output row."""
    tables = [t for t in tables]
    if not tables:
        return RowTable.empty(level, prec.R), np.zeros(0, np.int64)
    codes = np.concatenate(target_codes) if len(target_codes) > 1 else target_codes[0]
    out_code, gid = np.unique(codes, return_inverse=True)
    gid = gid.reshape(-1)
    lengths = np.concatenate([t.lengths for t in tables])
    coupons = np.concatenate([t.coupons for t in tables]) if len(tables) > 1 else tables[0].coupons
    base, dense_parts = 0, []
    for t in tables:
        dense_parts.append(np.where(t.dense >= 0, t.dense + base, -1))
        base += len(t.regs)
    dense_idx = np.concatenate(dense_parts)
    regs = np.concatenate([t.regs for t in tables]) if len(tables) > 1 else tables[0].regs
    imp = np.concatenate([t.imp for t in tables])
    off, dense, cps, rg, im = _kernel(gid, len(out_code), lengths, coupons, dense_idx, regs, imp, prec)
    return RowTable(level, out_code, off, dense, cps, rg, im), gid


def merge(tables: list[RowTable], prec: Precision) -> RowTable:
    """Union of same-level tables: rows with equal (key, node) are merged and
    their impressions added."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return RowTable.empty(0, prec.R)
    if len(tables) == 1:
        return tables[0]
    return combine(tables, [t.code for t in tables], tables[0].level, prec)[0]


def level_up(tables: list[RowTable], prec: Precision, level: int) -> tuple[RowTable, RowTable]:
    """Merge level ``level - 1`` rows into their parents at ``level``.

    Returns (full, kept): ``full`` has every parent (the complete merge, used
    to build the next level); ``kept`` only the parents worth storing under the
    rollup rule: a parent is kept when it is at most half the size of its
    children together.  That rule bounds the rollups' total size by the base
    rows' size (each kept level at least halves what it summarises, so the
    sizes telescope), and it keeps nothing for keys whose visitors never
    repeat, where a rollup would only copy the base.
    """
    tables = [t for t in tables if len(t)]
    if not tables:
        return RowTable.empty(level, prec.R), RowTable.empty(level, prec.R)
    parent_codes = [(t.code & ~NODE_MASK) | ((t.code & NODE_MASK) >> np.uint64(1)) for t in tables]
    full, gid = combine(tables, parent_codes, level, prec)
    full.imp[:] = 0  # rollups do not carry impressions (prefix sums over level 0 do)
    child_bytes = np.concatenate([t.row_bytes() for t in tables]).astype(np.float64)
    children = np.bincount(gid, weights=child_bytes, minlength=len(full))
    kept = full.take(2 * full.row_bytes() <= children)
    return full, kept


def rows_from_events(keys: np.ndarray, buckets: np.ndarray, coupons: np.ndarray, prec: Precision) -> RowTable:
    """Level-0 rows from events (one coupon each), impressions counted."""
    if len(keys) == 0:
        return RowTable.empty(0, prec.R)
    codes = make_code(keys, buckets)
    out_code, gid = np.unique(codes, return_inverse=True)
    gid = gid.reshape(-1)
    off, dense, cps, rg, im = _kernel(gid, len(out_code), None, np.asarray(coupons, np.uint32), None,
                                     None, np.ones(len(gid), np.int64), prec)
    return RowTable(0, out_code, off, dense, cps, rg, im)
