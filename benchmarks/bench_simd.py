"""numpy's AVX-512 kernels on and off, side by side, on this machine's CPU (``sketch.simd``).

    python -m benchmarks.bench_simd                 # 4M events, 3 rounds, as in docs/benchmarks.md
    python -m benchmarks.bench_simd --events 1e6 --rounds 1 --no-write

Each round runs the same work in two fresh processes, one with numpy's AVX-512
kernels turned off (``NPY_DISABLE_CPU_FEATURES`` as ``sketch.simd`` sets it on
AMD Zen 4) and one with numpy's own choice (the variable set empty, which
``sketch.simd`` leaves alone), one after the other; the table holds the medians
over rounds.  The work: numpy's sort of a million 32-bit values, the sketch
core's ingest and rollup build of one stream (``bench_core``'s), and shard
queries over 30 days (one shard, in process: ``ShardStore.query``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

from benchmarks.report import machine, table, write_section
from impressions.sketch import simd


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def child(events: int, ads: int, queries: int, seed: int) -> dict:
    from benchmarks.bench_core import NOW, ingest_stream
    from impressions.sketch import npx

    rng = np.random.default_rng(seed)
    u32 = rng.integers(0, 1 << 31, 1_000_000).astype(np.uint32)
    u64 = rng.integers(0, 1 << 62, 1_000_000).astype(np.uint64)
    out = {**simd.stats(), "sort u32 1M ms": _median_ms(lambda: np.sort(u32), 9),
           "sort u64 1M ms": _median_ms(lambda: np.sort(u64), 9),
           "argsort u32 1M ms": _median_ms(lambda: np.argsort(u32), 5),
           "distinct u64 1M ms": _median_ms(lambda: npx.unique(u64), 5)}
    c, _, st = ingest_stream(events, ads, seed)
    out["ingest M ev/s"] = st["events"] / st["ingest_s"] / 1e6
    out["rollup build s"] = st["maintain_s"]
    out["ingest + rollups M ev/s"] = st["events"] / (st["ingest_s"] + st["maintain_s"]) / 1e6
    store = c.stores[0]
    now_b = int(NOW // c.config.bucket_seconds)
    n = 43_200
    room = c.config.retention_buckets - n
    for label, keys, reps in (("site-wide", [None], queries), ("ad-0", ["ad-0"], queries),
                              ("100 keys", [f"ad-{i}" for i in range(100)], max(queries // 5, 5))):
        ts = []
        for _ in range(reps):
            e = now_b + 1 - int(rng.integers(0, room + 1))
            t = time.perf_counter()
            store.query(keys, e - n, e)
            ts.append(time.perf_counter() - t)
        out[f"30 d {label} p50 ms"] = float(np.median(ts) * 1e3)
        out[f"30 d {label} p99 ms"] = float(np.percentile(ts, 99) * 1e3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=4e6)
    ap.add_argument("--ads", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200, help="1-key queries per cell (a fifth for 100 keys)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(int(a.events), a.ads, a.queries, a.seed)))
        return
    off = simd.feature_names(metadata.version("numpy"))
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    env = {k: v for k, v in os.environ.items() if k != simd.VARIABLE}
    for r in range(a.rounds):
        for name, value in (("off", off), ("on", "")) if r % 2 == 0 else (("on", ""), ("off", off)):
            cmd = [sys.executable, "-m", "benchmarks.bench_simd", "--child", "--events", str(a.events),
                   "--ads", str(a.ads), "--queries", str(a.queries), "--seed", str(a.seed)]
            got = subprocess.run(cmd, env={**env, simd.VARIABLE: value}, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(got.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} AVX-512 {name}: sort {runs[name][-1]['sort u32 1M ms']:.1f} ms, "
                  f"100 keys {runs[name][-1]['30 d 100 keys p50 ms']:.1f} ms", flush=True)
    assert all(x["numpy_avx512"] is False for x in runs["off"]), "the variable did not turn AVX-512 off"
    metrics = [k for k in runs["off"][0] if k.endswith(("ms", "M ev/s", " s"))]
    rows = []
    for k in metrics:
        o, n = (float(np.median([x[k] for x in runs[name]])) for name in ("off", "on"))
        rows.append([k, o, n, (n / o) if "ev/s" not in k else (o / n)])
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    facts = simd.cpu_facts(cpuinfo)
    why = simd.choose(env, cpuinfo, metadata.version("numpy"))[1]
    t = table(["measure", "AVX-512 off", "AVX-512 on (numpy's own)", "off is faster by (x)"], rows)
    cmd = "python -m benchmarks.bench_simd" + ("" if a.events == 4e6 else f" --events {a.events:g}")
    body = f"""## numpy's AVX-512 kernels on this CPU (`{cmd}`)

Machine: {machine()}.
CPU vendor {facts['vendor']}, family {facts['family']}, AVX-512 {'present' if 'avx512f' in facts['flags'] else 'absent'}:
`sketch.simd` decides "{why}".  {a.rounds} rounds, each the same work in two fresh processes one after the
other (`NPY_DISABLE_CPU_FEATURES="{off}"` against the variable set empty); medians over rounds.  Stream:
{int(a.events):,} events over 29.9 days, {a.ads:,} ads (Zipf), as in `bench_core`; queries on one shard in
process over 30 days (n = 43,200), random end times.

{t}
"""
    print(body)
    if not a.no_write:
        write_section("simd", body)


if __name__ == "__main__":
    main()
