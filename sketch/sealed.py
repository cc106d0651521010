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
about ``BLOCK_BYTES`` of decoded sketch, in row order.  A table is one record
batch with one ``block`` column (large binary): each value is one block, its
planes laid end to end and compressed as one zstd frame::

    key     uint32   key id: the block's first as itself, then differences (ids are the store's, kept stable)
    node    uint32   node number: a key's first from the table's lowest node, then differences
    extra   int32    impressions less coupons (level 0 only; may be negative after a split)
    count   uint16   coupons of a sparse row (0 for a dense one)
    mode    uint8    0: a sparse row; 2: a dense row
    b0..b3  uint8    coupons' index (26 bits) as differences within the row, one byte plane each
    rank    uint8    coupons' rank
    regs    uint8    dense rows' registers, row after row

The planes' lengths follow from the block's rows, coupons and dense rows,
which the block index gives.  Why this shape (measured on the 20M per-ad
stream of ``bench_core``): differences within sorted rows, cut into byte
planes, let zstd see that coupons are close (the high planes compress to
almost nothing, the low two are noise); ranks alone are a few bits each;
node differences within a key are small.  One frame a block rather than one
per column (Arrow's own IPC compression): reading a block is one slice of the
mapped file and one decompression, 0.04 ms against 0.27 for a record batch
of eleven compressed buffers, at the same size (zstd level ``LEVEL``).

The file's schema metadata carries the format, version and the parameters a
reader must share (precision, bucket width, tier levels, shard layout),
which node it is, and per table its block index: each block's first and last
row code, first row, coupons and dense rows before it, impressions before
it, its decoded size and a CRC-32 of its stored bytes, checked every time a
block is read: a damaged file is refused, never read wrong.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
import threading
import time
import zlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from .hll import RANK_BITS, RANK_MASK
from .rows import RowTable, code_keys, code_nodes, make_code

FORMAT = "impressions-sealed"
VERSION = 2
ONE_KEYS = 4096  # keys a table remembers the impressions of, asked one at a time (``key_impression``)
BLOCK_BYTES = 64 * 1024  # decoded sketch bytes a block aims at: a few dense rows, or thousands of coupons
LEVEL = 1  # zstd level: 2 % larger than level 9 and sealing 2.7x cheaper (a third of all upkeep), decoded as fast
RAW, DENSE = 0, 2

SCHEMA = pa.schema([("block", pa.large_binary())])
_COLS = ("key", "node", "extra", "count", "mode", "b0", "b1", "b2", "b3", "rank", "regs")  # wide planes first
_DTYPES = (np.uint32, np.uint32, np.int32, np.uint16, np.uint8, np.uint8, np.uint8, np.uint8, np.uint8, np.uint8,
           np.uint8)
_CODEC = pa.Codec("zstd", compression_level=LEVEL)
_PLAIN = pa.Codec("zstd")


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


def _plane_sizes(level: int, n: int, c: int, d: int, R: int) -> list[int]:
    """Bytes of each plane of a block of ``n`` rows, ``c`` coupons and ``d`` dense rows (``_COLS``' order)."""
    return [4 * n, 4 * n, 4 * n if level == 0 else 0, 2 * n, n, c, c, c, c, c, d * R]


def _meta_crc(meta: dict) -> int:
    """CRC-32 of the header and block index (``crc`` itself left out): a damaged index is refused too."""
    body = {k: v for k, v in meta.items() if k != "crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# ---------------------------------------------------------------- writing

def encode(tables: list[tuple[int, RowTable]], R: int, header: dict) -> bytes:
    """The sealed file of a node whose tables are ``[(part, table)]``."""
    batches, index = [], []
    for part, t in tables:
        entry, blocks = _encode_table(t, R)
        entry["part"] = part
        entry["batch"] = len(batches)
        batches.append(pa.record_batch([pa.array(blocks, pa.large_binary())], schema=SCHEMA))
        index.append(entry)
    meta = dict(header, format=FORMAT, version=VERSION, R=R, tables=index)
    meta["crc"] = _meta_crc(meta)
    schema = SCHEMA.with_metadata({b"sealed": json.dumps(meta, separators=(",", ":")).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:  # not compressed again: each block is a zstd frame already
        for b in batches:
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


def _encode_table(t: RowTable, R: int) -> tuple[dict, list[bytes]]:
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
        raw = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays)
        frame = _CODEC.compress(raw, asbytes=True)
        blocks.append(frame)
        entries.append([int(t.code[a]), int(t.code[b - 1]), a, int(t.off[a]), int(dense_cs[a]), int(imp_cs[a]),
                        zlib.crc32(frame), len(raw)])
    keys, first = np.unique(code_keys(t.code), return_index=True)
    entry = {"level": t.level, "rows": n, "node_base": node_base, "coupons": int(t.off[-1]),
             "dense": int(dense_cs[-1]), "impressions": int(imp_cs[-1]),
             "keys": _b64(keys.astype(np.uint32)), "blocks": entries}
    if t.level == 0:  # each key's impressions here: a range holding the whole table reads no block
        entry["key_imp"] = _b64(np.diff(imp_cs[np.r_[first, n]]).astype(np.uint32))
    return entry, blocks


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
    idx = coupons >> np.uint32(RANK_BITS)
    d = idx.copy()
    if len(d):
        d[1:] -= idx[:-1]
        first = t.off[a:b][lengths[a:b] > 0] - c0
        d[first] = idx[first]  # each row's first index is itself
    planes = d.view(np.uint8).reshape(-1, 4) if len(d) else np.zeros((0, 4), np.uint8)
    rank = (coupons & np.uint32(RANK_MASK)).astype(np.uint8)
    regs = np.ascontiguousarray(t.regs[int(dense_cs[a]):int(dense_cs[b])]).reshape(-1)
    return [kd, nd, extra, cnt, m.astype(np.uint8), *(np.ascontiguousarray(planes[:, i]) for i in range(4)),
            rank, regs]


# ---------------------------------------------------------------- reading

class BlockCache:
    """Decoded blocks within a byte budget (per process), in two parts (a segmented LRU): a block enters
    *on probation* and moves to the *protected* part when it is asked for again later than
    ``CORRELATED_S`` after it came in (asked again within one question, as the blocks of a join are, it
    stays on probation); protected blocks fill at most ``PROTECTED`` of the budget (the least recent go
    back to probation).  What is evicted is the least recent block on probation, and only when none is
    left, the least recent protected one.  A scan of blocks asked for by one question each (questions over
    random hours, a top-keys read) then passes through the probation part and leaves alone the blocks
    that questions come back to (a dashboard's key sets): with one plain LRU, 50 one-hour questions of 100
    keys filled a 256 MB cache and the next 30-day questions of the same keys found part of their blocks
    gone, 60-70 ms of work in place of 25."""

    PROTECTED = 0.8  # the share of the budget blocks asked for again may hold
    CORRELATED_S = 1.0  # asked for again this soon after it came in: the same question, not a new one

    def __init__(self, budget: int = 256 << 20):
        self.budget = budget
        self.bytes = 0
        self._probation: OrderedDict = OrderedDict()
        self._protected: OrderedDict = OrderedDict()
        self._protected_bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            t = self._protected.get(key)
            if t is not None:
                self._protected.move_to_end(key)
                self.hits += 1
                return t
            got = self._probation.get(key)
            if got is None:
                self.misses += 1
                return None
            self.hits += 1
            t, came = got
            if time.monotonic() - came < self.CORRELATED_S:
                self._probation.move_to_end(key)
                return t
            del self._probation[key]
            self._protected[key] = t  # asked for again by a later question: protected
            self._protected_bytes += t.nbytes
            while self._protected_bytes > self.PROTECTED * self.budget and len(self._protected) > 1:
                k, old = self._protected.popitem(last=False)  # the least recent protected: back on probation
                self._protected_bytes -= old.nbytes
                self._probation[k] = (old, 0.0)
            return t

    def put(self, key, t: RowTable) -> None:
        with self._lock:
            if key in self._probation or key in self._protected:
                return
            self._probation[key] = (t, time.monotonic())
            self.bytes += t.nbytes
            while self.bytes > self.budget and len(self._probation) + len(self._protected) > 1:
                if self._probation:
                    _, (old, _) = self._probation.popitem(last=False)
                else:
                    _, old = self._protected.popitem(last=False)
                    self._protected_bytes -= old.nbytes
                self.bytes -= old.nbytes

    def items(self) -> list:
        """``(key, table)`` of every block held (a copy: for tests and reports)."""
        with self._lock:
            return [(k, t) for k, (t, _) in self._probation.items()] + list(self._protected.items())

    def stats(self) -> dict:
        """What a shard's or reader's stats report of its cache."""
        return {"block_cache_bytes": self.bytes, "block_cache_budget": self.budget, "block_cache_hits": self.hits,
                "block_cache_misses": self.misses, "block_cache_protected_bytes": self._protected_bytes}

    def clear(self) -> None:
        with self._lock:
            self._probation.clear()
            self._protected.clear()
            self.bytes = self._protected_bytes = 0

    def drop(self, prefix) -> None:
        """Forget every block of one file."""
        with self._lock:
            for k in [k for k in self._probation if k[0] == prefix]:
                self.bytes -= self._probation.pop(k)[0].nbytes
            for k in [k for k in self._protected if k[0] == prefix]:
                t = self._protected.pop(k)
                self.bytes -= t.nbytes
                self._protected_bytes -= t.nbytes


CACHE = BlockCache()
_TOKENS = itertools.count(1)


class SealedFile:
    """A sealed node's file, mapped; its tables are ``BlockedTable`` views."""

    def __init__(self, source, R: int, expect: dict, name: str = "", cache: BlockCache | None = None,
                 refetch=None):
        """``source``: a path (memory-mapped) or bytes.  ``expect``: header
        values the file must carry (precision, levels, shard layout...).
        ``refetch``: for a local copy of a remote object, a function that drops
        the copy and returns the path of a fresh, verified one: a block that
        does not match its checksum is then read once more from that copy
        before it is refused."""
        self.name = name or str(source)[:64]
        self.cache = CACHE if cache is None else cache
        self.token = next(_TOKENS)  # the cache's key for this file (ids of dead objects are reused)
        self.refetch, self.refetched = refetch, 0
        self._lock = threading.Lock()
        self._columns: dict = {}  # table batch -> (block offsets, data buffer), zero copy from the map
        self._src, self.reader, meta = self._open(source)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SealedError(f"{self.name} is not a sealed file of version {VERSION}")
        if meta.get("crc") != _meta_crc(meta):
            raise SealedError(f"{self.name}: its block index does not match its checksum")
        for k, v in dict(expect, R=R).items():
            if meta.get(k) != v:
                raise SealedError(f"{self.name} was written with {k}={meta.get(k)}, this store has {k}={v}")
        if self.reader.schema.remove_metadata() != SCHEMA:
            raise SealedError(f"{self.name} has another schema")
        self.R = R
        self.size = self._src.size() if callable(self._src.size) else self._src.size
        try:
            self.tables = [BlockedTable(self, i, e) for i, e in enumerate(meta.pop("tables"))]
        except (KeyError, TypeError, ValueError) as e:
            raise SealedError(f"{self.name} has a block index this reader does not know: {e!r}") from None
        self.meta = meta  # the header; the tables' entries live on as arrays in ``tables``

    def _open(self, source):
        try:
            src = pa.memory_map(source) if isinstance(source, str) else pa.py_buffer(source)
            reader = pa.ipc.open_file(src)
            meta = json.loads((reader.schema.metadata or {}).get(b"sealed", b"{}"))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise SealedError(f"{self.name} is not a readable sealed file: {e}") from None
        return src, reader, meta

    def read_block(self, batch: int, i: int, seen_reader=None):
        """``(reader, bytes)`` of block ``i`` of table batch ``batch``, a slice of the
        mapped file (or the error reading it); with ``seen_reader`` (the reader a
        bad block came from), from a fresh copy, if this file has a way to get
        one (None if not)."""
        with self._lock:
            if seen_reader is not None and self.reader is seen_reader:  # not yet replaced by another call
                if self.refetch is None:
                    return None
                src, reader, _ = self._open(self.refetch())
                if reader.schema != self.reader.schema:
                    raise SealedError(f"{self.name}: its fresh copy is another file")
                self._src, self.reader, self._columns = src, reader, {}
                self.refetched += 1
            reader = self.reader
            try:
                col = self._columns.get(batch)
                if col is None:
                    arr = reader.get_batch(batch).column(0)
                    _, offsets, data = arr.buffers()
                    col = self._columns[batch] = (np.frombuffer(offsets, np.int64)[arr.offset:arr.offset + len(arr) + 1],
                                                  data)
                offsets, data = col
                return reader, data.slice(int(offsets[i]), int(offsets[i + 1] - offsets[i]))
            except (pa.ArrowException, OSError, IndexError, ValueError) as e:
                return reader, e

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
        b = np.array(entry["blocks"], dtype=object).reshape(-1, 8) if entry["blocks"] else np.zeros((0, 8), object)
        self.first = b[:, 0].astype(np.uint64)
        self.last = b[:, 1].astype(np.uint64)
        self.row0 = np.r_[b[:, 2].astype(np.int64), self.rows]
        self.off0 = np.r_[b[:, 3].astype(np.int64), self.n_coupons]
        self.dense0 = np.r_[b[:, 4].astype(np.int64), self.n_dense]
        self.crc = b[:, 6].astype(np.int64)
        self.raw = b[:, 7].astype(np.int64)
        # impressions before each block (and in all): a range's impressions read two blocks at most
        self.imp0 = np.r_[b[:, 5].astype(np.int64), self.impressions]
        self.batch = int(entry["batch"])
        self._keys_b64 = entry["keys"]
        self._key_ids = None
        self._bounds = None
        self._totals_b64 = entry.get("key_imp")
        self._totals = None
        self._one: dict = {}  # key id -> its impressions here, for the keys asked alone (at most ONE_KEYS)

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
        return sum(a.nbytes for a in (self.first, self.last, self.row0, self.off0, self.dense0, self.crc, self.raw,
                                      self.imp0))

    def key_impressions(self, ids: np.ndarray) -> np.ndarray:
        """Impressions of each of ``ids`` in this (level-0) table, from the index (a
        file written before the index held them: counted once from its blocks)."""
        if self._totals is None:
            if self._totals_b64 is not None:
                imp = _unb64(self._totals_b64, np.uint32).astype(np.int64)
            else:
                t = self.materialize()
                imp = np.diff(t.imp_cs[np.r_[np.searchsorted(code_keys(t.code), self.key_ids), len(t)]])
            if len(imp) != len(self.key_ids):
                raise SealedError(f"{self.file.name}: table {self.index} has per-key totals for another key list")
            self._totals = imp
        ids = np.asarray(ids, np.int64)
        keys = self.key_ids
        if not len(keys):
            return np.zeros(len(ids), np.int64)
        at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[at] == ids, self._totals[at], 0)

    def key_impression(self, key: int) -> int:
        """``key_impressions`` of one key id, as a Python int, remembered: a 30-day question about one key
        asks every day's table, one lookup each, again and again for a dashboard's keys."""
        v = self._one.get(key)
        if v is None:
            v = int(self.key_impressions(np.array([key], np.int64))[0])
            if len(self._one) >= ONE_KEYS:  # a table asked about many keys one at a time: start afresh
                self._one = {}
            self._one[key] = v
        return v

    def view_keys(self, ids: np.ndarray, n0: int, n1: int) -> RowTable:
        """The rows of keys ``ids`` (sorted) with nodes in ``[n0, n1)``: only the blocks
        holding them are decoded (a few keys far apart do not read the table between them)."""
        ids = np.asarray(ids, np.int64)
        lo = np.asarray(make_code(ids, n0), np.uint64)
        hi = np.asarray(make_code(ids, max(n1 - 1, n0)), np.uint64)
        a = np.searchsorted(self.last, lo)
        b = np.searchsorted(self.first, hi, side="right")
        some = b > a
        if not some.any():
            return RowTable.empty(self.level, self.file.R)
        a, b = a[some], b[some]
        if (a[1:] <= b[:-1]).all():  # the blocks run on without a gap: one cached view
            return self.view(int(self.first[a[0]]), int(self.last[b[-1] - 1]))
        n = len(self.first)  # the blocks in any [a, b): where the running count of starts less ends is above 0
        need = np.flatnonzero(np.cumsum(np.bincount(a, minlength=n + 1) - np.bincount(b, minlength=n + 1))[:n]).tolist()
        # joined once and cached as one table (a dashboard asks for the same key set again and again);
        # the blocks decoded for it are not kept beside it
        key = (self.file.token, self.index, "keys", hash(tuple(need)), len(need))
        t = self.file.cache.get(key)
        if t is None:
            from .rows import concat
            t = concat([self.file.cache.get((self.file.token, self.index, i)) or self._decode(i) for i in need],
                       self.level)
            self.file.cache.put(key, t)
        return t

    def block(self, i: int) -> RowTable:
        key = (self.file.token, self.index, i)
        t = self.file.cache.get(key)
        if t is None:
            t = self._decode(i)
            self.file.cache.put(key, t)
        return t

    def _decode(self, i: int) -> RowTable:
        reader, got = self.file.read_block(self.batch, i)
        t = self._checked(got, i)
        if t is None:  # damaged: read once more from a fresh copy, if there is one
            again = self.file.read_block(self.batch, i, seen_reader=reader)
            t = None if again is None else self._checked(again[1], i)
            if t is None:
                raise SealedError(f"{self.file.name}: block {i} of table {self.index} does not match its checksum")
        return t

    def _checked(self, frame, i: int) -> RowTable | None:
        """Block ``i`` from its stored bytes, or None when they are not what was written."""
        if isinstance(frame, Exception) or zlib.crc32(frame) != int(self.crc[i]):
            return None
        try:
            raw = _PLAIN.decompress(frame, decompressed_size=int(self.raw[i]))
            sizes = _plane_sizes(self.level, int(self.row0[i + 1] - self.row0[i]),
                                 int(self.off0[i + 1] - self.off0[i]), int(self.dense0[i + 1] - self.dense0[i]),
                                 self.file.R)
            if sum(sizes) != raw.size:
                return None
            arrays, at = [], 0
            for size, dtype in zip(sizes, _DTYPES):
                arrays.append(np.frombuffer(raw, dtype, size // np.dtype(dtype).itemsize, at))
                at += size
            return self._build(i, arrays)
        except (pa.ArrowException, SealedError, ValueError):
            return None

    def _build(self, i: int, arrays) -> RowTable:
        kd, nd, extra, cnt, mode, b0, b1, b2, b3, rank, regs = arrays
        n = len(kd)
        keys = np.cumsum(kd, dtype=np.int64)
        new_key = np.empty(n, bool)
        new_key[:1] = True
        np.not_equal(kd[1:], 0, out=new_key[1:])
        code = make_code(keys, _restart_cumsum(nd.astype(np.int64), new_key) + self.node_base)
        lengths = cnt.astype(np.int64)
        off = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        c = int(off[-1])
        coupons = np.empty(c, np.uint32)
        if c:
            planes = np.empty((c, 4), np.uint8)  # the four byte planes side by side: little-endian words
            planes[:, 0], planes[:, 1], planes[:, 2], planes[:, 3] = b0, b1, b2, b3
            d = planes.view("<u4").reshape(-1)
            # running sums restarted at each row's first coupon (whose index is itself), in 32-bit words that
            # may wrap: an index is below 2**26, so the difference of two sums is exact modulo 2**32
            cs = np.cumsum(d, dtype=np.uint32)
            rows = lengths > 0
            starts = off[:-1][rows]
            idx = cs - np.repeat(cs[starts] - d[starts], lengths[rows])
            np.left_shift(idx, np.uint32(RANK_BITS), out=coupons)
            coupons |= rank
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
        if self._bounds is None:  # Python ints: bisect on them is several times faster than numpy on scalars
            self._bounds = (self.first.tolist(), self.last.tolist())
        first, last = self._bounds
        a = bisect.bisect_left(last, int(lo_code))
        b = bisect.bisect_right(first, int(hi_code))
        return range(a, max(a, b))

    def view(self, lo_code: int, hi_code: int) -> RowTable:
        """The rows with codes in ``[lo_code, hi_code]`` (and their block neighbours) as one table."""
        blocks = self.blocks_for(lo_code, hi_code)
        if len(blocks) == 1:
            return self.block(blocks[0])
        if not len(blocks):
            return RowTable.empty(self.level, self.file.R)
        # rows over several blocks (a busy key's): joined once, kept in the cache beside the blocks
        key = (self.file.token, self.index, blocks.start, blocks.stop)
        t = self.file.cache.get(key)
        if t is None:
            from .rows import concat
            # blocks decoded for the join are not kept beside it: the join holds them once
            t = concat([self.file.cache.get((self.file.token, self.index, i)) or self._decode(i) for i in blocks],
                       self.level)
            self.file.cache.put(key, t)
        return t

    def imp_before(self, codes: np.ndarray) -> np.ndarray:
        """Impressions of the rows with codes below each of ``codes`` (uint64): the
        block index's running total at the block holding the code, plus that
        block's own prefix (decoded only when the code falls inside it)."""
        codes = np.asarray(codes, np.uint64)
        blk = np.searchsorted(self.last, codes)  # the first block with a row at or past the code
        out = self.imp0[blk].copy()
        inside = (blk < len(self.first))
        inside[inside] = codes[inside] > self.first[blk[inside]]
        if inside.any():
            for i in np.unique(blk[inside]).tolist():
                t = self.block(i)
                sel = inside & (blk == i)
                out[sel] += t.imp_cs[np.searchsorted(t.code, codes[sel])]
        return out

    def scan(self, lo_code: int, hi_code: int):
        """The decoded blocks holding codes in ``[lo_code, hi_code]``, one at a time, for
        reads of whole ranges (top keys): cached blocks are used, new ones not kept."""
        for i in self.blocks_for(lo_code, hi_code):
            t = self.file.cache.get((self.file.token, self.index, i))
            yield t if t is not None else self._decode(i)

    def materialize(self) -> RowTable:
        """Every row, decoded (for rebuilds, exports and re-sharding)."""
        from .rows import concat
        return concat([self._decode(i) for i in range(len(self.first))], self.level) if len(self.first) \
            else RowTable.empty(self.level, self.file.R)
