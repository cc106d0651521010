"""Key names and the dense integer ids a shard store uses for them."""

from __future__ import annotations

import numpy as np

ALL_KEY = 0  # the site-wide key's id in every store
SITE_KEY = "*"  # an event with this key counts toward the site-wide total only


class KeyTable:
    """Key name <-> dense integer id.  Id 0 is the site-wide key (name None,
    also reached as ``"*"``).  Ids are per store: stored states carry names."""

    def __init__(self):
        self._ids: dict[str | None, int] = {None: ALL_KEY, SITE_KEY: ALL_KEY}
        self.names: list[str | None] = [None]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str | None) -> int | None:
        return self._ids.get(name)

    def ids(self, names) -> np.ndarray:
        """Ids of ``names`` (created as needed), as uint32."""
        out = np.empty(len(names), np.uint32)
        ids, table = self._ids, self.names
        for i, name in enumerate(names):
            k = ids.get(name)
            if k is None:
                k = ids[name] = len(table)
                table.append(name)
            out[i] = k
        return out

    def drop(self, ids) -> int:
        """Forget the keys ``ids`` (none of their rows is left); their ids are
        never handed out again.  Returns how many were dropped."""
        n = 0
        for i in ids:
            i = int(i)
            if i != ALL_KEY and 0 < i < len(self.names) and self.names[i] is not None:
                del self._ids[self.names[i]]
                self.names[i] = None
                n += 1
        return n

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
