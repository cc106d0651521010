"""``impressions up`` / ``down`` on this machine, with real processes.

``down`` stops every Ray process here, the session cluster's too, so the
test starts the session cluster again when it ends, whatever the outcome:
it can run in any order among the others.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import ray

from impressions.cluster.workload import generate
from tests.conftest import ROOT, free_port, restart_ray


def _cli(*args, env):
    exe = os.path.join(os.path.dirname(sys.executable), "impressions")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def test_up_ingest_query_down(ray_cluster, tmp_path):
    try:
        _up_ingest_query_down(tmp_path)
    finally:
        restart_ray(ray_cluster)  # the session cluster, back for the tests that follow


def _quickstart() -> str:
    """The README's quickstart commands, as one shell script."""
    readme = (ROOT / "README.md").read_text().split("## Quickstart on a running cluster", 1)[1]
    return re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[0]


def _up_ingest_query_down(tmp_path):
    ray.shutdown()
    # a new user's shell: no RAY_AUTH_MODE, no Ray token yet (`impressions up` makes one: token auth is on)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), IMPRESSIONS_NAMESPACE="life", IMPRESSIONS_SHARDS="2",
               IMPRESSIONS_STORAGE=f"file://{tmp_path}/store")
    assert _cli("down", env=env).returncode == 0  # the session cluster goes: `up` starts its own
    # the folder of the set-up commands: its .venv, and files where the demo writes them
    work = tmp_path / "work"
    (work / "data" / "demo" / "events-1").mkdir(parents=True)
    (work / ".venv").symlink_to(Path(sys.prefix))
    end = float(int(time.time()) // 60 * 60 - 60)
    pq.write_table(generate(5_000, days=1, visitors=2_000, keys=5, seed=9, end=end),
                   work / "data" / "demo" / "events-1" / "part-0.parquet")
    quick = subprocess.run(["bash", "-ec", _quickstart()], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
    assert quick.returncode == 0, quick.stdout[-3000:] + quick.stderr[-3000:]
    assert "started a local cluster (token auth on" in quick.stdout, quick.stdout
    assert (home / ".ray" / "auth_token").exists()
    assert "accepted: 5,000   rejected: 0" in quick.stderr + quick.stdout, quick.stderr[-3000:]
    assert "site-wide" in quick.stdout and "5,000" in quick.stdout.split("site-wide")[-1], quick.stdout
    r = httpx.get("http://127.0.0.1:8000/v1/unique", params={"last": "2d"}, timeout=30).json()
    assert r["impressions"] == 5_000
    # the same job again: every file was counted, none is counted twice
    activate, auth, _, submit = _quickstart().splitlines()[:4]
    again = subprocess.run(["bash", "-ec", f"{activate}\n{auth}\n{submit}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "accepted: 0" in again.stderr + again.stdout and "skipped 1 file ingested before" in again.stderr + again.stdout
    q = _cli("query", "--last", "2d", "--json", env=env)
    assert q.returncode == 0 and json.loads(q.stdout)["impressions"] == 5_000, q.stderr
    assert "2 shards" in _cli("status", env=env).stdout
    down = _cli("down", env=env)
    assert down.returncode == 0 and "stopped the local Ray" in down.stdout
    gone = _cli("status", "--namespace", "life", env=env)
    assert gone.returncode == 2 and "no Ray cluster is running here" in gone.stderr
    refused = subprocess.run([sys.executable, "-c", "from impressions.cluster.client import Client; Client()"],
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode != 0 and "ClusterNotRunning: no Ray cluster is running here" in refused.stderr
    # and back: the data was on the storage
    port = free_port()
    assert _cli("up", "--port", str(port), env=env).returncode == 0
    q = _cli("query", "--last", "2d", "--json", env=env)
    assert json.loads(q.stdout)["impressions"] == 5_000
    assert _cli("down", env=env).returncode == 0
