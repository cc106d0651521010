"""The shard's storage, side by side: memory per event, bytes at rest, query latency, restart.

    python -m benchmarks.bench_storage --before /tmp/before     # 20M per-ad events + the sparse stream
    python -m benchmarks.bench_storage --before /tmp/before --events 2e6 --no-write

Two engines, each in a process of its own, on the same seeded streams:

* **today's**: a checkout of the code before sealed nodes (``--before``): one
  shard's whole state on the heap (its in-process counter, which is exactly
  one shard actor's store);
* **sealed**: a shard actor of this checkout on a local store: what will not
  change again (built leaves and segments, upper nodes, summaries) is
  written as sealed files and read from a memory map, block by block, through
  a bounded cache of decoded blocks (``sketch/sealed.py``).

Streams (``cluster/workload.py``): ``per-ad``, as ``bench_core``'s (10,000
Zipf ads over 29.9 days); ``sparse``, 2M events over 7 days on 2,000 Zipf ads
(most key-minutes hold one event).  The events go in in slices of 1M; the last
slice after a checkpoint, so that it is only in the log (a shard killed
between checkpoints).

Memory is read from ``/proc/self/smaps_rollup`` (freed memory handed back
first: the Arrow pool's and ``malloc_trim``) after the data is in and
maintained, less the same reading before any data but after a small warm-up
stream through an engine of the same kind (modules, codecs and pools loaded
once): *heap* is anonymous memory, *mapped* the file pages resident; what the
queries then add (the bounded cache of decoded blocks) is shown apart, in MB.
*At rest* is the newest checkpoint on the store, its manifest and the objects
it names (the restarted shard checkpoints every event at its end; today's
engine: its state as the zstd Arrow IPC streams it checkpointed), beside the
raw events as zstd Parquet and Apache DataSketches HLL_4 compact sketches per
key-minute and site-minute.  A local store's sealed files are mapped in place
(no local cache copy).

Queries: one key, ``--queries`` random ranges a cell; *first pass* with the
block cache emptied before the cell (the page cache holds the files), *warm*
the same ranges again right after.  *Restart*: a fresh process builds the
shard from the store (checkpoint, sealed files mapped, the log replayed: the
late events of the last slice are runs until the upkeep folds them) and
answers one query; then one pass of each cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.report import machine, table, write_section

NOW = 1_800_000_000.0
NS = [60, 1440, 43_200]

WORKER = r"""
import ctypes, gc, json, os, sys, time
import numpy as np
mode, repo, store_dir, events, ads, days, reps = sys.argv[1:8]
events, ads, days, reps = int(float(events)), int(ads), float(days), int(reps)
sys.path.insert(0, repo)
NOW = %(now)r
NS = %(ns)r

def mem():
    gc.collect()
    try:
        import pyarrow as pa
        pa.default_memory_pool().release_unused()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, v = line.partition(":")
        if k in ("Rss", "Anonymous", "Pss_File"):
            out[k] = int(v.split()[0]) * 1024
    return out

from impressions.cluster.workload import generate
from impressions.sketch.store import SketchConfig
cfg = SketchConfig()
at_rest = None


