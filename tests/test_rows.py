"""The row kernel: one-sort level building equals level-by-level merging."""

import numpy as np
import pytest

from impressions.sketch import npx
from impressions.sketch.hll import RegisterRange, coupon_register, coupons_from_hashes
from impressions.sketch.rows import _build_levels_by_merging, build_levels, level_up, merge, rows_from_events


def _same(a, b):
    assert a.level == b.level
    assert np.array_equal(a.code, b.code)
    assert np.array_equal(a.off, b.off)
    assert np.array_equal(a.dense, b.dense)
    assert np.array_equal(a.coupons, b.coupons)
    assert np.array_equal(a.regs, b.regs)


def _brute_measures(base, top, prec):
    """Each level's nodes and their rule measure, by brute force over the base:
    R if a dense base row lies beneath, else min(R, 4 x distinct coupon indices)."""
    keys = (base.code >> np.uint64(32)).astype(np.int64)
    nodes = (base.code & np.uint64(0xFFFFFFFF)).astype(np.int64)
    out = []
    for lvl in range(top + 1):
        m = {}
        for r in range(len(base)):
            k = (int(keys[r]), int(nodes[r]) >> lvl)
            d = m.setdefault(k, [False, set()])
            if base.dense[r] >= 0:
                d[0] = True
            d[1].update((base.coupons[base.off[r]:base.off[r + 1]] >> 6).tolist())
        out.append({k: prec.R if d else min(prec.R, 4 * len(c)) for k, (d, c) in m.items()})
    return out


def _levels_as_the_rule_says(base, top, prec):
    """``build_levels`` of ``base``, checked against level-by-level merging and the rule by brute force."""
    fast, fsum = build_levels(base, top, prec)
    slow, ssum = _build_levels_by_merging(base, top, prec)
    _same(fsum, ssum)  # the full merge at the top is the same whatever the path
    measures = _brute_measures(base, top, prec)
    full = base
    for lvl in range(1, top + 1):
        full, _ = level_up([full], prec, lvl)  # every node of the level, merged
        kids = measures[lvl - 1]
        want = sorted((k << 32) | j for (k, j), size in measures[lvl].items()
                      if 2 * size <= sum(kids.get((k, c), 0) for c in (2 * j, 2 * j + 1)))
        assert fast[lvl].code.tolist() == want, lvl
        _same(fast[lvl], full.take(np.isin(full.code, fast[lvl].code)))
    return fast


def test_build_levels_counts_a_visitor_seen_again_once_from_the_level_its_buckets_share():
    """The same visitors in many buckets: a node is as big as each of its children (kept); visitors new in
    every bucket: a node is the sum of its children (not kept); buckets placed so that two repeats part at
    every bit, the counts must say from which level on each coupon repeats."""
    rng = np.random.default_rng(7)
    prec = RegisterRange(10)  # 1,024 bytes: the nodes below stay under it
    same = rng.integers(0, 2**64, 40, dtype=np.uint64)
    buckets = 1_000_000 + np.array([0, 1, 2, 3, 5, 6, 9, 12, 16, 17, 24, 31, 32, 47, 63])
    keys, bs, hs = [], [], []
    for b in buckets:
        keys += [1] * len(same) + [2] * len(same)
        bs += [b] * (2 * len(same))
        hs += [same, rng.integers(0, 2**64, len(same), dtype=np.uint64)]
    keys, bs, h = np.array(keys, np.uint32), np.array(bs), np.concatenate(hs)
    base = rows_from_events(keys, bs, coupons_from_hashes(h), prec)
    fast = _levels_as_the_rule_says(base, 6, prec)
    kept = {lvl: set((fast[lvl].code >> np.uint64(32)).tolist()) for lvl in range(1, 7)}
    assert all(k == {1} for k in kept.values()), kept


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shards", [1, 8])
def test_build_levels_keeps_exactly_what_the_rule_says_with_the_right_contents(seed, shards):
    rng = np.random.default_rng(seed)
    prec = RegisterRange(10, shards, shards - 1)
    n = 20_000
    keys = np.minimum(rng.zipf(1.3, n), 30).astype(np.uint32)
    buckets = 1_000_000 + rng.integers(0, 40, n)
    pool = rng.integers(0, 2**64, 3000, dtype=np.uint64)
    h = np.where(rng.random(n) < 0.5, pool[rng.integers(0, 3000, n)], rng.integers(0, 2**64, n, dtype=np.uint64))
    sel = prec.shard_of_hashes(h) == prec.shard
    base = rows_from_events(keys[sel], buckets[sel], coupons_from_hashes(h[sel]), prec)
    assert (base.dense >= 0).any() and len(base.coupons)
    fast = _levels_as_the_rule_says(base, 6, prec)
    assert sum(len(t) for t in fast[1:]) > 0


