"""Key names and the dense integer ids a shard store uses for them.

Ids are stable for a store's whole life: they are written beside its other
state (``chunk_table``/``load_chunk``), in chunks of ``CHUNK`` ids so that a
checkpoint rewrites only the chunks that changed, and a restarted store gets
every key back under the same id.  That is what lets sealed files
(``sealed``) hold key ids rather than names.  A key dropped by the retention
leaves a hole: its id is never handed out again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ALL_KEY = 0  # the site-wide key's id in every store
SITE_KEY = "*"  # an event with this key counts toward the site-wide total only
CHUNK = 1 << 16  # ids per persisted chunk


class KeyTable:
    """Key name <-> dense integer id.  Id 0 is the site-wide key (name None,
    also reached as ``"*"``).  Ids are per store: stored states carry names."""

    def __init__(self):
        self._ids: dict[str | None, int] = {None: ALL_KEY, SITE_KEY: ALL_KEY}
        self.names: list[str | None] = [None]
        self.changed: set[int] = {0}  # chunks changed since the caller last cleared this

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str | None) -> int | None:
        return self._ids.get(name)

    def ids(self, names) -> np.ndarray:
        """Ids of ``names`` (created as needed, in order), as uint32."""
        ids, table = self._ids, self.names
        out = np.array([ids.get(name, -1) for name in names], np.int64)
        for i in np.flatnonzero(out < 0).tolist():  # new names (one named twice gets one id)
            name = names[i]
            k = ids.get(name)
            if k is None:
                k = ids[name] = len(table)
                table.append(name)
                self.changed.add(k // CHUNK)
            out[i] = k
        return out.astype(np.uint32)

    def drop(self, ids) -> int:
        """Forget the keys ``ids`` (none of their rows is left); their ids are
        never handed out again.  Returns how many were dropped."""
        n = 0
        for i in ids:
            i = int(i)
            if i != ALL_KEY and 0 < i < len(self.names) and self.names[i] is not None:
                del self._ids[self.names[i]]
                self.names[i] = None
                self.changed.add(i // CHUNK)
                n += 1
        return n

    # ------------------------------------------------------------ persistence
    def chunks(self) -> list[int]:
        return list(range((len(self.names) - 1) // CHUNK + 1))

    def chunk_table(self, k: int) -> pa.Table:
        """Ids ``[k * CHUNK, (k + 1) * CHUNK)`` and their names (null: a hole, or the site-wide key)."""
        names = self.names[k * CHUNK:(k + 1) * CHUNK]
        return pa.table({"name": pa.array(names, pa.string())},
                        metadata={b"first": str(k * CHUNK).encode(), b"total": str(len(self.names)).encode()})

    def load_chunk(self, table: pa.Table) -> None:
        """Put a ``chunk_table`` back: every name under the id it had."""
        first = int((table.schema.metadata or {}).get(b"first", b"-1"))
        if first < 0 or first % CHUNK or table.num_columns != 1 or table.num_rows > CHUNK:
            raise ValueError("a key chunk that is not one this store wrote")
        names = table.column(0).to_pylist()
        end = max(first + len(names), int((table.schema.metadata or {}).get(b"total", b"0")))
        if len(self.names) < end:  # holes at the end stay holes: their ids are not handed out again
            self.names.extend([None] * (end - len(self.names)))
        for i, name in enumerate(names, first):
            if name is None:
                continue
            if not name or self._ids.get(name, i) != i or name == SITE_KEY:
                raise ValueError(f"key chunk holds {name!r} twice, or under two ids")
            self.names[i] = name
            self._ids[name] = i

    def live(self) -> int:
        """Keys held (the site-wide key included)."""
        return len(self._ids) - 1  # None and "*" both name the site-wide key

    def lookup(self, names) -> tuple[np.ndarray, np.ndarray]:
        """(the distinct ids of the known ``names``, sorted; for each name the
        index of its id there, or ``len(ids)`` for a name never seen)."""
        ids = [self._ids.get(n) for n in names]
        uniq = sorted({k for k in ids if k is not None})
        index = {k: i for i, k in enumerate(uniq)}
        return np.array(uniq, np.int64), np.array([index.get(k, len(uniq)) for k in ids], np.int64)