def engine(mode, folder, tab, slice_events=1_000_000):
    # the engine of ``mode`` with ``tab`` in, maintained (and checkpointed); its query function
    from impressions.sketch.events import prepare
    ts = tab["ts"].combine_chunks().to_numpy(); key = tab["key"].combine_chunks(); vis = tab["visitor"].combine_chunks()
    if mode == "before":
        try:
            from impressions.sketch.counter import LocalCounter as Counter
        except ImportError:
            from impressions.sketch.counter import Counter
        eng = Counter(cfg)
        for s in range(0, len(ts), slice_events):
            eng.ingest(ts[s:s + slice_events], key.slice(s, slice_events), visitors=vis.slice(s, slice_events),
                       now=NOW)
        eng.maintain()
        return eng, (lambda k, b0, b1: eng.query([k], start=b0 * 60, end=b1 * 60, now=NOW))
    from impressions.actors.shard import ShardActor
    from impressions.durable.layout import Layout, ShardStorage, write_layout
    from impressions.durable.objects import ObjectStore
    uri = "file://" + folder
    layout = Layout.new(1, cfg)
    write_layout(ObjectStore(uri), layout)
    eng = ShardActor(cfg, 0, 1, ShardStorage(uri, None, layout.cluster_id, layout.folder), 32.0)
    starts = list(range(0, len(ts), slice_events))
    for n, s in enumerate(starts):
        if n == len(starts) - 1 and n:
            # the last slice after the checkpoint: only in the log, as when a shard is killed between checkpoints
            eng.maintain()
            eng.checkpoint()
        b, _ = prepare(ts[s:s + slice_events], key.slice(s, slice_events), visitors=vis.slice(s, slice_events),
                       now=NOW, bucket_seconds=60, retention_buckets=cfg.retention_buckets, future_seconds=300)
        eng.apply(b, f"slice-{n}", 3600.0)
    eng.maintain()
    return eng, (lambda k, b0, b1: eng.query([k], b0, b1))


