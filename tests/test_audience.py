"""Audience questions on the sketch layer (no Ray): reach across keys, overlap,
rolling and cumulative series, near-exact counts while sparse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from impressions.sketch import windows
from impressions.sketch.counter import LocalCounter
from impressions.sketch.hll import RegisterRange, coupons_from_hashes
from impressions.sketch.sets import estimate_overlap, union_histogram
from impressions.sketch.timeindex import RangeError
from tests.reference import Events
from tests.test_sealed import seal_all
from tests.test_store import KEYS, NOW, SMALL, _ingest, _stream

FIELDS = ("unique_visitors", "impressions", "interval", "relative_error", "exact", "partial")


def _loaded(tmp_path, shards, seal: bool, seed: int = 3):
    """A counter with every place data can live (sealed files too, when ``seal``) and its reference events."""
    rng = np.random.default_rng(seed)
    c = LocalCounter(SMALL, shards=shards)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 3000, now_b - 5
    _ingest(c, ev, *_stream(rng, 30_000, b_lo, b_hi))
    c.maintain()
    if seal:
        for s in c.stores:
            seal_all(s, tmp_path)
    _ingest(c, ev, *_stream(rng, 3_000, b_lo, b_hi))  # late events: runs on built slots, and the memtable
    return c, ev, rng, b_lo, b_hi


def _union_registers(ev, keys, b0, b1, p):
    return np.max([ev.registers(k, b0, b1, p) for k in keys], axis=0)


@pytest.mark.parametrize("shards,seal", [(1, False), (4, True)])
def test_reach_merges_the_sets_registers_and_sums_impressions(tmp_path, shards, seal):
    c, ev, rng, b_lo, b_hi = _loaded(tmp_path, shards, seal)
    p = SMALL.p
    for _ in range(12):
        b0 = int(rng.integers(b_lo - 5, b_hi))
        b1 = int(rng.integers(b0 + 1, b_hi + 5))
        keys = [str(k) for k in rng.choice(KEYS, int(rng.integers(1, 6)), replace=False)]
        want_regs = _union_registers(ev, keys, b0, b1, p)
        got = [s.reach(keys, None, b0, b1) for s in c.stores]
        hist = sum(g[0][0] for g in got)
        assert np.array_equal(hist, np.bincount(want_regs, minlength=len(hist))), (b0, b1, keys)
        assert sum(int(g[2][0]) for g in got) == sum(ev.impressions(k, b0, b1) for k in keys)
        # a set of one key is that key's answer; a prefix picks the same keys as listing them
        one = c.reach([keys[0]], start=b0 * 60, end=b1 * 60, now=NOW)
        direct = c.query([keys[0]], start=b0 * 60, end=b1 * 60, now=NOW)[0].to_dict()
        assert {f: one[f] for f in FIELDS} == {f: direct[f] for f in FIELDS}
    every = c.reach([], "ad-", last=3000, now=NOW)
    listed = c.reach(KEYS, None, last=3000, now=NOW)
    assert {f: every[f] for f in FIELDS} == {f: listed[f] for f in FIELDS} and every["keys"] == len(KEYS)
    site = c.unique(None, last=3000, now=NOW).to_dict()
    assert every["impressions"] == site["impressions"]  # every event is of one ad here
    assert every["frequency"] == pytest.approx(every["impressions"] / every["unique_visitors"], rel=1e-3)


@pytest.mark.parametrize("shards,seal", [(2, False), (4, True)])
def test_series_points_are_the_range_answers_of_their_windows(tmp_path, shards, seal):
    c, ev, rng, b_lo, b_hi = _loaded(tmp_path, shards, seal, seed=5)
    end = b_hi + 3
    cases = [(KEYS[:1], None, 40, 7), (KEYS[:3], None, 64, 16), ([None], None, 200, 60), (KEYS[2:4], None, 5, 5),
             ([], "ad-1", 30, 4), (KEYS[:1], None, None, 50), ([None], None, None, 128)]
    for names, prefix, w, s in cases:
        span = 2900
        plan = windows.plan_series(end - span, end, s, w)
        n_points = 0
        for first, g, n, starts, ends in plan:
            per_shard = [st.series(names, prefix, first, g, n, starts, ends) for st in c.stores]
            for i, (a, e) in enumerate(zip(starts, ends)):
                b0, b1 = first + int(a) * g, first + int(e) * g
                assert b1 - b0 == (w if w is not None else b1 - (end - span // s * s))
                for st, (h, sp, imp) in zip(c.stores, per_shard):
                    rh, rs, ri, _ = st.reach(names, prefix, b0, b1) if names != [None] else (
                        *st.query([None], b0, b1), 0)
                    assert np.array_equal(h[i], rh[0]) and sp[i] == rs[0] and imp[i] == ri[0], (names, w, s, i)
            n_points += len(starts)
        assert n_points == ((span - w) // s + 1 if w is not None else span // s)
    # through the counter: the last window ends at the range's end, each answer a range answer
    out = c.rolling(KEYS[:2], step=60, window=240, last=3000, now=NOW)
    last = out["points"][-1]
    direct = c.reach(KEYS[:2], start=last["start"], end=last["end"], now=NOW)
    assert {f: last[f] for f in FIELDS} == {f: direct[f] for f in FIELDS}
    assert last["end"] == (int(NOW // 60) + 1) * 60 and not last["complete"]
    assert all(p["complete"] for p in out["points"][:-1])
    cum = c.rolling([None], step=300, window=None, last=3000, now=NOW)
    assert [p["start"] for p in cum["points"]] == [cum["start"]] * len(cum["points"])
    assert all(a["unique_visitors"] <= b["unique_visitors"] or not a["exact"]
               for a, b in zip(cum["points"], cum["points"][1:]))


def test_a_series_that_cannot_be_answered_is_refused_saying_why():
    for args, words in [((0, 100, 10, 200), "longer than the range"), ((0, 100, 0, 10), "at least one bucket"),
                        ((0, 43200, 1, 60), "points asked for"), ((0, 43200, 7, 43199), "pieces"),
                        ((0, 5, 10, None), "no whole step")]:
        with pytest.raises(RangeError, match=words):
            windows.plan_series(*args)


def test_near_exact_counts_while_sparse_are_far_inside_the_register_error():
    """10,000 visitors over a day, seen 1-2 times each: counted from coupons (0.1 % RMSE at most),
    the same answer before and after the rollups are built and the memtable flushed."""
    cfg = SMALL.__class__(p=14)
    errs = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        c = LocalCounter(cfg, shards=4)
        n = 10_000
        h = rng.integers(0, 2**64, n, dtype=np.uint64)
        h = np.concatenate([h, h[: n // 2]])
        ts = NOW - rng.uniform(0, 86000, len(h))  # inside the last 1d (1,440 whole buckets)
        c.ingest(ts, ["ad"] * len(h), hashes=h, now=NOW)
        before = c.unique("ad", last="1d", now=NOW).to_dict()
        c.maintain(NOW)
        after = c.unique("ad", last="1d", now=NOW).to_dict()
        assert before == after
        assert after["relative_error"] < 0.001 and not after["exact"]
        lo, hi = after["interval"]
        assert lo <= n <= hi
        errs.append(after["unique_visitors"] / n - 1)
    assert math.sqrt(np.mean(np.square(errs))) <= 0.001, errs


def _joint(a: np.ndarray, b: np.ndarray, rr: RegisterRange) -> np.ndarray:
    ra, rb = (rr.registers_from_coupons(coupons_from_hashes(x)) for x in (a, b))
    H = rr.prec.hist_len
    return np.bincount(ra.astype(np.int64) * H + rb, minlength=H * H).reshape(H, H)


def test_overlap_intervals_cover_the_truth_and_the_joint_estimate_beats_inclusion_exclusion():
    rr = RegisterRange(12, 1, 0)
    rng = np.random.default_rng(11)
    for jac, trials in ((0.5, 40), (0.05, 40)):
        n_u = 60_000
        both = int(jac * n_u)
        only = (n_u - both) // 2
        covered, err_mle, err_ie = 0, [], []
        for _ in range(trials):
            h = rng.integers(0, 2**64, n_u, dtype=np.uint64)
            a, b = h[: only + both], h[only:]
            joint = _joint(a, b, rr)
            o = estimate_overlap(joint, None, rr.prec.m)
            assert np.array_equal(union_histogram(joint), np.bincount(
                rr.registers_from_coupons(coupons_from_hashes(h)), minlength=rr.prec.hist_len))
            lo, hi = o.interval
            covered += lo <= both <= hi
            err_mle.append(o.both / both - 1)
            err_ie.append(o.ie / both - 1)
        assert covered >= 0.85 * trials, (jac, covered)
        if jac < 0.1:
            assert np.sqrt(np.mean(np.square(err_mle))) < 0.8 * np.sqrt(np.mean(np.square(err_ie)))
    # disjoint sets: too small to tell from zero, and said so
    h = rng.integers(0, 2**64, 40_000, dtype=np.uint64)
    o = estimate_overlap(_joint(h[:20_000], h[20_000:], rr), None, rr.prec.m)
    d = o.to_dict()
    assert not d["distinguishable"] and "too small to tell from zero" in d["note"] and d["both"]["interval"][0] == 0


def test_overlap_through_the_shards_counts_coupons_while_sparse_and_registers_when_dense():
    c = LocalCounter(SMALL.__class__(p=14), shards=4)
    rng = np.random.default_rng(4)
    h = rng.integers(0, 2**64, 300_000, dtype=np.uint64)
    small_a, small_b = h[:3000], h[2000:4000]  # 1,000 in both
    big_a, big_b = h[10_000:160_000], h[100_000:300_000]  # 60,000 in both
    for key, part in (("s-a", small_a), ("s-b", small_b), ("b-a", big_a), ("b-b", big_b)):
        c.ingest(NOW - rng.uniform(0, 3500, len(part)), [key] * len(part), hashes=part, now=NOW)
    c.maintain(NOW)
    small = c.overlap((["s-a"], None), (["s-b"], None), last="1h", now=NOW)
    assert small["both"]["method"] == "coupons" and abs(small["both"]["unique_visitors"] - 1000) <= 2
    assert small["a"]["unique_visitors"] == 3000 and small["union"]["unique_visitors"] == 4000
    big = c.overlap((["b-a"], None), ([], "b-b"), last="1h", now=NOW)
    assert big["both"]["method"] == "joint-mle"
    lo, hi = big["both"]["interval"]
    assert lo <= 60_000 <= hi and big["distinguishable"]
    assert big["a"]["impressions"] == len(big_a) and big["b"]["impressions"] == len(big_b)
    assert big["jaccard"] == pytest.approx(60_000 / 290_000, rel=0.05)


def test_whether_an_answer_is_counted_does_not_depend_on_the_shard_count():
    """Keys on both sides of the near-exact budget (2 m impressions) and of the count limit (m / 8
    visitors): 1, 2, 4 and 8 shards give the same answers, fresh and after the rollups."""
    cfg = SMALL.__class__(p=12, leaf_level=4, segment_level=8)
    m = 1 << cfg.p
    rng = np.random.default_rng(8)
    now_b = int(NOW // 60)
    parts = []
    for i, (imps, visitors) in enumerate([(2 * m - 300, 3000), (2 * m + 300, 3000), (2 * m - 5, 5000),
                                          (3 * m, m // 8 - 40), (3 * m, m // 8 + 40), (20 * m, 200)]):
        pool = rng.integers(0, 2**64, visitors, dtype=np.uint64)
        h = np.concatenate([pool, pool[rng.integers(0, visitors, imps - visitors)]])
        b = rng.integers(now_b - 2000, now_b - 10, imps)
        parts.append((np.full(imps, i), b, h))
    k, b, h = (np.concatenate(x) for x in zip(*parts))
    names = [f"k{i}" for i in range(len(parts))]
    answers = {}
    for shards in (1, 2, 4, 8):
        c = LocalCounter(cfg, shards=shards)
        c.ingest(b * 60 + 1.0, [names[i] for i in k], hashes=h, now=NOW)
        got = []
        for stage in ("fresh", "built"):
            if stage == "built":
                c.maintain(NOW)
            got += [r.to_dict() for r in c.query(names, last=2100, now=NOW)]
            got.append(c.reach(names[:2], last=2100, now=NOW))
            got.append(c.reach(names[3:5], last=2100, now=NOW))
        answers[shards] = got
    for shards in (2, 4, 8):
        assert answers[shards] == answers[1], shards
    exact = [a["relative_error"] < 0.001 for a in answers[1][: len(names)]]
    assert exact == [True, False, True, True, False, True]  # counted: within the budget, or few visitors
