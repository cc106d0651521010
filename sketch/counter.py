"""An in-process counter: ``S`` shard stores behind the user-level API.

This is the whole system without Ray: the same validation, the same
per-shard batches, the same shard stores and the same answer merging
that the actor cluster uses, called directly.  It is what the tests use as
the reference for the cluster, and what the core benchmark measures.

    >>> now = 1_800_000_000.0
    >>> c = LocalCounter(SketchConfig(), shards=2)
    >>> c.ingest(ts=[now, now], keys=["ad-1", "ad-2"], visitors=["u1", "u1"], now=now).accepted
    2
    >>> c.unique("ad-1", last="15m", now=now).unique_visitors
    1
    >>> c.unique(None, last="15m", now=now).to_dict()["impressions"]
    2
"""

from __future__ import annotations

import time

import numpy as np

from .answer import RangeResult, merge_answers, merge_overlap, merge_reach, series_answer, series_points
from .events import IngestReport, prepare
from .store import ShardStore, SketchConfig
from .timeindex import BucketRange
from .windows import plan_series


class LocalCounter:
    def __init__(self, config: SketchConfig | None = None, shards: int = 1):
        self.config = config or SketchConfig()
        self.stores = [ShardStore(self.config, s, shards) for s in range(shards)]
        self.rr = self.stores[0].rr

    @property
    def shards(self) -> int:
        return len(self.stores)

    def ingest(self, ts, keys, visitors=None, hashes=None, now: float | None = None) -> IngestReport:
        """Validate and add events; returns the ingest report."""
        cfg = self.config
        batch, report = prepare(ts, keys, visitors=visitors, hashes=hashes,
                                now=time.time() if now is None else now, bucket_seconds=cfg.bucket_seconds,
                                retention_buckets=cfg.retention_buckets, future_seconds=cfg.future_seconds)
        for store, part in zip(self.stores, batch.split(cfg.p, self.shards)):
            store.apply(part.key_names, part.key_index, part.bucket, part.coupon)
        return report

    def maintain(self, now: float | None = None) -> None:
        for store in self.stores:
            store.maintain(now)

    def query(self, keys, *, last=None, start=None, end=None, now: float | None = None) -> list[RangeResult]:
        """Unique visitors and impressions for each key (None = site-wide)."""
        rng = self.config.resolve(now=time.time() if now is None else now, last=last, start=start, end=end)
        return self.query_range(keys, rng)

    def query_range(self, keys, rng: BucketRange) -> list[RangeResult]:
        """``query`` for a range already resolved."""
        keys = list(keys)
        answers = [store.query(keys, rng.b0, rng.b1) for store in self.stores]
        merged = merge_answers(answers, self.rr.prec.m, self.rr.R, self.shards)
        return [RangeResult(k, rng.start, rng.end, est, imp) for k, (est, imp) in zip(keys, merged)]

    def _merge_args(self):
        return self.rr.prec.m, self.rr.R, self.shards

    def reach(self, keys=(), prefix: str | None = None, *, now: float | None = None, **rng) -> dict:
        """Unique visitors of the union of a key set (``keys``, and every key starting with ``prefix``)."""
        r = self.config.resolve(now=time.time() if now is None else now, **rng)
        answers = [s.reach(list(keys), prefix, r.b0, r.b1) for s in self.stores]
        return merge_reach(answers, *self._merge_args(), r.start, r.end, prefix)

    def overlap(self, a: tuple, b: tuple, *, now: float | None = None, **rng) -> dict:
        """Visitors of both key sets, each ``(keys, prefix)``."""
        r = self.config.resolve(now=time.time() if now is None else now, **rng)
        answers = [s.overlap(a, b, r.b0, r.b1) for s in self.stores]
        return merge_overlap(answers, *self._merge_args(), r.start, r.end)

    def rolling(self, keys=(None,), prefix: str | None = None, *, step: int, window: int | None,
                now: float | None = None, **rng) -> dict:
        """Trailing ``window`` (buckets) every ``step`` buckets, or cumulative (``window=None``)."""
        now = time.time() if now is None else now
        r = self.config.resolve(now=now, **rng)
        points = []
        for first, g, n, starts, ends in plan_series(r.b0, r.b1, step, window):
            answers = [s.series(list(keys), prefix, first, g, n, starts, ends) for s in self.stores]
            points += series_points(answers, *self._merge_args(), first, g, starts, ends, r.bucket_seconds, now)
        return series_answer(list(keys), prefix, step, window, r.bucket_seconds, points)

    def unique(self, key=None, **kw) -> RangeResult:
        return self.query([key], **kw)[0]

    def registers(self, key, b0: int, b1: int):
        """The full dense sketch (all shards' slices concatenated)."""
        return np.concatenate([s.registers(key, b0, b1) for s in self.stores])