def test_merge_adds_impressions_and_unions_visitors():
    prec = RegisterRange(10)
    a = rows_from_events(np.array([1, 1, 2], np.uint32), np.array([5, 5, 5]),
                         coupons_from_hashes(np.array([1 << 60, 1 << 61, 1 << 60], np.uint64)), prec)
    b = rows_from_events(np.array([1], np.uint32), np.array([5]), coupons_from_hashes(np.array([1 << 60], np.uint64)), prec)
    m = merge([a, b], prec)
    assert m.imp.tolist() == [3, 1]
    assert m.lengths.tolist() == [2, 1]


def test_max_rows_takes_the_max_of_every_row_into_its_target_whatever_the_order():
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 40, (60, 256)).astype(np.uint8)
    for targets in (np.sort(rng.integers(0, 9, 60)), rng.integers(0, 9, 60), np.arange(60) % 13):
        index = rng.permutation(60)
        for idx in (None, index):
            out = rng.integers(0, 20, (13, 256)).astype(np.uint8)
            want = out.copy()
            for i, k in enumerate(targets):
                want[k] = np.maximum(want[k], rows[i if idx is None else idx[i]])
            npx.max_rows(out, targets, rows, idx)
            assert np.array_equal(out, want)
    out = np.zeros((2, 4), np.uint8)
    npx.max_rows(out, np.zeros(0, np.int64), rows[:0])
    assert not out.any()


@pytest.mark.parametrize("per_row", [1, 300])  # few coupons a range (one gather) and many (slices joined once)
def test_add_gather_reads_the_same_coupons_and_positions_however_it_reads(per_row):
    from impressions.sketch.cover import SLICES_FROM, Pieces

    rr = RegisterRange(14, 2, 0)
    rng = np.random.default_rng(per_row)
    n = 40 * per_row
    keys = np.repeat(np.arange(1, 41), per_row)
    h = rng.integers(0, 1 << 63, 20 * n, dtype=np.uint64)
    c = coupons_from_hashes(h)
    c = c[coupon_register(c, 14) < rr.hi][:n]  # this range's coupons
    t = rows_from_events(keys[:len(c)], np.full(len(c), 7), c, rr)
    r0 = np.array([0, 5, 9, 20, 30]) % len(t)
    r1 = np.minimum(r0 + np.array([3, 1, 0, 8, 4]), len(t))
    pos = np.array([4, 0, 2, 1, 3])
    pc = Pieces(5)
    pc.add_gather(t, pos, r0, r1)
    want = np.concatenate([t.coupons[t.off[a]:t.off[b]] for a, b in zip(r0, r1)])
    assert (int(want.size) >= SLICES_FROM * len(r0)) == (per_row > 1)  # both ways of reading are taken
    assert np.array_equal(pc.coupon_array(), want)
    assert np.array_equal(np.concatenate(pc.ck), np.repeat(pos, t.off[r1] - t.off[r0]))
    assert pc.rows == int((r1 - r0).sum()) and pc.bytes == 4 * want.size
