"""Changing the number of shards: register ranges split or merge.

Register ranges are independent, so a new shard's state is made of slices of
the old ones, never recomputed from events:

* **split** (more shards): a new shard takes, from the one old shard whose
  range contains its own, the coupons that fall in its registers and the
  matching columns of each dense row;
* **merge** (fewer shards): a new shard takes all of its old shards' rows;
  dense rows are widened to the new range, and rows of the same key and node
  are merged (``rows.combine``: the coupons of different ranges are disjoint).

What is kept where:

* base rows (level 0, built or in runs) and summaries hold everything, so
  they are united;
* a rollup row is complete only for the range of the shard that kept it (the
  rule is applied per shard), so after a merge a rollup row survives only
  where every old shard kept it; elsewhere queries read finer rows, as they
  do for any node the rule did not keep;
* impressions are counted per shard and summed over shards: on a split, an
  old row's impressions go to the new shard that starts where the old one
  started, so every total is unchanged.
"""

from __future__ import annotations

import numpy as np

from .hll import RANK_BITS, SPARSE_P, Precision
from .rows import RowTable, _EMPTY_U32, combine
from .store import ShardStore, Slot


def _restrict(t: RowTable, src: Precision, dst: Precision, keep_impressions: bool) -> RowTable:
    """``t`` (rows of a ``src`` shard) as rows of the ``dst`` shard: coupons in
    ``dst``'s registers only, dense rows as ``dst``-wide rows (zero where
    ``src`` has no registers)."""
    lo = max(src.reg_lo, dst.reg_lo)
    hi = min(src.reg_lo + src.R, dst.reg_lo + dst.R)
    n = len(t)
    if len(t.coupons):
        reg = ((t.coupons >> np.uint32(RANK_BITS)) >> np.uint32(SPARSE_P - src.p)).astype(np.int64)
        inside = (reg >= lo) & (reg < hi)
    else:
        inside = np.zeros(0, bool)
    row_of = np.repeat(np.arange(n), t.lengths)
    lengths = np.bincount(row_of[inside], minlength=n) if n else np.zeros(0, np.int64)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    regs = np.zeros((len(t.regs), dst.R), np.uint8)
    regs[:, lo - dst.reg_lo:hi - dst.reg_lo] = t.regs[:, lo - src.reg_lo:hi - src.reg_lo]
    imp = t.imp if keep_impressions else np.zeros(n, np.int64)
    return RowTable(t.level, t.code, off, t.dense.copy(), t.coupons[inside] if len(inside) else _EMPTY_U32,
                    regs, imp)


def _unite(tables: list[RowTable], level: int, dst: Precision) -> RowTable:
    tables = [t for t in tables if len(t)]
    if not tables:
        return RowTable.empty(level, dst.R)
    out = combine(tables, [t.code for t in tables], level, dst)[0]
    out.level = level
    return out.warm()


def _intersect(tables: list[RowTable], level: int, dst: Precision) -> RowTable:
    """Rows present in every table (each complete for its own range), merged."""
    if any(len(t) == 0 for t in tables):
        return RowTable.empty(level, dst.R)
    common = tables[0].code
    for t in tables[1:]:
        common = np.intersect1d(common, t.code, assume_unique=True)
    return _unite([t.take(np.isin(t.code, common)) for t in tables], level, dst)


