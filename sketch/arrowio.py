"""A shard's whole state as Arrow record batches, and back.

Every stored node (a leaf or segment slot, an upper-index node, or a
pending summary) becomes three record batches, in this order:

``rows``        one row per sketch
    key         dictionary<int32, string>   the key; null = site-wide
    level       uint8                       node level (0 = a bucket)
    node        uint32                      node number, counted from the stored node's first one at that level
    part        uint8                       0 = the slot's built tables, i > 0 = its i-th run
    impressions int64                       impressions (level-0 rows; 0 in rollups)
    coupons     uint32                      how many coupons the row has (0 when dense)
    dense       bool                        whether the row's registers are in ``registers``
``coupons``     the sparse rows' coupons, row after row, as four uint8 columns
                b0..b3: the little-endian bytes of each coupon's difference from the
                previous one of its row (the first of a row is itself).  A row's
                coupons are sorted, so the differences are smaller than the
                coupons, and byte planes let zstd see that: 3.3 bytes a coupon
                instead of 3.8 on the benchmark streams.
``registers``   the dense rows' registers, row after row (fixed_size_binary(R))

Keeping the variable-length parts out of the ``rows`` batch leaves it small
integer columns in sorted order, which zstd shrinks to a few bytes a row;
coupons (random 32-bit values) and registers compress on their own.

Every batch's schema metadata names the format, its version, the
parameters that must match to read it (precision, bucket width, tier
levels, shard layout), which stored node it belongs to and which part it
is.  A node's batches (``node_batches``) are one checkpoint object; a whole
state (``store_to_batches``, what re-sharding ships) is every node's
batches and, last, one ``state`` batch whose metadata holds the store's
counters (newest bucket seen, events applied).  A state written under other parameters, or whose contents are out of
range (a rank no hash produces, a coupon of another shard, a register value
above 64 - p + 1, rows outside their node, counts that disagree), is refused
with a ``StateError`` that says what was wrong.  The checkpointer writes the
batches as compressed Arrow IPC.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from .hll import RANK_MASK, SPARSE_P
from .rows import RowTable, code_keys, code_nodes, make_code, rows_of
from .store import ShardStore, SketchConfig
from .tiers import Node, Slot, TableNode

FORMAT = "impressions-shard-state"
VERSION = 2

ROWS = pa.schema([
    ("key", pa.dictionary(pa.int32(), pa.string())),
    ("level", pa.uint8()),
    ("node", pa.uint32()),
    ("part", pa.uint8()),
    ("impressions", pa.int64()),
    ("coupons", pa.uint32()),
    ("dense", pa.bool_()),
])
COUPONS = pa.schema([(f"b{i}", pa.uint8()) for i in range(4)])


def registers_schema(R: int) -> pa.Schema:
    return pa.schema([("registers", pa.binary(R))])


class StateError(ValueError):
    """A stored state that cannot be loaded into this store."""


def _meta(store: ShardStore, role: str, level: int, node: int, component: str, extra: dict) -> dict[bytes, bytes]:
    m = {"format": FORMAT, "version": VERSION, "role": role, "level": level, "node": node,
         "component": component, "shard": store.shard, "shards": store.shards, **extra}
    m.update(store.config.identity())
    return {k.encode(): str(v).encode() for k, v in m.items()}


def _role(node: Node) -> str:
    if isinstance(node, Slot):
        return "slot" if node.main else "slot-raw"
    return node.kind


def node_batches(store: ShardStore, node: Node) -> list[pa.RecordBatch]:
    """The three record batches (rows, coupons, registers) of one stored node."""
    return _batches(store, node.parts(), _role(node), node.level, node.node)


def _batches(store: ShardStore, parts: list[tuple[int, RowTable]], role: str, level: int,
             node: int) -> list[pa.RecordBatch]:
    R = store.rr.R
    tables = [(rows_of(t), part) for part, t in parts if len(t)]
    if tables:
        codes = np.concatenate([t.code for t, _ in tables])
        ids = code_keys(codes)
        lv = np.concatenate([np.full(len(t), t.level, np.int64) for t, _ in tables])
        nodes = code_nodes(codes) - ((node << level) >> lv)
        part = np.concatenate([np.full(len(t), p, np.uint8) for t, p in tables])
        imp = np.concatenate([t.imp for t, _ in tables])
        counts = np.concatenate([t.lengths for t, _ in tables]).astype(np.uint32)
        dense = np.concatenate([t.dense >= 0 for t, _ in tables])
        coupons = np.concatenate([t.coupons for t, _ in tables])
        regs = np.concatenate([t.regs for t, _ in tables])
    else:
        ids = lv = nodes = imp = np.zeros(0, np.int64)
        part = np.zeros(0, np.uint8)
        counts = coupons = np.zeros(0, np.uint32)
        dense = np.zeros(0, bool)
        regs = np.zeros((0, R), np.uint8)
    uniq, inv = np.unique(ids, return_inverse=True)
    has_site = bool(len(uniq)) and uniq[0] == 0  # the site-wide key is stored as null
    names = [store.keys.names[int(i)] for i in (uniq[1:] if has_site else uniq)]
    indices = pa.array(inv.reshape(-1) - int(has_site), pa.int32(), mask=(ids == 0) if has_site else None)
    key = pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string()))
    extra = {"rows": len(ids), "coupon_count": len(coupons), "dense_count": len(regs)}
    rows = pa.RecordBatch.from_arrays(
        [key, pa.array(lv.astype(np.uint8)), pa.array(nodes.astype(np.uint32)), pa.array(part),
         pa.array(imp, pa.int64()), pa.array(counts), pa.array(dense)],
        schema=ROWS.with_metadata(_meta(store, role, level, node, "rows", extra)))
    planes = _coupon_planes(coupons.astype(np.uint32), counts)
    cps = pa.RecordBatch.from_arrays([pa.array(p) for p in planes],
                                     schema=COUPONS.with_metadata(_meta(store, role, level, node, "coupons", extra)))
    rs = registers_schema(R)
    reg_arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(R), len(regs),
                                                   [None, pa.py_buffer(np.ascontiguousarray(regs))])
    regb = pa.RecordBatch.from_arrays([reg_arr], schema=rs.with_metadata(_meta(store, role, level, node,
                                                                               "registers", extra)))
    return [rows, cps, regb]


def _coupon_planes(coupons: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    d = coupons.copy()
    if len(d) > 1:
        d[1:] -= coupons[:-1]  # uint32 arithmetic: row starts are fixed below
    counts = np.asarray(counts, np.int64)
    starts = (np.cumsum(counts) - counts)[counts > 0]  # each non-empty row's first coupon
    d[starts] = coupons[starts]
    b = d.view(np.uint8).reshape(-1, 4)
    return [np.ascontiguousarray(b[:, i]) for i in range(4)]


def _coupons_from_planes(cps: pa.RecordBatch, counts: np.ndarray) -> np.ndarray:
    d = np.zeros(cps.num_rows, np.int64)
    for i in range(4):
        d |= _np(cps.column(f"b{i}")).astype(np.int64) << (8 * i)
    if not len(d):
        return np.zeros(0, np.uint32)
    cs = np.cumsum(d)
    row_of = np.repeat(np.arange(len(counts)), counts)
    first = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=first[1:])
    before = cs[first[:-1][counts > 0]] - d[first[:-1][counts > 0]]
    base = np.zeros(len(counts), np.int64)
    base[counts > 0] = before
    vals = cs - base[row_of]
    # a row's coupons must rise strictly and fit in 32 bits
    rising = np.ones(len(vals), bool)
    rising[1:] = vals[1:] > vals[:-1]
    rising[first[:-1][counts > 0]] = True
    if (vals >= 1 << 32).any() or not rising.all():
        raise StateError("state holds a row whose coupons are not strictly increasing 32-bit values")
    return vals.astype(np.uint32)


def store_to_batches(store: ShardStore) -> list[pa.RecordBatch]:
    """The store's whole state: three batches per stored node (the memtable
    is flushed first), then the ``state`` batch with the store's counters."""
    out = []
    for node in store.nodes():
        out += node_batches(store, node)
    state = {"max_bucket": store.max_bucket, "events": store.events}
    out.append(pa.RecordBatch.from_arrays([pa.array([], t.type) for t in ROWS], schema=ROWS.with_metadata(
        _meta(store, "state", 0, 0, "state", state))))
    return out


