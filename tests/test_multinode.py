"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a raylet and workers each, Ray's own
code), the store on the loopback S3 server: shards spread over three worker nodes, and one whole node killed
(its raylet and every process on it) during an ingest job.

These clusters cannot run beside the session's: the module stops it first and starts it again at the end.
Ray is told to notice a dead node within about 3 s (GCS health checks every 1 s, 3 misses) instead of its
default of about 18 s (which a production cluster may keep: it only delays the shards' restart)."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from impressions.cluster.config import ClusterConfig
from impressions.cluster.workload import generate
from impressions.sketch.counter import LocalCounter
from impressions.sketch.store import SketchConfig
from tests.conftest import _ray_bin, free_port, restart_ray, wait_for

HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
          "health_check_failure_threshold": 3}
RESOURCE = "impressions_shard"


def _stop_ray() -> None:
    ray.shutdown()
    subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture
def nodes(ray_cluster, s3_server):
    from ray.cluster_utils import Cluster

    _stop_ray()  # the session's cluster: back at the end
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": free_port(), "_system_config": HEALTH})
    workers = [c.add_node(num_cpus=1, resources={RESOURCE: 2}) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        _stop_ray()
        restart_ray(ray_cluster)


def _node_of(client) -> list[str]:
    return [s and s["node"] for s in client.stats()["shards"]]


def test_losing_a_whole_node_mid_ingest_loses_nothing(nodes, s3_server, tmp_path):
    from impressions.cluster.bootstrap import teardown
    from impressions.cluster.client import Client

    cluster, workers = nodes
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("multinode")
    cfg = ClusterConfig(sketch=SketchConfig(), shards=4, namespace="multi", storage="s3://multinode/cluster",
                        s3_endpoint=s3_server, shard_resource=RESOURCE, batch_rows=10_000, max_inflight=1,
                        checkpoint_interval_s=5.0)
    client = Client(config=cfg, start=True)
    try:
        _lose_a_node(client, cluster, workers, tmp_path)
    finally:
        teardown("multi")


def _lose_a_node(client, cluster, workers, tmp_path):
    placed = _node_of(client)
    worker_ids = {w.node_id for w in workers}
    assert set(placed) <= worker_ids and len(set(placed)) == 3, placed  # spread, and only where the resource is
    now = time.time()
    stream = generate(400_000, days=1, visitors=100_000, keys=20, seed=31, end=now - 120)
    folder = tmp_path / "events"
    folder.mkdir()
    for i in range(4):
        pq.write_table(stream.slice(i * 100_000, 100_000), folder / f"part-{i}.parquet", row_group_size=25_000)
    ref = LocalCounter(SketchConfig())
    ref.ingest(stream["ts"].to_numpy(), stream["key"], visitors=stream["visitor"], now=now)

    out: dict = {}

    def ingest():
        try:
            out["summary"] = client.ingest_files([str(folder)], now=now, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e

    job = threading.Thread(target=ingest, daemon=True)
    job.start()
    wait_for(lambda: sum(s["events"] for s in client.stats()["shards"] if s) > 20_000, timeout=120,
             what="the ingest to get going")
    assert job.is_alive(), "the ingest finished before the fault: make it longer"
    # the node holding shard 0 goes, with its raylet and every process on it
    victim_id = placed[0]
    victim = next(w for w in workers if w.node_id == victim_id)
    lost = [i for i, n in enumerate(placed) if n == victim_id]
    t0 = time.perf_counter()
    cluster.remove_node(victim, allow_graceful=False)
    partial_seen, back = [], None
    while time.perf_counter() - t0 < 180:
        r = client.unique(None, last="2d", now=now)
        partial_seen.append(r["partial"])
        nodes_now = _node_of(client)
        if not r["partial"] and all(nodes_now[i] not in (None, victim_id) for i in lost):
            back = time.perf_counter() - t0
            break
        time.sleep(0.5)
    assert back is not None, f"shards {lost} did not come back on another node: {_node_of(client)}"
    print(f"shards {lost} answering again from other nodes {back:.1f} s after their node was killed; "
          f"{sum(partial_seen)} of {len(partial_seen)} answers meanwhile were partial")
    job.join(timeout=300)
    assert not job.is_alive() and "error" not in out, out.get("error")
    summary = out["summary"]
    assert summary.report.accepted == stream.num_rows and not summary.failed_files
    # nothing acknowledged is lost, nothing is counted twice: the same answers as the reference
    client.maintain()
    assert set(_node_of(client)) <= {w.node_id for w in workers if w is not victim}
    for key in [None, "ad-0", "ad-3", "ad-17"]:
        for last in ("1h", "6h", "2d"):
            got = client.unique(key, last=last, now=now)
            want = ref.unique(key, last=last, now=now).to_dict()
            assert not got["partial"] and got == {**want, "key": got["key"]}, (key, last)
    b1 = int(now // 60) + 1
    assert np.array_equal(client.registers("ad-0", b1 - 1440, b1), ref.registers("ad-0", b1 - 1440, b1))
    # a node that joins gets nothing until a re-sharding places shards there.  A re-sharding runs both layouts
    # until the new one is seeded, so it needs room for both: the two old nodes are full, the new one has room
    before = _node_of(client)
    joined = cluster.add_node(num_cpus=2, resources={RESOURCE: 8})  # 8 shards x 0.25 CPU
    cluster.wait_for_nodes()
    time.sleep(2)
    assert _node_of(client) == before
    assert client.rescale(8)["shards"] == 8
    after = _node_of(client)
    assert set(after) == {joined.node_id}, after
    for key in [None, "ad-0", "ad-3"]:
        got = client.unique(key, last="2d", now=now)
        assert got == {**ref.unique(key, last="2d", now=now).to_dict(), "key": got["key"]}


def test_resharding_drives_rays_autoscaler(ray_cluster, s3_server):
    """ray-cluster.yaml's worker type under Ray's real autoscaler (local provider): more shards than the
    workers hold add workers, the new shards land there, and idle workers go (benchmarks/bench_autoscale.py
    measures the same scenario for docs/benchmarks.md)."""
    from benchmarks.bench_autoscale import scenario

    try:
        f = scenario(s3_server, out=print, events=20_000)
    finally:
        restart_ray(ray_cluster)
    up, down = f["steps"]
    slots = f["slots"]
    assert up["workers_peak"] > up["workers_before"] and up["nodes_used"] >= 8 // slots  # workers were added
    assert up["workers_after"] == up["nodes_used"]  # and the idle one went
    assert down["workers_after"] <= max(4 // slots, f["worker"]["min_workers"])
