"""Durability costs: checkpoint size and time, recovery time, ingest with the
log on and off.

    python -m benchmarks.bench_durability                # 20M events, as in docs/benchmarks.md
    python -m benchmarks.bench_durability --events 2e6   # a quicker run

A per-ad stream (every event also counts site-wide) over 7 days is written as
Parquet; it is ingested with the ingest job's code into a fresh cluster
without storage and then into one with storage in a local folder (every
batch logged, fsynced, before it is applied).  Then: a full checkpoint, an
incremental one after 1 % more events, the checkpoint's bytes against the
Parquet and against Apache DataSketches' compact sketches of the same
key-minutes, and the time a SIGKILLed shard takes to come back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time

import numpy as np
import ray

from benchmarks.report import machine, table, write_section
from impressions.cluster.bootstrap import ensure_actors, teardown
from impressions.cluster.config import ClusterConfig
from impressions.cluster.ingest import run_ingest
from impressions.cluster.workload import generate, write_parquet


def datasketches_bytes(tab) -> tuple[int, int]:
    """Compact bytes of one hll_sketch (lg_k 14, HLL_4) per key-minute and per site-wide minute."""
    import datasketches as ds
    minute = (tab["ts"].to_numpy() // 60).astype(np.int64)
    kk = tab["key"].combine_chunks().dictionary_encode().indices.to_numpy().astype(np.int64)
    vis = tab["visitor"].to_pylist()
    sketches = {}
    for m, k, v in zip(minute.tolist(), kk.tolist(), vis):
        for key in ((k, m), (-1, m)):
            s = sketches.get(key)
            if s is None:
                s = sketches[key] = ds.hll_sketch(14, ds.tgt_hll_type.HLL_4)
            s.update(v)
    return sum(len(s.serialize_compact()) for s in sketches.values()), len(sketches)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=20e6)
    ap.add_argument("--ads", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    events = int(a.events)
    now = float(int(time.time()) // 60 * 60)
    work = tempfile.mkdtemp(prefix="bench-durability-")
    try:
        tab = generate(events, days=a.days, visitors=3_000_000, keys=a.ads, seed=a.seed, end=now - 60)
        files = write_parquet(tab, os.path.join(work, "events"), rows_per_file=1_000_000)
        extra = generate(max(events // 100, 1000), days=0.02, visitors=3_000_000, keys=a.ads, seed=a.seed + 1,
                         end=now - 60)
        write_parquet(extra, os.path.join(work, "extra"))
        pq_bytes = sum(os.path.getsize(f) for f in files)
        ds_bytes, ds_sketches = datasketches_bytes(tab)
        del tab
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ingest = []
        for label, storage in (("off (memory only)", None), ("on (log fsynced to a local folder)",
                                                            f"file://{work}/store")):
            cfg = ClusterConfig(shards=a.shards, namespace=f"dur-{storage is not None}", storage=storage,
                                maintain_interval_s=3600, checkpoint_interval_s=1e9)
            coord = ensure_actors(cfg)
            t = time.perf_counter()
            s = run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False, now=now)
            dt = time.perf_counter() - t
            ingest.append([label, s.report.accepted, dt, s.report.accepted / dt / 1e6])
            if storage is None:
                teardown(cfg.namespace)
        rate_off, rate_on = ingest[0][3], ingest[1][3]
        log_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{work}/store") for f in fs)
        # checkpoints: full, then incremental after 1 % more events
        t = time.perf_counter()
        ray.get(coord.maintain.remote())
        maint_s = time.perf_counter() - t
        t = time.perf_counter()
        full = ray.get(coord.checkpoint.remote())
        full_s = time.perf_counter() - t
        ckpt_bytes = sum(c["bytes_total"] for c in full)
        run_ingest([os.path.join(work, "extra")], coordinator=coord, progress=False, now=now)
        ray.get(coord.maintain.remote())
        t = time.perf_counter()
        inc = ray.get(coord.checkpoint.remote())
        inc_s = time.perf_counter() - t
        # recovery of one shard: right after a checkpoint, then with a log to replay
        shard = ray.get(coord.shard_handles.remote())[0]
        recov = []
        for label, replay_rows in (("after a checkpoint (nothing to replay)", 0),
                                   (f"with {events // 50:,} events in the log to replay", events // 50)):
            if replay_rows:
                more = generate(replay_rows, days=0.02, visitors=3_000_000, keys=a.ads, seed=a.seed + 2,
                                end=now - 60)
                shutil.rmtree(os.path.join(work, "more"), ignore_errors=True)
                write_parquet(more, os.path.join(work, "more"))
                run_ingest([os.path.join(work, "more")], coordinator=coord, progress=False, now=now)
            pid = ray.get(shard.pid.remote())
            t = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                try:
                    if ray.get(shard.pid.remote(), timeout=60) != pid:
                        break
                except Exception:
                    time.sleep(0.05)
            back = time.perf_counter() - t
            st = ray.get(shard.stats.remote())
            recov.append([label, back, st["recovery"]["seconds"], st["recovery"]["replayed"]])
            ray.get(coord.checkpoint.remote())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    t1 = table(["durability", "events", "ingest s (to acknowledged)", "M events/s"], ingest)
    t2 = table(["what", "bytes", "per event", "ratio to ours"], [
        ["ours: checkpoint (all shards, Arrow IPC zstd)", ckpt_bytes, ckpt_bytes / events, 1.0],
        ["raw events as Parquet (zstd)", pq_bytes, pq_bytes / events, pq_bytes / ckpt_bytes],
        [f"DataSketches HLL_4 compact, one per key-minute and site-minute ({ds_sketches:,} sketches)", ds_bytes,
         ds_bytes / events, ds_bytes / ckpt_bytes],
        ["ours: ingest log before the first checkpoint (garbage-collected after two)", log_bytes, log_bytes / events,
         log_bytes / ckpt_bytes]])
    t3 = table(["checkpoint", "seconds", "objects written", "bytes written"], [
        ["full, after the ingest (rollups built first: %.1f s)" % maint_s, full_s,
         sum(c["nodes_written"] for c in full), sum(c["bytes_written"] for c in full)],
        [f"incremental, after {max(events // 100, 1000):,} more events", inc_s, sum(c["nodes_written"] for c in inc),
         sum(c["bytes_written"] for c in inc)]])
    t4 = table(["one shard SIGKILLed", "back answering, s", "restore + replay inside, s", "log entries replayed"],
               recov)
    cmd = "python -m benchmarks.bench_durability" + ("" if events == 20_000_000 else f" --events {events:g}")
    body = f"""## Durability: log, checkpoints, recovery (`{cmd}`)

Machine: {machine()}.  {a.shards} shards; stream: {events:,} impressions of {a.ads:,} ads (Zipf) over
{a.days:g} days, 3M visitors, every event also counted site-wide ({pq_bytes / 1e6:.0f} MB of Parquet).
With durability on, a shard writes each batch to its log (a local file, fsynced, renamed) before applying it
and acknowledging it.

Ingest with the log on runs at {rate_on / rate_off * 100:.0f} % of the rate with it off
({(1 - rate_on / rate_off) * 100:.0f} % slower):

{t1}

Bytes at rest:

{t2}

{t3}

Recovery (a SIGKILLed shard restarted by Ray, restoring its newest checkpoint and replaying its log):

{t4}
"""
    print(body)
    if not a.no_write:
        write_section("durability", body)


if __name__ == "__main__":
    main()
