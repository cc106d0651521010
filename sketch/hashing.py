"""Visitor id -> 64-bit hash.

The one hash every part of the system agrees on, stated exactly so another
service can pre-hash visitor ids and send the hashes instead:

    h = first 8 bytes, read little-endian as an unsigned 64-bit integer, of
        MurmurHash3_x64_128(utf8(visitor_id), seed=0)

In Python that is ``mmh3.hash64(visitor_id, seed=0, signed=False)[0]``; in
Java, Guava's ``Hashing.murmur3_128(0).hashString(id, UTF_8).asLong()`` read
as unsigned.  ``tests/test_hashing.py`` pins reference values.

The hash call is the only per-event Python call in the ingest path:
``mmh3.hash_bytes`` over the whole batch, joined into one buffer and viewed
as a numpy array, costs about 130 ns per id here; everything after it is
vectorized.
"""

from __future__ import annotations

from typing import Iterable

import mmh3
import numpy as np
import pyarrow as pa

HASH_SEED = 0


def hash_visitor(visitor: str | bytes) -> int:
    """The 64-bit hash of one visitor id (str is hashed as its UTF-8 bytes)."""
    return mmh3.hash64(visitor, seed=HASH_SEED, signed=False)[0]


def hash_visitors(visitors: Iterable[str | bytes] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash many visitor ids into a ``uint64`` array, in order.

    Accepts a Python sequence of str/bytes or an Arrow string/binary array.
    Nulls are not allowed here: the ingest validation removes them first.
    """
    if isinstance(visitors, (pa.Array, pa.ChunkedArray)):
        visitors = visitors.to_pylist()
    # hash_bytes returns the 16-byte digest (h1 then h2, little-endian); h1 is
    # the first 8 bytes, so every other uint64 of the joined buffer is ours.
    digest = b"".join(map(mmh3.hash_bytes, visitors))
    return np.frombuffer(digest, dtype="<u8")[::2].astype(np.uint64, copy=True)
