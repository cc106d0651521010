"""The row kernel: one-sort level building equals level-by-level merging."""

import numpy as np
import pytest

from sketch.hll import Precision, coupons_from_hashes
from sketch.rows import _build_levels_by_merging, build_levels, merge, rows_from_events


def _same(a, b):
    assert a.level == b.level
    assert np.array_equal(a.code, b.code)
    assert np.array_equal(a.off, b.off)
    assert np.array_equal(a.dense, b.dense)
    assert np.array_equal(a.coupons, b.coupons)
    assert np.array_equal(a.regs, b.regs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shards", [1, 8])
def test_build_levels_equals_merging_level_by_level(seed, shards):
    rng = np.random.default_rng(seed)
    prec = Precision(10, shards, shards - 1)
    n = 40_000
    keys = np.minimum(rng.zipf(1.3, n), 50).astype(np.uint32)
    buckets = 1_000_000 + rng.integers(0, 40, n)
    pool = rng.integers(0, 2**64, 3000, dtype=np.uint64)
    h = np.where(rng.random(n) < 0.5, pool[rng.integers(0, 3000, n)], rng.integers(0, 2**64, n, dtype=np.uint64))
    h = h[prec.shard_of_hashes(h) == prec.shard]
    base = rows_from_events(keys[: len(h)], buckets[: len(h)], coupons_from_hashes(h), prec)
    assert (base.dense >= 0).any() and len(base.coupons)
    fast, fsum = build_levels(base, 6, prec)
    slow, ssum = _build_levels_by_merging(base, 6, prec)
    for a, b in zip(fast, slow):
        _same(a, b)
    _same(fsum, ssum)
    assert sum(len(t) for t in fast[1:]) > 0


def test_merge_adds_impressions_and_unions_visitors():
    prec = Precision(10)
    a = rows_from_events(np.array([1, 1, 2], np.uint32), np.array([5, 5, 5]),
                         coupons_from_hashes(np.array([1 << 60, 1 << 61, 1 << 60], np.uint64)), prec)
    b = rows_from_events(np.array([1], np.uint32), np.array([5]), coupons_from_hashes(np.array([1 << 60], np.uint64)), prec)
    m = merge([a, b], prec)
    assert m.imp.tolist() == [3, 1]
    assert m.lengths.tolist() == [2, 1]
