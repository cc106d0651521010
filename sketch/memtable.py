"""The newest events of a shard, not yet sorted into rows."""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.uint32)


class Memtable:
    """Events as unsorted chunks of (key id, bucket, coupon), uint32 each.

    Appending costs nothing but the arrays themselves; queries scan the
    columns with a vectorized mask (``columns`` concatenates the chunks once
    and keeps the result until the next append); ``take`` hands every event
    over to be sorted into rows and empties the table.
    """

    def __init__(self):
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.rows = 0
        self._cat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows

    def add(self, ids: np.ndarray, buckets: np.ndarray, coupons: np.ndarray) -> None:
        self._chunks.append((ids, buckets, coupons))
        self.rows += len(ids)
        self._cat = None

    def frozen(self) -> "Memtable":
        """A copy that later appends and takes do not touch (chunks are never changed in place)."""
        m = Memtable()
        m._chunks, m.rows, m._cat = list(self._chunks), self.rows, self._cat
        return m

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key ids, buckets, coupons) of every event held."""
        if self._cat is None:
            if not self._chunks:
                self._cat = (_EMPTY, _EMPTY, _EMPTY)
            elif len(self._chunks) == 1:
                self._cat = self._chunks[0]
            else:
                self._cat = tuple(np.concatenate(parts) for parts in zip(*self._chunks))
                self._chunks = [self._cat]
        return self._cat

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every event held, and an empty table."""
        out = self.columns()
        self._chunks, self.rows, self._cat = [], 0, None
        return out
