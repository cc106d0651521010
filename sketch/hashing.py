"""Visitor id -> 64-bit hash.

The one hash every part of the system agrees on, stated exactly so another
service can pre-hash visitor ids and send the hashes instead:

    h = first 8 bytes, read little-endian as an unsigned 64-bit integer, of
        MurmurHash3_x64_128(utf8(visitor_id), seed=0)

In Python that is ``mmh3.hash64(visitor_id, seed=0, signed=False)[0]``; in
Java, Guava's ``Hashing.murmur3_128(0).hashString(id, UTF_8).asLong()`` read
as unsigned.  ``tests/test_hashing.py`` pins reference values.

``hash_visitors`` computes the same function over a whole Arrow string
array at once: MurmurHash3's 16-byte blocks become numpy uint64 columns
(rows grouped by their number of blocks, bytes past each id's end masked to
zero, which is exactly MurmurHash3's tail rule), so no Python call happens
per id.  ``mmh3`` remains the reference it is tested against.
"""

from __future__ import annotations

from typing import Iterable

import mmh3
import numpy as np
import pyarrow as pa

HASH_SEED = 0
_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)
# _LOW_BYTES[v] keeps the low v bytes of a little-endian word (v = 0..8)
_LOW_BYTES = np.array([(1 << (8 * v)) - 1 for v in range(8)] + [0xFFFFFFFFFFFFFFFF], np.uint64)


def hash_visitor(visitor: str | bytes) -> int:
    """The 64-bit hash of one visitor id (str is hashed as its UTF-8 bytes)."""
    return mmh3.hash64(visitor, seed=HASH_SEED, signed=False)[0]


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(k: np.ndarray) -> np.ndarray:
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xFF51AFD7ED558CCD)
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xC4CEB9FE1A85EC53)
    k ^= k >> np.uint64(33)
    return k


def _murmur_blocks(words: list[np.ndarray], lengths: np.ndarray, nblocks: int) -> np.ndarray:
    """MurmurHash3_x64_128 (seed 0), first 64 bits, for rows of equal block count.

    ``words`` holds 2 * (nblocks + 1) little-endian uint64 columns: the full
    blocks, then the tail block, zero past each row's end.
    """
    n = len(lengths)
    h1 = np.zeros(n, np.uint64)
    h2 = np.zeros(n, np.uint64)
    for b in range(nblocks):
        k1 = words[2 * b] * _C1
        k1 = _rotl(k1, 31) * _C2
        h1 ^= k1
        h1 = _rotl(h1, 27) + h2
        h1 = h1 * np.uint64(5) + np.uint64(0x52DCE729)
        k2 = words[2 * b + 1] * _C2
        k2 = _rotl(k2, 33) * _C1
        h2 ^= k2
        h2 = _rotl(h2, 31) + h1
        h2 = h2 * np.uint64(5) + np.uint64(0x38495AB5)
    # tail: absent bytes are zero, and a zero k mixes in as a no-op
    k2 = words[2 * nblocks + 1] * _C2
    h2 ^= _rotl(k2, 33) * _C1
    k1 = words[2 * nblocks] * _C1
    h1 ^= _rotl(k1, 31) * _C2
    ln = lengths.astype(np.uint64)
    h1 ^= ln
    h2 ^= ln
    h1 += h2
    h2 += h1
    return _fmix(h1) + _fmix(h2)


def _hash_arrow(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    out = np.empty(n, np.uint64)
    if n == 0:
        return out
    bufs = arr.buffers()
    off_t = np.int64 if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(bufs[1], off_t)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    # the ids' bytes plus zero padding, seen as a little-endian uint64 at every
    # byte offset (an unaligned strided view): each word of each id is one gather
    data = np.concatenate([data[offsets[0]:offsets[-1]], np.zeros(24, np.uint8)])
    offsets -= offsets[0]
    at = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    lengths = np.diff(offsets)
    nblocks = lengths >> 4
    top = int(nblocks.max())
    for g in range(top + 1):
        rows = None if top == 0 else np.flatnonzero(nblocks == g)
        if rows is not None and not len(rows):
            continue
        o = offsets[:-1] if rows is None else offsets[:-1][rows]
        ln = lengths if rows is None else lengths[rows]
        words = []
        for w in range(2 * g):  # full blocks: all 8 bytes are the id's
            words.append(at[o + 8 * w])
        for w in (2 * g, 2 * g + 1):  # the tail block: mask what lies past the id
            valid = np.clip(ln - 8 * w, 0, 8)
            words.append(at[o + 8 * w] & _LOW_BYTES[valid])
        h = _murmur_blocks(words, ln, g)
        if rows is None:
            out[:] = h
        else:
            out[rows] = h
    return out


def hash_visitors(visitors: Iterable[str | bytes] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash many visitor ids into a ``uint64`` array, in order.

    Accepts an Arrow string/binary array (hashed in place, vectorized) or a
    Python sequence of str/bytes.  Nulls are not allowed here: the ingest
    validation removes them first.
    """
    if isinstance(visitors, pa.ChunkedArray):
        visitors = visitors.combine_chunks()
    if not isinstance(visitors, pa.Array):
        visitors = list(visitors)
        typ = pa.binary() if visitors and isinstance(visitors[0], bytes) else pa.string()
        visitors = pa.array(visitors, typ)
    if visitors.null_count:
        raise ValueError(f"{visitors.null_count} visitor ids are null")
    t = visitors.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        visitors = visitors.cast(pa.string())
    return _hash_arrow(visitors)
