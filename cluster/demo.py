"""The README's main job: a realistic sample stream, ingested, then answers
for a few keys and ranges printed next to the exact counts."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from cluster.workload import generate
from sketch.counter import Counter
from sketch.hashing import hash_visitors
from sketch.store import SketchConfig


def sample_stream(events: int, ads: int, days: float, end: float, seed: int = 7) -> pa.Table:
    return generate(events, days=days, visitors=max(1000, events // 4), keys=ads, seed=seed, end=end)


def exact(table: pa.Table, key, start: float, end: float) -> tuple[int, int]:
    ts = table["ts"].to_numpy()
    m = (ts >= start) & (ts < end)
    if key is not None:
        m &= np.asarray(table["key"].to_numpy(zero_copy_only=False) == key)
    h = hash_visitors(table["visitor"].filter(pa.array(m)))
    return len(np.unique(h)), int(m.sum())


def run(events: int = 2_000_000, ads: int = 1000, days: float = 3.0, shards: int = 2) -> None:
    now = time.time()
    print(f"generating {events:,} impressions of {ads:,} ads over {days:g} days ...")
    table = sample_stream(events, ads, days, now)
    counter = Counter(SketchConfig(), shards=shards)
    t = time.perf_counter()
    report = counter.ingest(table["ts"].to_numpy(), table["key"], visitors=table["visitor"], now=now)
    counter.maintain()
    dt = time.perf_counter() - t
    print(f"ingested {report.accepted:,} events in {dt:.2f} s ({report.accepted / dt / 1e6:.2f} M events/s, "
          f"{shards} shards in this process)\n")
    print(f"{'key':>10} {'range':>6} {'unique (estimate)':>18} {'95% interval':>22} {'exact unique':>13} "
          f"{'impressions':>12} {'ms':>6}")
    for key in (None, "ad-0", "ad-3", f"ad-{ads - 1}"):
        for last in ("15m", "1h", "1d", "3d"):
            t = time.perf_counter()
            r = counter.unique(key, last=last, now=now)
            ms = (time.perf_counter() - t) * 1e3
            true, imp = exact(table, key, r.start, r.end)
            lo, hi = r.estimate.interval
            print(f"{key or 'site-wide':>10} {last:>6} {r.unique_visitors:>18,} {f'[{lo:,.0f}, {hi:,.0f}]':>22} "
                  f"{true:>13,} {r.impressions:>12,} {ms:>6.2f}")
    assert r.impressions == imp
