"""The newest events of a shard, not yet sorted into rows."""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.uint32)


class Memtable:
    """Events as unsorted chunks of (key id, bucket, coupon), uint32 each,
    each chunk tagged with the log position it came from (0: none).

    The chunks sit end to end in three column buffers that grow by doubling:
    appending copies a chunk in once, and ``columns`` is three slices of the
    buffers, never a concatenation, so a question scans the events with a
    vectorized mask at no other cost.  Rows once written are never written
    again: an append writes past every row a copy (``frozen``) can see, and
    ``take``, ``take_through`` and ``drop_through`` move the rows left to
    buffers of their own, so a frozen copy reads the same events however the
    table goes on.  ``take`` hands every event over to be sorted into rows and
    empties the table, ``take_through`` the chunks up to a log position,
    ``drop_through`` forgets them (their rows came from elsewhere: a reader
    given its writer's sorted runs).
    """

    MIN_CAPACITY = 1 << 12

    def __init__(self):
        self._buf: tuple[np.ndarray, np.ndarray, np.ndarray] = (_EMPTY, _EMPTY, _EMPTY)
        self._tags: list[int] = []  # each chunk's log position, in order
        self._ends: list[int] = []  # each chunk's end row
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def add(self, ids: np.ndarray, buckets: np.ndarray, coupons: np.ndarray, tag: int = 0) -> None:
        """Append one chunk: three uint32 arrays of one length (anything else is refused, never cast)."""
        n = len(ids)
        if any(getattr(v, "dtype", None) != np.uint32 or len(v) != n for v in (ids, buckets, coupons)):
            raise ValueError("a memtable chunk is three uint32 arrays of one length")
        end = self.rows + n
        if end > len(self._buf[0]):  # a new buffer: the rows copies see stay where they are
            cap = max(end, 2 * len(self._buf[0]), self.MIN_CAPACITY)
            grown = tuple(np.empty(cap, np.uint32) for _ in range(3))
            for new, old in zip(grown, self._buf):
                new[:self.rows] = old[:self.rows]
            self._buf = grown
        for col, values in zip(self._buf, (ids, buckets, coupons)):
            col[self.rows:end] = values
        self._tags.append(int(tag))
        self._ends.append(end)
        self.rows = end

    def frozen(self) -> "Memtable":
        """A copy that later appends and takes do not touch (rows once written are never written again)."""
        m = Memtable()
        m._buf, m._tags, m._ends, m.rows = self._buf, list(self._tags), list(self._ends), self.rows
        return m

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key ids, buckets, coupons) of every event held: slices of the buffers, not copies."""
        return tuple(col[:self.rows] for col in self._buf)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every event held, and an empty table."""
        out = self.columns()
        self._buf, self._tags, self._ends, self.rows = (_EMPTY, _EMPTY, _EMPTY), [], [], 0
        return out

    def take_through(self, tag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The events of the chunks tagged ``tag`` or less (chunks are added in tag order), taken out."""
        return self._cut(tag)

    def drop_through(self, tag: int) -> int:
        """Forget the chunks tagged ``tag`` or less; returns the events dropped."""
        return len(self._cut(tag)[0])

    def _cut(self, tag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The events of the chunks tagged ``tag`` or less, removed from the table; the rest move to buffers of
        their own (copies of the table keep reading the old ones)."""
        k = 0
        while k < len(self._tags) and self._tags[k] <= tag:
            k += 1
        cut = self._ends[k - 1] if k else 0
        out = tuple(col[:cut] for col in self._buf)
        rest = self.rows - cut
        self._buf = tuple(col[cut:self.rows].copy() for col in self._buf) if rest else (_EMPTY, _EMPTY, _EMPTY)
        self._tags, self._ends = self._tags[k:], [e - cut for e in self._ends[k:]]
        self.rows = rest
        return out
