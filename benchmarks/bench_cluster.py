"""The actor cluster end to end: ingest job throughput and query latency,
through the Python client (one hop, to the readers or to the writers) and
through the coordinator; questions while an ingest job runs; a writer and
a reader killed.

    python -m benchmarks.bench_cluster                  # 20M events, as in docs/benchmarks.md
    python -m benchmarks.bench_cluster --events 2e6     # a quicker run

Starts a private local Ray (all CPUs), the coordinator and ``--shards``
shards; writes a per-ad stream (every event also counts site-wide) as
Parquet; ingests it with the ingest job's code (parallel read/validate/hash
tasks sending straight to the shards), each run into a fresh cluster: 1
worker with readers, then 2 workers without and with readers, each with the
upkeep loop on during the ingest and off (all of it after), reporting the CPU
each writer and reader used; then times queries every way, idle
and during a second ingest of the same files; then kills (SIGKILL) one
writer during an ingest, and one reader, asking all the while.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from types import SimpleNamespace

import numpy as np
import ray

from benchmarks.report import machine, table, write_section
from impressions.actors.questions import DirectQuestions
from impressions.cluster.bootstrap import RayRuntime, ensure_actors, reader_name, teardown
from impressions.cluster.config import ClusterConfig
from impressions.cluster.ingest import run_ingest
from impressions.cluster.workload import generate, write_parquet
from impressions.durable.layout import epoch_folder
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


def _ask_while(ask, stop, out: list) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        r = ask()
        out.append((time.perf_counter() - t, r["partial"]))
        time.sleep(0.02)


def reader_lag(coord, questions, now: float, probes: int = 20) -> list[float]:
    """How long after an acknowledged write another driver's question (no log positions of its own, so the
    readers answer as they are) sees it: one event to a key of its own, then ask until it is counted."""
    import pyarrow as pa

    from impressions.cluster.ingest import ingest_table
    out = []
    for i in range(probes):
        key = f"probe-{i}-{int(now)}"
        ingest_table(pa.table({"ts": [now - 30.0], "key": [key], "visitor": [f"v{i}"]}), coord, now=now)
        t = time.perf_counter()
        rng = SketchConfig().resolve(now=now, last=60)
        while questions.query([key], rng)[0]["impressions"] < 1:
            if time.perf_counter() - t > 10:
                break
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _kill_while_asking(ask, actor, back, lead: float, until=lambda: None) -> tuple[list, float | None]:
    """SIGKILL ``actor``'s process ``lead`` seconds into asking every 20 ms; ``back(pid, killed)`` says how many
    seconds after the kill it served again (None: not yet), looked at for up to 120 s; ``until()`` runs before
    the asking stops.  Returns (the answers' (seconds, partial), back)."""
    stop, seen = threading.Event(), []
    asker = threading.Thread(target=_ask_while, args=(ask, stop, seen), daemon=True)
    asker.start()
    time.sleep(lead)
    pid = ray.get(actor.pid.remote())
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    got = None
    while got is None and time.time() - killed < 120:
        try:
            got = back(pid, killed)
        except Exception:  # noqa: BLE001, S110 - still restarting
            pass
        time.sleep(0.1)
    until()
    stop.set()
    asker.join()
    return seen, got


def kill_drills(coord, questions, work: str, now: float) -> list[list]:
    """SIGKILL a writer during an ingest job, then a reader, asking all the while."""
    rng = SketchConfig().resolve(now=now, last=43_200)

    def ask():
        return questions.query([None], rng)[0]

    def row(fault, seen, recovered):
        return [fault, len(seen), sum(p for _, p in seen), max(t for t, _ in seen) * 1e3, recovered]

    writer = ray.get(coord.shard_handles.remote())[0]
    result: dict = {}

    def reingest():
        try:
            result["summary"] = run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False,
                                           max_tasks=2, now=now, force=True)
        except Exception as e:  # noqa: BLE001 - reported in the table
            result["error"] = e

    def writer_back(pid, killed):
        st = ray.get(writer.stats.remote(), timeout=5)
        return st["first_apply_at"] - killed if st["pid"] != pid and st.get("first_apply_at") else None
    job = threading.Thread(target=reingest, daemon=True)
    job.start()
    time.sleep(2.0)
    seen, back = _kill_while_asking(ask, writer, writer_back, 1.0, job.join)
    rows = [row("writer 0 SIGKILL during ingest", seen,
                f"took batches {back:.1f} s after the kill; ingest {'FAILED' if 'error' in result else 'completed'}"
                if back is not None else "not back within 120 s")]
    cfg = ray.get(coord.cluster_config.remote())
    layout = SimpleNamespace(shards=cfg.shards, folder=epoch_folder(0))
    reader = ray.get_actor(reader_name(0, 0, layout), namespace=cfg.namespace)

    def reader_back(pid, killed):
        ok = ray.get(reader.health.remote(), timeout=5)["available"] and ray.get(reader.pid.remote(), timeout=5) != pid
        return time.time() - killed if ok else None
    seen, back = _kill_while_asking(ask, reader, reader_back, 0.5, lambda: time.sleep(1.0))
    rows.append(row("reader 0 of range 0 SIGKILL", seen,
                    f"serving again {back:.1f} s after the kill" if back is not None else "not back within 120 s"))
    return rows


