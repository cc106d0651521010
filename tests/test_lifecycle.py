"""``impressions up`` / ``down`` on this machine, with real processes.

``down`` stops every Ray process here, the session cluster's too, so the
test starts the session cluster again when it ends, whatever the outcome:
it can run in any order among the others.
"""

import json
import os
import subprocess
import sys
import time

import httpx
import pyarrow.parquet as pq
import ray

from cluster.workload import generate
from tests.conftest import free_port, restart_ray, wait_for


def _cli(*args, env):
    exe = os.path.join(os.path.dirname(sys.executable), "impressions")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def test_up_ingest_query_down(ray_cluster, tmp_path):
    try:
        _up_ingest_query_down(tmp_path)
    finally:
        restart_ray(ray_cluster)  # the session cluster, back for the tests that follow


def _up_ingest_query_down(tmp_path):
    ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(IMPRESSIONS_NAMESPACE="life", IMPRESSIONS_SHARDS="2", IMPRESSIONS_STORAGE=f"file://{tmp_path}/store")
    assert _cli("down", env=env).returncode == 0  # the session cluster goes: `up` starts its own
    port = free_port()
    up = _cli("up", "--port", str(port), env=env)
    assert up.returncode == 0, up.stderr
    assert "started a local cluster" in up.stdout and f"http://127.0.0.1:{port}" in up.stdout
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, timeout=120,
             what="the REST app")
    end = float(int(time.time()) // 60 * 60 - 60)
    pq.write_table(generate(5_000, days=1, visitors=2_000, keys=5, seed=9, end=end), tmp_path / "e.parquet")
    ing = _cli("ingest", str(tmp_path / "e.parquet"), env=env)
    assert ing.returncode == 0 and "5,000 accepted" in ing.stdout, ing.stdout + ing.stderr
    q = _cli("query", "--last", "2d", "--json", env=env)
    assert q.returncode == 0 and json.loads(q.stdout)["impressions"] == 5_000, q.stderr
    r = httpx.get(f"http://127.0.0.1:{port}/v1/unique", params={"last": "2d"}, timeout=30).json()
    assert r["impressions"] == 5_000
    assert "2 shards" in _cli("status", env=env).stdout
    down = _cli("down", env=env)
    assert down.returncode == 0 and "stopped the local Ray" in down.stdout
    gone = _cli("status", env=env)
    assert gone.returncode == 2 and "no Ray cluster is running here" in gone.stderr
    # and back: the data was on the storage
    assert _cli("up", "--port", str(port), env=env).returncode == 0
    q = _cli("query", "--last", "2d", "--json", env=env)
    assert json.loads(q.stdout)["impressions"] == 5_000
    assert _cli("down", env=env).returncode == 0
