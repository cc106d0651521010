"""The actor cluster end to end: ingest job throughput and query latency,
through the Python client (one hop) and through the coordinator.

    python -m benchmarks.bench_cluster                  # 20M events, as in docs/benchmarks.md
    python -m benchmarks.bench_cluster --events 2e6     # a quicker run

Starts a private local Ray (all CPUs), the coordinator and ``--shards``
shards; writes a per-ad stream (every event also counts site-wide) as
Parquet; ingests it with the ingest job's code (parallel read/validate/hash
tasks sending straight to the shards) with 1 and then 2 ingest workers, each
into a fresh cluster; then times queries both ways.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import ray

from benchmarks.report import machine, table, write_section
from impressions.actors.questions import DirectQuestions
from impressions.cluster.bootstrap import RayRuntime, ensure_actors, teardown
from impressions.cluster.config import ClusterConfig
from impressions.cluster.ingest import run_ingest
from impressions.cluster.workload import generate, write_parquet
from impressions.sketch.config import SketchConfig


def timed_queries(ask, keys, n: int, reps: int, now: float, rng) -> tuple[float, float]:
    times = []
    room = 43_200 - n
    for _ in range(reps):
        end = now - 60 * int(rng.integers(0, room + 1))
        t = time.perf_counter()
        ask(keys, SketchConfig().resolve(now=now, last=n, end=end))
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=20e6)
    ap.add_argument("--ads", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    events = int(a.events)
    now = float(int(time.time()) // 60 * 60)
    rng = np.random.default_rng(a.seed)
    work = tempfile.mkdtemp(prefix="bench-cluster-")
    try:
        t = time.perf_counter()
        tab = generate(events, days=29.9, visitors=3_000_000, keys=a.ads, seed=a.seed, end=now - 60)
        files = write_parquet(tab, os.path.join(work, "events"), rows_per_file=1_000_000)
        gen_s = time.perf_counter() - t
        pq_bytes = sum(os.path.getsize(f) for f in files)
        del tab
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ingest_rows = []
        coord = None
        for workers in (1, 2):
            # a store of its own for each run: a store remembers the files it ingested, and skips them
            cfg = ClusterConfig(shards=a.shards, namespace=f"bench-{workers}", maintain_interval_s=3600,
                                storage=f"file://{work}/store-{workers}")
            coord = ensure_actors(cfg)
            t = time.perf_counter()
            s = run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False, max_tasks=workers,
                           now=now)
            ingest_s = time.perf_counter() - t
            t = time.perf_counter()
            ray.get(coord.maintain.remote())
            maint_s = time.perf_counter() - t
            ingest_rows.append([workers, a.shards, s.report.accepted, ingest_s, s.report.accepted / ingest_s / 1e6,
                                maint_s, s.report.accepted / (ingest_s + maint_s) / 1e6])
            if workers == 1:
                teardown(cfg.namespace)
        # queries on the last cluster
        keys100 = [f"ad-{i}" for i in range(100)]
        direct = DirectQuestions(lambda: ray.get(coord.route.remote()), RayRuntime(),
                                 ray.get(coord.cluster_config.remote()), SketchConfig().p)
        paths = (("client, one hop", direct.query), ("via coordinator", lambda k, r: ray.get(coord.query.remote(k, r))))
        lat_rows = []
        for label, keys in (("1 key (site-wide)", [None]), ("1 key (ad-0, busy)", ["ad-0"]),
                            (f"1 key (ad-{a.ads - 1}, quiet)", [f"ad-{a.ads - 1}"]), ("100 keys (ad-0..ad-99)", keys100)):
            rows = {name: [label, name] for name, _ in paths}
            for n in (60, 43_200):
                for name, ask in paths:
                    ask(keys, SketchConfig().resolve(now=now, last=n))  # warm: neither path pays for cold blocks
                    rows[name] += list(timed_queries(ask, keys, n, a.queries if len(keys) == 1 else a.queries // 4,
                                                     now, rng))
            lat_rows += list(rows.values())
        # a bare round trip through the coordinator, for scale
        base = []
        for _ in range(a.queries):
            t = time.perf_counter()
            ray.get(coord.cluster_config.remote())
            base.append(time.perf_counter() - t)
        st = ray.get(coord.stats.remote())
        mem = sum(x["base_bytes"] + x["rollup_bytes"] for x in st["shards"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()
    t1 = table(["ingest workers", "shards", "events", "ingest s (to queryable)", "M events/s",
                "rollups after, s", "M events/s incl. rollups"], ingest_rows)
    t2 = table(["query", "path", "n=60 p50 ms", "p99 ms", "n=43,200 p50 ms", "p99 ms"], lat_rows)
    cmd = "python -m benchmarks.bench_cluster" + ("" if events == 20_000_000 else f" --events {events:g}")
    body = f"""## Actor cluster: ingest job and coordinator queries (`{cmd}`)

Machine: {machine()}.  A private local Ray on all {os.cpu_count()} CPUs; {a.shards} shard actors and the coordinator.
Stream: {events:,} impressions of {a.ads:,} ads (Zipf) over 29.9 days, 3M visitors, every event also counted
site-wide, as {len(files)} Parquet files ({pq_bytes / 1e6:.0f} MB; generated in {gen_s:.0f} s, not counted).
"Ingest" is the ingest job's code end to end: list files, read row groups, parse and validate, hash, cut by
shard, send with bounded in-flight calls, applied in the shards' memtables and sorted runs (queryable).
"Rollups after" is the maintenance that folds runs into segments and builds the time index; in service it
runs in the background between calls.  Sketch memory on the heap after the queries: {mem / 1e6:.0f} MB over all
shards (sealed nodes are mapped files, section 5 of the design).

{t1}

Query latency, {a.queries} queries per cell ({a.queries // 4} for 100 keys), random end times, two paths side
by side: the Python client's (one hop: the driver asks all shards in parallel on its copy of the shard map and
combines) and through the coordinator (driver -> coordinator -> all shards -> combine).  A bare call to the
coordinator costs {np.median(base) * 1e3:.2f} ms p50 / {np.percentile(base, 99) * 1e3:.2f} ms p99 here.

{t2}
"""
    print(body)
    if not a.no_write:
        write_section("cluster", body)


if __name__ == "__main__":
    main()
