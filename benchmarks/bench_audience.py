"""Audience questions, side by side: reach across keys, rolling series, overlap and near-exact accuracy.

    python -m benchmarks.bench_audience                 # as in docs/benchmarks.md
    python -m benchmarks.bench_audience --events 1e6 --trials 50 --no-write   # quicker

1. **Reach of 100 keys over 30 days** through the Python client (a Ray
   cluster started here, 2 shards, the real ingest job), against Redis
   ``PFCOUNT`` over the 100 keys' per-minute HLLs (100 x 43,200 names, as
   Redis keeps a time series) and a DataSketches union of the same
   per-minute sketches (lg_k 14, HLL_4).
2. **Rolling series**: trailing 24 hours every hour over 30 days for one
   key (697 points, every window inside the range), against one 24-hour
   query and against the same points asked one query at a time.
3. **Near-exact counts while sparse**: 10,000 distinct visitors over a
   day (each seen once or twice, per-minute rows), seeded trials: ours,
   the register estimate the same sketch gave before (Ertl's estimator on
   its registers), and a DataSketches union of the per-minute sketches;
   and a dense point (200,000 visitors in an hour), where both paths are
   the register estimate.
4. **Overlap**: two audiences of 200,000 visitors together at Jaccard 0.5,
   0.1 and 0.01, seeded trials: coverage of the 95 % interval and RMSE of
   the joint maximum-likelihood estimate (what we answer) and of
   inclusion-exclusion.
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

from benchmarks.report import free_port, machine, table, write_section

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _pcts(xs) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 99))


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


# ---------------------------------------------------------------- 1 and 2: on a cluster

def cluster_part(events: int, reps: int, seed: int, work: str) -> dict:
    import pyarrow.compute as pc
    import ray

    from benchmarks.compare import Ours
    from impressions.cluster.client import Client
    from impressions.cluster.workload import generate, write_parquet
    now = float(int(time.time()) // 60 * 60)
    t = generate(events, days=30, visitors=max(events // 4, 1000), keys=1000, seed=seed, end=now - 1)
    files = write_parquet(t, os.path.join(work, "events"))
    keys = [f"ad-{i}" for i in range(100)]
    out: dict = {"events": events}
    ours = Ours(work, per_key=True, now=now)
    try:
        t0 = time.perf_counter()
        ours.ingest(files)
        out["ingest_s"] = time.perf_counter() - t0
        client = Client(namespace=ours.ns)
        end_min = int(now // 60) + 1
        reach = client.reach(keys, last="30d")
        out["reach"] = reach
        out["lat"] = {}
        out["lat"]["ours: reach, 100 keys, 30 days"] = _timed(lambda: client.reach(keys, last="30d"), reps)
        out["lat"]["ours: one key, 30 days"] = _timed(lambda: client.unique("ad-0", last="30d"), reps)
        out["lat"]["ours: 100 keys each, 30 days (one call)"] = _timed(lambda: client.query(keys, last="30d"), reps)
        # 2. rolling
        for key, label in (("ad-0", "busiest ad"), ("ad-500", "a small ad"), (None, "site-wide")):
            one = _timed(lambda: client.unique(key, last="24h"), reps)
            roll = _timed(lambda: client.rolling(key, step="1h", window="24h", last="30d"), max(5, reps // 4))
            out.setdefault("rolling", []).append((label, one, roll))
        series = client.rolling("ad-0", step="1h", window="24h", last="30d")
        out["points"] = len(series["points"])
        out["series"] = series
        pts = series["points"]
        t0 = time.perf_counter()
        singles = [client.query(["ad-0"], start=p["start"], end=p["end"])[0] for p in pts]
        out["one_by_one_ms"] = (time.perf_counter() - t0) * 1e3
        same = all(s["unique_visitors"] == p["unique_visitors"] and s["interval"] == p["interval"]
                   for s, p in zip(singles, pts[:-1]))  # the last window is still filling
        out["same_as_queries"] = same
        # truth for the reach, from the events
        sel = pc.is_in(t["key"], value_set=__import__("pyarrow").array(keys))
        out["reach_truth"] = len(pc.unique(pc.filter(t["visitor"], sel)))
        out["reach_impressions"] = int(pc.sum(sel.cast("int64")).as_py())
    finally:
        ours.close()
    # peers on the same events: per-minute sketches of the 100 keys
    groups = _minute_groups(t, keys)
    out["peers"] = {}
    out["peers"]["Redis PFCOUNT over 100 x 43,200 per-minute keys"] = _redis(groups, keys, end_min, work, reps)
    out["peers"]["DataSketches union of the same per-minute sketches"] = _datasketches(groups, keys, end_min, reps)
    ray.shutdown()
    return out


def _minute_groups(t, keys: list[str]) -> list[tuple[str, list[str]]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    sel = pc.is_in(t["key"], value_set=pa.array(keys))
    k = pc.filter(t["key"], sel).to_numpy(zero_copy_only=False)
    v = pc.filter(t["visitor"], sel).to_numpy(zero_copy_only=False)
    m = (pc.filter(t["ts"], sel).to_numpy() // 60).astype(np.int64)
    names = np.char.add(np.char.add(k.astype(str), ":"), m.astype(str))
    order = np.argsort(names, kind="stable")
    names, v = names[order], v[order]
    cut = np.flatnonzero(np.r_[True, names[1:] != names[:-1], True])
    return [(str(names[a]), list(v[a:b])) for a, b in zip(cut[:-1], cut[1:])]


def _redis(groups, keys, end_min: int, work: str, reps: int) -> dict:
    import redis
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i, (name, vis) in enumerate(groups):
            pipe.pfadd(name, *vis)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        load = time.perf_counter() - t0
        names = [f"{k}:{m}" for k in keys for m in range(end_min - 43_200, end_min)]
        est = []
        lat = _timed(lambda: est.append(r.pfcount(*names)), max(3, reps // 10))
        return {"lat": lat, "estimate": est[-1], "load_s": load, "sketches": len(groups)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _datasketches(groups, keys, end_min: int, reps: int) -> dict:
    import datasketches as ds
    sk = {}
    for name, vis in groups:
        s = ds.hll_sketch(14, ds.tgt_hll_type.HLL_4)
        for v in vis:
            s.update(v)
        sk[name] = s
    est = []

    def q():
        u = ds.hll_union(14)
        for k in keys:
            for m in range(end_min - 43_200, end_min):
                s = sk.get(f"{k}:{m}")
                if s is not None:
                    u.update(s)
        est.append(u.get_result().get_estimate())
    lat = _timed(q, max(3, reps // 10))
    return {"lat": lat, "estimate": est[-1]}


# ---------------------------------------------------------------- 3: near-exact accuracy

def sparse_accuracy(trials: int, seed: int) -> list:
    import datasketches as ds

    from impressions.sketch.config import SketchConfig
    from impressions.sketch.counter import LocalCounter
    from impressions.sketch.hll import estimate_from_parts
    now = 1_800_000_000.0
    rows = []
    for label, n, span, per_minute_ds in (("sparse: 10,000 over a day", 10_000, 86_000, True),
                                          ("dense: 200,000 in an hour", 200_000, 3_500, False)):
        rng = np.random.default_rng(seed + n)
        ours, registers_only, dsk, exact_paths = [], [], [], 0
        t_ours = []
        for _ in range(trials if n == 10_000 else max(20, trials // 5)):
            h = rng.integers(0, 2**64, n, dtype=np.uint64)
            h = np.concatenate([h, h[rng.random(n) < 0.5]])  # half seen twice
            ts = now - rng.uniform(0, span, len(h))
            c = LocalCounter(SketchConfig(), shards=4)
            c.ingest(ts, ["ad"] * len(h), hashes=h, now=now)
            c.maintain(now)
            t0 = time.perf_counter()
            r = c.query(["ad"], last=span // 60 + 1, now=now)[0]
            t_ours.append((time.perf_counter() - t0) * 1e3)
            ours.append(r.estimate.value / n - 1)
            exact_paths += r.estimate.relative_error < 0.001
            rng_b = c.config.resolve(now=now, last=span // 60 + 1)
            hist = sum(s.query(["ad"], rng_b.b0, rng_b.b1)[0][0] for s in c.stores)
            registers_only.append(estimate_from_parts(hist, None, 1 << 14).value / n - 1)
            # DataSketches: one sketch a minute (as it would keep a time series), unioned over the range
            minute = (ts // 60).astype(np.int64)
            order = np.argsort(minute, kind="stable")
            cut = np.flatnonzero(np.r_[True, minute[order][1:] != minute[order][:-1], True])
            u = ds.hll_union(14)
            hs = h[order]
            for a, b in zip(cut[:-1], cut[1:]):
                s = ds.hll_sketch(14, ds.tgt_hll_type.HLL_4)
                for x in hs[a:b].view(np.int64).tolist():
                    s.update(x)
                u.update(s)
            dsk.append(u.get_result().get_estimate() / n - 1)
        rmse = [100 * math.sqrt(np.mean(np.square(x))) for x in (ours, registers_only, dsk)]
        rows.append([label, len(ours), *rmse, f"{exact_paths}/{len(ours)}", float(np.median(t_ours))])
    return rows


# ---------------------------------------------------------------- 4: overlap

def overlap_accuracy(trials: int, seed: int) -> tuple[list, dict]:
    from impressions.sketch.hll import RegisterRange, coupons_from_hashes
    from impressions.sketch.sets import estimate_overlap
    rr = RegisterRange(14, 1, 0)
    H = rr.prec.hist_len
    rows, raw = [], {}
    for jac in (0.5, 0.1, 0.01):
        rng = np.random.default_rng(seed + int(jac * 1000))
        n_u = 200_000
        both = int(round(jac * n_u))
        only = (n_u - both) // 2
        res = []
        t_est = []
        for _ in range(trials):
            h = rng.integers(0, 2**64, n_u, dtype=np.uint64)
            ra = rr.registers_from_coupons(coupons_from_hashes(h[: only + both]))
            rb = rr.registers_from_coupons(coupons_from_hashes(h[only:]))
            joint = np.bincount(ra.astype(np.int64) * H + rb, minlength=H * H).reshape(H, H)
            t0 = time.perf_counter()
            o = estimate_overlap(joint, None, rr.prec.m)
            t_est.append((time.perf_counter() - t0) * 1e3)
            lo, hi = o.interval
            z = 1.959963984540054
            res.append((o.both / both - 1, lo <= both <= hi, o.ie / both - 1,
                        o.ie - z * o.ie_se <= both <= o.ie + z * o.ie_se, o.distinguishable))
        r = np.array(res, float)
        raw[jac] = r
        rows.append([jac, both, trials, 100 * math.sqrt(np.mean(r[:, 0] ** 2)), 100 * np.mean(r[:, 1]),
                     100 * math.sqrt(np.mean(r[:, 2] ** 2)), 100 * np.mean(r[:, 3]), 100 * np.mean(r[:, 4]),
                     float(np.median(t_est))])
    return rows, raw


def _plot(series: dict, raw: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    pts = series["points"]
    x = np.array([p["end"] for p in pts], float)
    x = (x - x[-1]) / 86400
    y = np.array([p["unique_visitors"] for p in pts], float)
    lo = np.array([p["interval"][0] for p in pts], float)
    hi = np.array([p["interval"][1] for p in pts], float)
    axes[0].fill_between(x, lo, hi, alpha=0.3, label="95 % interval")
    axes[0].plot(x, y, lw=1, label="unique visitors, trailing 24 h")
    axes[0].set(xlabel="days before now (window end)", ylabel="unique visitors",
                title=f"rolling series: {len(pts)} points, one call")
    axes[0].legend(fontsize=8)
    jacs = sorted(raw)
    axes[1].plot(jacs, [100 * math.sqrt(np.mean(raw[j][:, 0] ** 2)) for j in jacs], marker="o", label="joint MLE")
    axes[1].plot(jacs, [100 * math.sqrt(np.mean(raw[j][:, 2] ** 2)) for j in jacs], marker="o",
                 label="inclusion-exclusion")
    axes[1].set(xscale="log", yscale="log", xlabel="Jaccard", ylabel="RMSE of |A and B| (%)",
                title="overlap of two 100k-ish audiences (p = 14)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=5e6, help="events of the cluster part (1000 ads, 30 days)")
    ap.add_argument("--reps", type=int, default=60, help="client queries per latency cell")
    ap.add_argument("--trials", type=int, default=200, help="seeded trials per accuracy point")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="audience-")
    try:
        cl = cluster_part(int(a.events), a.reps, a.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sparse_rows = sparse_accuracy(a.trials, a.seed)
    ov_rows, raw = overlap_accuracy(a.trials, a.seed)

    ours_reach = _pcts(cl["lat"]["ours: reach, 100 keys, 30 days"])
    lat_rows = [[name, *_pcts(v), len(v)] for name, v in cl["lat"].items()]
    for name, d in cl["peers"].items():
        lat_rows.append([name, *_pcts(d["lat"]), len(d["lat"])])
    truth = cl["reach_truth"]
    acc = [["ours", cl["reach"]["unique_visitors"], 100 * (cl["reach"]["unique_visitors"] / truth - 1)]]
    for name, d in cl["peers"].items():
        acc.append([name.split(" ")[0], int(round(d["estimate"])), 100 * (d["estimate"] / truth - 1)])
    redis_p50 = _pcts(cl["peers"]["Redis PFCOUNT over 100 x 43,200 per-minute keys"]["lat"])[0]
    ds_p50 = _pcts(cl["peers"]["DataSketches union of the same per-minute sketches"]["lat"])[0]
    redis_sketches = cl["peers"]["Redis PFCOUNT over 100 x 43,200 per-minute keys"]["sketches"]
    roll_rows = []
    for label, one, roll in cl["rolling"]:
        o, r = _pcts(one), _pcts(roll)
        roll_rows.append([label, o[0], o[1], r[0], r[1], r[0] / o[0]])
    cmd = "python -m benchmarks.bench_audience" + ("" if a.events == 5e6 else f" --events {a.events:g}") + \
        ("" if a.trials == 200 else f" --trials {a.trials}")
    plot = ""
    if not a.no_write:
        os.makedirs(os.path.join(DOCS, "img"), exist_ok=True)
        _plot(cl["series"], raw, os.path.join(DOCS, "img", "audience.png"))
        plot = "\n![rolling series and overlap error](img/audience.png)\n"
    body = f"""## Audience questions: reach, rolling series, near-exact counts, overlap (`{cmd}`)

