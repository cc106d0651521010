"""The REST API over HTTP: query latency and throughput, ingest rates.

    python -m benchmarks.bench_api                 # as in docs/benchmarks.md
    python -m benchmarks.bench_api --events 5e5    # a quicker run

A private local Ray with 2 shards (durable, local folder) and the Serve app
(one replica) on 127.0.0.1; a per-ad stream is loaded first.  Then, with
httpx keep-alive clients on the same machine: a bare round trip (/healthz),
one-key and 100-key queries sequentially (p50/p99) and from 8 threads
(queries per second), the same while another thread posts Arrow batches,
and ingest rates for JSON and Arrow bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import ray

from benchmarks.report import machine, table, write_section
from impressions.cluster.bootstrap import ensure_actors, teardown
from impressions.cluster.config import ClusterConfig
from impressions.cluster.ingest import run_ingest
from impressions.cluster.workload import generate, write_parquet


def latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(make_fn, threads: int, seconds: float) -> float:
    done = [0] * threads
    stop = time.time() + seconds

    def run(i):
        fn = make_fn()
        while time.time() < stop:
            fn()
            done[i] += 1
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / seconds


def arrow_body(n: int, now: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = pa.table({"ts": pa.array(now - rng.uniform(0, 3600, n)),
                  "key": pa.array([f"ad-{i}" for i in rng.integers(0, 1000, n)]),
                  "visitor": pa.array([f"v{i}" for i in rng.integers(0, 1_000_000, n)])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def json_body(n: int, now: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return json.dumps([{"ts": float(now - x), "key": f"ad-{k}", "visitor": f"v{v}"} for x, k, v in
                       zip(rng.uniform(0, 3600, n), rng.integers(0, 1000, n), rng.integers(0, 1_000_000, n))]).encode()


def one_setting(a, work: str, now: float, first: bool, ports: bool = True) -> tuple[list, list, tuple]:
    """The cluster, its REST app and every measure, with ``questions_first`` and ``question_ports`` as given:
    (query rows, ingest rows, (events posted while measuring, questions answered on ports)); the cluster and
    the app are taken down after."""
    from ray import serve

    from impressions.cluster.serve import start
    ns = f"bench-api-{int(first)}{int(ports)}"
    bulk = "give way" if first else "alike"
    asked = "ports" if ports else "Ray calls"
    coord = ensure_actors(ClusterConfig(shards=2, namespace=ns, storage=f"file://{work}/store-{int(first)}{int(ports)}",
                                        checkpoint_interval_s=3600, questions_first=first, question_ports=ports))
    run_ingest([f"{work}/events"], coordinator=coord, progress=False, now=now)
    ray.get(coord.maintain.remote())
    port = 18000 + os.getpid() % 1000
    url = start(ns, port=port, name=ns)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    c = httpx.Client(base_url=url, timeout=60)
    keys100 = [f"ad-{i}" for i in range(100)]
    one = lambda cl=c: cl.get("/v1/unique", params={"key": "ad-0", "last": "1h"}).raise_for_status()  # noqa: E731
    one_30d = lambda cl=c: cl.get("/v1/unique", params={"key": "ad-0", "last": "7d"}).raise_for_status()  # noqa: E731
    hundred = lambda cl=c: cl.post("/v1/unique", json={"keys": keys100, "last": "1h"}).raise_for_status()  # noqa: E731
    time.sleep(2.0)  # settled: the app's first requests and the shards' upkeep after the load out of the way
    for _ in range(50):
        c.get("/healthz").raise_for_status()
        one()
    rows = []

    def measure(label):
        out = []
        for name, fn, n in (("/healthz (bare round trip)", lambda: c.get("/healthz").raise_for_status(), a.queries),
                            ("1 key, last 1h", one, a.queries), ("1 key, last 7d", one_30d, a.queries),
                            ("100 keys, last 1h", hundred, a.queries // 5)):
            lat = latencies(fn, n)
            qps = throughput(lambda name=name: (lambda cl=httpx.Client(base_url=url, timeout=60): (
                cl.get("/healthz") if name.startswith("/healthz") else
                cl.get("/v1/unique", params={"key": "ad-0", "last": "1h"}) if name == "1 key, last 1h" else
                cl.get("/v1/unique", params={"key": "ad-0", "last": "7d"}) if name == "1 key, last 7d" else
                cl.post("/v1/unique", json={"keys": keys100, "last": "1h"}))), 8, 5.0)
            out.append([label, bulk, asked, name, float(np.median(lat) * 1e3), float(np.percentile(lat, 99) * 1e3),
                        qps])
        return out

    rows += measure("idle")
    # the same with a concurrent ingest of Arrow batches
    stop = threading.Event()
    posted = [0]

    def ingest_loop():
        cl = httpx.Client(base_url=url, timeout=120)
        i = 0
        while not stop.is_set():
            body = arrow_body(100_000, time.time(), 100 + i)
            cl.post("/v1/events", content=body, headers={"Content-Type": "application/vnd.apache.arrow.stream"})
            posted[0] += 100_000
            i += 1
    th = threading.Thread(target=ingest_loop, daemon=True)
    th.start()
    time.sleep(2)
    rows += measure("during Arrow ingest")
    stop.set()
    th.join(timeout=120)
    # ingest rates, one replica
    ing = []
    for label, ctype, body_fn, n in (("JSON array", "application/json", json_body, 50_000),
                                     ("Arrow IPC stream", "application/vnd.apache.arrow.stream", arrow_body,
                                      200_000)):
        bodies = [body_fn(n, time.time(), 1000 + i) for i in range(5)]
        t = time.perf_counter()
        for b in bodies:
            r = c.post("/v1/events", content=b, headers={"Content-Type": ctype})
            r.raise_for_status()
        dt = time.perf_counter() - t
        ing.append([label, bulk, asked, n, len(bodies[0]) / n, 5 * n / dt])
    st = ray.get(coord.stats.remote())
    on_ports = sum((x or {}).get("port_questions", 0) for x in st["shards"] + st["readers"])
    serve.delete(ns)
    teardown(ns)
    return rows, ing, (posted[0], on_ports)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=2e6, help="events loaded before querying")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-api-")
    now = float(int(time.time()))
    rows, ing, posted = [], [], []
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        tab = generate(int(a.events), days=7, visitors=3_000_000, keys=10_000, seed=4, end=now - 60)
        write_parquet(tab, f"{work}/events")
        del tab
        # side by side: as it runs by default; the questions by Ray calls (no ports); the bulk threads at the
        # questions' priority
        for first, ports in ((True, True), (True, False), (False, True)):
            r, i, p = one_setting(a, work, now, first, ports)
            rows, ing, posted = rows + r, ing + i, posted + [p]
    finally:
        if ray.is_initialized():
            from ray import serve
            try:
                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (r[0] != "idle", ["/healthz", "1 key, last 1h", "1 key, last 7d", "100"].index(
        next(x for x in ["/healthz", "1 key, last 1h", "1 key, last 7d", "100"] if r[3].startswith(x))),
        r[1] != "give way", r[2] != "ports"))
    t1 = table(["load", "bulk threads", "questions", "request", "sequential p50 ms", "p99 ms", "queries/s, 8 threads"],
               rows)
    t2 = table(["body", "bulk threads", "questions", "events per request", "bytes per event",
                "events/s (one replica, durable)"], ing)
    cmd = "python -m benchmarks.bench_api" + ("" if int(a.events) == 2_000_000 else f" --events {a.events:g}")
    body = f"""## REST API over HTTP (`{cmd}`)