def _cpu(coord) -> dict:
    """CPU seconds the writers and the readers have used so far (their processes, every thread), summed."""
    st = ray.get(coord.stats.remote())
    return {"writers": sum(x.get("cpu_s", 0.0) for x in st["shards"] if x),
            "readers": sum(x.get("cpu_s", 0.0) for x in st.get("readers", []) if x)}


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
        runs = ((1, 2, True), (2, 0, False), (2, 0, True), (2, 2, False), (2, 2, True))
        for workers, readers, upkeep in runs:
            # a store of its own for each run: a store remembers the files it ingested, and skips them;
            # the upkeep loop on (as in service: rollups and sealing beside the applies) or off (all after)
            name = f"{workers}-{readers}-{int(upkeep)}"
            cfg = ClusterConfig(shards=a.shards, namespace=f"bench-{name}", maintain_interval_s=1.0 if upkeep else 3600,
                                storage=f"file://{work}/store-{name}", readers=readers)
            coord = ensure_actors(cfg)
            cpu0 = _cpu(coord)
            t = time.perf_counter()
            s = run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False, max_tasks=workers,
                           now=now)
            ingest_s = time.perf_counter() - t
            t = time.perf_counter()
            ray.get(coord.maintain.remote())
            maint_s = time.perf_counter() - t
            cpu = {k: v - cpu0[k] for k, v in _cpu(coord).items()}
            ingest_rows.append([workers, a.shards, readers, "beside" if upkeep else "after", s.report.accepted,
                                ingest_s, s.report.accepted / ingest_s / 1e6, maint_s,
                                s.report.accepted / (ingest_s + maint_s) / 1e6, cpu["writers"] / a.shards,
                                cpu["readers"] / (a.shards * readers) if readers else "-"])
            if (workers, readers, upkeep) != runs[-1]:
                teardown(cfg.namespace)
        cfg = ray.get(coord.cluster_config.remote())
        ray.get(coord.checkpoint.remote())  # the readers switch to the checkpoint holding the rollups
        deadline = time.time() + 120
        # publish the readers that answer now (the upkeep loop would within a round)
        while time.time() < deadline and ray.get(coord.watch_readers.remote()) != [2] * a.shards:
            time.sleep(0.5)
        if ray.get(coord.watch_readers.remote()) != [2] * a.shards:
            raise RuntimeError("the readers did not answer within 120 s")
        # queries on the last cluster, three paths side by side
        keys100 = [f"ad-{i}" for i in range(100)]
        p = SketchConfig().p
        readers_q = DirectQuestions(lambda: ray.get(coord.read_route.remote()), RayRuntime(), cfg, p)
        writers_q = DirectQuestions(lambda: ray.get(coord.route.remote()), RayRuntime(), cfg, p)
        paths = (("client -> readers", readers_q.query), ("client -> writers", writers_q.query),
                 ("via coordinator", lambda k, r: ray.get(coord.query.remote(k, r))))
        lat_rows = []
        for label, keys in (("1 key (site-wide)", [None]), ("1 key (ad-0, busy)", ["ad-0"]),
                            (f"1 key (ad-{a.ads - 1}, quiet)", [f"ad-{a.ads - 1}"]), ("100 keys (ad-0..ad-99)", keys100)):
            rows = {name: [label, name] for name, _ in paths}
            for n in (60, 43_200):
                for name, ask in paths:
                    ask(keys, SketchConfig().resolve(now=now, last=n))  # warm: no path pays for cold blocks
                    rows[name] += list(timed_queries(ask, keys, n, a.queries if len(keys) == 1 else a.queries // 4,
                                                     now, rng))
            lat_rows += list(rows.values())
        # a bare round trip through the coordinator, for scale
        base = []
        for _ in range(a.queries):
            t = time.perf_counter()
            ray.get(coord.cluster_config.remote())
            base.append(time.perf_counter() - t)
        # one key over 30 days, idle and while an ingest job saturates the cluster (the same files again)
        load_rows = []
        idle = {name: timed_queries(ask, [None], 43_200, a.queries, now, rng) for name, ask in paths[:2]}

        def reingest():
            run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False, max_tasks=2, now=now,
                       force=True)
        th = threading.Thread(target=reingest, daemon=True)
        th.start()
        time.sleep(2.0)
        busy = {}
        for name, ask in paths[:2]:
            busy[name] = timed_queries(ask, [None], 43_200, a.queries // 2, now, rng)
        busy_alive = th.is_alive()
        th.join()
        for name, _ in paths[:2]:
            load_rows.append([name, idle[name][0], idle[name][1], busy[name][0], busy[name][1],
                              busy[name][1] / idle[name][1]])
        lag = reader_lag(coord, readers_q, now)
        drills = kill_drills(coord, readers_q, work, now)
        st = ray.get(coord.stats.remote())
        mem = sum(x["base_bytes"] + x["rollup_bytes"] for x in st["shards"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()
    t1 = table(["ingest workers", "shards", "readers per range", "upkeep", "events", "ingest s (to queryable)",
                "M events/s", "rollups left after, s", "M events/s, index built", "CPU s a writer",
                "CPU s a reader"], ingest_rows)
    t2 = table(["query", "path", "n=60 p50 ms", "p99 ms", "n=43,200 p50 ms", "p99 ms"], lat_rows)
    t3 = table(["path", "idle p50 ms", "idle p99 ms", "during ingest p50 ms", "p99 ms", "p99 / idle p99"], load_rows)
    t4 = table(["fault", "questions asked", "partial answers", "slowest answer ms", "recovered"], drills)
    cmd = "python -m benchmarks.bench_cluster" + ("" if events == 20_000_000 else f" --events {events:g}")
    body = f"""## Actor cluster: ingest job and coordinator queries (`{cmd}`)

Machine: {machine()}.  A private local Ray on all {os.cpu_count()} CPUs; {a.shards} shard actors and the coordinator.
Stream: {events:,} impressions of {a.ads:,} ads (Zipf) over 29.9 days, 3M visitors, every event also counted
site-wide, as {len(files)} Parquet files ({pq_bytes / 1e6:.0f} MB; generated in {gen_s:.0f} s, not counted).
"Ingest" is the ingest job's code end to end: list files, read row groups, parse and validate, hash, cut by
shard, send with bounded in-flight calls, applied in the shards' memtables and sorted runs (queryable).
"Upkeep" is the maintenance that folds runs into segments, builds the time index and seals what will not
change: "beside" runs the coordinator's upkeep loop during the ingest (as in service: each writer's upkeep
thread builds beside its applies, a slice of 0.2 s a shard every second), "after" leaves it all to the end (the
loop off); "rollups left after" is a full maintenance once the ingest job returned, "index built" the
events over both, i.e. Parquet to queryable with the index built; "CPU s" what each writer and each reader
process used over both (all its threads; the ingest workers and Ray's own processes not counted).  Sketch memory on the heap after the queries: {mem / 1e6:.0f} MB over all
shards (sealed nodes are mapped files, section 5 of the design).

{t1}

Query latency, {a.queries} queries per cell ({a.queries // 4} for 100 keys), random end times, three paths side
by side on the same cluster: the Python client's to the readers (one hop: the driver asks one copy of every
register range in parallel on its copy of the shard map and combines), the same to the writers only (the
engine before readers), and through the coordinator (driver -> coordinator -> writers -> combine).  A bare
call to the coordinator costs {np.median(base) * 1e3:.2f} ms p50 / {np.percentile(base, 99) * 1e3:.2f} ms p99 here.

{t2}

One key (site-wide) over 30 days, idle and while an ingest job of the same {events:,} events runs again
(2 workers{"" if busy_alive else "; it ended before the questions did"}), {a.queries // 2} questions a path:

{t3}

Read lag: after a write acknowledged to another driver, a question that carries no log position of its own
(the readers answer as they are) counted it {np.median(lag):.1f} ms p50, {max(lag):.1f} ms at most later
({len(lag)} probes, the cluster idle; a question that carries its asker's positions always counts its writes).

Faults while asking every 20 ms through the client (readers path): a writer killed with SIGKILL during an
ingest job (Ray restarts it; "recovered" is from the kill to the new process taking batches again, and the
ingest's own result), and one reader killed with SIGKILL.

{t4}
"""
    print(body)
    if not a.no_write:
        write_section("cluster", body)


if __name__ == "__main__":
    main()
