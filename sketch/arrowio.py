"""A shard's whole state as Arrow record batches, and back.

One record batch per stored node (a leaf or segment slot, an upper-index
node, or a pending summary), all with the same schema, one row per sketch:

    key         dictionary<int32, string>  the key; null = site-wide
    level       uint8                      node level (0 = a bucket)
    node        uint32                     node number at that level
    part        int8                       0 = the slot's built tables, i > 0 = its i-th run
    impressions int64                      impressions (level-0 rows)
    coupons     list<uint32>               sparse sketch (empty when dense)
    registers   large_binary               dense sketch: R register bytes; null when sparse

Each batch's schema metadata names the format, its version, the
parameters that must match to read it (precision, bucket width, tier
levels, shard layout) and what the batch is (``role``, ``level``,
``node``).  A batch written under other parameters, or whose contents are
out of range (a rank the hash cannot produce, a coupon of another shard,
registers of the wrong length, rows outside their node), is refused with a
``StateError`` that says what was wrong.  The checkpointer writes these
batches as compressed Arrow IPC files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .hll import RANK_BITS, RANK_MASK, SPARSE_P
from .rows import RowTable, make_code
from .store import ShardStore, SketchConfig, Slot

FORMAT = "impressions-shard-state"
VERSION = 1

SCHEMA = pa.schema([
    ("key", pa.dictionary(pa.int32(), pa.string())),
    ("level", pa.uint8()),
    ("node", pa.uint32()),
    ("part", pa.int8()),
    ("impressions", pa.int64()),
    ("coupons", pa.list_(pa.uint32())),
    ("registers", pa.large_binary()),
])


class StateError(ValueError):
    """A stored state that cannot be loaded into this store."""


def _meta(store: ShardStore, role: str, level: int, node: int) -> dict[bytes, bytes]:
    m = {"format": FORMAT, "version": VERSION, "role": role, "level": level, "node": node,
         "shard": store.shard, "shards": store.shards, "max_bucket": store.max_bucket, "events": store.events}
    m.update(store.config.identity())
    return {k.encode(): str(v).encode() for k, v in m.items()}


def _table_arrays(store: ShardStore, t: RowTable, part: int):
    n = len(t)
    ids = t.keys
    uniq, inv = np.unique(ids, return_inverse=True)
    has_site = bool(len(uniq)) and uniq[0] == 0  # the site-wide key is stored as null
    names = [store.keys.names[int(i)] for i in (uniq[1:] if has_site else uniq)]
    indices = pa.array(inv.reshape(-1) - int(has_site), pa.int32(), mask=(ids == 0) if has_site else None)
    key = pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string()))
    coupons = pa.ListArray.from_arrays(pa.array(t.off.astype(np.int32)), pa.array(t.coupons, pa.uint32()))
    is_dense = t.dense >= 0
    R = t.regs.shape[1]
    reg_off = np.zeros(n + 1, np.int64)
    np.cumsum(np.where(is_dense, R, 0), out=reg_off[1:])
    validity = pa.array(is_dense).buffers()[1] if n else None
    registers = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [validity, pa.py_buffer(reg_off),
                                                                        pa.py_buffer(np.ascontiguousarray(t.regs))],
                                                 null_count=int(n - is_dense.sum()))
    return [key, pa.array(np.full(n, t.level, np.uint8)), pa.array(t.nodes.astype(np.uint32)),
            pa.array(np.full(n, part, np.int8)), pa.array(t.imp, pa.int64()), coupons, registers]


def _batch(store: ShardStore, tables: list[tuple[RowTable, int]], role: str, level: int, node: int) -> pa.RecordBatch:
    cols = [_table_arrays(store, t, part) for t, part in tables]
    arrays = []
    for i, field in enumerate(SCHEMA):
        parts = [c[i] for c in cols]
        if pa.types.is_dictionary(field.type):
            arrays.append(_concat_dictionary(parts))
        else:
            arrays.append(pa.concat_arrays(parts) if parts else pa.array([], field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA.with_metadata(_meta(store, role, level, node)))


def _concat_dictionary(parts: list[pa.DictionaryArray]) -> pa.DictionaryArray:
    if not parts:
        return pa.array([], SCHEMA.field("key").type)
    return pa.chunked_array(parts, SCHEMA.field("key").type).unify_dictionaries().combine_chunks() \
        if len(parts) > 1 else parts[0]


def store_to_batches(store: ShardStore) -> list[pa.RecordBatch]:
    """The store's whole state (the memtable is flushed first)."""
    store.flush()
    out = []
    for (level, node), slot in sorted(store.slots.items()):
        tables = [(t, 0) for t in (slot.main or [])] + [(t, i + 1) for i, t in enumerate(slot.runs)]
        out.append(_batch(store, tables, "slot" if slot.main else "slot-raw", level, node))
    for (level, node), t in sorted(store.upper.items()):
        out.append(_batch(store, [(t, 0)], "upper", level, node))
    for (level, node), t in sorted(store.summaries.items()):
        out.append(_batch(store, [(t, 0)], "summary", level, node))
    if not out:  # an empty store still records its parameters
        out.append(_batch(store, [], "empty", 0, 0))
    return out


