"""Re-sharding moves register slices: results never change."""

import numpy as np
import pytest

from impressions.sketch.counter import LocalCounter
from impressions.sketch.reshard import reshard, sources_of
from tests.reference import Events
from tests.test_store import KEYS, NOW, SMALL, _ingest, _stream


def _reshaped(c: LocalCounter, shards: int) -> LocalCounter:
    new = LocalCounter(c.config, shards)
    old = c.shards
    new.stores = [reshard([c.stores[i] for i in sources_of(s, shards, old)], s, shards) for s in range(shards)]
    return new


def _check(c: LocalCounter, ev: Events, rng, b_lo, b_hi, n=25):
    for _ in range(n):
        b0 = int(rng.integers(b_lo - 5, b_hi))
        b1 = int(rng.integers(b0 + 1, b_hi + 10))
        for key in [None, KEYS[0], KEYS[int(rng.integers(1, len(KEYS)))]]:
            assert np.array_equal(c.registers(key, b0, b1), ev.registers(key, b0, b1, c.config.p)), (key, b0, b1)
            got = c.query([key], start=b0 * 60, end=b1 * 60, now=NOW)[0].impressions
            assert got == ev.impressions(key, b0, b1), (key, b0, b1)


@pytest.mark.parametrize("path", [(2, 4, 1), (1, 8, 2), (4, 2, 8)])
def test_split_and_merge_keep_every_register_and_count(path):
    rng = np.random.default_rng(sum(path))
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 3000, now_b - 5
    c = LocalCounter(SMALL, path[0])
    ev = Events(KEYS)
    # a state with every kind of place filled: built segments, upper nodes, leaves, runs, memtable
    _ingest(c, ev, *_stream(rng, 30_000, b_lo, b_hi - 400))
    c.maintain()
    _ingest(c, ev, *_stream(rng, 6_000, b_hi - 400, b_hi))
    c.stores[0].maintain()  # shards at different stages of maintenance
    _ingest(c, ev, *_stream(rng, 2_000, b_lo, b_hi))  # late data: runs on built slots
    for shards in path[1:]:
        c = _reshaped(c, shards)
        _check(c, ev, rng, b_lo, b_hi)
        _ingest(c, ev, *_stream(rng, 3_000, b_lo, b_hi))  # the new layout keeps working
        c.maintain()
        _check(c, ev, rng, b_lo, b_hi)


def test_sources_of():
    assert sources_of(3, 4, 2) == [1]
    assert sources_of(0, 1, 4) == [0, 1, 2, 3]
    assert sources_of(1, 2, 8) == [4, 5, 6, 7]