def _check_meta(meta, config: SketchConfig, shard: int, shards: int) -> dict[str, str]:
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


def nodes_from_batches(batches: list[pa.RecordBatch], store: ShardStore) -> tuple[list[Node], dict[str, int]]:
    """The nodes in ``batches`` (validated, key ids translated to ``store``'s)
    and the store counters of a ``state`` batch among them (else {})."""
    config, shard, shards = store.config, store.shard, store.shards
    parts: dict[tuple[str, int, int], dict[str, pa.RecordBatch]] = defaultdict(dict)
    metas = {}
    counters: dict[str, int] = {}
    for rb in batches:
        m = _check_meta(rb.schema.metadata, config, shard, shards)
        comp = m.get("component")
        if comp == "state":
            counters = {"max_bucket": int(m["max_bucket"]), "events": int(m["events"])}
            continue
        want = {"rows": ROWS, "coupons": COUPONS, "registers": registers_schema(store.rr.R)}.get(comp)
        if want is None:
            raise StateError(f"unknown state component {comp!r}")
        if rb.schema.remove_metadata() != want:
            raise StateError(f"state {comp} batch has schema {rb.schema.remove_metadata()}, expected {want}")
        ident = (m["role"], int(m["level"]), int(m["node"]))
        if comp in parts[ident]:
            raise StateError(f"state holds two {comp} batches for {ident[0]} node {ident[1]}/{ident[2]}")
        parts[ident][comp] = rb
        metas[ident] = m
    nodes: list[Node] = []
    R = store.rr.R
    for (role, level, node), comps in parts.items():
        missing = {"rows", "coupons", "registers"} - set(comps)
        if missing:
            raise StateError(f"state for {role} node {level}/{node} lacks its {', '.join(sorted(missing))}")
        tables = _tables(store, comps, metas[(role, level, node)], level, node)
        if role in ("slot", "slot-raw"):
            if level not in (config.leaf_level, config.segment_level):
                raise StateError(f"slot at level {level} is neither a leaf ({config.leaf_level}) "
                                 f"nor a segment ({config.segment_level})")
            main = [tables.get((0, lvl), RowTable.empty(lvl, R)) for lvl in range(level + 1)] \
                if role == "slot" else None
            runs = [t for (part, _), t in sorted(tables.items()) if part > 0]
            nodes.append(Slot(level, node, None if main is None else tuple(main), tuple(runs)))
        elif role in ("upper", "summary"):
            nodes.append(TableNode(role, level, node, tables.get((0, level), RowTable.empty(level, R))))
        else:
            raise StateError(f"unknown state role {role!r}")
    return nodes, counters


