"""One shard's sketches: every key, every time bucket, one register range.

Where data lives
----------------
Events arrive as (key, bucket, coupon) triples; every event also counts for
the site-wide key (id 0).  They go through four places, newest first:

1. **memtable** (``memtable.Memtable``): unsorted chunks, at most
   ``memtable_rows`` rows; queries scan it with a vectorized mask.
2. **leaf slots** (level ``leaf_level`` = 6, 64 buckets): ``flush`` sorts
   the memtable into level-0 rows (one per key and bucket, see
   ``rows.RowTable``) and appends them to the slot of their leaf node as a
   *run*.  When the leaf's time is sealed its runs are merged and its
   rollups built.
3. **segment slots** (level ``segment_level`` = 11, 2048 buckets): a sealed
   segment's leaves become one slot with rollups for levels 1..11.
4. **upper index** (levels 12..``top_level``): rollup rows built from the
   segments' top-level merges, for ranges longer than a segment.

``tiers`` holds places 2-4 as immutable nodes, ``rollup`` builds them
(``maintain``), ``cover`` answers a range from them (``query``).

Threads
-------
One thread applies (``apply``, ``flush``) while another maintains
(``maintain``, ``seal``): every change to the maps of nodes, the memtable
and the key table is made under ``lock``, and held only for the change
itself.  Maintenance builds outside it, from nodes it took as inputs, and
puts its result in place under it with whatever runs reached those nodes
meanwhile (``rollup``).  Questions take no lock: they read the last
published view (``view``).  Every
place holds a *complete* answer for what it covers, and merging is a
``max``, so a query may take any pieces that cover its range, overlapping
or not: the rollups may lag behind late events (those are in runs or the
memtable, which queries always read) and never make an answer wrong.

Impressions are exact counts on the level-0 rows only (each event is in
exactly one place); a range sums prefix sums, O(log n) per table touched.

What a store holds is listed and replaced node by node (``nodes``,
``install``): checkpoints, recovery and re-sharding use only that, with
the store's two counters (``max_bucket``, ``events``) beside it.
"""

from __future__ import annotations

import threading

import numpy as np

from . import cover, npx, windows
from .config import SketchConfig
from .hll import RANK_BITS, RegisterRange
from .keys import ALL_KEY, KeyTable
from .memtable import Memtable
from .rollup import Rollups
from .rows import merge, rows_from_events, split_by_node, table_keys
from .tiers import Node, Slot, Tiers

__all__ = ["ShardStore", "SketchConfig", "ALL_KEY"]


