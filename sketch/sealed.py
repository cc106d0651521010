"""Sealed nodes: immutable row tables in one Arrow IPC file, read block by block.

A node that will not change again (a built leaf or segment with no runs, an
upper-index node, a summary) is written once as an Arrow IPC *file*: the same
bytes are its checkpoint object on the store and the file a shard maps from
its local disk (``pyarrow.memory_map`` + ``pa.ipc.open_file``).  Nothing of it
lives on the heap but a small index; a query decodes only the *blocks* it
touches, and a bounded cache (``BlockCache``) keeps the blocks decoded
lately.

Layout
------
Each of the node's tables (its levels, see ``tiers``) is cut into blocks of
about ``BLOCK_BYTES`` of decoded sketch, in row order.  A block is one record
batch of one row whose columns are flat arrays (list columns), compressed
with zstd by the IPC writer, one buffer each::

    key     uint32   key id: the block's first as itself, then differences (ids are the store's, kept stable)
    node    uint32   node number: a key's first from the table's first node, then differences
    count   uint16   coupons of a sparse row (0 for a dense one)
    extra   int32    impressions less coupons (level 0 only)
    mode    uint8    0: a sparse row; 2: a dense row
    b0..b3  uint8    coupons' index (26 bits) as differences within the row, one byte plane each
    rank    uint8    coupons' rank
    regs    uint8    dense rows' registers, row after row

Why this shape (measured on the 20M per-ad stream of ``bench_core``):
differences within sorted rows, cut into byte planes, let zstd see that
coupons are close (the high planes compress to almost nothing, the low two
are noise); ranks alone are a few bits each; node differences within a key
are small.  Every other column is nearly constant and compresses away.

The file's schema metadata carries the format, version and the parameters a
reader must share (precision, bucket width, tier levels, shard layout),
which node it is, and per table its block index: each block's first and last
row code, first row, coupons and dense rows before it, impressions before
it, and a CRC-32 of its decoded arrays, checked every time a block is
decoded: a damaged file is refused, never read wrong.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import zlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from .hll import RANK_BITS, RANK_MASK
from .rows import RowTable, code_keys, code_nodes, make_code

FORMAT = "impressions-sealed"
VERSION = 1
BLOCK_BYTES = 64 * 1024  # decoded sketch bytes a block aims at: a few dense rows, or thousands of coupons
RAW, DENSE = 0, 2

_LIST_U8, _LIST_U16, _LIST_U32 = pa.list_(pa.uint8()), pa.list_(pa.uint16()), pa.list_(pa.uint32())
SCHEMA = pa.schema([("key", _LIST_U32), ("node", _LIST_U32), ("count", _LIST_U16), ("extra", pa.list_(pa.int32())),
                    ("mode", _LIST_U8), ("b0", _LIST_U8), ("b1", _LIST_U8), ("b2", _LIST_U8), ("b3", _LIST_U8),
                    ("rank", _LIST_U8), ("regs", _LIST_U8)])
_COLS = SCHEMA.names
_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


class SealedError(ValueError):
    """A sealed file that cannot be read as this store's (damaged, or another configuration's)."""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype)


def _restart_cumsum(d: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Running sums of non-negative ``d`` that restart where ``start`` is true
    (each run's first value is itself: the decoding of in-run differences)."""
    cs = np.cumsum(d)
    return cs - np.maximum.accumulate(np.where(start, cs - d, 0))


def _crc(arrays) -> int:
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), c)
    return c


# ---------------------------------------------------------------- writing

