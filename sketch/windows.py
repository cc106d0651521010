"""Rolling and cumulative series: many ranges of one key set in one pass.

A rolling series asks for a trailing window of ``w`` buckets evaluated every
``s`` buckets over a span (trailing 24 hours, every hour, over 30 days: 720
ranges); a cumulative series for ``[start, t)`` at every step ``t``.
Answered as independent range queries, 720 points cost 720 walks, each
re-reading the big nodes its neighbours read.  Here one pass does it:

1. **Cells.**  The span is cut into cells of ``g = gcd(w, s)`` buckets
   (an hour for the example).  Each cell's registers are gathered once,
   for all cells together (``gather_cells``): within every slot (leaf or
   segment) the walk goes down the levels, and at each level takes, with
   one vectorized lookup, the key's rows of the nodes that lie inside one
   cell and are not yet covered by a larger node; level 0 takes what is
   left, runs and the memtable add their rows by bucket.  A node at any
   level is read at most once for the whole series, and the cost is
   a few numpy calls per slot and level, not per point.
2. **Windows.**  Every window is a run of consecutive cells, so its
   registers are a sliding maximum over the cells' registers.  With the
   cells cut into blocks of one window length, a window is the suffix
   maximum of one block and the prefix maximum of the next (the "two
   stacks" of sliding-window aggregation): two cumulative maxima and one
   more maximum per window, whatever the window's length.  A cumulative
   series is one cumulative maximum.
3. **Counts.**  Each window gets the answer a range query over it gets: a
   window within the near-exact budget is read from level-0 rows (those
   cells are gathered base-only) and its coupons counted, and the others
   are counted only while their union would be stored sparse.  Distinct
   coupons of every window come from one sort: an occurrence of a coupon
   index in cell ``c`` whose previous occurrence was in cell ``p`` is new
   to exactly the windows starting in ``(max(p, c - w), c]``, so a
   difference array over window starts counts all windows at once.

Registers of every point equal those of the range query over the same
buckets; so do counts and impressions.
"""

from __future__ import annotations

import math

import numpy as np

from . import cover
from .hll import RANK_BITS, RegisterRange
from .rows import code_nodes, make_code
from .tiers import Tiers
from .timeindex import RangeError

MAX_POINTS = 5000  # points of one rolling series
MAX_SERIES_CELLS = 2048  # cells of one shard call (its memory: cells x registers bytes), and cumulative points


