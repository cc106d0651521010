"""The sketch core on one core: ingest rate, query latency against range
length, bytes per key-bucket and accuracy, beside Apache DataSketches.

    python -m benchmarks.bench_core                # 20M events per stream, as in docs/benchmarks.md
    python -m benchmarks.bench_core --events 2e6   # a quicker run

Everything runs in this one process on one core (no Ray): the in-process
``LocalCounter`` with a single shard is exactly one shard actor's work.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pyarrow as pa

from benchmarks.report import machine, table, write_section
from impressions.cluster.workload import generate
from impressions.sketch.arrowio import node_batches
from impressions.sketch.counter import LocalCounter
from impressions.sketch.hll import RegisterRange, coupons_from_hashes
from impressions.sketch.rows import RowTable, rows_from_events
from impressions.sketch.store import ShardStore, SketchConfig
from impressions.sketch.tiers import Slot

NOW = 1_800_000_000.0
QUERY_NS = [1, 60, 1440, 10_080, 43_200]


def ingest_stream(events: int, keys: int, seed: int, batch: int = 1_000_000):
    tab = generate(events, days=29.9, visitors=3_000_000, keys=keys, seed=seed, end=NOW)
    ts = tab["ts"].combine_chunks().to_numpy()
    key = tab["key"].combine_chunks()
    vis = tab["visitor"].combine_chunks()
    c = LocalCounter(SketchConfig())
    t0 = time.perf_counter()
    for s in range(0, len(ts), batch):
        c.ingest(ts[s:s + batch], key.slice(s, batch), visitors=vis.slice(s, batch), now=NOW)
    t1 = time.perf_counter()
    c.maintain()
    t2 = time.perf_counter()
    st = c.stores[0].stats()
    return c, tab, {"events": len(ts), "ingest_s": t1 - t0, "maintain_s": t2 - t1, **st}


def query_latency(c: LocalCounter, key, n: int, reps: int, rng) -> tuple[float, float]:
    w = c.config.bucket_seconds
    now_b = int(NOW // w)
    room = c.config.retention_buckets - n
    times = []
    for _ in range(reps):
        end_b = now_b + 1 - int(rng.integers(0, room + 1))
        t = time.perf_counter()
        c.query([key], start=(end_b - n) * w, end=end_b * w, now=NOW)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3)


def ipc_bytes(batches) -> int:
    """Bytes of the batches as compressed Arrow IPC streams, as the checkpointer writes them."""
    total = 0
    for rb in batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rb.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as wr:
            wr.write_batch(rb)
        total += sink.getvalue().size
    return total


def bytes_per_key_bucket(cards: list[int], rng) -> list[list]:
    import datasketches as ds
    cfg = SketchConfig()
    prec = RegisterRange(cfg.p)
    store = ShardStore(cfg)
    rows = []
    fixed = ipc_bytes(node_batches(store, Slot(0, 29_000_000, main=(RowTable.empty(0, prec.R),))))  # schemas and metadata of one node
    for c in cards:
        # enough key-buckets per node that the node's fixed overhead (three IPC
        # headers, ~`fixed` bytes) is spread as it is in a real segment
        k = max(8, min(20_000, 4_000_000 // c))
        h = rng.integers(0, 2**64, c * k, dtype=np.uint64)
        keys = np.repeat(np.arange(1, k + 1, dtype=np.uint32), c)
        t = rows_from_events(keys, np.full(c * k, 29_000_000), coupons_from_hashes(h), prec)
        store.keys.ids([f"ad-{i}" for i in range(len(store.keys), k + 1)])  # names for the Arrow dictionary
        ours_disk = (ipc_bytes(node_batches(store, Slot(0, 29_000_000, main=(t,)))) - fixed) / k
        ours_mem = t.nbytes / k
        d4 = d8 = 0
        for i in range(k):
            s4 = ds.hll_sketch(cfg.p, ds.tgt_hll_type.HLL_4)
            s8 = ds.hll_sketch(cfg.p, ds.tgt_hll_type.HLL_8)
            for x in h[i * c:(i + 1) * c].tolist():
                s4.update(x)
                s8.update(x)
            d4 += len(s4.serialize_compact())
            d8 += len(s8.serialize_compact())
        form = "dense" if (t.dense >= 0).all() else "sparse"
        rows.append([c, form, ours_disk, ours_mem, d4 / k, d8 / k, ours_disk / (d4 / k)])
    return rows, fixed


def accuracy(ns: list[int], trials: list[int], seed: int) -> list[list]:
    import datasketches as ds
    out = []
    rng = np.random.default_rng(seed)
    cfg = SketchConfig()
    for n, tr in zip(ns, trials):
        ours, theirs = [], []
        for t in range(tr):
            ids = np.arange(n) + t * 10_000_000 + n * 1000
            # each visitor seen in 1 to 3 of 60 one-minute buckets
            reps = rng.integers(1, 4, n)
            vid = np.repeat(ids, reps)
            bucket = rng.integers(0, 60, len(vid))
            names = pa.array([f"v{x}" for x in vid.tolist()])
            c = LocalCounter(cfg)
            end_b = int(NOW // 60) + 1
            c.ingest((end_b - 60 + bucket) * 60.0, pa.array(["k"] * len(vid)), visitors=names, now=NOW)
            est = c.unique("k", last=60, now=NOW).estimate.value
            ours.append(est / n - 1)
            sketches = [ds.hll_sketch(cfg.p, ds.tgt_hll_type.HLL_4) for _ in range(60)]
            for b, name in zip(bucket.tolist(), names.to_pylist()):
                sketches[b].update(name)
            u = ds.hll_union(cfg.p)
            for s in sketches:
                u.update(s)
            theirs.append(u.get_result().get_estimate() / n - 1)
        rm = lambda e: float(np.sqrt(np.mean(np.square(e))) * 100)
        out.append([n, tr, rm(ours), rm(theirs), 104 / math.sqrt(1 << cfg.p)])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=20e6, help="events per stream (default 20M)")
    ap.add_argument("--ads", type=int, default=10_000, help="ads in the per-ad stream")
    ap.add_argument("--queries", type=int, default=200, help="queries per latency cell")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    a = ap.parse_args(argv)
    events = int(a.events)
    rng = np.random.default_rng(a.seed)

    ingest_rows, lat_rows = [], []
    for label, keys in (("site-wide (1 page)", 0), (f"per-ad ({a.ads:,} ads, Zipf)", a.ads)):
        c, tab, st = ingest_stream(events, keys, a.seed)
        e = st["events"]
        ingest_rows.append([label, e, e / st["ingest_s"] / 1e6, e / (st["ingest_s"] + st["maintain_s"]) / 1e6,
                            st["maintain_s"] / e * 1e9, st["base_bytes"] / e, st["rollup_bytes"] / st["base_bytes"]])
        if keys:
            counts = np.bincount(tab["key"].combine_chunks().dictionary_encode().indices.to_numpy())
            quiet = f"ad-{int(np.flatnonzero(counts >= 30)[-1])}"  # a tail ad with a few dozen impressions
            probe = [("busy: ad-0", "ad-0"), (f"quiet: {quiet} ({int(counts[int(quiet[3:])])} impressions)", quiet)]
        else:
            probe = [("busy: site-wide", None)]
        for name, key in probe:
            row = [f"{label}, {name}"]
            for n in QUERY_NS:
                p50, p99 = query_latency(c, key, n, a.queries, rng)
                row += [p50, p99]
            row.append(row[-1] / row[4])  # p99 at 43,200 / p99 at 60
            lat_rows.append(row)
        del c, tab
    t1 = table(["stream", "events", "ingest M ev/s", "ingest + rollups M ev/s", "rollup build ns/event",
                "base bytes/event (memory)", "rollups / base"], ingest_rows)
    hdr = ["key"]
    for n in QUERY_NS:
        hdr += [f"n={n:,} p50 ms", "p99 ms"]
    hdr.append("p99 ratio 43,200 / 60")
    t2 = table(hdr, lat_rows)
    cards = [1, 10, 100, 1000, 3000, 10_000, 100_000]
    byte_rows, fixed = bytes_per_key_bucket(cards, rng)
    t3 = table(["distinct visitors", "ours form", "ours bytes (Arrow IPC, zstd)", "ours bytes (memory)",
                "DataSketches HLL_4 compact", "DataSketches HLL_8 compact", "ours / HLL_4"], byte_rows)
    t3 += (f"\n\nOurs: per key-bucket, in a node of up to 20,000 key-buckets, after subtracting the node's fixed "
           f"{fixed:,} bytes (three IPC schemas and metadata), as in a real segment where they are shared by "
           f"millions of rows.  DataSketches: one compact sketch per key-bucket, as a per-key-and-minute store "
           f"keeps them.")
    t4 = table(["distinct visitors", "trials", "ours RMSE %", "DataSketches RMSE %", "theory 1.04/sqrt(m) %"],
               accuracy([1000, 10_000, 100_000, 1_000_000], [20, 100, 40, 12], a.seed))
    cmd = "python -m benchmarks.bench_core" + ("" if events == 20_000_000 else f" --events {events:g}")
    body = f"""## Sketch core, one core (`{cmd}`)

Machine: {machine()}.  Streams: {events:,} events over 29.9 days ending at a fixed time, 3M visitors with
skewed activity, daily cycle (`cluster/workload.py`, seed {a.seed}); ingested in batches of 1M through
`LocalCounter.ingest` (validation, vectorized hashing of string ids, memtable, flush), then `maintain()` builds
the segments and rollups.  One shard = one core's work.

### Ingest

{t1}

### Query latency against range length n (one-minute buckets), {a.queries} queries per cell

Each query is the whole user-level path: range resolution, the shard's dyadic cover, merge, histogram,
estimator.

{t2}

### Bytes per key-bucket against Apache DataSketches `hll_sketch` (lg_k = 14)

{t3}

### Accuracy on merged streams (60 one-minute buckets, each visitor in 1 to 3 of them; union of 60 sketches for DataSketches)

{t4}
"""
    print(body)
    if not a.no_write:
        write_section("core", body)


if __name__ == "__main__":
    main()