def store_from_batches(batches: list[pa.RecordBatch], config: SketchConfig, shard: int = 0,
                       shards: int = 1) -> ShardStore:
    """Rebuild a store from ``store_to_batches`` output, validating it."""
    store = ShardStore(config, shard, shards)
    nodes, counters = nodes_from_batches(batches, store)
    if not counters:
        raise StateError("state lacks its state batch (the store's counters)")
    store.install(nodes, **counters)
    return store


def _np(col) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def _tables(store: ShardStore, comps, meta, level: int, node: int) -> dict[tuple[int, int], RowTable]:
    rr = store.rr
    rows, cps, regb = comps["rows"], comps["coupons"], comps["registers"]
    n = rows.num_rows
    if n != int(meta.get("rows", -1)) or cps.num_rows != int(meta.get("coupon_count", -1)) \
            or regb.num_rows != int(meta.get("dense_count", -1)):
        raise StateError(f"state for node {level}/{node} is incomplete: its batches disagree with the "
                         f"counts recorded beside them")
    if n == 0:
        return {}
    key = rows.column("key")
    names = key.dictionary.to_pylist()
    if any(not name for name in names):
        raise StateError("state holds an empty key name")
    if key.null_count == 0 and len(set(names)) != len(names):
        raise StateError("state holds a repeated key name")
    ids_of_names = store.keys.ids(names).astype(np.int64)
    knull = np.asarray(_np(key.is_null()), bool)
    kidx = np.where(knull, 0, _np(key.indices)).astype(np.int64)
    if len(names) and (kidx.max() >= len(names) or kidx.min() < 0):
        raise StateError("state holds a key index outside its dictionary")
    ids = np.where(knull, 0, ids_of_names[kidx] if len(names) else 0)
    lv = _np(rows.column("level")).astype(np.int64)
    if lv.max() > level:
        raise StateError(f"state rows lie above their node's level {level}")
    rel = _np(rows.column("node")).astype(np.int64)
    span = 1 << (level - lv)
    if (rel >= span).any():
        raise StateError(f"state rows lie outside their node (level {level}, node {node})")
    nd = ((node << level) >> lv) + rel
    part = _np(rows.column("part")).astype(np.int64)
    imp = _np(rows.column("impressions")).astype(np.int64)
    if (imp < 0).any():
        raise StateError("state holds a negative impression count")
    counts = _np(rows.column("coupons")).astype(np.int64)
    is_dense = np.asarray(_np(rows.column("dense")), bool)
    if (counts[is_dense] != 0).any():
        raise StateError("state holds a row that is both sparse and dense")
    if counts.sum() != cps.num_rows or is_dense.sum() != regb.num_rows:
        raise StateError(f"state for node {level}/{node} has {cps.num_rows} coupons and {regb.num_rows} "
                         f"dense rows for rows that need {counts.sum()} and {is_dense.sum()}")
    cvals = _coupons_from_planes(cps, counts)
    if len(cvals):
        rank = cvals & RANK_MASK
        if (rank < 1).any() or (rank > 64 - SPARSE_P + 1).any():
            raise StateError("state holds a coupon with an impossible rank")
        if not rr.owns(cvals):
            raise StateError(f"state holds coupons outside shard {rr.shard}'s registers")
    rcol = regb.column("registers")
    if len(rcol):
        buf = np.frombuffer(rcol.buffers()[1], np.uint8)
        regs = buf[rcol.offset * rr.R:(rcol.offset + len(rcol)) * rr.R].reshape(-1, rr.R).copy()
        if (regs > rr.prec.q + 1).any():
            raise StateError(f"state holds a register value above {rr.prec.q + 1}")
    else:
        regs = np.zeros((0, rr.R), np.uint8)
    coff = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=coff[1:])
    dense_all = np.full(n, -1, np.int64)
    dense_all[is_dense] = np.arange(int(is_dense.sum()))
    out = {}
    group = part * 64 + lv
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        code = make_code(ids[sel], nd[sel])
        order = np.argsort(code, kind="stable")
        sel, code = sel[order], code[order]
        if len(code) > 1 and (code[1:] == code[:-1]).any():
            raise StateError("state holds the same key and node twice in one table")
        lengths = counts[sel]
        off = np.zeros(len(sel) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        gather = np.repeat(coff[:-1][sel] - off[:-1], lengths) + np.arange(off[-1], dtype=np.int64)
        d = dense_all[sel]
        dense = np.full(len(sel), -1, np.int32)
        dense[d >= 0] = np.arange(int((d >= 0).sum()), dtype=np.int32)
        out[(int(g // 64), int(g % 64))] = RowTable(int(g % 64), code, off, dense, cvals[gather],
                                                   regs[d[d >= 0]], imp[sel])
    return out
