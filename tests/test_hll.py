import math

import numpy as np
import pytest

from impressions.sketch.counter import LocalCounter
from impressions.sketch.hll import (
    EXACT_MAX,
    Precision,
    RegisterRange,
    coupons_from_hashes,
    ertl_estimate,
    estimate_from_parts,
    register_of_hash,
)
from impressions.sketch.store import SketchConfig
from tests.reference import registers


def test_register_of_known_hashes():
    # top 14 bits = 8192, nothing below: the largest rank, 64 - 14 + 1
    assert register_of_hash(0x8000000000000000, 14) == (8192, 51)
    # index 5, first one bit of the remaining 50 at position 40 -> 9 zeros, rank 10
    assert register_of_hash((5 << 50) | (1 << 40), 14) == (5, 10)
    assert register_of_hash((1 << 64) - 1, 14) == ((1 << 14) - 1, 1)
    prec = Precision(14)
    for h, want in [(0x8000000000000000, (8192, 51)), ((5 << 50) | (1 << 40), (5, 10)), ((5 << 50) | 1, (5, 50))]:
        reg, rank = prec.coupon_registers(coupons_from_hashes(np.array([h], np.uint64)))
        assert (int(reg[0]), int(rank[0])) == want


@pytest.mark.parametrize("p", [8, 11, 14, 18])
@pytest.mark.parametrize("shards", [1, 4])
def test_coupons_give_exactly_the_dense_registers(p, shards):
    rng = np.random.default_rng(p)
    h = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
    # include hashes with long zero runs, so every rank branch is exercised
    h[:64] = np.uint64(1) << np.arange(64, dtype=np.uint64)
    h[64:128] = (h[64:128] >> np.uint64(20)) << np.uint64(20)
    full = np.concatenate([RegisterRange(p, shards, s).registers_from_coupons(
        coupons_from_hashes(h[RegisterRange(p, shards, s).shard_of_hashes(h) == s])) for s in range(shards)])
    if p >= 11:  # the reference's float trick is exact for rest < 2**53
        assert np.array_equal(full, registers(h, p))
    else:
        want = np.zeros(1 << p, np.uint8)
        for x in h.tolist():
            i, r = register_of_hash(x, p)
            want[i] = max(want[i], r)
        assert np.array_equal(full, want)


def test_estimator_empty_and_full():
    assert ertl_estimate(np.r_[16384, np.zeros(51)]) == 0.0
    e = estimate_from_parts(np.r_[16384, np.zeros(51)], 0, 16384)
    assert e.value == 0 and e.exact
    e = estimate_from_parts(np.r_[16384, np.zeros(51)], None, 16384)
    assert e.value == 0 and not e.exact


def _rel_errors(n, trials, p=14, seed=0):
    rng = np.random.default_rng(seed + n)
    cfg = SketchConfig(p=p)
    now = 1_800_000_000
    errs, exact = [], []
    for _ in range(trials):
        c = LocalCounter(cfg)
        h = rng.integers(0, 2**64, n, dtype=np.uint64)
        c.ingest(np.full(n, float(now)), ["k"] * n, hashes=h, now=now)
        r = c.unique("k", last=1, now=now)
        true = len(np.unique(h))
        errs.append(r.estimate.value / true - 1)
        exact.append(r.estimate.exact)
        assert r.impressions == n
        lo, hi = r.estimate.interval
        assert lo <= r.estimate.value <= hi
    return np.array(errs), exact


@pytest.mark.parametrize("n,trials", [(1, 20), (10, 20), (100, 20), (1000, 20), (10_000, 10),
                                      (100_000, 5), (1_000_000, 3)])
def test_accuracy_within_three_standard_errors(n, trials):
    errs, exact = _rel_errors(n, trials)
    rmse = float(np.sqrt(np.mean(errs ** 2)))
    assert rmse <= 3 * 1.04 / math.sqrt(1 << 14), (n, rmse, errs)
    if n <= 1000:
        assert np.abs(errs).max() < 0.001
        assert all(exact)  # counted from coupons, not estimated
    if n >= 10_000:
        assert not any(exact)


def test_partial_answer_is_unbiased_and_wider():
    rng = np.random.default_rng(7)
    n = 200_000
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    prec = [RegisterRange(14, 4, s) for s in range(4)]
    hists = []
    for s, pr in enumerate(prec):
        regs = pr.registers_from_coupons(coupons_from_hashes(h[pr.shard_of_hashes(h) == s]))
        hists.append(np.bincount(regs, minlength=52))
    full = estimate_from_parts(sum(hists), None, 1 << 14)
    part = estimate_from_parts(sum(hists[:3]), None, 1 << 14)
    assert part.partial and not full.partial
    assert part.relative_error > full.relative_error
    assert abs(part.value / n - 1) < 3 * part.relative_error
    assert part.interval[0] <= n <= part.interval[1]


def test_exact_threshold_is_the_one_percent_birthday_bound():
    k = EXACT_MAX
    assert k * k / 2 / (1 << 26) <= 0.01 < (k + 1) ** 2 / 2 / (1 << 26)
