"""The newest events of a shard, not yet sorted into rows."""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.uint32)


class Memtable:
    """Events as unsorted chunks of (key id, bucket, coupon), uint32 each,
    each chunk tagged with the log position it came from (0: none).

    Appending costs nothing but the arrays themselves; queries scan the
    columns with a vectorized mask (``columns`` concatenates the chunks once
    and keeps the result until the next change); ``take`` hands every event
    over to be sorted into rows and empties the table, ``take_through`` the
    chunks up to a log position, ``drop_through`` forgets them (their rows
    came from elsewhere: a reader given its writer's sorted runs).
    """

    def __init__(self):
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._tags: list[int] = []
        self.rows = 0
        self._cat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows

    def add(self, ids: np.ndarray, buckets: np.ndarray, coupons: np.ndarray, tag: int = 0) -> None:
        self._chunks.append((ids, buckets, coupons))
        self._tags.append(int(tag))
        self.rows += len(ids)
        self._cat = None

    def frozen(self) -> "Memtable":
        """A copy that later appends and takes do not touch (chunks are never changed in place)."""
        m = Memtable()
        m._chunks, m._tags, m.rows, m._cat = list(self._chunks), list(self._tags), self.rows, self._cat
        return m

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key ids, buckets, coupons) of every event held."""
        if self._cat is None:
            self._cat = _concat(self._chunks)
        return self._cat

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every event held, and an empty table."""
        out = self.columns()
        self._chunks, self._tags, self.rows, self._cat = [], [], 0, None
        return out

    def take_through(self, tag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The events of the chunks tagged ``tag`` or less (chunks are added in tag order), taken out."""
        return _concat(self._cut(tag))

    def drop_through(self, tag: int) -> int:
        """Forget the chunks tagged ``tag`` or less; returns the events dropped."""
        return sum(len(ids) for ids, _, _ in self._cut(tag))

    def _cut(self, tag: int) -> list:
        """The chunks tagged ``tag`` or less, removed from the table."""
        k = 0
        while k < len(self._tags) and self._tags[k] <= tag:
            k += 1
        out, self._chunks, self._tags = self._chunks[:k], self._chunks[k:], self._tags[k:]
        self.rows -= sum(len(ids) for ids, _, _ in out)
        self._cat = None
        return out


def _concat(chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not chunks:
        return _EMPTY, _EMPTY, _EMPTY
    if len(chunks) == 1:
        return chunks[0]
    return tuple(np.concatenate(parts) for parts in zip(*chunks))
