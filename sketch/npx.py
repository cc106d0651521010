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


def max_rows(out: np.ndarray, targets: np.ndarray, rows: np.ndarray, index: np.ndarray | None = None) -> None:
    """``out[targets[i]] = max(out[targets[i]], rows[index[i]])`` for every i (``index`` default: i), with
    ``targets`` that may repeat: one numpy max per run of equal targets (sorted targets make one a target).
    Register rows are a few KB each: ``np.maximum.reduceat`` along them took 30x longer (2.5 ms against
    0.08 for 121 rows of 8 KB here), ``np.maximum.at`` on rows longer still."""
    t = np.asarray(targets)
    if not len(t):
        return
    bounds = [0, *(np.flatnonzero(t[1:] != t[:-1]) + 1).tolist(), len(t)]
    firsts = t[bounds[:-1]].tolist()
    for k, a, b in zip(firsts, bounds[:-1], bounds[1:]):
        dst = out[k]
        src = rows[a:b] if index is None else rows[index[a:b]]
        np.maximum(dst, src[0] if b - a == 1 else src.max(axis=0), out=dst)