Machine: {machine()}.  One run.  Cluster part: {cl['events']:,} events over 30 days on 1,000 ads (Zipf),
the real ingest job into a local Ray cluster of 2 shards ({cl['ingest_s']:.1f} s with rollups), questions
through the Python client; peers on the same events, in the same run.

**Reach of 100 keys (ad-0 .. ad-99, the busiest) over 30 days**: one call per shard merges the keys'
registers.  Ours p50 {ours_reach[0]:.1f} ms / p99 {ours_reach[1]:.1f} ms (target p99 <= 20 ms); Redis
`PFCOUNT` over the {100 * 43_200:,} per-minute names ({redis_sketches:,} of them hold data) takes
{redis_p50 / ours_reach[0]:,.0f}x ours at p50, the DataSketches union
{ds_p50 / ours_reach[0]:,.0f}x.

{table(["question", "p50 ms", "p99 ms", "queries"], lat_rows)}

Accuracy of that reach against the exact count ({truth:,} visitors, {cl['reach_impressions']:,} impressions;
ours reports {cl['reach']['impressions']:,} impressions, frequency {cl['reach']['frequency']}):

{table(["answer", "unique visitors", "error %"], acc)}

**Rolling series**: trailing 24 h every hour over the last 30 days ({cl['points']} points: every window inside
the range) in one call per shard, against one 24 h query; asking the same points one query at a time took
{cl['one_by_one_ms']:,.0f} ms, and gave the same answers: {cl['same_as_queries']}.

{table(["key", "one 24 h query p50 ms", "p99 ms", f"{cl['points']}-point series p50 ms", "p99 ms",
        "series / one query (p50)"], roll_rows)}
{plot}
**Near-exact counts while sparse** ({a.trials} seeded trials; 4 shards, p = 14; rollups built): each
visitor seen once or twice, per-minute rows.  "Registers" is the estimate the same registers give (what
every answer was before); DataSketches unions one lg_k 14 sketch a minute over the range.

{table(["stream", "trials", "ours RMSE %", "registers RMSE %", "DataSketches RMSE %", "near-exact answers",
        "ours query ms (p50)"], sparse_rows)}

**Overlap** ({a.trials} seeded trials per row; two audiences, 200,000 visitors in their union, p = 14,
one shard's registers): what we answer (joint maximum likelihood, Ertl 2017) against inclusion-exclusion
with the variance of its three estimates summed.

{table(["Jaccard", "true overlap", "trials", "MLE RMSE %", "MLE 95 % coverage %", "IE RMSE %",
        "IE 95 % coverage %", "told apart from 0 %", "MLE ms (p50)"], ov_rows)}
"""
    print(body)
    if not a.no_write:
        write_section("audience", body)
    return cl


if __name__ == "__main__":
    main()