def _check_meta(meta: dict[bytes, bytes], config: SketchConfig, shard: int, shards: int) -> dict[str, str]:
    m = {k.decode(): v.decode() for k, v in (meta or {}).items()}
    if m.get("format") != FORMAT:
        raise StateError(f"not a shard state (format {m.get('format')!r}, expected {FORMAT!r})")
    if m.get("version") != str(VERSION):
        raise StateError(f"state format version {m.get('version')} is not supported (this build reads {VERSION})")
    want = dict(config.identity(), shard=shard, shards=shards)
    for k, v in want.items():
        if m.get(k) != str(v):
            raise StateError(f"state was written with {k}={m.get(k)}, this store has {k}={v}")
    return m


def store_from_batches(batches: list[pa.RecordBatch], config: SketchConfig, shard: int = 0,
                       shards: int = 1) -> ShardStore:
    """Rebuild a store from ``store_to_batches`` output, validating it."""
    store = ShardStore(config, shard, shards)
    if not batches:
        return store
    for rb in batches:
        m = _check_meta(rb.schema.metadata, config, shard, shards)
        if rb.schema.remove_metadata() != SCHEMA:
            raise StateError(f"state batch has schema {rb.schema.remove_metadata()}, expected {SCHEMA}")
        store.max_bucket = max(store.max_bucket, int(m["max_bucket"]))
        store.events = int(m["events"])
        role, level, node = m["role"], int(m["level"]), int(m["node"])
        tables = _tables_from_batch(store, rb, level, node)
        if role in ("slot", "slot-raw"):
            if level not in (config.leaf_level, config.segment_level):
                raise StateError(f"slot at level {level} is neither a leaf ({config.leaf_level}) "
                                 f"nor a segment ({config.segment_level})")
            slot = Slot(level, node)
            main = [tables.get((0, lvl), RowTable.empty(lvl, store.prec.R)) for lvl in range(level + 1)]
            slot.main = main if role == "slot" else None
            slot.runs = [t for (part, _), t in sorted(tables.items()) if part > 0]
            store.slots[(level, node)] = slot
            if level == config.leaf_level or slot.runs:
                store._loose.add((level, node))
        elif role in ("upper", "summary"):
            t = tables.get((0, level), RowTable.empty(level, store.prec.R))
            (store.upper if role == "upper" else store.summaries)[(level, node)] = t
        elif role != "empty":
            raise StateError(f"unknown state batch role {role!r}")
    return store


