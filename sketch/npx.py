"""Small numpy helpers the hot paths share."""

from __future__ import annotations

import numpy as np


def unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, sorted.  A sort and a comparison: numpy's own
    ``unique`` (hash-based since numpy 2.3) takes 50-70x longer on large arrays
    of many distinct 64-bit values (200 ms against 3 ms for 450,000 here)."""
    s = np.sort(np.asarray(a).reshape(-1))
    if len(s) < 2:
        return s
    keep = np.empty(len(s), bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
