"""One shard's sketches: every key, every time bucket, one register range.

Where data lives
----------------
Events arrive as (key, bucket, coupon) triples; every event also counts for
the site-wide key (id 0).  They go through four places, newest first:

1. **memtable**: unsorted numpy chunks, at most ``memtable_rows`` rows;
   queries scan it with a vectorized mask.
2. **leaf slots** (level ``leaf_level`` = 6, 64 buckets): ``flush`` sorts
   the memtable into level-0 rows (one per key and bucket, see
   ``rows.RowTable``) and appends them to the slot of their leaf node as a
   *run*.  When the leaf's time is sealed (``lateness_buckets`` behind the
   newest bucket seen) its runs are merged and its rollups built: levels
   1..6, each node kept only where the rollup rule says it pays
   (``rows.level_up``).
3. **segment slots** (level ``segment_level`` = 11, 2048 buckets): once a
   whole segment is sealed its leaves are merged into one slot, with
   rollups for levels 7..11 computed from the leaves' top-level merges.
   Late events for a built slot become runs on it, folded in later.
4. **upper index** (levels 12..``top_level``): rollup rows built from the
   segments' top-level merges, for ranges longer than a segment.

Every place holds a *complete* answer for what it covers, and merging is a
``max``, so a query may take any pieces that cover its range, overlapping or
not: the rollups may lag behind late events (those are in runs or the
memtable, which queries always read) and never make an answer wrong.

Impressions are exact counts on the level-0 rows only (each event is in
exactly one place); a range sums prefix sums, O(log n) per table touched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .hll import RANK_BITS, Precision
from .rows import RowTable, build_levels, level_up, merge, rows_from_events, split_by_node
from .timeindex import dyadic

ALL_KEY = 0  # the site-wide key's id in every store
SITE_KEY = "*"  # an event with this key counts toward the site-wide total only


@dataclass(frozen=True)
class SketchConfig:
    """Parameters of the sketch store.  ``p`` and ``bucket_seconds`` (and the
    tier levels) are part of a stored state's identity: a state written with
    other values is refused on load."""

    p: int = 14
    bucket_seconds: int = 60
    retention_seconds: int = 30 * 86400
    future_seconds: int = 300
    leaf_level: int = 6
    segment_level: int = 11
    lateness_buckets: int = 2
    memtable_rows: int = 1 << 16
    max_runs: int = 4

    def __post_init__(self):
        if self.bucket_seconds < 1:
            raise ValueError(f"bucket_seconds must be at least 1, got {self.bucket_seconds}")
        if self.retention_seconds < self.bucket_seconds or self.retention_seconds % self.bucket_seconds:
            raise ValueError(f"retention of {self.retention_seconds} s must be a whole number of "
                             f"{self.bucket_seconds}-second buckets")
        if not (1 <= self.leaf_level < self.segment_level <= 20):
            raise ValueError(f"need 1 <= leaf_level ({self.leaf_level}) < segment_level "
                             f"({self.segment_level}) <= 20")
        if self.future_seconds < 0 or self.lateness_buckets < 0 or self.memtable_rows < 1 or self.max_runs < 1:
            raise ValueError("future_seconds, lateness_buckets, memtable_rows and max_runs must be positive")
        Precision(self.p)  # validates p

    @property
    def retention_buckets(self) -> int:
        return self.retention_seconds // self.bucket_seconds

    @property
    def top_level(self) -> int:
        """Highest useful node level: a larger node never fits in a query."""
        return max(self.segment_level, int(math.floor(math.log2(self.retention_buckets))))

    def identity(self) -> dict[str, int]:
        """The parameters a stored state must match to be loaded."""
        return {"p": self.p, "bucket_seconds": self.bucket_seconds,
                "leaf_level": self.leaf_level, "segment_level": self.segment_level}

    def to_dict(self) -> dict:
        return asdict(self)


class KeyTable:
    """Key name <-> dense integer id.  Id 0 is the site-wide key (name None,
    also reached as ``"*"``)."""

    def __init__(self):
        self._ids: dict[str | None, int] = {None: ALL_KEY, SITE_KEY: ALL_KEY}
        self.names: list[str | None] = [None]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str | None) -> int | None:
        return self._ids.get(name)

    def ids(self, names) -> np.ndarray:
        """Ids of ``names`` (created as needed), as uint32."""
        out = np.empty(len(names), np.uint32)
        ids, table = self._ids, self.names
        for i, name in enumerate(names):
            k = ids.get(name)
            if k is None:
                k = ids[name] = len(table)
                table.append(name)
            out[i] = k
        return out


class Slot:
    """A leaf or segment node: its built tables (levels 0..level) and runs."""

    __slots__ = ("level", "node", "main", "runs")

    def __init__(self, level: int, node: int):
        self.level, self.node = level, node
        self.main: list[RowTable] | None = None
        self.runs: list[RowTable] = []

    @property
    def start(self) -> int:
        return self.node << self.level

    @property
    def end(self) -> int:
        return (self.node + 1) << self.level

    def base_tables(self) -> list[RowTable]:
        return ([self.main[0]] if self.main else []) + self.runs


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
    """Sketch pieces gathered for K keys at once; ``finish`` merges them.

    Pieces are kept as chunks of (key position, coupons) and (key position,
    dense register rows); overlapping pieces are harmless (merging is a max).
    """

    __slots__ = ("K", "ck", "cv", "dk", "dv", "rows", "reads", "bytes")

    def __init__(self, K: int):
        self.K = K
        self.rows = 0  # stored rows merged
        self.reads = 0  # contiguous reads (a row, or a slice of a key's base rows): what the index keeps small
        self.bytes = 0  # sketch bytes read: coupons x 4 + dense rows x R
        self.ck: list[np.ndarray] = []  # key positions of coupons
        self.cv: list[np.ndarray] = []  # coupons
        self.dk: list[np.ndarray] = []  # key positions of dense rows
        self.dv: list[np.ndarray] = []  # dense rows (n, R)

    def add_rows(self, t: RowTable, pos: np.ndarray, rows: np.ndarray) -> None:
        """Row ``rows[i]`` of ``t`` for key position ``pos[i]``."""
        self.add_ranges(t, pos, rows, rows + 1)

    def add_ranges(self, t: RowTable, pos: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> None:
        """Rows ``[r0[i], r1[i])`` of ``t`` for key position ``pos[i]``."""
        if not len(pos):
            return
        self.rows += int((r1 - r0).sum())
        self.reads += int((r1 > r0).sum())
        c0, c1 = t.off[r0], t.off[r1]
        if (c1 > c0).any():
            self.cv.append(t.coupons[_gather_ranges(c0, c1)])
            self.ck.append(np.repeat(pos, c1 - c0))
            self.bytes += 4 * len(self.cv[-1])
        d0, d1 = t.dense_cs[r0], t.dense_cs[r1]
        if (d1 > d0).any():
            self.dv.append(t.regs[_gather_ranges(d0, d1)])
            self.dk.append(np.repeat(pos, d1 - d0))
            self.bytes += self.dv[-1].nbytes

    def add_range(self, t: RowTable, p: int, r0: int, r1: int) -> None:
        """Rows ``[r0, r1)`` of ``t`` for key position ``p`` (the one-key path: slices, no gathers)."""
        if r1 <= r0:
            return
        self.rows += r1 - r0
        self.reads += 1
        c0, c1 = int(t.off[r0]), int(t.off[r1])
        if c1 > c0:
            self.cv.append(t.coupons[c0:c1])
            self.ck.append(np.full(c1 - c0, p, np.int64))
            self.bytes += 4 * (c1 - c0)
        d0, d1 = int(t.dense_cs[r0]), int(t.dense_cs[r1])
        if d1 > d0:
            self.dv.append(t.regs[d0:d1])
            self.dk.append(np.full(d1 - d0, p, np.int64))
            self.bytes += (d1 - d0) * t.regs.shape[1]

    def add_coupons(self, pos: np.ndarray, coupons: np.ndarray) -> None:
        if len(coupons):
            self.reads += 1
            self.bytes += 4 * len(coupons)
            self.ck.append(pos)
            self.cv.append(coupons)

    def registers(self, prec: Precision) -> np.ndarray:
        """(K, R) dense registers."""
        K, R = self.K, prec.R
        regs = np.zeros((K, R), np.uint8)
        if K == 1:  # one key: max in place, no stacking or sorting
            for block in self.dv:
                np.maximum(regs[0], block.max(axis=0) if len(block) > 1 else block[0], out=regs[0])
            if self.cv:
                prec.registers_from_coupons(np.concatenate(self.cv) if len(self.cv) > 1 else self.cv[0],
                                            out=regs[0])
            return regs
        if self.dv:
            dk = np.concatenate(self.dk)
            dv = np.concatenate(self.dv)
            order = np.argsort(dk, kind="stable")
            dk, dv = dk[order], dv[order]
            starts = np.flatnonzero(np.r_[True, dk[1:] != dk[:-1]])
            regs[dk[starts]] = np.maximum.reduceat(dv, starts, axis=0)
        if self.cv:
            ck = np.concatenate(self.ck)
            reg, rank = prec.coupon_registers(np.concatenate(self.cv))
            np.maximum.at(regs.reshape(-1), ck * R + reg, rank)
        return regs

    def finish(self, prec: Precision) -> tuple[np.ndarray, np.ndarray]:
        """(K, hist_len) register-value histograms and, per key, its distinct
        coupon count, or -1 when the merged slice would be stored dense.

        The count is given exactly when the merged slice would be stored
        sparse (at most ``dense_threshold`` coupons), so the answer depends on
        the data alone, never on which pieces happened to be stored dense: a
        dense piece always holds more than the threshold itself.
        """
        K, H = self.K, prec.hist_len
        regs = self.registers(prec)
        if K == 1:
            hist = np.bincount(regs[0], minlength=H)[None, :]
            if self.dv or not self.cv or prec.R - hist[0, 0] > prec.dense_threshold:
                return hist, np.array([0 if not (self.dv or self.cv) else -1], np.int64)
            idx = np.sort(np.concatenate(self.cv) >> np.uint32(RANK_BITS))
            k = int(np.count_nonzero(idx[1:] != idx[:-1])) + 1
            return hist, np.array([k if k <= prec.dense_threshold else -1], np.int64)
        hist = np.empty((K, H), np.int64)
        for i in range(K):  # K small bincounts beat one over a K x R int64 copy
            hist[i] = np.bincount(regs[i], minlength=H)
        # a key is dense if a dense piece fed it, or if more registers are set
        # than the threshold (each needs a distinct coupon): no need to count those
        dense = (prec.R - hist[:, 0]) > prec.dense_threshold
        if self.dk:
            dense[np.concatenate(self.dk)] = True
        sparse = np.zeros(K, np.int64)
        if self.cv and not dense.all():
            ck = np.concatenate(self.ck)
            cv = np.concatenate(self.cv)
            keep = ~dense[ck]
            comp = np.sort((ck[keep].astype(np.uint64) << np.uint64(32))
                           | (cv[keep] >> np.uint32(RANK_BITS)).astype(np.uint64))
            first = np.r_[True, comp[1:] != comp[:-1]]
            sparse = np.bincount((comp[first] >> np.uint64(32)).astype(np.int64), minlength=K)
        sparse[dense | (sparse > prec.dense_threshold)] = -1
        return hist, sparse


class ShardStore:
    """The sketches of one register range (``shard`` of ``shards``)."""

    def __init__(self, config: SketchConfig | None = None, shard: int = 0, shards: int = 1):
        self.config = config or SketchConfig()
        self.prec = Precision(self.config.p, shards, shard)
        self.keys = KeyTable()
        self.slots: dict[tuple[int, int], Slot] = {}
        self.upper: dict[tuple[int, int], RowTable] = {}  # built upper nodes (table may be empty)
        self.summaries: dict[tuple[int, int], RowTable] = {}  # full merges awaiting their parent
        self._upper_keys: dict[int, frozenset] = {}  # level -> keys kept in any upper node of that level
        self._loose: set[tuple[int, int]] = set()  # slots whose data the upper index may lack
        self._mem: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._mem_n = 0
        self._mem_cat = None
        self.max_bucket = -1
        self.events = 0

    @property
    def shard(self) -> int:
        return self.prec.shard

    @property
    def shards(self) -> int:
        return self.prec.shards

    # ================================================================ ingest
    def apply(self, key_names, key_index: np.ndarray, buckets: np.ndarray, coupons: np.ndarray) -> int:
        """Add validated events: ``key_names[key_index[i]]`` saw coupon
        ``coupons[i]`` in bucket ``buckets[i]``.  Each also counts site-wide.
        Returns the number of events applied."""
        n = len(buckets)
        if n == 0:
            return 0
        ids = self.keys.ids(key_names)[np.asarray(key_index, np.int64)]
        b = np.asarray(buckets, np.int64).astype(np.uint32)
        c = np.asarray(coupons, np.uint32)
        own = ids != ALL_KEY  # events keyed "*" have no key of their own
        if own.all():
            entry = (np.concatenate([ids, np.zeros(n, np.uint32)]), np.concatenate([b, b]), np.concatenate([c, c]))
        else:
            entry = (np.concatenate([ids[own], np.zeros(n, np.uint32)]), np.concatenate([b[own], b]),
                     np.concatenate([c[own], c]))
        self._mem.append(entry)
        self._mem_n += len(entry[0])
        self._mem_cat = None
        self.max_bucket = max(self.max_bucket, int(b.max()))
        self.events += n
        if self._mem_n >= self.config.memtable_rows:
            self.flush()
        return n

    def _memtable(self):
        if self._mem_cat is None:
            if not self._mem:
                e = np.zeros(0, np.uint32)
                self._mem_cat = (e, e, e)
            elif len(self._mem) == 1:
                self._mem_cat = self._mem[0]
            else:
                self._mem_cat = tuple(np.concatenate(parts) for parts in zip(*self._mem))
                self._mem = [self._mem_cat]
        return self._mem_cat

    def flush(self) -> None:
        """Sort the memtable into level-0 runs on their leaf (or segment) slots."""
        if not self._mem_n:
            return
        k, b, c = self._memtable()
        self._mem, self._mem_n, self._mem_cat = [], 0, None
        rows = rows_from_events(k, b, c, self.prec)
        for jf, run in split_by_node(rows, self.config.leaf_level):
            self._add_run(jf, run)

    def _add_run(self, jf: int, run: RowTable) -> None:
        cfg = self.config
        js = jf >> (cfg.segment_level - cfg.leaf_level)
        slot = self.slots.get((cfg.segment_level, js))
        if slot is None:
            slot = self.slots.get((cfg.leaf_level, jf))
            if slot is None:
                slot = self.slots[(cfg.leaf_level, jf)] = Slot(cfg.leaf_level, jf)
        slot.runs.append(run.warm())
        if len(slot.runs) > 4 * cfg.max_runs:  # bound what a query reads between maintenance passes
            slot.runs = [merge(slot.runs, self.prec).warm()]
        self._loose.add((slot.level, slot.node))

    # ================================================================ maintenance
    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        """Fold runs and build rollups for sealed time.  Returns True when
        nothing is left to do (False if ``max_seconds`` cut it short)."""
        try:
            return self._maintain(now, max_seconds)
        finally:
            self._index_upper()

    def _maintain(self, now: float | None, max_seconds: float | None) -> bool:
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.flush()
        if now is not None:
            self.expire(now)
        cfg = self.config
        LF, LS = cfg.leaf_level, cfg.segment_level
        sealed_end = self.max_bucket + 1 - cfg.lateness_buckets

        def out_of_time():
            return deadline is not None and time.perf_counter() > deadline

        # 1. segments: build each sealed one straight from its base rows; fold late runs
        d = LS - LF
        candidates = {k[1] >> d for k in self.slots if k[0] == LF} | {k[1] for k in self.slots if k[0] == LS}
        for js in sorted(candidates):
            if (js + 1) << LS > sealed_end:
                continue
            slot = self.slots.get((LS, js))
            if slot is not None:
                base_rows = len(slot.main[0]) if slot.main else 0
                run_rows = sum(len(r) for r in slot.runs)
                if run_rows and (run_rows * 8 >= base_rows or len(slot.runs) > cfg.max_runs):
                    self._rebuild_segment(slot)
            else:
                self._build_segment(js, [self.slots[(LF, jf)] for jf in range(js << d, (js + 1) << d)
                                         if (LF, jf) in self.slots])
            if out_of_time():
                return False
        # 2. leaves of the open segments: build the sealed ones (in one pass); compact long run lists
        sealed = []
        for key in sorted(k for k in self.slots if k[0] == LF):
            slot = self.slots[key]
            if slot.runs and slot.end <= sealed_end:
                sealed.append(slot)
            elif len(slot.runs) > cfg.max_runs:
                slot.runs = [merge(slot.runs, self.prec).warm()]
        if sealed:
            self._build_leaves(sealed)
        if out_of_time():
            return False
        # 3. upper index, bottom-up
        for lvl in range(LS, cfg.top_level):
            for (l, j) in sorted(k for k in self.summaries if k[0] == lvl):
                if (l, j) not in self.summaries:
                    continue  # consumed with its sibling
                parent = (lvl + 1, j >> 1)
                if parent in self.upper or ((j >> 1) + 1) << (lvl + 1) > sealed_end:
                    continue
                sib = (lvl, j ^ 1)
                if sib in self.summaries or not self._pending(lvl, j ^ 1):
                    self._build_upper(*parent)
                if out_of_time():
                    return False
        for k in [k for k in self.summaries if k[0] >= cfg.top_level]:
            del self.summaries[k]
        return True

    def _index_upper(self) -> None:
        """Which keys the upper index holds, per level: a key in none of a
        node's levels goes straight to the segments beneath it."""
        by_level: dict[int, set] = {}
        for (lvl, _), t in self.upper.items():
            if len(t):
                by_level.setdefault(lvl, set()).update((t.code >> np.uint64(32)).astype(np.int64).tolist())
        self._upper_keys = {lvl: frozenset(keys) for lvl, keys in by_level.items()}

    def _build_leaves(self, slots: list[Slot]) -> None:
        """Build leaves together: node numbers keep them apart until level
        ``leaf_level``, so one vectorized pass serves them all."""
        LF = self.config.leaf_level
        base = merge([t for s in slots for t in s.base_tables()], self.prec)
        tables, _ = build_levels(base, LF, self.prec, summary=False)
        by_leaf = {s.node: s for s in slots}
        for s in slots:
            s.main = [RowTable.empty(lvl, self.prec.R) for lvl in range(LF + 1)]
            s.runs = []
        for lvl, t in enumerate(tables):
            for jf, part in split_by_node(t, LF - lvl):
                by_leaf[jf].main[lvl] = part.warm()

    def _build_segment(self, js: int, leaves: list[Slot]) -> None:
        """A sealed segment, from all its leaves' base rows in one pass (the
        leaves' own rollups only served while the segment was open)."""
        cfg = self.config
        LF, LS = cfg.leaf_level, cfg.segment_level
        slot = Slot(LS, js)
        base = merge([t for leaf in leaves for t in leaf.base_tables()], self.prec)
        slot.main, summary = build_levels(base, LS, self.prec)
        for t in slot.main:
            t.warm()
        for leaf in leaves:
            del self.slots[(LF, leaf.node)]
            self._loose.discard((LF, leaf.node))
        self.slots[(LS, js)] = slot
        self._settle_summary(js, summary)

    def _rebuild_segment(self, slot: Slot) -> None:
        base = merge(slot.base_tables(), self.prec)
        slot.main, summary = build_levels(base, slot.level, self.prec)
        for t in slot.main:
            t.warm()
        slot.runs = []
        self._loose.discard((slot.level, slot.node))
        self._settle_summary(slot.node, summary)

    def _settle_summary(self, js: int, summary: RowTable) -> None:
        """Keep a segment's top merge for its parent, or, when the parent is
        already built (late data), fold it into the built upper nodes."""
        LS = self.config.segment_level
        if (LS + 1, js >> 1) not in self.upper:
            self.summaries[(LS, js)] = summary
            return
        cur, lvl, j = summary, LS, js
        while lvl < self.config.top_level and (lvl + 1, j >> 1) in self.upper:
            cur, _ = level_up([cur], self.prec, lvl + 1)
            lvl, j = lvl + 1, j >> 1
            t = self.upper[(lvl, j)]
            if len(t):
                self.upper[(lvl, j)] = merge([t, cur.take(np.isin(cur.code >> np.uint64(32), t.code >> np.uint64(32)))], self.prec)
        if (lvl, j) in self.summaries:  # the highest built node still awaits its parent
            self.summaries[(lvl, j)] = merge([self.summaries[(lvl, j)], cur], self.prec)

    def _build_upper(self, lvl: int, j: int) -> None:
        children = [self.summaries.pop(k) for k in ((lvl - 1, 2 * j), (lvl - 1, 2 * j + 1)) if k in self.summaries]
        full, kept = level_up(children, self.prec, lvl)
        self.upper[(lvl, j)] = kept
        if lvl < self.config.top_level:
            self.summaries[(lvl, j)] = full

    def _pending(self, lvl: int, j: int) -> bool:
        """Whether node (lvl, j) has data not yet summarised at its level."""
        cfg = self.config
        LF, LS = cfg.leaf_level, cfg.segment_level
        start, end = j << lvl, (j + 1) << lvl
        for l in range(LS, lvl):
            for jj in range(start >> l, end >> l):
                if (l, jj) in self.summaries:
                    return True
        for js in range(start >> LS, end >> LS):
            if (LS, js) in self.slots:
                return True
            for jf in range(js << (LS - LF), (js + 1) << (LS - LF)):
                if (LF, jf) in self.slots:
                    return True
        return False

    def expire(self, now: float) -> None:
        """Drop every node entirely older than the retention window."""
        oldest = math.floor(now / self.config.bucket_seconds) - self.config.retention_buckets + 1
        for k in [k for k in self.slots if (k[1] + 1) << k[0] <= oldest]:
            del self.slots[k]
            self._loose.discard(k)
        for d in (self.upper, self.summaries):
            for k in [k for k in d if (k[1] + 1) << k[0] <= oldest]:
                del d[k]

    # ================================================================ queries
    def query(self, key_names, b0: int, b1: int):
        """Answer for each key over buckets ``[b0, b1)``, all keys at once.

        Returns ``(hist, sparse, impressions)``: ``hist[i]`` the register-value
        histogram of key i's merged slice (``hist_len`` ints), ``sparse[i]``
        its distinct coupon count, or -1 when dense, ``impressions[i]`` its
        exact impression count on this shard.
        """
        kids, where = self._key_ids(key_names)
        U = len(kids)
        pc = self._pieces(kids, np.arange(U), U, b0, b1)
        hist, sparse = pc.finish(self.prec) if U else (np.zeros((0, self.prec.hist_len), np.int64),
                                                       np.zeros(0, np.int64))
        empty = np.zeros((1, self.prec.hist_len), np.int64)
        empty[0, 0] = self.prec.R  # an unknown key: every register zero
        hist = np.concatenate([hist, empty])
        sparse = np.r_[sparse, 0]
        imp = np.r_[self._impressions(kids, b0, b1), 0]
        return hist[where], sparse[where], imp[where]

    def registers(self, name: str | None, b0: int, b1: int) -> np.ndarray:
        """This shard's dense register slice for ``name`` over ``[b0, b1)``."""
        kids, _ = self._key_ids([name])
        return self._pieces(kids, np.arange(len(kids)), 1, b0, b1).registers(self.prec)[0]

    def _key_ids(self, key_names) -> tuple[np.ndarray, np.ndarray]:
        """(distinct ids of the known keys, for each name the index of its id,
        or ``len(ids)`` for an unknown key)."""
        ids = [self.keys.get(n) for n in key_names]
        uniq = sorted({k for k in ids if k is not None})
        index = {k: i for i, k in enumerate(uniq)}
        return np.array(uniq, np.int64), np.array([index.get(k, len(uniq)) for k in ids], np.int64)

    def _pieces(self, kids: np.ndarray, pos: np.ndarray, K: int, b0: int, b1: int) -> Pieces:
        pc = Pieces(K)
        if not len(kids):
            return pc
        if len(kids) == 1:  # the common case: scalar lookups beat numpy calls on 1-element arrays
            kid, p = int(kids[0]), int(pos[0])
            for lvl, j in dyadic(b0, b1):
                self._cover1(kid, p, lvl, j, pc)
        else:
            for lvl, j in dyadic(b0, b1):
                self._cover(kids, pos, lvl, j, pc)
        k, b, c = self._memtable()
        if len(k):
            m = (b >= b0) & (b < b1)
            if len(kids) == 1:
                m &= k == kids[0]
                pc.add_coupons(np.full(int(m.sum()), pos[0]), c[m])
            else:
                order = np.argsort(kids)
                i = np.searchsorted(kids, k, sorter=order)
                i = order[np.minimum(i, len(kids) - 1)]
                m &= kids[i] == k
                pc.add_coupons(pos[i[m]], c[m])
        return pc

    def _cover(self, kids: np.ndarray, pos: np.ndarray, lvl: int, j: int, pc: Pieces) -> None:
        """Gather the pieces covering node (lvl, j) for every key in ``kids``."""
        cfg = self.config
        LF, LS = cfg.leaf_level, cfg.segment_level
        if lvl > LS:
            t = self.upper.get((lvl, j))
            if t is not None and len(t):
                rows = t.find_many(kids, j)
                hit = rows >= 0
                if hit.any():
                    pc.add_rows(t, pos[hit], rows[hit])
                    self._loose_cover(kids[hit], pos[hit], j << lvl, (j + 1) << lvl, pc)
                    kids, pos = kids[~hit], pos[~hit]
            if len(kids):
                self._cover(kids, pos, lvl - 1, 2 * j, pc)
                self._cover(kids, pos, lvl - 1, 2 * j + 1, pc)
            return
        slot = self.slots.get((LS, j >> (LS - lvl)))
        if slot is None and lvl <= LF:
            slot = self.slots.get((LF, j >> (LF - lvl)))
        if slot is None:
            if lvl > LF:  # spans several leaves of an unbuilt segment
                self._cover(kids, pos, lvl - 1, 2 * j, pc)
                self._cover(kids, pos, lvl - 1, 2 * j + 1, pc)
            return
        if slot.main:
            self._segment_cover(slot.main, kids, pos, lvl, j, pc)
        lo, hi = j << lvl, (j + 1) << lvl
        for run in slot.runs:
            r0, r1 = run.node_range_many(kids, lo, hi)
            pc.add_ranges(run, pos, r0, r1)

    def _segment_cover(self, tables: list[RowTable], kids, pos, lvl: int, j: int, pc: Pieces) -> None:
        if 0 < lvl < len(tables) and len(tables[lvl]):
            rows = tables[lvl].find_many(kids, j)
            hit = rows >= 0
            if hit.any():
                pc.add_rows(tables[lvl], pos[hit], rows[hit])
                kids, pos = kids[~hit], pos[~hit]
                if not len(kids):
                    return
        base = tables[0]
        r0, r1 = base.node_range_many(kids, j << lvl, (j + 1) << lvl)
        some = r1 > r0
        if not some.any():
            return
        kids, pos, r0, r1 = kids[some], pos[some], r0[some], r1[some]
        if lvl == 0:
            pc.add_ranges(base, pos, r0, r1)
            return
        # small enough to read from the base, or else look for finer rollups
        size = 4 * (base.off[r1] - base.off[r0]) + self.prec.R * (base.dense_cs[r1] - base.dense_cs[r0])
        small = size <= 4 * self.prec.R
        if small.any():
            pc.add_ranges(base, pos[small], r0[small], r1[small])
        if not small.all():
            big = ~small
            self._segment_cover(tables, kids[big], pos[big], lvl - 1, 2 * j, pc)
            self._segment_cover(tables, kids[big], pos[big], lvl - 1, 2 * j + 1, pc)

    def _cover1(self, kid: int, p: int, lvl: int, j: int, pc: Pieces) -> None:
        """``_cover`` for a single key."""
        cfg = self.config
        LF, LS = cfg.leaf_level, cfg.segment_level
        if lvl > LS:
            if not any(kid in self._upper_keys.get(l, ()) for l in range(LS + 1, lvl + 1)):
                for js in range(j << (lvl - LS), (j + 1) << (lvl - LS)):  # nothing above the segments
                    self._cover1(kid, p, LS, js, pc)
                return
            t = self.upper.get((lvl, j))
            if t is not None and len(t):
                r = t.find(kid, j)
                if r >= 0:
                    pc.add_range(t, p, r, r + 1)
                    self._loose_cover(np.array([kid]), np.array([p]), j << lvl, (j + 1) << lvl, pc)
                    return
            self._cover1(kid, p, lvl - 1, 2 * j, pc)
            self._cover1(kid, p, lvl - 1, 2 * j + 1, pc)
            return
        slot = self.slots.get((LS, j >> (LS - lvl)))
        if slot is None and lvl <= LF:
            slot = self.slots.get((LF, j >> (LF - lvl)))
        if slot is None:
            if lvl > LF:
                self._cover1(kid, p, lvl - 1, 2 * j, pc)
                self._cover1(kid, p, lvl - 1, 2 * j + 1, pc)
            return
        if slot.main:
            self._segment_cover1(slot.main, kid, p, lvl, j, pc)
        lo, hi = j << lvl, (j + 1) << lvl
        for run in slot.runs:
            pc.add_range(run, p, *run.node_range(kid, lo, hi))

    def _segment_cover1(self, tables: list[RowTable], kid: int, p: int, lvl: int, j: int, pc: Pieces) -> None:
        """``_segment_cover`` for a single key."""
        if 0 < lvl < len(tables) and len(tables[lvl]):
            r = tables[lvl].find(kid, j)
            if r >= 0:
                pc.add_range(tables[lvl], p, r, r + 1)
                return
        base = tables[0]
        r0, r1 = base.node_range(kid, j << lvl, (j + 1) << lvl)
        if r0 == r1:
            return
        if lvl == 0 or base.bytes_between(r0, r1) <= 4 * self.prec.R:
            pc.add_range(base, p, r0, r1)
            return
        self._segment_cover1(tables, kid, p, lvl - 1, 2 * j, pc)
        self._segment_cover1(tables, kid, p, lvl - 1, 2 * j + 1, pc)

    def _loose_cover(self, kids, pos, lo: int, hi: int, pc: Pieces) -> None:
        """Base rows in ``[lo, hi)`` that the upper index may not include yet."""
        for key in self._loose:
            slot = self.slots[key]
            if slot.end > lo and slot.start < hi:
                tables = slot.runs + ([slot.main[0]] if slot.main and slot.level == self.config.leaf_level else [])
                for t in tables:
                    r0, r1 = t.node_range_many(kids, lo, hi)
                    pc.add_ranges(t, pos, r0, r1)

    def _slots_overlapping(self, b0: int, b1: int):
        LF, LS = self.config.leaf_level, self.config.segment_level
        for js in range(b0 >> LS, ((b1 - 1) >> LS) + 1):
            slot = self.slots.get((LS, js))
            if slot is not None:
                yield slot
                continue
            for jf in range(max(b0 >> LF, js << (LS - LF)), min(((b1 - 1) >> LF) + 1, (js + 1) << (LS - LF))):
                slot = self.slots.get((LF, jf))
                if slot is not None:
                    yield slot

    def _impressions(self, kids: np.ndarray, b0: int, b1: int) -> np.ndarray:
        total = np.zeros(len(kids), np.int64)
        if not len(kids):
            return total
        if len(kids) == 1:
            kid, n = int(kids[0]), 0
            for slot in self._slots_overlapping(b0, b1):
                for t in slot.base_tables():
                    n += t.impressions_between(*t.node_range(kid, b0, b1))
            k, b, _ = self._memtable()
            if len(k):
                n += int(np.count_nonzero((k == kid) & (b >= b0) & (b < b1)))
            total[0] = n
            return total
        for slot in self._slots_overlapping(b0, b1):
            for t in slot.base_tables():
                r0, r1 = t.node_range_many(kids, b0, b1)
                total += t.imp_cs[r1] - t.imp_cs[r0]
        k, b, _ = self._memtable()
        if len(k):
            m = (b >= b0) & (b < b1)
            order = np.argsort(kids)
            i = np.searchsorted(kids, k[m], sorter=order)
            i = order[np.minimum(i, len(kids) - 1)]
            hit = kids[i] == k[m]
            total += np.bincount(i[hit], minlength=len(kids))
        return total

    def key_impressions(self, b0: int, b1: int, prefix: str = "") -> tuple[list, np.ndarray]:
        """(key names, impressions on this shard over ``[b0, b1)``) of every key
        with impressions there whose name starts with ``prefix`` (site-wide excluded)."""
        totals = np.zeros(len(self.keys), np.int64)
        for slot in self._slots_overlapping(b0, b1):
            for t in slot.base_tables():
                nodes = t.nodes
                m = (nodes >= b0) & (nodes < b1) & (t.imp > 0)
                if m.any():
                    totals += np.bincount(t.keys[m], weights=t.imp[m], minlength=len(totals)).astype(np.int64)
        k, b, _ = self._memtable()
        if len(k):
            m = (b >= b0) & (b < b1)
            totals += np.bincount(k[m].astype(np.int64), minlength=len(totals))
        totals[0] = 0  # the site-wide key is not a key to pick
        ids = np.flatnonzero(totals)
        names = self.keys.names
        if prefix:
            ids = np.array([i for i in ids if names[i].startswith(prefix)], np.int64)
        return [names[i] for i in ids], totals[ids]

    # ================================================================ introspection
    def stats(self) -> dict:
        """Row and byte counts per place, for benchmarks and the design doc."""
        base = rollup = upper = 0
        base_rows = rollup_rows = 0
        for slot in self.slots.values():
            for t in slot.base_tables():
                base += t.nbytes
                base_rows += len(t)
            for t in (slot.main or [])[1:]:
                rollup += t.nbytes
                rollup_rows += len(t)
        for t in self.upper.values():
            upper += t.nbytes
            rollup_rows += len(t)
        return {"keys": len(self.keys), "events": self.events, "memtable_rows": self._mem_n,
                "slots": len(self.slots), "upper_nodes": len(self.upper), "summaries": len(self.summaries),
                "base_rows": base_rows, "rollup_rows": rollup_rows,
                "base_bytes": base, "rollup_bytes": rollup + upper,
                "summary_bytes": sum(t.nbytes for t in self.summaries.values())}