def _tables_from_batch(store: ShardStore, rb: pa.RecordBatch, level: int, node: int) -> dict[tuple[int, int], RowTable]:
    prec = store.prec
    n = rb.num_rows
    if n == 0:
        return {}
    key = rb.column("key")
    names = key.dictionary.to_pylist()
    if any(not name for name in names):
        raise StateError("state holds an empty key name")
    ids_of_names = store.keys.ids(names).astype(np.uint64)
    kidx = key.indices.to_numpy(zero_copy_only=False)
    knull = np.asarray(key.is_null().to_numpy(zero_copy_only=False), bool)
    ids = np.where(knull, 0, ids_of_names[np.where(knull, 0, kidx).astype(np.int64)] if len(names) else 0)
    lv = rb.column("level").to_numpy(zero_copy_only=False).astype(np.int64)
    nd = rb.column("node").to_numpy(zero_copy_only=False).astype(np.int64)
    part = rb.column("part").to_numpy(zero_copy_only=False).astype(np.int64)
    imp = rb.column("impressions").to_numpy(zero_copy_only=False).astype(np.int64)
    if lv.max() > level or ((nd >> (level - lv)) != node).any():
        raise StateError(f"state rows lie outside their node (level {level}, node {node})")
    if (imp < 0).any():
        raise StateError("state holds a negative impression count")
    cl = rb.column("coupons")
    coff = cl.offsets.to_numpy().astype(np.int64)
    cvals = cl.values.to_numpy(zero_copy_only=False).astype(np.uint32)
    coff = coff - coff[0]
    cvals = cvals[:coff[-1]] if len(cvals) >= coff[-1] else cvals
    if len(cvals):
        rank = cvals & RANK_MASK
        if (rank < 1).any() or (rank > 64 - SPARSE_P + 1).any():
            raise StateError("state holds a coupon with an impossible rank")
        reg = (cvals >> RANK_BITS) >> (SPARSE_P - prec.p)
        if ((reg < prec.reg_lo) | (reg >= prec.reg_lo + prec.R)).any():
            raise StateError(f"state holds coupons outside shard {prec.shard}'s registers")
    regcol = rb.column("registers")
    is_dense = np.asarray(regcol.is_valid().to_numpy(zero_copy_only=False), bool)
    lens = np.asarray(pc.binary_length(regcol).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    if (lens[is_dense] != prec.R).any():
        raise StateError(f"state holds dense registers of {lens[is_dense][lens[is_dense] != prec.R][0]} bytes, "
                         f"expected {prec.R}")
    if (np.diff(coff)[is_dense] != 0).any():
        raise StateError("state holds a row that is both sparse and dense")
    if is_dense.any():
        data = regcol.filter(pa.array(is_dense))
        offsets = np.frombuffer(data.buffers()[1], np.int64)[data.offset:data.offset + len(data) + 1]
        buf = np.frombuffer(data.buffers()[2], np.uint8)
        regs = buf[offsets[0]:offsets[-1]].reshape(-1, prec.R).copy()
        if (regs > prec.q + 1).any():
            raise StateError(f"state holds a register value above {prec.q + 1}")
    else:
        regs = np.zeros((0, prec.R), np.uint8)
    dense_all = np.full(n, -1, np.int64)
    dense_all[is_dense] = np.arange(int(is_dense.sum()))
    out = {}
    group = part * 64 + lv
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        code = make_code(ids[rows], nd[rows])
        order = np.argsort(code, kind="stable")
        rows = rows[order]
        code = code[order]
        if len(code) > 1 and (code[1:] == code[:-1]).any():
            raise StateError("state holds the same key and node twice in one table")
        lengths = np.diff(coff)[rows]
        off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        gather = np.repeat(coff[:-1][rows] - off[:-1], lengths) + np.arange(off[-1], dtype=np.int64)
        d = dense_all[rows]
        dense = np.full(len(rows), -1, np.int32)
        dense[d >= 0] = np.arange(int((d >= 0).sum()), dtype=np.int32)
        out[(int(g // 64), int(g % 64))] = RowTable(int(g % 64), code, off, dense, cvals[gather], regs[d[d >= 0]],
                                                   imp[rows])
    return out
