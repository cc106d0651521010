"""Maintenance: folding runs and building rollups for time that is sealed.

Time is *sealed* ``lateness_buckets`` behind the newest bucket a shard has
seen; only sealed time is built, so late events rarely land on built nodes
(when they do they become runs there, which queries read, and the node is
rebuilt once its runs grow).  One pass (``maintain``), oldest first:

1. **segments**: a sealed segment is built straight from all its leaves'
   base rows in one pass (``rows.build_levels``: levels 1..11 of every key
   from one sort); a built segment whose runs grew is rebuilt.  Its full
   merge at level 11 becomes a *summary*, kept for the upper index.
2. **leaves** of the open segment: the sealed ones are built together (node
   numbers keep them apart until level 6); long run lists are compacted.
3. **upper index**, bottom-up: a node is built from its two children's
   summaries once both are built or have nothing pending.

Every step takes immutable tables and puts new nodes in place
(``tiers.Tiers``), so a query between two steps sees either the old node or
the new one, each complete.  ``maintain`` can stop after any step when its
time is up and resume where it left off.

Building beside ingest
----------------------
Applies go on while a step builds (another thread, ``store.ShardStore``).
A step takes its input slots under the store's lock and marks them *busy*;
it builds with no lock held; then, under the lock again, it puts its result
in place together with every run that reached those slots meanwhile (and
the runs of any leaf that appeared in their time), which are events the
result does not hold.  A busy slot only ever gains runs (a flush does not
merge a busy slot's runs), so "what came meanwhile" is the runs after the
ones the step took; if a slot changed any other way the result is dropped
and the step is done again on the next pass.  Only this thread changes
built tables, the upper index and summaries.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np

from .config import SketchConfig
from .hll import RegisterRange
from .rows import RowTable, build_levels, code_keys, level_up, merge, rows_of, split_by_node
from .tiers import Tiers


class Rollups:
    """Builds one shard's rollups in its ``Tiers``."""

    def __init__(self, tiers: Tiers, config: SketchConfig, rr: RegisterRange, lock=None, publish=lambda: None):
        self.tiers, self.config, self.rr = tiers, config, rr
        self.lock = lock if lock is not None else nullcontext()
        self.publish = publish  # makes what was put in place the view questions read (under the lock)
        self.dropped = 0  # built results dropped because their inputs changed meanwhile (see the module text)

    # ------------------------------------------------------------ taking inputs, putting results
    def _take(self, keys) -> dict:
        """The slots at ``keys`` (those that exist), marked busy: the inputs of a build."""
        with self.lock:
            got = {k: self.tiers.slots[k] for k in keys if k in self.tiers.slots}
            self.tiers.busy.update(got)
            return got

    def _release(self, got: dict) -> None:
        with self.lock:
            self.tiers.busy.difference_update(got)

    def _since(self, got: dict, keys) -> dict | None:
        """Under the lock: per key of ``keys``, the tables that reached it after ``got`` was taken (runs
        added to a taken slot; every base table of a slot that appeared), or None when a taken slot
        changed otherwise (its built tables replaced, a run folded, the slot gone): the build is stale."""
        late = {}
        for k in keys:
            cur = self.tiers.slots.get(k)
            old = got.get(k)
            if old is None:
                if cur is not None:
                    late[k] = cur.base_tables()
                continue
            if cur is None or cur.main is not old.main or len(cur.runs) < len(old.runs) \
                    or any(a is not b for a, b in zip(cur.runs, old.runs)):
                self.dropped += 1
                return None
            late[k] = list(cur.runs[len(old.runs):])
        return late

    def maintain(self, sealed_end: int, max_seconds: float | None = None) -> bool:
        """Build what lies before bucket ``sealed_end``.  Returns True when
        nothing is left to do (False if ``max_seconds`` cut it short)."""
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds

        def out_of_time():
            return deadline is not None and time.perf_counter() > deadline

        cfg, tiers = self.config, self.tiers
        LF, LS = cfg.leaf_level, cfg.segment_level
        d = LS - LF
        with self.lock:
            slots = dict(tiers.slots)  # what to do is decided on a copy; each step takes its inputs again
        # 1. segments
        candidates = {k[1] >> d for k in slots if k[0] == LF} | {k[1] for k in slots if k[0] == LS}
        for js in sorted(candidates):
            if (js + 1) << LS > sealed_end:
                continue
            slot = slots.get((LS, js))
            if slot is not None:
                base_rows = len(slot.main[0]) if slot.main else 0
                run_rows = sum(len(r) for r in slot.runs)
                if run_rows and (run_rows * 8 >= base_rows or len(slot.runs) > cfg.max_runs):
                    self._build_segment(js)
            else:
                self._build_segment(js)
            if out_of_time():
                return False
        # 2. leaves of the open segments
        with self.lock:
            slots = dict(tiers.slots)
        sealed = []
        for key in sorted(k for k in slots if k[0] == LF):
            slot = slots[key]
            if slot.runs and slot.end <= sealed_end:
                sealed.append(key)
            elif len(slot.runs) > cfg.max_runs:
                self._compact(key)
        if sealed:
            self._build_leaves(sealed)
        if out_of_time():
            return False
        # 3. upper index, bottom-up
        for lvl in range(LS, cfg.top_level):
            for (l, j) in sorted(k for k in tiers.summaries if k[0] == lvl):
                if (l, j) not in tiers.summaries:
                    continue  # consumed with its sibling
                parent = (lvl + 1, j >> 1)
                if parent in tiers.upper or ((j >> 1) + 1) << (lvl + 1) > sealed_end:
                    continue
                if (lvl, j ^ 1) in tiers.summaries or not self._pending(lvl, j ^ 1):
                    self._build_upper(*parent)
                if out_of_time():
                    return False
        with self.lock:
            for k in [k for k in tiers.summaries if k[0] >= cfg.top_level]:
                tiers.pop_summary(k)
            self.publish()
        return True

    def _compact(self, key: tuple[int, int]) -> None:
        """Fold a leaf's runs into one (the leaf's time is still open)."""
        got = self._take([key])
        try:
            if key not in got:
                return
            slot = got[key]
            folded = merge(list(slot.runs), self.rr)
            with self.lock:
                late = self._since(got, [key])
                if late is not None:
                    self.tiers.put_slot(slot.level, slot.node, slot.main, [folded] + late[key], slot.sealed)
                    self.publish()
        finally:
            self._release(got)

    def _build_leaves(self, keys: list[tuple[int, int]]) -> None:
        """Build leaves together: node numbers keep them apart until level
        ``leaf_level``, so one vectorized pass serves them all."""
        LF, R = self.config.leaf_level, self.rr.R
        got = self._take(keys)
        try:
            slots = list(got.values())
            if not slots:
                return
            base = merge([rows_of(t) for s in slots for t in s.base_tables()], self.rr)
            tables, _ = build_levels(base, LF, self.rr, summary=False)
            mains = {s.node: [RowTable.empty(lvl, R) for lvl in range(LF + 1)] for s in slots}
            for lvl, t in enumerate(tables):
                for jf, part in split_by_node(t, LF - lvl):
                    mains[jf][lvl] = part
            with self.lock:
                late = self._since(got, list(got))
                if late is None:
                    return
                for k, s in got.items():
                    self.tiers.put_slot(LF, s.node, mains[s.node], late[k])
                self.publish()
        finally:
            self._release(got)

    def _build_segment(self, js: int) -> None:
        """Segment ``js`` from all its base rows in one pass (its slot's, or
        its leaves', whose own rollups only served while the segment was
        open: they go)."""
        LF, LS = self.config.leaf_level, self.config.segment_level
        d = LS - LF
        keys = [(LS, js)] + [(LF, jf) for jf in range(js << d, (js + 1) << d)]
        got = self._take(keys)
        try:
            base_tables = [t for s in got.values() for t in s.base_tables()]
            main, summary = build_levels(merge([rows_of(t) for t in base_tables], self.rr), LS, self.rr)
            with self.lock:
                late = self._since(got, keys)
                if late is None:
                    return
                self.tiers.put_slot(LS, js, main, [t for k in keys for t in late.get(k, ())])
                for k in keys[1:]:
                    if k in self.tiers.slots:
                        self.tiers.drop_slot(k)
                self._settle_summary(js, summary)
                self.publish()
        finally:
            self._release(got)

    def _settle_summary(self, js: int, summary: RowTable) -> None:
        """Keep a segment's top merge for its parent, or, when the parent is
        already built (late data), fold it into the built upper nodes."""
        cfg, tiers = self.config, self.tiers
        LS = cfg.segment_level
        if (LS + 1, js >> 1) not in tiers.upper:
            tiers.put_summary(LS, js, summary)
            return
        cur, lvl, j = summary, LS, js
        while lvl < cfg.top_level and (lvl + 1, j >> 1) in tiers.upper:
            cur, _ = level_up([cur], self.rr, lvl + 1)
            lvl, j = lvl + 1, j >> 1
            t = rows_of(tiers.upper_table(lvl, j))
            if len(t):  # only keys the rule kept there: the others read finer nodes anyway
                tiers.put_upper(lvl, j, merge([t, cur.take(np.isin(code_keys(cur.code), code_keys(t.code)))],
                                              self.rr, lvl, impressions=False))
        if (lvl, j) in tiers.summaries:  # the highest built node still awaits its parent
            tiers.put_summary(lvl, j, merge([rows_of(tiers.summaries[(lvl, j)].table), cur], self.rr, lvl,
                                            impressions=False))

    def _build_upper(self, lvl: int, j: int) -> None:
        """Upper node (lvl, j) from its children's summaries (only this thread changes summaries)."""
        tiers = self.tiers
        keys = [k for k in ((lvl - 1, 2 * j), (lvl - 1, 2 * j + 1)) if k in tiers.summaries]
        full, kept = level_up([rows_of(tiers.summaries[k].table) for k in keys], self.rr, lvl)
        with self.lock:
            for k in keys:
                tiers.pop_summary(k)
            tiers.put_upper(lvl, j, kept)
            if lvl < self.config.top_level:
                tiers.put_summary(lvl, j, full)
            self.publish()

    def _pending(self, lvl: int, j: int) -> bool:
        """Whether node (lvl, j) has data not yet summarised at its level."""
        cfg, tiers = self.config, self.tiers
        LF, LS = cfg.leaf_level, cfg.segment_level
        start, end = j << lvl, (j + 1) << lvl
        for l in range(LS, lvl):
            for jj in range(start >> l, end >> l):
                if (l, jj) in tiers.summaries:
                    return True
        for js in range(start >> LS, end >> LS):
            if (LS, js) in tiers.slots:
                return True
            for jf in range(js << (LS - LF), (js + 1) << (LS - LF)):
                if (LF, jf) in tiers.slots:
                    return True
        return False
