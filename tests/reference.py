"""Brute-force reference: registers and counts straight from raw events."""

from __future__ import annotations

import numpy as np


def ranks(h: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(register index, rank) of each 64-bit hash at precision p, by the definition."""
    h = np.asarray(h, np.uint64)
    q = 64 - p
    rest = h & np.uint64((1 << q) - 1)
    bitlen = np.frexp(rest.astype(np.float64))[1]  # exact: rest < 2**53 for p >= 11
    return (h >> np.uint64(q)).astype(np.int64), (q - bitlen + 1).astype(np.uint8)


def registers(h: np.ndarray, p: int) -> np.ndarray:
    out = np.zeros(1 << p, np.uint8)
    if len(h):
        idx, r = ranks(h, p)
        np.maximum.at(out, idx, r)
    return out


class Events:
    """Raw events kept for checking: key index (-1 = none), bucket, hash."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.k = np.zeros(0, np.int64)
        self.b = np.zeros(0, np.int64)
        self.h = np.zeros(0, np.uint64)

    def add(self, k, b, h):
        self.k = np.concatenate([self.k, k])
        self.b = np.concatenate([self.b, b])
        self.h = np.concatenate([self.h, np.asarray(h, np.uint64)])

    def select(self, key: str | None, b0: int, b1: int) -> np.ndarray:
        m = (self.b >= b0) & (self.b < b1)
        if key is not None:
            m &= self.k == self.keys.index(key)
        return m

    def registers(self, key, b0, b1, p):
        return registers(self.h[self.select(key, b0, b1)], p)

    def impressions(self, key, b0, b1) -> int:
        return int(self.select(key, b0, b1).sum())

    def distinct(self, key, b0, b1) -> int:
        return len(np.unique(self.h[self.select(key, b0, b1)]))
