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
and while ingest jobs run in processes of their own (a live one: events of
the last hour; a backfill: the 30 days again); then kills (SIGKILL) one
writer during an ingest job, and one reader, asking all the while.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
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


def timed_queries(paths, keys, n: int, reps: int, now: float, rng) -> dict:
    """``(p50 ms, p99 ms)`` of each path of ``paths`` (name, ask) over ``reps`` random ranges of ``n`` buckets, the
    paths asked in turn on the same range (their order rotating), so each sees the same moments of the machine."""
    times = {name: [] for name, _ in paths}
    room = 43_200 - n
    for i in range(reps):
        rng_i = SketchConfig().resolve(now=now, last=n, end=now - 60 * int(rng.integers(0, room + 1)))
        k = i % len(paths)
        for name, ask in paths[k:] + paths[:k]:
            t = time.perf_counter()
            ask(keys, rng_i)
            times[name].append(time.perf_counter() - t)
    return {name: (float(np.median(v) * 1e3), float(np.percentile(v, 99) * 1e3)) for name, v in times.items()}


def _ask_while(ask, stop, out: list) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        r = ask()
        out.append((time.perf_counter() - t, r["partial"]))
        time.sleep(0.02)


def ingest_job(folder: str, cfg) -> subprocess.Popen:
    """The ingest job as ``ray job submit`` runs it: a driver process of its own on this cluster (so the
    questions asked here never share a process, or its interpreter lock, with the job's driver).  Its summary
    comes as one JSON line on stdout; its messages go to a file of its own (``job.errors``)."""
    env = dict(os.environ, **cfg.job_env(), RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the job; closed by job_summary
    job = subprocess.Popen([sys.executable, "-m", "impressions.cluster.ingest", folder, "--force", "--json",
                            "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    job.errors = errors
    return job


def job_summary(job: subprocess.Popen) -> tuple[dict, float]:
    """(the job's summary, when it printed it): waits for the job; a job that failed raises, saying why."""
    line = job.stdout.readline()
    printed = time.time()
    job.wait()
    job.errors.seek(0)
    errors = job.errors.read()
    job.errors.close()
    if job.returncode != 0 or not line.strip():
        raise RuntimeError(f"the ingest job failed (exit {job.returncode}): {errors[-2000:]}")
    return json.loads(line), printed


@ray.remote(num_cpus=0)
class Idle:
    """An actor with nothing else to do: a bare call to it is what the machine itself costs a call."""

    def ping(self) -> int:
        return 1


def asked_during(job: subprocess.Popen, asks: dict, question) -> tuple[dict, dict]:
    """Ask every path of ``asks`` in turn (interleaved, so each sees the same moments of the job) until the job
    ends; keep the answers given while it ingested (its own seconds, counted back from when it printed its
    summary).  Returns (seconds a path, the job's summary)."""
    seen = {name: [] for name in asks}
    stamps = []
    done: dict = {}
    waiter = threading.Thread(target=lambda: done.update(out=_summary_or_error(job)), daemon=True)
    waiter.start()
    try:
        while waiter.is_alive():
            for name, ask in asks.items():
                t = time.perf_counter()
                ask(*question())
                seen[name].append(time.perf_counter() - t)
            stamps.append(time.time())
    finally:
        if job.poll() is None:  # a question failed: the job does not outlive the benchmark
            job.kill()
        waiter.join()
    if isinstance(done["out"], Exception):
        raise done["out"]
    summary, printed = done["out"]
    start = printed - summary["seconds"]
    keep = [i for i, t in enumerate(stamps) if start <= t <= printed]
    return {name: [v[i] for i in keep] for name, v in seen.items()}, summary


def _summary_or_error(job):
    try:
        return job_summary(job)
    except Exception as e:  # noqa: BLE001 - raised again by the asking thread
        return e


def under_load(coord, cfg, work: str, now: float, rng, queries: int, readers_q, ray_q, writers_q, idle_actor,
               bulk: str) -> list[list]:
    """One key over 30 days, idle and while an ingest job saturates the cluster: a live one (events of the last
    hour: the newest leaves change) and a backfill (the 30 days again: every leaf changes), each a job of its
    own process; the paths asked in turn, with a bare call to an idle actor for scale.  ``bulk`` names the
    cluster's ``questions_first`` setting in the rows."""
    asks = {"client -> readers' ports": readers_q.query, "client -> readers by Ray": ray_q.query,
            "client -> writers": writers_q.query,
            "bare call (idle actor)": lambda k, r: ray.get(idle_actor.ping.remote())}

    def question():
        end = now - 60 * int(rng.integers(0, 60))  # the newest hour: where a live ingest writes
        return [None], SketchConfig().resolve(now=now, last=43_140, end=end)
    rows = []
    for label, folder in (("live (the last hour)", "live"), ("backfill (the 30 days)", "events")):
        # idle means idle: the last job's upkeep done and checkpointed (the readers switch to it)
        ray.get(coord.maintain.remote())
        ray.get(coord.checkpoint.remote())
        time.sleep(2.0)
        idle = {name: [] for name in asks}
        for _ in range(queries // 2):
            for name, ask in asks.items():
                t = time.perf_counter()
                ask(*question())
                idle[name].append(time.perf_counter() - t)
        busy, summary = asked_during(ingest_job(os.path.join(work, folder), cfg), asks, question)
        rate = summary["accepted"] / summary["seconds"] / 1e6
        for name in asks:
            if not busy[name]:
                raise RuntimeError(f"the {label} job ended before a question was answered during it")
            i50, i99 = np.median(idle[name]) * 1e3, np.percentile(idle[name], 99) * 1e3
            b50, b99 = np.median(busy[name]) * 1e3, np.percentile(busy[name], 99) * 1e3
            rows.append([label, bulk, f"{summary['accepted']:,} at {rate:.2f} M/s", name, i50, i99,
                         b50, b99, len(busy[name]), b99 / i99])
    return rows


def wait_for_readers(coord, shards: int) -> None:
    """Publish the readers that answer now (the upkeep loop would within a round); at most 120 s."""
    deadline = time.time() + 120
    while time.time() < deadline and ray.get(coord.watch_readers.remote()) != [2] * shards:
        time.sleep(0.5)
    if ray.get(coord.watch_readers.remote()) != [2] * shards:
        raise RuntimeError("the readers did not answer within 120 s")


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
    cfg = ray.get(coord.cluster_config.remote())

    def writer_back(pid, killed):
        st = ray.get(writer.stats.remote(), timeout=5)
        return st["first_apply_at"] - killed if st["pid"] != pid and st.get("first_apply_at") else None
    before = ray.get(writer.stats.remote())["applied_batches"]
    job = ingest_job(os.path.join(work, "events"), cfg)
    deadline = time.time() + 60
    while ray.get(writer.stats.remote())["applied_batches"] == before and time.time() < deadline:
        time.sleep(0.05)  # the job started, connected and is sending
    out: list = []
    seen, back = _kill_while_asking(ask, writer, writer_back, 1.0, lambda: out.append(_summary_or_error(job)))
    ok = not isinstance(out[0], Exception) and out[0][0]["accepted"] > 0
    rows = [row("writer 0 SIGKILL during ingest", seen,
                f"took batches {back:.1f} s after the kill; ingest {'completed' if ok else 'FAILED'}"
                if back is not None else "not back within 120 s")]
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
        wait_for_readers(coord, a.shards)
        # queries on the last cluster, three paths side by side
        keys100 = [f"ad-{i}" for i in range(100)]
        p = SketchConfig().p
        readers_q = DirectQuestions(lambda: ray.get(coord.read_route.remote()), RayRuntime(), cfg, p)
        # the same readers asked by Ray calls (the route without their ports), as before ``question_ports``
        ray_q = DirectQuestions(lambda: ray.get(coord.read_route.remote())[:3], RayRuntime(), cfg, p)
        writers_q = DirectQuestions(lambda: ray.get(coord.route.remote()), RayRuntime(), cfg, p)
        assert all(a is not None for r in readers_q._shard_map().ports for a in r), "readers without ports"
        paths = (("client -> readers' ports", readers_q.query), ("client -> readers by Ray", ray_q.query),
                 ("client -> writers", writers_q.query),
                 ("via coordinator", lambda k, r: ray.get(coord.query.remote(k, r))))
        lat_rows = []
        for label, keys in (("1 key (site-wide)", [None]), ("1 key (ad-0, busy)", ["ad-0"]),
                            (f"1 key (ad-{a.ads - 1}, quiet)", [f"ad-{a.ads - 1}"]), ("100 keys (ad-0..ad-99)", keys100)):
            rows = {name: [label, name] for name, _ in paths}
            for n in (60, 43_200):
                for name, ask in paths:
                    ask(keys, SketchConfig().resolve(now=now, last=n))  # warm: no path pays for cold blocks
                got = timed_queries(paths, keys, n, a.queries if len(keys) == 1 else a.queries // 4, now, rng)
                for name, _ in paths:
                    rows[name] += list(got[name])
            lat_rows += list(rows.values())
        # a bare round trip through the coordinator, for scale
        base = []
        for _ in range(a.queries):
            t = time.perf_counter()
            ray.get(coord.cluster_config.remote())
            base.append(time.perf_counter() - t)
        # one key over 30 days, idle and while an ingest job saturates the cluster: a live one (events of the
        # last hour: the newest leaves change) and a backfill (the 30 days again: every leaf changes), each
        # a job of its own process; the paths asked in turn, with a bare call to an idle actor for scale
        live = generate(events // 2, days=1 / 24, visitors=3_000_000, keys=a.ads, seed=a.seed + 1, end=now - 60)
        write_parquet(live, os.path.join(work, "live"), rows_per_file=1_000_000)
        del live
        idle_actor = Idle.remote()
        ray.get(idle_actor.ping.remote())
        load_rows = under_load(coord, cfg, work, now, rng, a.queries, readers_q, ray_q, writers_q, idle_actor,
                               "give way")
        lag = reader_lag(coord, readers_q, now)
        drills = kill_drills(coord, readers_q, work, now)
        st = ray.get(coord.stats.remote())
        mem = sum(x["base_bytes"] + x["rollup_bytes"] for x in st["shards"])
        # the same under load, side by side: a cluster whose bulk threads run at the questions' priority (the
        # engine before ``questions_first``), the same events in it
        teardown(cfg.namespace)
        alike = cfg.replace(namespace="bench-alike", storage=f"file://{work}/store-alike", questions_first=False)
        coord = ensure_actors(alike)
        run_ingest([os.path.join(work, "events")], coordinator=coord, progress=False, now=now)
        ray.get(coord.maintain.remote())
        ray.get(coord.checkpoint.remote())
        wait_for_readers(coord, a.shards)
        readers_q = DirectQuestions(lambda: ray.get(coord.read_route.remote()), RayRuntime(), alike, p)
        ray_q = DirectQuestions(lambda: ray.get(coord.read_route.remote())[:3], RayRuntime(), alike, p)
        writers_q = DirectQuestions(lambda: ray.get(coord.route.remote()), RayRuntime(), alike, p)
        load_rows += under_load(coord, alike, work, now, rng, a.queries, readers_q, ray_q, writers_q, idle_actor,
                                "alike")
        load_rows.sort(key=lambda r: (r[0] != "live (the last hour)", r[3], r[1] != "give way"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()
    t1 = table(["ingest workers", "shards", "readers per range", "upkeep", "events", "ingest s (to queryable)",
                "M events/s", "rollups left after, s", "M events/s, index built", "CPU s a writer",
                "CPU s a reader"], ingest_rows)
    t2 = table(["query", "path", "n=60 p50 ms", "p99 ms", "n=43,200 p50 ms", "p99 ms"], lat_rows)
    t3 = table(["ingest job", "bulk threads", "events, while asked", "path", "idle p50 ms", "idle p99 ms", "during p50 ms", "p99 ms",
                "questions during", "p99 / idle p99"], load_rows)
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

Query latency, {a.queries} queries per cell ({a.queries // 4} for 100 keys), random end times, four paths side
by side on the same cluster, asked in turn on each range (their order rotating): the Python client's to the readers on their own ports (one round trip: the driver
asks one copy of every register range in parallel on its copy of the shard map and combines; `question_ports`,
the default), the same by Ray calls (the route without the ports: the engine before them), the same to the
writers only by Ray calls (the engine before readers), and through the coordinator (driver -> coordinator ->
readers' ports -> combine).  A bare call to the coordinator costs {np.median(base) * 1e3:.2f} ms p50 /
{np.percentile(base, 99) * 1e3:.2f} ms p99 here.

{t2}

One key (site-wide) over 30 days less an hour, ending in the newest hour, idle and while an ingest job runs, the job in a
process of its own as `ray job submit` runs it (the questions never share a driver with it): a live job
({events // 2:,} events of the last hour: only the newest leaves change) and a backfill (the {events:,}
events of the 30 days again: every leaf changes, and until the upkeep folds them a question reads their raw
runs).  The paths are asked in turn, {a.queries // 2} rounds idle (the upkeep of what came before done) and as
many as fit in the job; "bare call" is a call to an actor with nothing else to do, what a call costs on the
machine at that moment.  "Bulk threads": "give way" is the cluster as it runs by default (`questions_first`:
the writers' applies and upkeep and the readers' following of their writers run on threads at nice 19, the
ingest tasks' processes in the idle class, `cluster/priority.py`); "alike", side by side, a cluster with the
setting off, the same events ingested into it, asked after the rest of this run.

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
