"""One-key query latency of two checkouts of this project, side by side in one run.

    git worktree add /tmp/before <commit>
    python -m benchmarks.ab_core --before /tmp/before                 # 20M per-ad events, as bench_core
    python -m benchmarks.ab_core --before /tmp/before --events 2e6    # quicker

Each checkout runs in a process of its own (its own code, the same seeded
stream as ``bench_core``'s per-ad stream, ingested and maintained), and the
two are asked the same queries in alternating rounds, so both meet the same
machine load; every cell's p50 and p99 are over all rounds.  Prints a table
(and writes nothing): a refactoring's "no slower" is read off it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

NS = [1, 60, 1440, 10_080, 43_200]
NOW = 1_800_000_000.0

WORKER = r"""
import json, sys, time
import numpy as np
repo, events, ads = sys.argv[1], int(float(sys.argv[2])), int(sys.argv[3])
sys.path.insert(0, repo)
from impressions.cluster.workload import generate
try:
    from impressions.sketch.counter import LocalCounter as Counter
except ImportError:  # checkouts from before the rename
    from impressions.sketch.counter import Counter
from impressions.sketch.store import SketchConfig
NOW = %r
tab = generate(events, days=29.9, visitors=3_000_000, keys=ads, seed=1, end=NOW)
ts = tab["ts"].combine_chunks().to_numpy(); key = tab["key"].combine_chunks(); vis = tab["visitor"].combine_chunks()
c = Counter(SketchConfig())
for s in range(0, len(ts), 1_000_000):
    c.ingest(ts[s:s + 1_000_000], key.slice(s, 1_000_000), visitors=vis.slice(s, 1_000_000), now=NOW)
c.maintain()
counts = np.bincount(tab["key"].combine_chunks().dictionary_encode().indices.to_numpy())
quiet = f"ad-{int(np.flatnonzero(counts >= 30)[-1])}"
del tab, ts, key, vis
print(json.dumps({"ready": True}), flush=True)
now_b = int(NOW // 60)
for line in sys.stdin:
    req = json.loads(line)
    rng = np.random.default_rng(req["seed"])
    out = {}
    for k in req["keys"]:
        name = quiet if k == "quiet" else k
        for n in req["ns"]:
            room = c.config.retention_buckets - n
            times = []
            for _ in range(req["reps"]):
                end_b = now_b + 1 - int(rng.integers(0, room + 1))
                t = time.perf_counter()
                c.query([name], start=(end_b - n) * 60, end=end_b * 60, now=NOW)
                times.append(time.perf_counter() - t)
            out[f"{k}|{n}"] = times
    print(json.dumps(out), flush=True)
""" % NOW


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the code to compare against")
    ap.add_argument("--after", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--events", type=float, default=20e6)
    ap.add_argument("--ads", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=150, help="queries per cell per round")
    a = ap.parse_args(argv)
    trees = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
    procs = {}
    for name, repo in trees.items():
        procs[name] = subprocess.Popen([sys.executable, "-c", WORKER, repo, str(a.events), str(a.ads)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        json.loads(procs[name].stdout.readline())
    keys = ["ad-0", "quiet", None]
    res: dict[str, dict[str, list]] = {n: {} for n in trees}
    for r in range(a.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            p = procs[name]
            p.stdin.write(json.dumps({"seed": r, "keys": keys, "ns": NS, "reps": a.reps}) + "\n")
            p.stdin.flush()
            for k, v in json.loads(p.stdout.readline()).items():
                res[name].setdefault(k, []).extend(v)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"one-key query latency, ms: {a.events:,.0f} per-ad events, {a.rounds} rounds x {a.reps} queries a cell\n")
    print(f"| key | n | before p50 | after p50 | before p99 | after p99 | p99 after / before |")
    print("|---|---|---|---|---|---|---|")
    for cell in res["before"]:
        k, n = cell.split("|")
        b = np.array(res["before"][cell]) * 1e3
        f = np.array(res["after"][cell]) * 1e3
        label = {"None": "site-wide", "quiet": "a quiet ad"}.get(k, k)
        print(f"| {label} | {int(n):,} | {np.median(b):.3f} | {np.median(f):.3f} | {np.percentile(b, 99):.3f} | "
              f"{np.percentile(f, 99):.3f} | {np.percentile(f, 99) / np.percentile(b, 99):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
