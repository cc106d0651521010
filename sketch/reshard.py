"""Changing the number of shards: register ranges split or merge.

Register ranges are independent, so a new shard's state is made of slices of
the old ones, never recomputed from events:

* **split** (more shards): a new shard takes, from the one old shard whose
  range contains its own, the coupons that fall in its registers and the
  matching columns of each dense row;
* **merge** (fewer shards): a new shard takes all of its old shards' rows;
  dense rows are widened to the new range, and rows of the same key and node
  are merged (``rows.merge``: the coupons of different ranges are disjoint).

What is kept where:

* base rows (level 0, built or in runs) and summaries hold everything, so
  they are merged;
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

from .hll import RegisterRange, coupon_register
from .rows import _EMPTY_U32, RowTable, code_keys, code_nodes, make_code, merge, rows_of
from .store import ShardStore
from .tiers import Slot, TableNode


def _restrict(t: RowTable, src: RegisterRange, dst: RegisterRange, keep_impressions: bool) -> RowTable:
    """``t`` (rows of a ``src`` shard) as rows of the ``dst`` shard: coupons in
    ``dst``'s registers only, dense rows as ``dst``-wide rows (zero where
    ``src`` has no registers)."""
    lo, hi = max(src.lo, dst.lo), min(src.hi, dst.hi)
    n = len(t)
    if len(t.coupons):
        reg = coupon_register(t.coupons, src.p)
        inside = (reg >= lo) & (reg < hi)
    else:
        inside = np.zeros(0, bool)
    row_of = np.repeat(np.arange(n), t.lengths)
    lengths = np.bincount(row_of[inside], minlength=n) if n else np.zeros(0, np.int64)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    regs = np.zeros((len(t.regs), dst.R), np.uint8)
    regs[:, lo - dst.lo:hi - dst.lo] = t.regs[:, lo - src.lo:hi - src.lo]
    imp = t.imp if keep_impressions else np.zeros(n, np.int64)
    return RowTable(t.level, t.code, off, t.dense.copy(), t.coupons[inside] if len(inside) else _EMPTY_U32,
                    regs, imp)


def _intersect(tables: list[RowTable], level: int, dst: RegisterRange) -> RowTable:
    """Rows present in every table (each complete for its own range), merged."""
    if any(len(t) == 0 for t in tables):
        return RowTable.empty(level, dst.R)
    common = tables[0].code
    for t in tables[1:]:
        common = np.intersect1d(common, t.code, assume_unique=True)
    return merge([t.take(np.isin(t.code, common)) for t in tables], dst, level)


def reshard(sources: list[ShardStore], shard: int, shards: int) -> ShardStore:
    """The state of shard ``shard`` of ``shards`` made from the old shards
    whose register ranges overlap its own (``sources``, in register order)."""
    cfg = sources[0].config
    out = ShardStore(cfg, shard, shards)
    dst = out.rr
    sources = [s for s in sources if s.rr.lo < dst.hi and s.rr.hi > dst.lo]
    if not sources:
        raise ValueError(f"no old shard covers registers {dst.lo}..{dst.hi}")
    covered = sum(min(dst.hi, s.rr.hi) - max(dst.lo, s.rr.lo) for s in sources)
    if covered != dst.R:
        raise ValueError(f"old shards cover {covered} of shard {shard}'s {dst.R} registers")
    # every source keeps its impressions exactly once: in the new shard that starts where it starts
    keep_imp = [s.rr.lo >= dst.lo for s in sources]
    held = [{(n.kind, n.level, n.node): n for n in s.nodes()} for s in sources]

    def lift(s: ShardStore, t: RowTable, keep: bool) -> RowTable:
        # key ids are per store: translate to the new store's ids through the names
        t = rows_of(t)
        uniq, inv = np.unique(code_keys(t.code), return_inverse=True)
        new_ids = out.keys.ids([s.keys.names[int(i)] for i in uniq]) if len(uniq) else np.zeros(0, np.uint32)
        code = make_code(new_ids[inv.reshape(-1)], code_nodes(t.code))
        order = np.argsort(code, kind="stable")
        r = _restrict(t, s.rr, dst, keep)
        return RowTable(r.level, code, r.off, r.dense, r.coupons, r.regs, r.imp).take_rows(order)

    LF, LS = cfg.leaf_level, cfg.segment_level
    nodes = []

    def place(level: int, node: int, parts) -> None:
        """One new slot from the sources' slots ``parts`` (source, slot, keep
        impressions): built tables where they were built (rollups kept only
        where every builder kept them), everything else as runs, which
        queries always read."""
        built = [(s, sl, keep) for s, sl, keep in parts if sl.main]
        runs = [lift(s, r, keep) for s, sl, keep in parts for r in sl.runs]
        main = None
        if built:
            main = []
            for lvl in range(level + 1):
                lifted = [lift(s, sl.main[lvl], keep) for s, sl, keep in built]
                main.append(merge(lifted, dst, lvl) if lvl == 0 or len(lifted) == 1 else
                            _intersect(lifted, lvl, dst))
        runs = [r for r in runs if len(r)]
        if main is not None or runs:
            nodes.append(Slot(level, node, None if main is None else tuple(main), tuple(runs)))

    slot_keys = {(k[1], k[2]) for h in held for k in h if k[0] == "slot"}
    for js in sorted({j >> (LS - LF) if lvl == LF else j for lvl, j in slot_keys}):
        seg = [(s, h[("slot", LS, js)], keep) for s, h, keep in zip(sources, held, keep_imp) if ("slot", LS, js) in h]
        leaves = sorted(j for lvl, j in slot_keys if lvl == LF and j >> (LS - LF) == js)
        if seg:
            # some source built the segment: the others' leaves join it as runs (their rollups are dropped)
            extra = [(s, Slot(LF, jf, runs=tuple(h[("slot", LF, jf)].base_tables())), keep)
                     for jf in leaves for s, h, keep in zip(sources, held, keep_imp) if ("slot", LF, jf) in h]
            place(LS, js, seg + extra)
        else:
            for jf in leaves:
                place(LF, jf, [(s, h[("slot", LF, jf)], keep) for s, h, keep in zip(sources, held, keep_imp)
                               if ("slot", LF, jf) in h])
    for kind in ("upper", "summary"):
        for _, level, node in sorted({k for h in held for k in h if k[0] == kind}):
            tables = [lift(s, h[(kind, level, node)].table, False) for s, h in zip(sources, held)
                      if (kind, level, node) in h]
            if len(tables) < len(sources):
                continue  # not built everywhere: left to rebuild
            nodes.append(TableNode(kind, level, node, _intersect(tables, level, dst) if kind == "upper"
                                   else merge(tables, dst, level)))
    out.install(nodes, max_bucket=max(s.max_bucket for s in sources),
                events=sum(s.events for s, keep in zip(sources, keep_imp) if keep))
    return out


def sources_of(shard: int, shards: int, old_shards: int) -> list[int]:
    """The old shards whose registers overlap new shard ``shard``."""
    if shards >= old_shards:
        return [shard * old_shards // shards]
    per = old_shards // shards
    return list(range(shard * per, (shard + 1) * per))