Machine: {machine()}.  A private local Ray: 2 shards (durable, local folder), the coordinator, one Serve
replica; client, proxy, replica and shards share the 2 cores.  {int(a.events):,} impressions of 10,000 ads over
7 days loaded first.  Keep-alive httpx clients on 127.0.0.1; {a.queries} sequential requests per row
({a.queries // 5} for 100 keys), then 5 s from 8 threads.  "During Arrow ingest": another thread posts
100,000-event Arrow batches back to back ({", ".join(f"{p:,}" for p, _ in posted)} events while measuring).  "Bulk
threads": "give way" is the cluster as it runs by default (`questions_first`: the replica parses and sends
ingest bodies on threads at nice 19, the writers apply on such threads, `cluster/priority.py`);
"alike", side by side in the same run, a cluster and app with the setting off.  "Questions": "ports" is
the default (`question_ports`: the replica asks each register range's copy on its own TCP port,
`actors/wire.py`), "Ray calls" a cluster with the setting off, side by side in the same run (no readers
here: on 2 CPUs with 2 shards a range gets none by default, so the copies asked are the writers; questions
the copies answered on their ports, per app: {", ".join(f"{q:,}" for _, q in posted)}).

{t1}

Ingest through `POST /v1/events` (answered once the events are in the shards' logs):

{t2}
"""
    print(body)
    if not a.no_write:
        write_section("api", body)


if __name__ == "__main__":
    main()
