"""Side by side: ours against the tools a user would pick instead.

    python -m benchmarks.compare                      # 20M events per shape, as in docs/benchmarks.md
    python -m benchmarks.compare --events 1e6         # a quicker run
    python -m benchmarks.compare --events 2e4 --smoke # the harness only (the test suite runs this)

Two shapes (``cluster/workload.py``, seeded): one site-wide counter over 30
days, and per-ad counters (every event also counted site-wide) over 7 days,
both written as Parquet.  Every peer implements one small interface: ingest
the Parquet files; answer "unique visitors of key K (or site-wide) in the
last n minutes ending at t"; report the bytes it holds.

* Redis HyperLogLog: a real ``redis-server`` on 127.0.0.1 (started here,
  stopped after), one HLL per key and minute, PFADD grouped by key-minute and
  pipelined (its best case), PFCOUNT over the range's keys; bytes from
  ``INFO memory``;
* Apache DataSketches: one ``hll_sketch`` (lg_k 14, HLL_4) per key and
  minute, a union over the range; bytes of the compact serializations;
* DuckDB over the raw events: ``approx_count_distinct`` and exact
  ``count(DISTINCT)`` (which is also the ground truth); bytes of its file;
* ours: the real ingest job into a local Ray cluster (2 shards, durable),
  queries through the coordinator; bytes of its checkpoint; one row of
  queries through the REST app.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.report import free_port, machine, table, write_section
from impressions.cluster.workload import generate, write_parquet

NS = [1, 5, 60, 1440, 10_080, 43_200]
SITE = None


def _batches(files: list[str], rows: int = 1_000_000):
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["ts", "key", "visitor"]):
            yield rb


def _groups(rb: pa.RecordBatch, per_key: bool):
    """(name, visitors) groups by key-minute (and site-minute) of a batch."""
    minute = (rb.column("ts").to_numpy() // 60).astype(np.int64)
    vis = rb.column("visitor")
    out = []
    specs = [("site", np.zeros(len(minute), np.int64), ["site"])]
    if per_key:
        enc = rb.column("key").dictionary_encode()
        specs.append(("key", enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()))
    for _, codes, names in specs:
        comp = codes * (1 << 32) + (minute - minute.min())
        order = np.argsort(comp, kind="stable")
        comp_s = comp[order]
        cuts = np.r_[0, np.flatnonzero(comp_s[1:] != comp_s[:-1]) + 1, len(comp_s)]
        vis_s = vis.take(pa.array(order)).to_pylist()
        for a, b in zip(cuts[:-1], cuts[1:]):
            i = order[a]
            out.append((f"{names[codes[i]]}:{minute[i]}", vis_s[a:b]))
    return out


class Redis:
    name = "Redis HLL"

    def __init__(self, work: str, per_key: bool):
        import redis
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.r = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(100):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.base = self.r.info("memory")["used_memory"]
        self.per_key = per_key

    def ingest(self, files):
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for rb in _batches(files):
            for name, vis in _groups(rb, self.per_key):
                pipe.pfadd(name, *vis)
                n += 1
                if n % 5000 == 0:
                    pipe.execute()
        pipe.execute()

    def query(self, key, end_min: int, n: int) -> float:
        prefix = "site" if key is None else key
        return float(self.r.pfcount(*[f"{prefix}:{m}" for m in range(end_min - n, end_min)]))

    def bytes(self) -> int:
        return self.r.info("memory")["used_memory"] - self.base

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class DataSketches:
    name = "DataSketches"

    def __init__(self, work: str, per_key: bool):
        self.sk: dict = {}
        self.per_key = per_key

    def ingest(self, files):
        import datasketches as ds
        sk = self.sk
        for rb in _batches(files):
            for name, vis in _groups(rb, self.per_key):
                s = sk.get(name)
                if s is None:
                    s = sk[name] = ds.hll_sketch(14, ds.tgt_hll_type.HLL_4)
                for v in vis:
                    s.update(v)

    def query(self, key, end_min: int, n: int) -> float:
        import datasketches as ds
        prefix = "site" if key is None else key
        u = ds.hll_union(14)
        for m in range(end_min - n, end_min):
            s = self.sk.get(f"{prefix}:{m}")
            if s is not None:
                u.update(s)
        return u.get_result().get_estimate()

    def bytes(self) -> int:
        return sum(len(s.serialize_compact()) for s in self.sk.values())

    def close(self):
        self.sk.clear()


class DuckDB:
    def __init__(self, work: str, per_key: bool, exact: bool):
        import duckdb
        self.exact = exact
        self.name = "DuckDB exact" if exact else "DuckDB approx"
        self.path = os.path.join(work, f"events-{int(per_key)}-{int(exact)}.duckdb")
        self.db = duckdb.connect(self.path)

    def ingest(self, files):
        listing = ", ".join(f"'{f}'" for f in files)
        self.db.execute(f"CREATE TABLE events AS SELECT ts, key, visitor FROM read_parquet([{listing}]) ORDER BY ts")
        self.db.execute("CHECKPOINT")

    def query(self, key, end_min: int, n: int) -> float:
        agg = "count(DISTINCT visitor)" if self.exact else "approx_count_distinct(visitor)"
        where = "ts >= ? AND ts < ?" + ("" if key is None else " AND key = ?")
        args = [(end_min - n) * 60.0, end_min * 60.0] + ([] if key is None else [key])
        return float(self.db.execute(f"SELECT {agg} FROM events WHERE {where}", args).fetchone()[0])

    def bytes(self) -> int:
        return os.path.getsize(self.path)

    def close(self):
        self.db.close()


class Ours:
    name = "ours (Ray cluster)"

    def __init__(self, work: str, per_key: bool, now: float, rest: bool = False):
        import ray

        from impressions.cluster.bootstrap import connect, ensure_actors
        from impressions.cluster.config import ClusterConfig
        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            self.started = True
        else:
            connect()
            self.started = False
        self.ns = f"compare-{os.getpid()}-{int(per_key)}"
        self.cfg = ClusterConfig(shards=2, namespace=self.ns, storage=f"file://{work}/ours-{int(per_key)}",
                                 checkpoint_interval_s=1e9, maintain_interval_s=3600)
        self.coord = ensure_actors(self.cfg)
        self.now = now
        self.rest_url = None
        self.rollups_s = 0.0

    def ingest(self, files):
        import ray

        from impressions.cluster.ingest import run_ingest
        run_ingest(files, coordinator=self.coord, progress=False, now=self.now)
        t = time.perf_counter()
        ray.get(self.coord.maintain.remote())
        self.rollups_s = time.perf_counter() - t

    def query(self, key, end_min: int, n: int) -> float:
        return float(self.answer(key, end_min, n)["unique_visitors"])

    def answer(self, key, end_min: int, n: int) -> dict:
        """Minutes ``[end_min - n, end_min)``, as the other peers are asked."""
        import ray

        from impressions.sketch.timeindex import BucketRange
        return ray.get(self.coord.query.remote([key], BucketRange(end_min - n, end_min, 60)))[0]

    def bytes(self) -> int:
        import ray
        return sum(c["bytes_total"] for c in ray.get(self.coord.checkpoint.remote()))

    def memory(self) -> int:
        import ray
        st = ray.get(self.coord.stats.remote())
        return sum(s["base_bytes"] + s["rollup_bytes"] for s in st["shards"] if s)

    def start_rest(self) -> str:
        from impressions.cluster.serve import start
        self.rest_url = start(self.ns, port=free_port(), name=f"compare-{self.ns}")
        return self.rest_url

    def close(self):
        import ray

        from impressions.cluster.bootstrap import teardown
        if self.rest_url:
            from ray import serve
            serve.delete(f"compare-{self.ns}")
        teardown(self.ns)
        if self.started:
            ray.shutdown()


class OursRest:
    """Queries of the same cluster through the REST app, over HTTP."""

    name = "ours over REST"

    def __init__(self, ours: Ours):
        import httpx
        self.ours = ours
        self.url = ours.start_rest()
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def query(self, key, end_min: int, n: int) -> float:
        # the app checks retention against the real clock: a 30-day range fixed a
        # few minutes ago has slipped past it, so such a range ends now instead
        oldest = int(time.time() // 60) + 1 - self.ours.cfg.sketch.retention_buckets
        end_min = max(end_min, oldest + n)
        params = {"start": (end_min - n) * 60, "end": end_min * 60}
        if key is not None:
            params["key"] = key
        r = self.http.get("/v1/unique", params=params)
        r.raise_for_status()
        return float(r.json()["unique_visitors"])

    def close(self):
        self.http.close()


def run_shape(shape: str, events: int, seed: int, reps: int, work: str, smoke: bool, out: dict):
    per_key = shape == "per-ad"
    now = float(int(time.time()) // 60 * 60)
    days = 7 if per_key else 30
    tab = generate(events, days=days - 0.01, visitors=3_000_000 if not smoke else 20_000, keys=10_000 if per_key else 0,
                   seed=seed, end=now - 60)
    files = write_parquet(tab, os.path.join(work, shape), rows_per_file=1_000_000)
    pq_bytes = sum(os.path.getsize(f) for f in files)
    keys = [SITE]
    if per_key:
        counts = np.bincount(tab["key"].combine_chunks().dictionary_encode().indices.to_numpy())
        names = tab["key"].combine_chunks().dictionary_encode().dictionary.to_pylist()
        order = np.argsort(-counts)
        keys += [names[order[0]], names[order[min(len(order) - 1, 100)]]]  # the busiest ad, and the 100th
    del tab
    end_min = int(now // 60)
    rng = np.random.default_rng(seed)
    truth, ours = DuckDB(work, per_key, exact=True), Ours(work, per_key, now)
    peers = [truth, DuckDB(work, per_key, exact=False), ours, DataSketches(work, per_key), Redis(work, per_key)]
    ingest_rows, lat, err, size = [], {}, {}, []
    try:
        for p in peers:
            t = time.perf_counter()
            p.ingest(files)
            dt = time.perf_counter() - t
            note = f"includes building the time index ({p.rollups_s:.1f} s)" if isinstance(p, Ours) else ""
            ingest_rows.append([p.name, events, dt, events / dt, note])
            out.setdefault("ingest", {})[(shape, p.name)] = events / dt
        rest = OursRest(ours)
        cells = [(k, n) for k in keys for n in NS]
        for k, n in cells:
            ends = [end_min + 1 - int(rng.integers(0, max(1, days * 1440 - n))) if n < days * 1440 else end_min + 1
                    for _ in range(reps)]
            truths = [truth.query(k, e, n) for e in ends[:min(reps, 5)]]
            for p in [p for p in peers if p is not truth] + [rest]:
                ts, errs = [], []
                for i, e in enumerate(ends):
                    t = time.perf_counter()
                    v = p.query(k, e, n)
                    ts.append(time.perf_counter() - t)
                    if i < len(truths) and truths[i] > 0:
                        errs.append(v / truths[i] - 1)
                lat[(p.name, k, n)] = (float(np.median(ts) * 1e3), float(np.percentile(ts, 99) * 1e3))
                if errs:
                    err[(p.name, k, n)] = float(np.sqrt(np.mean(np.square(errs))) * 100)
            if smoke:  # the smoke check: our answers within their error bars
                for e in ends[:len(truths)]:
                    a = ours.answer(k, e, n)
                    i = ends.index(e)
                    assert a["interval"][0] <= truths[i] <= (a["interval"][1] or math.inf) or \
                        abs(a["unique_visitors"] - truths[i]) <= 3 * a["relative_error"] * truths[i] + 1, (k, n, a, truths[i])
        for p in peers:
            b = p.bytes()
            size.append([p.name, b, b / events])
        size.append(["ours in memory (both shards)", ours.memory(), ours.memory() / events])
        size.append(["raw events as Parquet", pq_bytes, pq_bytes / events])
        rest.close()
    finally:
        for p in reversed(peers):
            try:
                p.close()
            except Exception:
                pass
    out[shape] = {"ingest": ingest_rows, "lat": lat, "err": err, "size": size, "keys": keys, "events": events,
                  "peers": [p.name for p in peers if p is not truth] + [rest.name]}
    return out


def _fmt_key(k):
    return "site-wide" if k is None else k


def render(out: dict, args, plots_dir: str | None) -> str:
    parts = []
    for shape in ("site-wide", "per-ad"):
        if shape not in out:
            continue
        d = out[shape]
        peers = d["peers"]
        parts.append(f"### {shape}: {d['events']:,} events ({'30 days, one counter' if shape == 'site-wide' else '7 days, 10,000 ads + site-wide'})\n")
        parts.append("Ingest from Parquet, end to end:\n\n" + table(["peer", "events", "seconds", "events/s", ""],
                                                                   d["ingest"]))
        for k in d["keys"]:
            rows = []
            for p in peers:
                row = [p]
                for n in NS:
                    v = d["lat"].get((p, k, n))
                    row += [v[0], v[1]] if v else ["-", "-"]
                rows.append(row)
            hdr = ["peer"] + [x for n in NS for x in (f"n={n:,} p50 ms", "p99")]
            parts.append(f"\nQuery latency, key {_fmt_key(k)}:\n\n" + table(hdr, rows))
            rows = []
            for p in peers:
                row = [p] + [d["err"].get((p, k, n), "-") for n in NS]
                rows.append(row)
            parts.append(f"\nRelative error (RMSE %, against DuckDB's exact count), key {_fmt_key(k)}:\n\n"
                         + table(["peer"] + [f"n={n:,}" for n in NS], rows))
        parts.append("\nBytes held:\n\n" + table(["peer", "bytes", "per event"], d["size"]))
        parts.append(_targets(d, shape))
        if plots_dir:
            parts.append(_plots(d, shape, peers, plots_dir))
    return "\n".join(parts)


def _targets(d: dict, shape: str) -> str:
    """The comparison targets, each a label, a measured ratio and the test it must pass."""
    lat, size = d["lat"], {r[0]: r[1] for r in d["size"]}
    ours = Ours.name
    k = None
    p99 = lambda p, n: lat.get((p, k, n), (math.nan, math.nan))[1]  # noqa: E731
    ing = {r[0]: r[3] for r in d["ingest"]}
    min_ingest = 5 if shape == "per-ad" else 1
    targets = [
        ("query p99 at n=43,200: Redis / ours", ">= 20", p99(Redis.name, 43_200) / p99(ours, 43_200),
         lambda v: v >= 20),
        ("query p99 at n=43,200: DataSketches / ours", ">= 20", p99(DataSketches.name, 43_200) / p99(ours, 43_200),
         lambda v: v >= 20),
        ("ours: p99 at n=43,200 / p99 at n=60", "<= 3", p99(ours, 43_200) / p99(ours, 60), lambda v: v <= 3),
        ("ingest: ours / Redis", f">= {min_ingest}", ing.get(ours, math.nan) / ing.get(Redis.name, math.nan),
         lambda v: v >= min_ingest),
        ("bytes: ours / DataSketches", "<= 1", size.get(ours, math.nan) / size.get(DataSketches.name, math.nan),
         lambda v: v <= 1),
        ("bytes: ours / Redis", "< 1", size.get(ours, math.nan) / size.get(Redis.name, math.nan), lambda v: v < 1),
    ]
    rows = [[f"{label} ({want})", v, "met" if ok(v) else "missed"] for label, want, v, ok in targets]
    return "\nTargets (site-wide key):\n\n" + table(["target", "measured", ""], rows)


def _plots(d: dict, shape: str, peers: list[str], plots_dir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(plots_dir, exist_ok=True)
    k = None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for p in peers:
        xs = [n for n in NS if (p, k, n) in d["lat"]]
        axes[0].plot(xs, [d["lat"][(p, k, n)][1] for n in xs], marker="o", label=p)
        xe = [n for n in NS if (p, k, n) in d["err"]]
        axes[1].plot(xe, [d["err"][(p, k, n)] for n in xe], marker="o", label=p)
    axes[0].set(xscale="log", yscale="log", xlabel="range n (minutes)", ylabel="query p99 (ms)",
                title=f"{shape}: query latency against n")
    axes[1].set(xscale="log", xlabel="range n (minutes)", ylabel="RMSE (%)", title=f"{shape}: error against n")
    names = [r[0] for r in d["size"]]
    axes[2].barh(names, [r[1] / 1e6 for r in d["size"]])
    axes[2].set(xlabel="MB", title=f"{shape}: bytes held")
    for ax in axes[:2]:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"compare-{shape}.png"
    fig.savefig(os.path.join(plots_dir, name), dpi=110)
    plt.close(fig)
    return f"\n![{shape}](img/{name})\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=20e6, help="events per shape")
    ap.add_argument("--shapes", default="site-wide,per-ad")
    ap.add_argument("--reps", type=int, default=20, help="queries per cell")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny and fast: check the harness, not the speed")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    events = int(a.events)
    work = tempfile.mkdtemp(prefix="compare-")
    out: dict = {}
    try:
        for shape in a.shapes.split(","):
            run_shape(shape, events, a.seed, a.reps, work, a.smoke, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    plots = None if a.no_write else os.path.join(docs, "img")
    text = render(out, a, plots)
    cmd = "python -m benchmarks.compare" + ("" if events == 20_000_000 else f" --events {events:g}")
    body = f"""## Side by side: Redis HyperLogLog, Apache DataSketches, DuckDB and ours (`{cmd}`)

Machine: {machine()}.  Everything in one run on this machine, one peer at a time; redis-server
{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2][2:]}
on 127.0.0.1.  Latencies: {a.reps} queries per cell, random end times; errors: the first 5 of them against
DuckDB's exact count.  Ours: 2 shards, durable (local folder), queried through the coordinator; "ours over
REST" is the same cluster through the REST app over HTTP.

{text}
"""
    print(body)
    if not a.no_write:
        write_section("compare", body)
    return out


if __name__ == "__main__":
    main()