class ShardStore:
    """The sketches of one register range (``shard`` of ``shards``)."""

    def __init__(self, config: SketchConfig | None = None, shard: int = 0, shards: int = 1):
        self.config = config or SketchConfig()
        self.rr = RegisterRange(self.config.p, shards, shard)
        self.keys = KeyTable()
        self.tiers = Tiers(self.config)
        self.memtable = Memtable()
        self.lock = threading.RLock()  # held for every change (see the module text), never for a question
        self._rollups = Rollups(self.tiers, self.config, self.rr, self.lock, self.publish)
        self.max_bucket = -1  # newest bucket seen: time before it (less the lateness) is sealed
        self.events = 0  # events applied
        # log positions (``apply(tag=...)``): the memtable holds the events of positions (flushed, tagged]
        self.tagged = self.flushed = 0
        self.flush_rows = self.config.memtable_rows  # a flush comes when the memtable holds this many rows
        self.on_flush = None  # called as on_flush(after, through, runs) under the lock by every flush
        self._view: StoreView | None = None
        self.publish()

    def publish(self) -> "StoreView":
        """Make the current state the one ``view`` gives: called by the writer at the end of
        every change (the store's own methods do), never in the middle of one."""
        with self.lock:
            self._view = StoreView(self)
            return self._view

    def view(self) -> "StoreView":
        """The state as last published: immutable, so it can answer on another thread while
        the writer goes on (applies, flushes, maintenance never show half done)."""
        return self._view

    @property
    def shard(self) -> int:
        return self.rr.shard

    @property
    def shards(self) -> int:
        return self.rr.shards

    # ================================================================ ingest
    def apply(self, key_names, key_index: np.ndarray, buckets: np.ndarray, coupons: np.ndarray,
              tag: int | None = None) -> int:
        """Add validated events: ``key_names[key_index[i]]`` saw coupon
        ``coupons[i]`` in bucket ``buckets[i]``.  Each also counts site-wide.
        ``tag``: the log position they come from (positions come in order).
        Returns the number of events applied."""
        n = len(buckets)
        with self.lock:
            if tag is not None:
                self.tagged = int(tag)
            if n == 0:
                return 0
            return self._apply(key_names, key_index, buckets, coupons, n)

    def _apply(self, key_names, key_index, buckets, coupons, n: int) -> int:
        ids = self.keys.ids(key_names)[np.asarray(key_index, np.int64)]
        b = np.asarray(buckets, np.int64).astype(np.uint32)
        c = np.asarray(coupons, np.uint32)
        own = ids != ALL_KEY  # events keyed "*" have no key of their own
        if own.all():
            self.memtable.add(np.concatenate([ids, np.zeros(n, np.uint32)]), np.concatenate([b, b]),
                              np.concatenate([c, c]), self.tagged)
        else:
            self.memtable.add(np.concatenate([ids[own], np.zeros(n, np.uint32)]), np.concatenate([b[own], b]),
                              np.concatenate([c[own], c]), self.tagged)
        self.max_bucket = max(self.max_bucket, int(b.max()))
        self.events += n
        if len(self.memtable) >= self.flush_rows:
            self.flush()
        else:
            self.publish()
        return n

    def flush(self) -> None:
        """Sort the memtable into level-0 runs on their leaf (or segment) slots."""
        with self.lock:
            after, self.flushed = self.flushed, self.tagged
            if not len(self.memtable):
                return
            pieces = self._sort_in(self.memtable.take())
            if self.on_flush is not None:
                self.on_flush(after, self.flushed, pieces)
            self.publish()  # the events left the memtable and are in runs: both in one view

    def _sort_in(self, events) -> list:
        """Sort memtable events into level-0 runs, one a leaf, and put them on their slots; returns the runs."""
        pieces = split_by_node(rows_from_events(*events, self.rr), self.config.leaf_level)
        self._add_runs(pieces)
        return pieces

    def _add_runs(self, pieces) -> None:
        cfg = self.config
        for jf, run in pieces:
            slot = self.tiers.slot_of_leaf(jf)
            if slot is None:
                slot = self.tiers.put_slot(cfg.leaf_level, jf)
            runs = slot.runs + (run,)
            # bound what a query reads between maintenance passes (not under a build that took the slot:
            # it folds them soon, and a fold now would make it drop its work, see ``rollup``)
            if len(runs) > 4 * cfg.max_runs and (slot.level, slot.node) not in self.tiers.busy:
                runs = (merge(list(runs), self.rr),)
            self.tiers.put_slot(slot.level, slot.node, slot.main, runs, slot.sealed)

    def flush_through(self, tag: int) -> None:
        """Sort the memtable's events of log positions up to ``tag`` into runs (the later ones stay)."""
        with self.lock:
            if tag <= self.flushed:
                return
            rest = self.memtable.take_through(tag)
            self.flushed = min(tag, self.tagged)
            if len(rest[0]):
                self._sort_in(rest)
                self.publish()

    def take_runs(self, after: int, through: int, pieces) -> bool:
        """Take the sorted runs another copy of this range flushed from the events of log positions
        ``(after, through]`` (``on_flush``, with the same key ids) in place of sorting those events here.
        Possible when this memtable holds them all: positions up to ``through`` applied, none of
        ``(after, through]`` flushed here yet (those up to ``after`` are flushed first).  Returns
        whether the runs were taken (else nothing changed)."""
        with self.lock:
            if through > self.tagged or self.flushed > after:
                return False
            self.flush_through(after)
            self.memtable.drop_through(through)
            self.flushed = through
            self._add_runs(pieces)
            self.publish()
            return True

    # ================================================================ maintenance
    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        """Flush, drop what ``now`` puts beyond the retention, fold runs and
        build rollups for sealed time.  Returns True when nothing is left to
        do (False if ``max_seconds`` cut it short)."""
        self.flush()
        if now is not None:
            self.expire(now)
        try:
            return self._rollups.maintain(self.max_bucket + 1 - self.config.lateness_buckets, max_seconds)
        finally:
            self.publish()

    def expire(self, now: float) -> int:
        """Drop every node entirely older than the retention window, and the
        keys left with no rows; returns how many nodes were dropped."""
        with self.lock:
            dropped = self.tiers.expire(self.config.oldest_bucket(now))
            if dropped:
                held = [self.memtable.columns()[0].astype(np.int64)]
                for node in self.tiers.nodes():
                    held += [table_keys(t) for _, t in node.parts()]
                self.keys.drop(np.setdiff1d(np.arange(1, len(self.keys)), np.concatenate(held)))
                self.publish()
            return dropped

    # ================================================================ queries
    def query(self, key_names, b0: int, b1: int):
        """Answer for each key over buckets ``[b0, b1)``, all keys at once.

        Returns ``(hist, sparse, impressions)``: ``hist[i]`` the register-value
        histogram of key i's merged slice (``hist_len`` ints), ``sparse[i]``
        its distinct coupon count, or -1 when dense, ``impressions[i]`` its
        exact impression count on this shard.
        """
        ids, where = self.keys.lookup(key_names)
        hist, sparse, imp = self.answer_sets(ids, None, len(ids), b0, b1)
        if len(ids) == len(where) and (len(where) == 1 or (where[1:] > where[:-1]).all()):
            return hist, sparse, imp  # every key known, each once, in id order
        unknown = np.zeros((1, self.rr.prec.hist_len), np.int64)
        unknown[0, 0] = self.rr.R  # a key never seen: every register zero
        zero = np.zeros(1, np.int64)
        return (np.concatenate([hist, unknown])[where], np.concatenate([sparse, zero])[where],
                np.concatenate([imp, zero])[where])

    def answer_sets(self, ids: np.ndarray, pos: np.ndarray | None, K: int, b0: int, b1: int):
        """``(hist, sparse, impressions)`` of K key sets over ``[b0, b1)``: key
        ``ids[i]`` (distinct ids) belongs to set ``pos[i]`` (default: set i is
        key i), and a set's answer is the union of its keys' visitors.

        A set whose impressions on this shard are within ``exact_budget`` is
        read from its level-0 rows and its coupons counted however many
        (near-exact, see ``cover.gather_base``); the others take the cover
        walk, counted up to ``count_limit``.  Both give the same registers;
        whether the count is used is decided on the sums of all shards
        (``answer.merge_answers``)."""
        rr = self.rr
        pos = np.arange(len(ids)) if pos is None else np.asarray(pos, np.int64)
        hist = np.zeros((K, rr.prec.hist_len), np.int64)
        hist[:, 0] = rr.R
        sparse = np.zeros(K, np.int64)
        key_imp = cover.impressions(self.tiers, self.memtable, ids, b0, b1)
        imp = np.bincount(pos, weights=key_imp, minlength=K).astype(np.int64) if len(ids) else np.zeros(K, np.int64)
        small = imp <= rr.exact_budget
        for how, which in ((True, small), (False, ~small)):
            sel = which[pos]
            if not sel.any():
                continue
            sets = np.flatnonzero(which)
            pc, limit = self._pieces(how, ids[sel], np.searchsorted(sets, pos[sel]), len(sets), b0, b1)
            hist[sets], sparse[sets] = pc.finish(rr, limit)
        return hist, sparse, imp

    def _pieces(self, near_exact: bool, ids: np.ndarray, pos: np.ndarray, K: int, b0: int, b1: int):
        """``(pieces, count limit for finish)``: level-0 rows counted however many
        (near-exact), or the cover walk counted up to ``count_limit``."""
        if near_exact:
            return cover.gather_base(self.tiers, self.memtable, self.rr, ids, b0, b1, pos, K), None
        return cover.gather(self.tiers, self.memtable, self.rr, ids, b0, b1, pos, K), -1

    def key_ids(self, names=(), prefix: str | None = None) -> np.ndarray:
        """The distinct ids of a key set on this shard: the ``names`` it knows,
        and every key whose name starts with ``prefix`` (when given)."""
        ids, _ = self.keys.lookup(list(names))
        if prefix:
            names_ = self.keys.names
            more = [i for i, nm in enumerate(names_) if nm is not None and i != ALL_KEY and nm.startswith(prefix)]
            ids = np.union1d(ids, np.array(more, np.int64))
        return ids.astype(np.int64)

    def reach(self, names, prefix: str | None, b0: int, b1: int):
        """``(hist, sparse, impressions, keys)`` of the union of a key set over
        ``[b0, b1)``: one row, as ``query`` gives for one key; ``keys`` the
        number of the set's keys this shard holds."""
        ids = self.key_ids(names, prefix)
        hist, sparse, imp = self.answer_sets(ids, np.zeros(len(ids), np.int64), 1, b0, b1)
        return hist, sparse, imp, len(ids)

    def overlap(self, a: tuple, b: tuple, b0: int, b1: int):
        """Two key sets ``a`` and ``b`` (each ``(names, prefix)``) over ``[b0, b1)``:
        ``(joint, counts, impressions)`` where ``joint[i, j]`` counts this
        shard's registers holding ``i`` in a's union and ``j`` in b's (all
        the estimators need), ``counts`` the distinct coupons of a, b and
        a | b (-1 where not counted, as for ``query``) and ``impressions``
        a's and b's."""
        rr, H = self.rr, self.rr.prec.hist_len
        regs, counts, imps, index = [], [], [], []
        for names, prefix in (a, b):
            ids = self.key_ids(names, prefix)
            imp = int(cover.impressions(self.tiers, self.memtable, ids, b0, b1).sum()) if len(ids) else 0
            pc, limit = self._pieces(imp <= rr.exact_budget, ids, np.zeros(len(ids), np.int64), 1, b0, b1)
            r = pc.registers(rr)
            _, count = pc.finish(rr, limit, regs=r)
            regs.append(r[0])
            counts.append(int(count[0]))
            imps.append(imp)
            index.append(pc.coupon_array() >> np.uint32(RANK_BITS))
        joint = np.bincount(regs[0].astype(np.int64) * H + regs[1], minlength=H * H).reshape(H, H)
        union = len(npx.unique(np.concatenate(index))) if min(counts) >= 0 else -1
        return joint, np.array(counts + [union], np.int64), np.array(imps, np.int64)

    def series(self, names, prefix: str | None, b0: int, g: int, n: int, starts, ends):
        """``(hist, sparse, impressions)`` of windows ``[b0 + starts[i] g, b0 + ends[i] g)``
        of a key set's union, all in one pass (``windows.series``): each row
        what ``reach`` answers for that window."""
        ids = self.key_ids(names, prefix)
        return windows.series(self.tiers, self.memtable, self.rr, ids, b0, g, n, windows.Windows(starts, ends))

    def registers(self, name: str | None, b0: int, b1: int) -> np.ndarray:
        """This shard's dense register slice for ``name`` over ``[b0, b1)``."""
        ids, _ = self.keys.lookup([name])
        if not len(ids):
            return np.zeros(self.rr.R, np.uint8)
        return cover.gather(self.tiers, self.memtable, self.rr, ids, b0, b1).registers(self.rr)[0]

    def key_impressions(self, b0: int, b1: int, prefix: str = "", limit: int | None = None) -> tuple[list, np.ndarray]:
        """(key names, impressions on this shard over ``[b0, b1)``) of the keys
        with impressions there whose name starts with ``prefix`` (site-wide
        excluded): all of them, or the ``limit`` with the most."""
        totals = cover.impressions_by_key(self.tiers, self.memtable, len(self.keys), b0, b1)
        totals[ALL_KEY] = 0  # the site-wide key is not a key to pick
        names = self.keys.names
        # a view can hold a key the writer has dropped since (its name is then gone): left out
        ids = np.array([i for i in np.flatnonzero(totals).tolist() if names[i] is not None
                        and names[i].startswith(prefix)], np.int64)
        if limit is not None and len(ids) > limit:
            ids = ids[np.argsort(-totals[ids], kind="stable")[:limit]]
        return [names[i] for i in ids], totals[ids]

    # ================================================================ nodes
    def nodes(self) -> list[Node]:
        """Every stored node (the memtable is flushed first), each immutable
        and with a version that changes whenever the node does."""
        with self.lock:
            self.flush()
            return self.tiers.nodes()

    def sealable(self) -> list[Node]:
        """The nodes that will not change again and are still on the heap: a
        built leaf or segment with no runs, an upper node, a summary."""
        with self.lock:
            return [n for n in self.tiers.nodes() if n.sealed is None and (not isinstance(n, Slot) or
                                                                            (n.main and not n.runs))]

    def seal(self, node: Node, sealed) -> Node | None:
        """Put ``node`` back read from its sealed file (``sealed.SealedFile``),
        if it is still the node given (a node that changed since is left as it is)."""
        with self.lock:
            return self._seal(node, sealed)

    def _seal(self, node: Node, sealed) -> Node | None:
        where = self.tiers.slots if isinstance(node, Slot) else \
            (self.tiers.upper if node.kind == "upper" else self.tiers.summaries)
        if where.get((node.level, node.node)) is not node:
            return None
        if isinstance(node, Slot):
            out = self.tiers.put_slot(node.level, node.node, [sealed.table(0, lvl) for lvl in range(node.level + 1)],
                                      (), sealed)
        else:
            table = sealed.table(0, node.level)
            (self.tiers.put_upper if node.kind == "upper" else self.tiers.put_summary)(node.level, node.node, table,
                                                                                      sealed)
            out = where[(node.level, node.node)]
        self.publish()
        return out

    def install(self, nodes, *, max_bucket: int | None = None, events: int | None = None) -> None:
        """Put nodes made elsewhere in place (their key ids are this store's:
        see ``keys``), and set the counters that go with them."""
        with self.lock:
            for node in nodes:
                self.tiers.install(node)
            if max_bucket is not None:
                self.max_bucket = max(self.max_bucket, int(max_bucket))
            if events is not None:
                self.events = int(events)
            self.publish()

    # ================================================================ introspection
    def stats(self) -> dict:
        """Row and byte counts per place, for benchmarks and the design doc."""
        with self.lock:
            return self._stats()

    def _stats(self) -> dict:
        base = rollup = 0
        base_rows = rollup_rows = run_rows = 0
        tiers = self.tiers
        sealed = {id(n.sealed): n.sealed for n in tiers.nodes() if n.sealed is not None}
        for slot in tiers.slots.values():
            for t in slot.base_tables():
                base += t.nbytes
                base_rows += len(t)
            run_rows += sum(len(t) for t in slot.runs)
            for t in (slot.main or ())[1:]:
                rollup += t.nbytes
                rollup_rows += len(t)
        for n in tiers.upper.values():
            rollup += n.table.nbytes
            rollup_rows += len(n.table)
        return {"keys": self.keys.live(), "events": self.events, "memtable_rows": len(self.memtable),
                "slots": len(tiers.slots), "upper_nodes": len(tiers.upper), "summaries": len(tiers.summaries),
                "base_rows": base_rows, "rollup_rows": rollup_rows, "base_bytes": base, "rollup_bytes": rollup,
                "summary_bytes": sum(n.table.nbytes for n in tiers.summaries.values()),
                # what upkeep has yet to fold: rows in runs, and slots whose rows the upper index may lack
                "run_rows": run_rows, "loose_slots": len(tiers.loose),
                "sealed_nodes": len(sealed), "sealed_bytes": sum(f.size for f in sealed.values())}


class StoreView:
    """An immutable view of a ``ShardStore`` (``ShardStore.view``): the same
    questions, answered from the nodes and memtable events as they were when
    it was published.  Nodes are immutable and the maps holding them are
    copied, so the writer's later changes never reach a view; the key table
    is shared (it only grows, and a dropped key has no rows in any later view)."""

    def __init__(self, store: ShardStore):
        self.config, self.rr, self.keys = store.config, store.rr, store.keys
        self.tiers, self.memtable = store.tiers.frozen(), store.memtable.frozen()

    query = ShardStore.query
    answer_sets = ShardStore.answer_sets
    _pieces = ShardStore._pieces
    key_ids = ShardStore.key_ids
    reach = ShardStore.reach
    overlap = ShardStore.overlap
    series = ShardStore.series
    registers = ShardStore.registers
    key_impressions = ShardStore.key_impressions