def encode(tables: list[tuple[int, RowTable]], R: int, header: dict) -> bytes:
    """The sealed file of a node whose tables are ``[(part, table)]``."""
    batches, index = [], []
    for part, t in tables:
        entry, blocks = _encode_table(t, R)
        entry["part"] = part
        entry["batch0"] = len(batches)
        batches += blocks
        index.append(entry)
    meta = dict(header, format=FORMAT, version=VERSION, R=R, tables=index)
    schema = SCHEMA.with_metadata({b"sealed": json.dumps(meta, separators=(",", ":")).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=_IPC) as w:
        for b in batches:
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


def _encode_table(t: RowTable, R: int) -> tuple[dict, list[pa.RecordBatch]]:
    n = len(t)
    node_base = int(code_nodes(t.code).min()) if n else 0  # nodes are stored above the table's lowest
    lengths = np.diff(t.off).astype(np.int64)
    is_dense = t.dense >= 0
    mode = np.where(is_dense, DENSE, RAW).astype(np.uint8)
    # blocks: cut in row order at about BLOCK_BYTES of decoded sketch
    cost = 12 + np.where(is_dense, R, 4 * lengths)
    cum = np.cumsum(cost)
    cuts = [0]
    while cuts[-1] < n:
        nxt = int(np.searchsorted(cum, (cum[cuts[-1] - 1] if cuts[-1] else 0) + BLOCK_BYTES, side="right"))
        cuts.append(max(nxt, cuts[-1] + 1))
    cuts[-1] = n
    blocks, entries = [], []
    dense_cs = np.r_[0, np.cumsum(is_dense)]
    imp_cs = np.r_[0, np.cumsum(t.imp)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        arrays = _encode_block(t, a, b, node_base, lengths, mode, dense_cs)
        blocks.append(pa.record_batch([pa.ListArray.from_arrays(pa.array([0, len(v)], pa.int32()), pa.array(v))
                                       for v in arrays], schema=SCHEMA))
        entries.append([int(t.code[a]), int(t.code[b - 1]), a, int(t.off[a]), int(dense_cs[a]), int(imp_cs[a]),
                        _crc(arrays)])
    return {"level": t.level, "rows": n, "node_base": node_base, "coupons": int(t.off[-1]),
            "dense": int(dense_cs[-1]), "impressions": int(imp_cs[-1]),
            "keys": _b64(np.unique(code_keys(t.code)).astype(np.uint32)),
            "blocks": entries}, blocks


def _encode_block(t: RowTable, a: int, b: int, node_base: int, lengths, mode, dense_cs) -> list[np.ndarray]:
    keys = code_keys(t.code[a:b]).astype(np.int64)
    nodes = code_nodes(t.code[a:b]) - node_base
    new_key = np.r_[True, keys[1:] != keys[:-1]]
    kd = np.diff(keys, prepend=0).astype(np.uint32)  # the block's first key as itself, the others as differences
    nd = np.where(new_key, nodes, np.diff(nodes, prepend=0)).astype(np.uint32)  # nodes rise within a key
    m = mode[a:b]
    cnt = np.where(m == DENSE, 0, lengths[a:b]).astype(np.uint16)
    # impressions less coupons: 0 for most rows; negative after a re-sharding split a row's coupons from its count
    extra = (t.imp[a:b] - lengths[a:b]).astype(np.int32) if t.level == 0 else np.zeros(0, np.int32)
    c0, c1 = int(t.off[a]), int(t.off[b])
    coupons = t.coupons[c0:c1]
    row_of = np.repeat(np.arange(b - a), lengths[a:b])
    idx = coupons >> np.uint32(RANK_BITS)
    d = idx.copy()
    if len(d):
        d[1:] -= idx[:-1]
        first = np.r_[True, row_of[1:] != row_of[:-1]]
        d[first] = idx[first]  # each row's first index is itself
    planes = d.view(np.uint8).reshape(-1, 4) if len(d) else np.zeros((0, 4), np.uint8)
    rank = (coupons & np.uint32(RANK_MASK)).astype(np.uint8)
    regs = np.ascontiguousarray(t.regs[int(dense_cs[a]):int(dense_cs[b])]).reshape(-1)
    return [kd, nd, cnt, extra, m.astype(np.uint8), *(np.ascontiguousarray(planes[:, i]) for i in range(4)),
            rank, regs]


# ---------------------------------------------------------------- reading

class BlockCache:
    """Decoded blocks, most recently used kept, within a byte budget (per process)."""

    def __init__(self, budget: int = 32 << 20):
        self.budget = budget
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return t

    def put(self, key, t: RowTable) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = t
            self.bytes += t.nbytes
            while self.bytes > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes

    def drop(self, prefix) -> None:
        """Forget every block of one file."""
        with self._lock:
            for k in [k for k in self._items if k[0] == prefix]:
                self.bytes -= self._items.pop(k).nbytes


CACHE = BlockCache()
_TOKENS = itertools.count(1)


class SealedFile:
    """A sealed node's file, mapped; its tables are ``BlockedTable`` views."""

    def __init__(self, source, R: int, expect: dict, name: str = "", cache: BlockCache | None = None):
        """``source``: a path (memory-mapped) or bytes.  ``expect``: header
        values the file must carry (precision, levels, shard layout...)."""
        self.name = name or str(source)[:64]
        self.cache = cache or CACHE
        self.token = next(_TOKENS)  # the cache's key for this file (ids of dead objects are reused)
        try:
            self._src = pa.memory_map(source) if isinstance(source, str) else pa.py_buffer(source)
            self.reader = pa.ipc.open_file(self._src)
            meta = json.loads((self.reader.schema.metadata or {}).get(b"sealed", b"{}"))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise SealedError(f"{self.name} is not a readable sealed file: {e}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SealedError(f"{self.name} is not a sealed file of version {VERSION}")
        for k, v in dict(expect, R=R).items():
            if meta.get(k) != v:
                raise SealedError(f"{self.name} was written with {k}={meta.get(k)}, this store has {k}={v}")
        if self.reader.schema.remove_metadata() != SCHEMA:
            raise SealedError(f"{self.name} has another schema")
        self.meta, self.R = meta, R
        self.size = self._src.size() if callable(self._src.size) else self._src.size
        self.tables = [BlockedTable(self, i, e) for i, e in enumerate(meta["tables"])]

    def table(self, part: int, level: int):
        for t in self.tables:
            if t.part == part and t.level == level:
                return t
        return None

    def close(self) -> None:
        self.cache.drop(self.token)


class BlockedTable:
    """A sealed table: row lookups on the block index, rows decoded block by
    block.  ``view`` gives a ``RowTable`` of the rows of some keys."""

    def __init__(self, f: SealedFile, index: int, entry: dict):
        self.file, self.index = f, index
        self.part, self.level = int(entry["part"]), int(entry["level"])
        self.rows, self.node_base = int(entry["rows"]), int(entry["node_base"])
        self.n_coupons, self.n_dense, self.impressions = int(entry["coupons"]), int(entry["dense"]), \
            int(entry["impressions"])
        b = np.array(entry["blocks"], dtype=object).reshape(-1, 7) if entry["blocks"] else np.zeros((0, 7), object)
        self.first = b[:, 0].astype(np.uint64)
        self.last = b[:, 1].astype(np.uint64)
        self.row0 = np.r_[b[:, 2].astype(np.int64), self.rows]
        self.crc = b[:, 6].astype(np.int64)
        self.batch0 = int(entry["batch0"])
        self._keys_b64 = entry["keys"]
        self._key_ids = None

    def __len__(self) -> int:
        return self.rows

    @property
    def key_ids(self) -> np.ndarray:
        """The key ids with rows here, sorted."""
        if self._key_ids is None:
            self._key_ids = _unb64(self._keys_b64, np.uint32).astype(np.int64)
        return self._key_ids

    @property
    def nbytes(self) -> int:  # what it holds on the heap: its index
        return self.first.nbytes + self.last.nbytes + self.row0.nbytes + self.crc.nbytes

    def block(self, i: int) -> RowTable:
        key = (self.file.token, self.index, i)
        t = self.file.cache.get(key)
        if t is None:
            t = self._decode(i)
            self.file.cache.put(key, t)
        return t

    def _decode(self, i: int) -> RowTable:
        rb = self.file.reader.get_batch(self.batch0 + i)
        arrays = [rb.column(c).flatten().to_numpy(zero_copy_only=False) for c in _COLS]
        if _crc(arrays) != int(self.crc[i]):
            raise SealedError(f"{self.file.name}: block {i} of table {self.index} does not match its checksum")
        kd, nd, cnt, extra, mode, b0, b1, b2, b3, rank, regs = arrays
        n = len(kd)
        keys = np.cumsum(kd.astype(np.int64))
        new_key = np.r_[True, kd[1:] != 0] if n else np.zeros(0, bool)
        code = make_code(keys, _restart_cumsum(nd.astype(np.int64), new_key) + self.node_base)
        lengths = cnt.astype(np.int64)
        off = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        coupons = np.empty(int(off[-1]), np.uint32)
        row_of = np.repeat(np.arange(n), lengths)
        if len(coupons):
            d = (b0.astype(np.int64) | (b1.astype(np.int64) << 8) | (b2.astype(np.int64) << 16)
                 | (b3.astype(np.int64) << 24))
            first = np.r_[True, row_of[1:] != row_of[:-1]]
            idx = _restart_cumsum(d, first).astype(np.uint32)
            coupons[:] = (idx << np.uint32(RANK_BITS)) | rank.astype(np.uint32)
        dense = np.full(n, -1, np.int32)
        dmask = mode == DENSE
        dense[dmask] = np.arange(int(dmask.sum()), dtype=np.int32)
        imp = (lengths + extra.astype(np.int64)) if self.level == 0 and len(extra) else np.zeros(n, np.int64)
        if not n or int(code[0]) != int(self.first[i]) or int(code[-1]) != int(self.last[i]):
            raise SealedError(f"{self.file.name}: block {i} of table {self.index} does not decode to its index")
        return RowTable(self.level, code, off, dense, coupons, regs.reshape(-1, self.file.R), imp)

    # ------------------------------------------------------------ what the cover walk reads
    def blocks_for(self, lo_code: int, hi_code: int) -> range:
        """The blocks holding rows with codes in ``[lo_code, hi_code]``."""
        a = int(np.searchsorted(self.last, np.uint64(lo_code)))
        b = int(np.searchsorted(self.first, np.uint64(hi_code), side="right"))
        return range(a, max(a, b))

    def view(self, lo_code: int, hi_code: int) -> RowTable:
        """The rows with codes in ``[lo_code, hi_code]`` (and their block neighbours) as one table."""
        blocks = self.blocks_for(lo_code, hi_code)
        if len(blocks) == 1:
            return self.block(blocks[0])
        if not len(blocks):
            return RowTable.empty(self.level, self.file.R)
        from .rows import concat
        return concat([self.block(i) for i in blocks], self.level)

    def materialize(self) -> RowTable:
        """Every row, decoded (for rebuilds, exports and re-sharding)."""
        from .rows import concat
        return concat([self._decode(i) for i in range(len(self.first))], self.level) if len(self.first) \
            else RowTable.empty(self.level, self.file.R)