def gather_cells(tiers: Tiers, memtable, rr: RegisterRange, ids: np.ndarray, b0: int, g: int, n: int,
                 base_only: np.ndarray | None = None) -> cover.Pieces:
    """Pieces of the union of keys ``ids`` for cells ``[b0 + i g, b0 + (i + 1) g)``,
    ``i < n``, at position i.  Cells where ``base_only`` is true take level-0 rows only."""
    pc = cover.Pieces(max(n, 2))  # positions always kept (K > 1), even for one cell
    b1 = b0 + g * n
    for kid in np.asarray(ids, np.int64).tolist():
        one = cover.OneKey(kid, 0)
        for slot in tiers.slots_overlapping(b0, b1):
            lo, hi = max(slot.start, b0), min(slot.end, b1)
            if slot.main:
                _slot_levels(slot.main, kid, lo, hi, b0, g, base_only, pc)
            for run in slot.runs:
                t = cover._rows(run, one, lo, hi)
                r0, r1 = t.node_range(kid, lo, hi)
                if r1 > r0:
                    rows = np.arange(r0, r1)
                    pc.add_gather(t, (code_nodes(t.code[r0:r1]).astype(np.int64) - b0) // g, rows, rows + 1)
    k, b, c = memtable.columns()
    if len(k):
        m = (b >= b0) & (b < b1) & np.isin(k, ids)
        if m.any():
            pc.cv.append(c[m])
            pc.ck.append((b[m].astype(np.int64) - b0) // g)
            pc.reads += 1
    return pc


def _slot_levels(tables, kid: int, lo: int, hi: int, b0: int, g: int, base_only, pc: cover.Pieces) -> None:
    """One built slot: from its top level down, the key's rows of nodes inside
    one cell and not covered yet; level 0 last."""
    covered = np.zeros(hi - lo, bool)
    for lvl in range(len(tables) - 1, -1, -1):
        t = tables[lvl]
        if not len(t):
            continue
        size = 1 << lvl
        j0, j1 = -(-lo >> lvl), hi >> lvl  # nodes entirely inside [lo, hi)
        if j1 <= j0:
            continue
        st = np.arange(j0, j1, dtype=np.int64) << lvl
        cell = (st - b0) // g
        ok = (cell == (st + size - 1 - b0) // g) & ~covered[st - lo]
        if lvl and base_only is not None:
            ok &= ~base_only[cell]
        if not ok.any():
            continue
        if lvl == 0 and ok.sum() * 4 > len(ok):  # most of the slot's minutes: its rows in one slice, masked
            v = cover._rows(t, cover.OneKey(kid, 0), lo, hi)
            r0, r1 = v.node_range(kid, lo, hi)
            nodes = code_nodes(v.code[r0:r1]).astype(np.int64)
            keep = ok[nodes - lo]
            if keep.all():  # every row wanted (a key with no rollups below the cell): slices, no gathers
                if r1 > r0:
                    pc.add_run(v, r0, r1, (nodes - b0) // g)
                continue
            rows = np.arange(r0, r1)[keep]
            if len(rows):
                pc.add_gather(v, (nodes[keep] - b0) // g, rows, rows + 1)
            continue
        st, cell = st[ok], cell[ok]
        for part, which, r in _lookup(t, make_code(kid, st >> lvl).astype(np.uint64)):
            pc.add_gather(part, cell[which], r, r + 1)
            if lvl:
                covered[((st[which] - lo)[:, None] + np.arange(size)).ravel()] = True


def _lookup(t, codes: np.ndarray):
    """Rows of ``codes`` (sorted) found in ``t``: (table, which codes, their rows)
    per table read; for a sealed table only the blocks holding them are decoded."""
    if isinstance(t, cover.RowTable):
        parts = [(t, np.arange(len(codes)))]
    else:
        blk = np.searchsorted(t.last, codes)
        ok = blk < len(t.first)
        ok[ok] = codes[ok] >= t.first[blk[ok]]
        parts = [(t.block(i), np.flatnonzero(ok & (blk == i))) for i in np.unique(blk[ok]).tolist()]
    out = []
    for part, which in parts:
        r = np.searchsorted(part.code, codes[which])
        found = r < len(part.code)
        found[found] = part.code[r[found]] == codes[which][found]
        if found.any():
            out.append((part, which[found], r[found]))
    return out


def cell_impressions(tiers: Tiers, memtable, ids: np.ndarray, b0: int, g: int, n: int) -> np.ndarray:
    """Exact impressions of the union of keys ``ids`` in each of the ``n`` cells
    (impressions add up across keys: each event belongs to one key)."""
    b1 = b0 + g * n
    imp = np.zeros(n, np.int64)
    for kid in np.asarray(ids, np.int64).tolist():
        for slot in tiers.slots_overlapping(b0, b1):
            c0, c1 = max(0, (slot.start - b0) // g), min(n, -(-(slot.end - b0) // g))  # cells it touches
            e = np.clip(b0 + g * np.arange(c0, c1 + 1, dtype=np.int64), slot.start, slot.end)
            codes = make_code(kid, e).astype(np.uint64)
            for t in slot.base_tables():
                if isinstance(t, cover.RowTable):
                    imp[c0:c1] += np.diff(t.imp_cs[np.searchsorted(t.code, codes)])
                else:
                    imp[c0:c1] += np.diff(t.imp_before(codes))
    k, b, _ = memtable.columns()
    if len(k):
        m = (b >= b0) & (b < b1) & np.isin(k, ids)
        if m.any():
            imp += np.bincount((b[m].astype(np.int64) - b0) // g, minlength=n)
    return imp


class Windows:
    """Windows over cells: ``[a_i, e_i)`` in cell units, either rolling
    (``e_i - a_i = w`` for every i, ``a_i`` increasing) or cumulative
    (``a_i = 0``)."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        widths = self.ends - self.starts
        self.cumulative = bool((self.starts == 0).all() and len(set(widths.tolist())) > 1)
        if not self.cumulative and len(set(widths.tolist())) > 1:
            raise ValueError("windows must all have one width, or all start at cell 0")
        self.w = int(widths[0]) if len(widths) else 1
        d = np.diff(self.starts)
        self.regular_step = int(d[0]) if len(d) and d[0] > 0 and (d == d[0]).all() else 0

    def __len__(self) -> int:
        return len(self.starts)

    def registers(self, X: np.ndarray) -> np.ndarray:
        """(windows, R): each window's registers from the cells' registers ``X`` (cells, R)."""
        if self.cumulative:
            return np.maximum.accumulate(X, axis=0)[self.ends - 1]
        C, R = X.shape
        w = self.w
        B = -(-C // w)
        Xp = np.zeros((B * w, R), np.uint8)
        Xp[:C] = X
        pre = Xp.reshape(B, w, R)
        suf = pre.copy()
        for i in range(1, w):  # along the block, a whole (B, R) plane at a time
            np.maximum(pre[:, i - 1], pre[:, i], out=pre[:, i])
            np.maximum(suf[:, w - i], suf[:, w - i - 1], out=suf[:, w - i - 1])
        pre, suf = pre.reshape(B * w, R), suf.reshape(B * w, R)
        return np.maximum(suf[self.starts], pre[self.ends - 1])

    def sums(self, per_cell: np.ndarray) -> np.ndarray:
        cs = np.zeros(len(per_cell) + 1, np.int64)
        np.cumsum(per_cell, out=cs[1:])
        return cs[self.ends] - cs[self.starts]

    def distinct(self, index: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Distinct values of ``index`` among entries whose cell lies in each window."""
        out = np.zeros(len(self) + 1, np.int64)
        if not len(index):
            return out[:-1]
        key = np.sort((index.astype(np.uint64) << np.uint64(32)) | cells.astype(np.uint64))
        idx, c = key >> np.uint64(32), (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
        first = np.r_[True, idx[1:] != idx[:-1]]
        if self.cumulative:  # a value counts from the first window that reaches its first cell
            return np.searchsorted(np.sort(c[first]), self.ends, side="left")
        prev = np.where(first, -(1 << 40), np.r_[0, c[:-1]])
        # the windows [a, a + w) with a in (max(prev, c - w), c] see c and not prev
        a_lo, a_hi = np.maximum(prev + 1, c - self.w + 1), c
        s = self.regular_step
        if s:  # starts a0 + i s: the windows' indices by arithmetic
            a0, K = int(self.starts[0]), len(self)
            i_lo = np.clip(-(-(a_lo - a0) // s), 0, K)
            i_hi = np.clip((a_hi - a0) // s + 1, 0, K)
        else:
            i_lo = np.searchsorted(self.starts, a_lo, side="left")
            i_hi = np.searchsorted(self.starts, a_hi, side="right")
        keep = i_hi > i_lo
        out = np.bincount(i_lo[keep], minlength=len(self) + 1) - np.bincount(i_hi[keep], minlength=len(self) + 1)
        return np.cumsum(out)[:-1]


def histograms(regs: np.ndarray, H: int) -> np.ndarray:
    """(n, H) register-value histograms of the rows of ``regs``.  Neighbouring
    windows share most registers, so after the first row only the registers
    that changed are counted: one pass of comparisons, then bincounts over
    the changes (old values out, new values in) and a running sum."""
    n = len(regs)
    hist = np.empty((n, H), np.int64)
    if not n:
        return hist
    hist[0] = np.bincount(regs[0], minlength=H)
    if n == 1:
        return hist
    if regs.shape[1] % 8 == 0 and regs.flags.c_contiguous:  # compare 8 registers a word, then the changed words' bytes
        words = regs.view(np.uint64)
        at = np.flatnonzero(words[1:] != words[:-1])  # flat index into words[1:]: row * W + column
        old = words.reshape(-1)[at].view(np.uint8)
        new = words.reshape(-1)[at + words.shape[1]].view(np.uint8)
        moved = np.flatnonzero(old != new)
        rows = at[moved >> 3] // words.shape[1]
        old, new = old[moved], new[moved]
    else:
        rows, cols = np.nonzero(regs[1:] != regs[:-1])
        old, new = regs[rows, cols], regs[rows + 1, cols]
    if len(rows) > regs.size // 4:  # most registers move: plain counts are cheaper
        for i in range(1, n):
            hist[i] = np.bincount(regs[i], minlength=H)
        return hist
    base = rows * H
    delta = np.bincount(base + new, minlength=(n - 1) * H) - np.bincount(base + old, minlength=(n - 1) * H)
    np.cumsum(delta.reshape(n - 1, H), axis=0, out=hist[1:])
    hist[1:] += hist[0]
    return hist


def series(tiers: Tiers, memtable, rr: RegisterRange, ids: np.ndarray, b0: int, g: int, n: int,
           win: Windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hist, sparse, impressions)`` of each window of the union of ``ids``
    (cells of ``g`` buckets from ``b0``, ``n`` cells), as ``ShardStore.answer_sets``
    would answer each window's range."""
    H = rr.prec.hist_len
    K = len(win)
    if not len(ids):
        hist = np.zeros((K, H), np.int64)
        hist[:, 0] = rr.R
        return hist, np.zeros(K, np.int64), np.zeros(K, np.int64)
    imp = win.sums(cell_impressions(tiers, memtable, ids, b0, g, n))
    small = imp <= rr.exact_budget
    base = np.zeros(n, bool)
    if small.any():  # cells of a window within the budget are read base-only, for every window
        d = np.zeros(n + 1, np.int64)
        np.add.at(d, win.starts[small], 1)
        np.add.at(d, win.ends[small], -1)
        base = np.cumsum(d)[:-1] > 0
    pc = gather_cells(tiers, memtable, rr, ids, b0, g, n, base if base.any() else None)
    X = pc.registers(rr)[:n]
    regs = win.registers(X)
    hist = histograms(regs, H)
    # dense pieces per window; cells of a memtable minute with too many coupons count as dense
    dense_cells = np.zeros(n, np.int64)
    if pc.dv:
        np.add.at(dense_cells, np.concatenate(pc.dk), 1)
    coupons = pc.coupon_array()
    cells = np.concatenate(pc.ck) if pc.cv else np.zeros(0, np.int64)
    if len(coupons) and base.any():
        dense_cells += _crowded_memtable_cells(memtable, ids, b0, g, n, rr, base)
    # counted: windows without a dense piece, near-exact or with few registers set
    counted = (win.sums(dense_cells) == 0) & (small | (rr.R - hist[:, 0] <= rr.count_limit))
    sparse = np.full(K, -1, np.int64)
    if counted.any():
        d = np.zeros(n + 1, np.int64)
        np.add.at(d, win.starts[counted], 1)
        np.add.at(d, win.ends[counted], -1)
        need = (np.cumsum(d)[:-1] > 0)[cells]  # only the cells of counted windows are read
        got = win.distinct(coupons[need] >> np.uint32(RANK_BITS), cells[need])
        got[~small & (got > rr.count_limit)] = -1
        sparse[counted] = got[counted]
    return hist, sparse, imp


def _crowded_memtable_cells(memtable, ids, b0: int, g: int, n: int, rr: RegisterRange, base) -> np.ndarray:
    """Per cell: memtable key-minutes (in base-only cells) with more distinct coupons
    than a sparse row holds (rows that will be dense once sorted; as ``cover.memtable_part``)."""
    out = np.zeros(n, np.int64)
    k, b, c = memtable.columns()
    if not len(k):
        return out
    m = (b >= b0) & (b < b0 + g * n) & np.isin(k, ids)
    if not m.any():
        return out
    _, buckets = cover.crowded_minutes(k[m], b[m], c[m], rr)
    at = (buckets - b0) // g
    at = at[base[at]]
    np.add.at(out, at, 1)
    return out


def rolling_windows(n_points: int, w: int, s: int) -> tuple[int, int, Windows]:
    """Cells and windows for ``n_points`` trailing windows of ``w`` buckets every
    ``s`` buckets, the last ending at the span's end: (cell size g, cells, windows)."""
    g = math.gcd(w, s)
    wc, sc = w // g, s // g
    n = wc + (n_points - 1) * sc
    starts = np.arange(n_points, dtype=np.int64) * sc
    return g, n, Windows(starts, starts + wc)


def cumulative_windows(n_points: int, s: int) -> tuple[int, int, Windows]:
    """Cells and windows for ``[start, start + (i + 1) s)``, i < n_points."""
    ends = np.arange(1, n_points + 1, dtype=np.int64)
    return s, n_points, Windows(np.zeros(n_points, np.int64), ends)


def plan_series(b0: int, b1: int, step: int, window: int | None) -> list[tuple]:
    """How a series over ``[b0, b1)`` is asked of the shards: a list of calls
    ``(first bucket, cell size, cells, window starts, window ends)`` (starts
    and ends in cells).  Rolling (``window`` buckets every ``step``): every
    window inside the range, the last ending at ``b1``, cut into calls of at
    most ``MAX_SERIES_CELLS`` cells.  Cumulative (``window`` None):
    ``[b0', b0' + (i + 1) step)`` with ``b0'`` the range's start moved forward
    to a whole number of steps before ``b1``.  Raises ``RangeError`` saying
    what is wrong with a series that cannot be answered."""
    if isinstance(step, bool) or step < 1 or (window is not None and window < 1):
        raise RangeError("step and window must be at least one bucket")
    span = b1 - b0
    if window is not None and window > span:
        raise RangeError(f"the window ({window} buckets) is longer than the range ({span} buckets)")
    points = (span - window) // step + 1 if window is not None else span // step
    if points < 1:
        raise RangeError(f"the range ({span} buckets) holds no whole step of {step} buckets")
    limit = MAX_POINTS if window is not None else MAX_SERIES_CELLS
    if points > limit:
        raise RangeError(f"{points} points asked for; at most {limit}: take a longer step or a shorter range")
    if window is None:
        g, n, win = cumulative_windows(points, step)
        return [(b1 - n * g, g, n, win.starts, win.ends)]
    g = math.gcd(window, step)
    if window // g > MAX_SERIES_CELLS:
        raise RangeError(f"a window of {window} buckets every {step} buckets cuts each window into "
                         f"{window // g} pieces (at most {MAX_SERIES_CELLS}): take a step that divides the "
                         "window, or a coarser one")
    g, n_all, win = rolling_windows(points, window, step)
    first = b1 - n_all * g
    per = max(1, (MAX_SERIES_CELLS - window // g) // (step // g) + 1)  # points a call: cells bounded
    out = []
    for i0 in range(0, points, per):
        i1 = min(points, i0 + per)
        c0 = int(win.starts[i0])
        out.append((first + c0 * g, g, int(win.ends[i1 - 1]) - c0, win.starts[i0:i1] - c0, win.ends[i0:i1] - c0))
    return out
