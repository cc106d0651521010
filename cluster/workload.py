"""Deterministic, seeded impression streams with a realistic shape.

* **time**: ``days`` days ending at ``end``, with a daily cycle (traffic at
  its peak is ``(1 + swing) / (1 - swing)`` times the trough), sorted by time
  as an ad server would emit them;
* **visitors**: ``visitors`` ids with skewed activity (log-normal weights:
  a few visitors generate many impressions, most only a few), so visitors
  repeat within and across buckets;
* **keys**: ``keys`` ads with Zipf popularity (weight ``1 / rank**zipf``);
  ``keys=0`` gives a site-wide stream (every event keyed ``"*"``, counted
  toward the site-wide total only).

``generate`` returns an Arrow table ``(ts: float64 seconds, key: string,
visitor: string)``; ``write_parquet`` writes it as files of
``rows_per_file`` rows.  The same seed always gives the same table.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _weighted(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(weights) - 1)


def generate(events: int, *, days: float = 30, visitors: int = 3_000_000, keys: int = 0, zipf: float = 1.1,
             swing: float = 0.5, seed: int = 1, end: float | None = None, chunk: int = 2_000_000) -> pa.Table:
    rng = np.random.default_rng(seed)
    end = math.floor(time.time() if end is None else end)
    span = days * 86400.0
    activity = rng.lognormal(0.0, 1.2, visitors)
    key_w = 1.0 / np.arange(1, keys + 1) ** zipf if keys else None
    parts = []
    remaining = events
    while remaining > 0:
        n = min(chunk, remaining)
        # daily cycle by rejection: accept t with probability (1 + swing sin) / (1 + swing)
        t = np.empty(0)
        while len(t) < n:
            cand = rng.uniform(0, span, int((n - len(t)) * (1 + swing) * 1.05) + 16)
            keep = rng.random(len(cand)) * (1 + swing) < 1 + swing * np.sin(2 * np.pi * cand / 86400.0)
            t = np.concatenate([t, cand[keep]])
        ts = end - span + t[:n]
        vid = _weighted(rng, activity, n)
        kid = _weighted(rng, key_w, n) if keys else np.zeros(n, np.int64)
        parts.append((ts, vid, kid))
        remaining -= n
    ts = np.concatenate([p[0] for p in parts])
    vid = np.concatenate([p[1] for p in parts])
    kid = np.concatenate([p[2] for p in parts])
    order = np.argsort(ts, kind="stable")
    ts, vid, kid = ts[order], vid[order], kid[order]
    visitor = pc.binary_join_element_wise("v", pa.array(vid).cast(pa.string()), "")
    names = pa.array([f"ad-{i}" for i in range(keys)] if keys else ["*"])  # "*": site-wide only
    key = pa.DictionaryArray.from_arrays(pa.array(kid.astype(np.int32)), names).cast(pa.string())
    return pa.table({"ts": pa.array(ts), "key": key, "visitor": visitor})


def write_parquet(table: pa.Table, folder: str, rows_per_file: int = 2_000_000) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_file)):
        path = os.path.join(folder, f"part-{i:05d}.parquet")
        pq.write_table(table.slice(start, rows_per_file), path, compression="zstd")
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--visitors", type=int, default=3_000_000)
    ap.add_argument("--keys", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--end", type=float, default=None)
    a = ap.parse_args(argv)
    t = generate(a.events, days=a.days, visitors=a.visitors, keys=a.keys, seed=a.seed, end=a.end)
    paths = write_parquet(t, a.folder)
    print(f"wrote {t.num_rows:,} events to {len(paths)} files in {a.folder}")


if __name__ == "__main__":
    main()