def reshard(sources: list[ShardStore], shard: int, shards: int) -> ShardStore:
    """The state of shard ``shard`` of ``shards`` made from the old shards
    whose register ranges overlap its own (``sources``, in register order)."""
    cfg = sources[0].config
    out = ShardStore(cfg, shard, shards)
    dst = out.prec
    lo, hi = dst.reg_lo, dst.reg_lo + dst.R
    sources = [s for s in sources if s.prec.reg_lo < hi and s.prec.reg_lo + s.prec.R > lo]
    if not sources:
        raise ValueError(f"no old shard covers registers {lo}..{hi}")
    covered = sum(min(hi, s.prec.reg_lo + s.prec.R) - max(lo, s.prec.reg_lo) for s in sources)
    if covered != dst.R:
        raise ValueError(f"old shards cover {covered} of shard {shard}'s {dst.R} registers")
    for s in sources:
        s.flush()
    # every source keeps its impressions exactly once: in the new shard that starts where it starts
    keep_imp = [s.prec.reg_lo >= lo for s in sources]
    names = {}

    def lift(s: ShardStore, t: RowTable, keep: bool) -> RowTable:
        # key ids are per store: translate to the new store's ids through the names
        ids = (t.code >> np.uint64(32)).astype(np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        new_ids = out.keys.ids([s.keys.names[int(i)] for i in uniq]).astype(np.uint64) if len(uniq) else \
            np.zeros(0, np.uint64)
        code = (new_ids[inv.reshape(-1)] << np.uint64(32)) | (t.code & np.uint64(0xFFFFFFFF))
        order = np.argsort(code, kind="stable")
        r = _restrict(t, s.prec, dst, keep)
        r = RowTable(r.level, code, r.off, r.dense, r.coupons, r.regs, r.imp).take_rows(order)
        return r

    LF, LS = cfg.leaf_level, cfg.segment_level

    def place(key, parts):
        """One new slot from the sources' slots at ``key``: built tables where
        they were built (rollups kept only where every builder kept them),
        everything else as runs, which queries always read."""
        level, node = key
        slot = Slot(level, node)
        built = [(s, sl, keep) for s, sl, keep in parts if sl.main]
        runs = [lift(s, r, keep) for s, sl, keep in parts for r in sl.runs]
        if built:
            main = []
            for lvl in range(level + 1):
                lifted = [lift(s, sl.main[lvl], keep) for s, sl, keep in built]
                main.append(_unite(lifted, lvl, dst) if lvl == 0 or len(lifted) == 1 else
                            _intersect(lifted, lvl, dst))
            slot.main = main
        slot.runs = [r.warm() for r in runs if len(r)]
        if slot.main is None and not slot.runs:
            return
        out.slots[key] = slot
        if level == LF or slot.runs:
            out._loose.add(key)

    for js in sorted({k[1] >> (LS - LF) if k[0] == LF else k[1] for s in sources for k in s.slots}):
        seg = [(s, s.slots[(LS, js)], keep) for s, keep in zip(sources, keep_imp) if (LS, js) in s.slots]
        leaves = sorted({k for s in sources for k in s.slots if k[0] == LF and k[1] >> (LS - LF) == js})
        if seg:
            # some source built the segment: the others' leaves join it as runs (their rollups are dropped)
            extra = [(s, Slot(LF, k[1]), keep) for k in leaves for s, keep in zip(sources, keep_imp) if k in s.slots]
            for (s, sl, keep) in extra:
                sl.runs = s.slots[(LF, sl.node)].base_tables()
            place((LS, js), seg + extra)
        else:
            for k in leaves:
                place(k, [(s, s.slots[k], keep) for s, keep in zip(sources, keep_imp) if k in s.slots])
    for key in sorted({k for s in sources for k in s.upper}):
        tables = [lift(s, s.upper[key], False) for s in sources if key in s.upper]
        if len(tables) == len(sources):  # built everywhere; a node built only somewhere is left to rebuild
            out.upper[key] = _intersect(tables, key[0], dst)
    for key in sorted({k for s in sources for k in s.summaries}):
        tables = [lift(s, s.summaries[key], False) for s in sources if key in s.summaries]
        if len(tables) == len(sources):
            out.summaries[key] = _unite(tables, key[0], dst)
    out.max_bucket = max(s.max_bucket for s in sources)
    out.events = sum(s.events for s, keep in zip(sources, keep_imp) if keep)
    out._index_upper()
    return out


def sources_of(shard: int, shards: int, old_shards: int) -> list[int]:
    """The old shards whose registers overlap new shard ``shard``."""
    if shards >= old_shards:
        return [shard * old_shards // shards]
    per = old_shards // shards
    return list(range(shard * per, (shard + 1) * per))