def warm_up(mode):
    # everything an engine loads once (modules, codecs, pools) loaded, so that ``base`` holds it
    import shutil, tempfile
    folder = tempfile.mkdtemp(prefix="warm-")
    eng, query = engine(mode, os.path.join(folder, "store"),
                        generate(50_000, days=days, visitors=20_000, keys=50, seed=2, end=NOW), 10_000)
    now_b = int(NOW // 60)
    for n in NS:
        query(None, now_b + 1 - n, now_b + 1)
    del eng, query
    shutil.rmtree(folder, ignore_errors=True)
    try:
        from impressions.sketch import sealed
        sealed.CACHE.clear()
    except ImportError:
        pass


if mode in ("before", "sealed"):
    warm_up(mode)
base = mem()
if mode in ("before", "sealed"):
    tab = generate(events, days=days, visitors=3_000_000, keys=ads, seed=1, end=NOW)
    ts = tab["ts"].combine_chunks().to_numpy(); key = tab["key"].combine_chunks(); vis = tab["visitor"].combine_chunks()
    counts = np.bincount(key.dictionary_encode().indices.to_numpy())
    names = key.dictionary_encode().dictionary.to_pylist()
    busy = names[int(np.argmax(counts))]
    quiet = names[int(np.flatnonzero(counts >= 5)[np.argmin(counts[counts >= 5])])]
    json.dump({"busy": busy, "quiet": quiet}, open(os.path.join(store_dir, "keys.json"), "w"))
    t0 = time.perf_counter()
    eng, query = engine(mode, os.path.join(store_dir, "store"), tab)
    ingest_s = time.perf_counter() - t0
    if mode == "before":  # its checkpoint: every batch of the state as a zstd Arrow IPC stream
        from impressions.sketch.arrowio import store_to_batches
        from impressions.cluster.journal import batches_to_bytes
        at_rest = sum(len(batches_to_bytes(store_to_batches(st))) for st in eng.stores)
    del tab, ts, key, vis
else:  # restart: a fresh process from the store
    from impressions.actors.shard import ShardActor
    from impressions.durable.layout import ShardStorage, read_layout
    from impressions.durable.objects import ObjectStore
    uri = "file://" + os.path.join(store_dir, "store")
    layout = read_layout(ObjectStore(uri))
    t0 = time.perf_counter()
    eng = ShardActor(cfg, 0, 1, ShardStorage(uri, None, layout.cluster_id, layout.folder), 32.0)
    keys = json.load(open(os.path.join(store_dir, "keys.json")))
    now_b = int(NOW // 60)
    eng.query([keys["busy"]], now_b - 43_199, now_b + 1)
    ingest_s = time.perf_counter() - t0  # here: the restart, to a first answer
    query = lambda k, b0, b1: eng.query([k], b0, b1)
after = mem()
keys = json.load(open(os.path.join(store_dir, "keys.json")))
now_b = int(NOW // 60)
lat = {}
for name in ("busy", "quiet", None):
    for n in NS:
        # a cell: its ranges once with the block cache empty, then again (its blocks decoded, as a dashboard
        # asking the same ranges again finds them); a restarted shard's first pass only
        try:
            from impressions.sketch import sealed
            sealed.CACHE.clear()
        except ImportError:
            pass
        for warm in ((False, True) if mode != "restart" else (False,)):
            rng = np.random.default_rng(n)
            room = cfg.retention_buckets - n
            times = []
            for _ in range(reps):
                end = now_b + 1 - int(rng.integers(0, room + 1))
                t = time.perf_counter()
                query(keys[name] if name else None, end - n, end)
                times.append(time.perf_counter() - t)
            lat[f"{'warm' if warm else 'cold'}|{name or 'site-wide'}|{n}"] = [float(np.median(times) * 1e3),
                                                                                float(np.percentile(times, 99) * 1e3)]
after_queries = mem()
if mode == "restart":  # the last slice checkpointed too: the data at rest is then every event's
    eng.maintain()
    eng.checkpoint()
print(json.dumps({"base": base, "after": after, "after_queries": after_queries, "seconds": ingest_s, "lat": lat,
                  "at_rest": at_rest}))
""" % {"now": NOW, "ns": NS}


def _run(mode: str, repo: str, store_dir: str, events: float, ads: int, days: float, reps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, mode, repo, store_dir, str(events), str(ads), str(days),
                          str(reps)], capture_output=True, text=True, cwd="/")
    if out.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _checkpoint_bytes(root: str) -> int:
    """Bytes of the newest checkpoint of every shard under ``root``: its manifest and the objects it names
    (older objects still awaiting collection, and the log, are not the data at rest)."""
    total = 0
    for d, _, fs in os.walk(root):
        manifests = sorted(f for f in fs if f.startswith("manifest-"))
        if not manifests:
            continue
        body = json.load(open(os.path.join(d, manifests[-1])))["body"]
        total += os.path.getsize(os.path.join(d, manifests[-1]))
        for entry in body["nodes"]:
            total += sum(os.path.getsize(os.path.join(d, "nodes", entry[k])) for k in ("object", "sealed")
                         if entry.get(k))
        for folder in ("applied", "keys"):
            total += sum(os.path.getsize(os.path.join(d, folder, e["object"])) for e in body.get(folder, []))
    return total


def _dir_bytes(path: str, log: bool | None = None) -> int:
    """Bytes of the files under ``path``: all, only the log's (``log=True``) or all but the log's."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if log is None or (os.path.basename(d) == "log") == log)


def _peers_at_rest(work: str, events: float, ads: int, days: float, sketches: bool) -> tuple[int, int | None]:
    """Bytes of the raw events as zstd Parquet, and of Apache DataSketches HLL_4 compact sketches per
    key-minute and site-minute (what a per-key-and-minute store of theirs keeps), on the same stream."""
    from benchmarks.compare import DataSketches
    from impressions.cluster.workload import generate, write_parquet
    tab = generate(int(events), days=days, visitors=3_000_000, keys=ads, seed=1, end=NOW)
    files = write_parquet(tab, os.path.join(work, "parquet"), rows_per_file=1_000_000)
    del tab
    parquet = sum(os.path.getsize(f) for f in files)
    hll4 = None
    if sketches:
        try:
            ds = DataSketches(work, per_key=True)
        except ImportError:
            ds = None
        if ds is not None:
            ds.ingest(files)
            hll4 = ds.bytes()
            ds.close()
    return parquet, hll4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the code before sealed nodes")
    ap.add_argument("--events", type=float, default=20e6, help="events of the per-ad stream")
    ap.add_argument("--sparse-events", type=float, default=2e6)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-datasketches", action="store_true", help="skip the DataSketches column (slow: one update per event)")
    a = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows_mem, rows_lat, rows_restart, rows_rest = [], [], [], []
    streams = [("per-ad", a.events, 10_000, 29.9), ("sparse", a.sparse_events, 2_000, 7.0)]
    for label, events, ads, days in streams:
        work = tempfile.mkdtemp(prefix="bench-storage-")
        try:
            before = _run("before", os.path.abspath(a.before), work, events, ads, days, a.queries)
            sealed = _run("sealed", here, work, events, ads, days, a.queries)
            log_bytes = _dir_bytes(os.path.join(work, "store"), log=True)  # the last slice, not checkpointed
            read_at_restart = _checkpoint_bytes(os.path.join(work, "store")) + log_bytes
            restart = _run("restart", here, work, events, ads, days, a.queries)
            at_rest = _checkpoint_bytes(os.path.join(work, "store"))  # every event checkpointed
            parquet, hll4 = _peers_at_rest(work, events, ads, days, not a.no_datasketches)
            for name, r in (("today's (all on the heap)", before), ("sealed (mapped files)", sealed)):
                heap = r["after"]["Anonymous"] - r["base"]["Anonymous"]
                heap_q = r["after_queries"]["Anonymous"] - r["after"]["Anonymous"]
                mapped = r["after"].get("Pss_File", 0) - r["base"].get("Pss_File", 0)
                rest = r["at_rest"] if r is before else at_rest
                rows_mem.append([label, name, events, heap / events, heap_q / 2**20, mapped / events,
                                 rest / events, (log_bytes / events) if r is sealed else "-",
                                 0 if r is sealed else "-"])
            rows_rest.append([label, events, before["at_rest"] / events, at_rest / events, parquet / events,
                              "-" if hll4 is None else hll4 / events])
            for cell in sealed["lat"]:
                warmth, key, n = cell.split("|")
                b = before["lat"].get(f"warm|{key}|{n}")
                rows_lat.append([label, key, int(n), "warm" if warmth == "warm" else "first pass",
                                 b[0] if warmth == "warm" else "-", b[1] if warmth == "warm" else "-",
                                 sealed["lat"][cell][0], sealed["lat"][cell][1]])
            for cell, v in restart["lat"].items():
                _, key, n = cell.split("|")
                rows_lat.append([label, key, int(n), "restarted", "-", "-", v[0], v[1]])
            rows_restart.append([label, events, restart["seconds"], read_at_restart / events])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    t1 = table(["stream", "engine", "events", "heap bytes/event", "heap MB added by queries (block cache)",
                "mapped bytes/event (resident)", "at rest bytes/event", "log bytes/event", "local cache bytes/event"],
               rows_mem)
    t4 = table(["stream", "events", "today's checkpoint", "sealed checkpoint", "raw events, zstd Parquet",
                "DataSketches HLL_4 compact, per key-minute"], rows_rest)
    t2 = table(["stream", "key", "n", "pass", "today p50 ms", "today p99 ms", "sealed p50 ms", "sealed p99 ms"],
               rows_lat)
    t3 = table(["stream", "events", "seconds from a new process to its first answer", "bytes/event read from the store"],
               rows_restart)
    body = f"""## Shard storage: heap, at rest, queries, restart (`python -m benchmarks.bench_storage --before <checkout>`)

Machine: {machine()}.  Today's engine is the checkout before sealed nodes (all of a shard on the heap), the
other this checkout's shard actor on a local store; each in its own process, on the same seeded streams:
per-ad ({a.events:,.0f} events, 10,000 Zipf ads, 29.9 days) and sparse ({a.sparse_events:,.0f} events, 2,000 Zipf
ads, 7 days).  Heap is anonymous memory, mapped the file pages resident, both less the process's own before any
data; at rest is every object of a checkpoint; a local store's sealed files are mapped in place (no cache copy).

### Memory

{t1}

### Bytes at rest per event, side by side

{t4}

### One-key query latency ({a.queries} random ranges a cell; first pass: the block cache empty; warm: a second pass; restarted: a fresh process from the store)

{t2}

### Restart

{t3}
"""
    print(body)
    if not a.no_write:
        write_section("storage", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
