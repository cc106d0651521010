"""The README's main job, on the embedded default.

1. connect to Ray (a cluster already running here, else a local one with
   its dashboard, which job submission needs) and create the actors;
2. generate a realistic stream (many ads with Zipf popularity, repeat
   visitors, a daily cycle, a few days) and write it as Parquet under the
   storage folder;
3. ingest it with an ingest job submitted through Ray's job API, exactly as
   ``ray job submit -- python -m impressions.cluster.ingest DIR`` does;
4. print answers for a few keys and ranges next to the exact counts.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import ray

from impressions.cluster.bootstrap import connect, dashboard_url, ensure_actors
from impressions.cluster.config import ClusterConfig
from impressions.cluster.workload import generate, write_parquet
from impressions.durable.objects import filesystem
from impressions.sketch.hashing import hash_visitors


def exact(table: pa.Table, key, start: float, end: float) -> tuple[int, int]:
    ts = table["ts"].to_numpy()
    m = (ts >= start) & (ts < end)
    if key is not None:
        m &= np.asarray(table["key"].to_numpy(zero_copy_only=False) == key)
    h = hash_visitors(table["visitor"].filter(pa.array(m)))
    return len(np.unique(h)), int(m.sum())


def submit_ingest(dashboard: str, folder: str, config: ClusterConfig, timeout: float = 900) -> dict:
    """Run ``python -m impressions.cluster.ingest folder`` as a Ray job; return its summary."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    job = client.submit_job(entrypoint=f"{sys.executable} -m impressions.cluster.ingest {folder} --json --no-progress",
                            runtime_env={"env_vars": config.job_env()})
    deadline = time.time() + timeout
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"ingest job {job} still {status} after {timeout:g} s")
        time.sleep(0.5)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"ingest job {job} {status}:\n{logs[-2000:]}")
    line = next(ln for ln in logs.splitlines() if ln.startswith('{"files"'))
    return {"job": job, **json.loads(line)}


def run(events: int = 2_000_000, ads: int = 1000, days: float = 3.0, config: ClusterConfig | None = None,
        out=print) -> None:
    cfg = config or ClusterConfig.from_env()
    how = connect(include_dashboard=True)
    coord = ensure_actors(cfg)
    cfg = ray.get(coord.cluster_config.remote())
    out(f"Ray: {how}; {cfg.shards} shards in namespace {cfg.namespace!r}, storage {cfg.storage}")
    end = float(int(time.time()) - 60)
    out(f"generating {events:,} impressions of {ads:,} ads over {days:g} days ...")
    table = generate(events, days=days, visitors=max(1000, events // 4), keys=ads, seed=7, end=end)
    fs, base = filesystem(cfg.storage, cfg.s3_endpoint)
    folder = os.path.join(base, "demo", f"events-{int(end)}")
    write_parquet(table, folder, rows_per_file=max(100_000, events // 8))
    t = time.perf_counter()
    summary = submit_ingest(dashboard_url(), folder, cfg)
    dt = time.perf_counter() - t
    out(f"ingest job {summary['job']}: {summary['accepted']:,} events from {summary['files']} files, "
        f"{summary['rejected']:,} rejected; {summary['events_per_second']:,} events/s inside the job, "
        f"{dt:.1f} s with job start-up\n")
    ray.get(coord.maintain.remote())
    out(f"{'key':>10} {'range':>6} {'unique (estimate)':>18} {'95% interval':>22} {'exact unique':>13} "
        f"{'impressions':>12} {'exact impr.':>12} {'ms':>6}")
    for key in (None, "ad-0", "ad-3", f"ad-{ads - 1}"):
        for last in ("15m", "1h", "1d", f"{int(days)}d"):
            t = time.perf_counter()
            r = ray.get(coord.query.remote([key], cfg.sketch.resolve(now=end, last=last)))[0]
            ms = (time.perf_counter() - t) * 1e3
            true, imp = exact(table, key, r["start"], r["end"])
            lo, hi = r["interval"]
            out(f"{key or 'site-wide':>10} {last:>6} {r['unique_visitors']:>18,} {f'[{lo:,}, {hi:,}]':>22} "
                f"{true:>13,} {r['impressions']:>12,} {imp:>12,} {ms:>6.2f}")
    out("\nThe embedded Ray stops with this command; `impressions up` first keeps a cluster running.")
