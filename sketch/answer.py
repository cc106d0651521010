"""From shard answers to the answer a user reads.

Each shard answers a range query for K keys with three small arrays: the
register-value histogram of its slice (``K x 52`` ints at p = 14), its
distinct coupon count (-1 once any piece was dense) and its impressions.
Summing them over shards gives the histogram of the whole sketch, so the
estimate needs nothing else: a few hundred bytes per key cross the network
whatever the sketch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hll import Estimate, ertl_estimates, estimate_from_parts
from .sets import estimate_overlap


@dataclass(frozen=True)
class RangeResult:
    key: str | None
    start: int
    end: int
    estimate: Estimate
    impressions: int

    @property
    def unique_visitors(self) -> int:
        return self.estimate.unique_visitors

    def to_dict(self) -> dict:
        e = self.estimate
        return {"key": self.key, "start": self.start, "end": self.end,
                "unique_visitors": e.unique_visitors, "impressions": int(self.impressions),
                "relative_error": round(float(e.relative_error), 6),
                "interval": [int(np.floor(e.interval[0])), int(np.ceil(e.interval[1]))
                             if np.isfinite(e.interval[1]) else None],
                "exact": e.exact, "partial": e.partial}


def counted(counts: list[np.ndarray], imp: np.ndarray, count: np.ndarray, m: int) -> np.ndarray:
    """Which answers are counted from their coupons, decided on the whole sketch
    (sums over shards, so the shard count never changes an answer): every
    shard counted its coupons, and either the impressions of all shards are
    within the near-exact budget (2 m: each shard then read level-0 rows
    only, ``cover.gather_base``) or the distinct coupons are at most m / 8
    (the sparse form of the whole sketch; each shard counts up to that)."""
    every = np.all([c >= 0 for c in counts], axis=0)
    return every & ((imp <= 2 * m) | (count <= m // 8))


def merge_answers(answers: list[tuple[np.ndarray, np.ndarray, np.ndarray]], m: int,
                    registers_per_shard: int, shards_total: int) -> list[tuple[Estimate, int]]:
    """Merge shard answers (``hist``, ``sparse``, ``impressions``, one row per
    key) and estimate each key.  The shards' register ranges are disjoint, so
    merging their slices is summing their histograms.  Missing shards (fewer answers than
    ``shards_total``) make the answers partial: estimates and impressions
    are extrapolated from the register ranges that answered."""
    hist = sum(a[0] for a in answers)
    sparse = sum(np.maximum(a[1], 0) for a in answers)
    imp = sum(a[2] for a in answers)
    sparse_all = counted([a[1] for a in answers], imp, sparse, m)
    seen = registers_per_shard * len(answers)
    partial = len(answers) < shards_total
    raw = ertl_estimates(hist) if hist.shape[0] > 8 else None  # many rows (a series): one vectorized pass
    out = []
    for i in range(hist.shape[0]):
        est = estimate_from_parts(hist[i], int(sparse[i]) if sparse_all[i] else None, m, seen if partial else None,
                                  None if raw is None else raw[i])
        # impressions are counted on the shard of each event's visitor: the
        # shards that answered saw a uniform sample of them
        out.append((est, int(round(imp[i] * m / seen)) if partial else int(imp[i])))
    return out


def merge_reach(answers: list, m: int, registers_per_shard: int, shards_total: int, start: int, end: int,
                prefix: str | None) -> dict:
    """The reach answer from shard answers ``(hist, sparse, impressions, keys)``
    of one key set's union."""
    (est, imp), = merge_answers([a[:3] for a in answers], m, registers_per_shard, shards_total)
    out = RangeResult(None, start, end, est, imp).to_dict()
    del out["key"]
    out.update(keys=max(int(a[3]) for a in answers), prefix=prefix or None,
               frequency=round(float(imp / est.value), 4) if est.value > 0 else None)
    return out


def merge_overlap(answers: list, m: int, registers_per_shard: int, shards_total: int, start: int, end: int) -> dict:
    """The overlap answer from shard answers ``(joint histogram, counts, impressions)``."""
    joint = sum(a[0] for a in answers)
    imp = sum(a[2] for a in answers)
    count = sum(np.maximum(a[1], 0) for a in answers)
    ok = np.zeros(3, bool)
    ok[:2] = counted([a[1][:2] for a in answers], imp, count[:2], m)
    ok[2] = ok[:2].all() and all(a[1][2] >= 0 for a in answers)  # both sides counted: their union is too
    counts = np.where(ok, count, -1)
    seen = registers_per_shard * len(answers)
    partial = len(answers) < shards_total
    o = estimate_overlap(joint, counts, m, seen if partial else None)
    if partial:
        imp = np.round(imp * m / seen).astype(np.int64)
    out = {"start": start, "end": end, **o.to_dict()}
    out["a"]["impressions"], out["b"]["impressions"] = int(imp[0]), int(imp[1])
    out["partial"] = partial
    return out


def series_points(answers: list, m: int, registers_per_shard: int, shards_total: int, first: int, g: int,
                  starts, ends, bucket_seconds: int, now: float) -> list[dict]:
    """The points of one series call: window i covers cells ``[starts[i], ends[i])``
    of ``g`` buckets from bucket ``first``; ``complete`` false for a window ending after ``now``."""
    out = []
    t0 = ((first + np.asarray(starts, np.int64) * g) * bucket_seconds).tolist()
    t1 = ((first + np.asarray(ends, np.int64) * g) * bucket_seconds).tolist()
    for (est, imp), a, e in zip(merge_answers(answers, m, registers_per_shard, shards_total), t0, t1):
        p = RangeResult(None, a, e, est, imp).to_dict()
        del p["key"]
        p["complete"] = e <= now
        out.append(p)
    return out


def series_answer(keys: list, prefix: str | None, step: int, window: int | None, bucket_seconds: int,
                  points: list[dict]) -> dict:
    return {"keys": list(keys), "prefix": prefix or None, "step": step * bucket_seconds,
            "window": None if window is None else window * bucket_seconds, "cumulative": window is None,
            "start": points[0]["start"], "end": points[-1]["end"], "points": points}
