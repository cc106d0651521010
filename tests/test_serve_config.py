"""deploy/serve.yaml, run as Serve users run configs: ``serve run`` on the session's Ray, on a namespace
where no actor exists yet (the app creates them), then events in and answers out over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from impressions.cluster.bootstrap import get_coordinator, teardown
from tests.conftest import ROOT, free_port, wait_for

CONFIG = ROOT / "deploy" / "serve.yaml"


def test_the_config_is_valid_for_this_serve():
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = cfg.applications
    assert app.import_path == "impressions.cluster.serve:build" and cfg.http_options.host == "127.0.0.1"
    (dep,) = app.deployments
    assert dep.name == "ImpressionsApi" and dep.autoscaling_config["max_replicas"] >= 2


def test_serve_run_of_the_config_on_a_fresh_namespace(ray_cluster, tmp_path):
    from ray import serve

    serve.shutdown()  # Serve takes http_options only when it first starts: the config's own, here
    ns = "servecfg"
    cfg = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["runtime_env"]["env_vars"] = {
        "IMPRESSIONS_NAMESPACE": ns, "IMPRESSIONS_SHARDS": "2", "IMPRESSIONS_STORAGE": f"file://{tmp_path}/store",
        "IMPRESSIONS_API_KEYS": "rk:read,wk:write"}
    path = Path(tmp_path) / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster["address"])
    try:
        t = time.perf_counter()
        run = subprocess.run([serve_bin, "run", "--non-blocking", str(path)], capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        def ready() -> bool:  # a probe that times out (the replica still starting the actors) is "not yet"
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.TimeoutException:
                return False
        wait_for(ready, timeout=120, what="readyz")
        print(f"serve run to ready: {time.perf_counter() - t:.1f} s")
        get_coordinator(ns)  # the replicas created the actors
        now = time.time()
        events = [{"ts": now - i, "key": f"ad-{i % 3}", "visitor": f"u{i}"} for i in range(300)]
        assert httpx.post(f"{url}/v1/events", json=events, timeout=60).status_code == 401  # keys from the env
        r = httpx.post(f"{url}/v1/events", json=events, headers={"Authorization": "Bearer wk"}, timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 300, r.text
        got = httpx.get(f"{url}/v1/unique", params={"key": "ad-1", "last": "15m"},
                        headers={"Authorization": "Bearer rk"}, timeout=30).json()
        assert got["unique_visitors"] == 100 and got["impressions"] == 100 and got["exact"]
        status = subprocess.run([serve_bin, "status", "--address", ray_cluster["dashboard"]], capture_output=True,
                                text=True, timeout=120, env=env)
        assert "ImpressionsApi" in status.stdout and "RUNNING" in status.stdout, status.stdout + status.stderr
    finally:
        serve.shutdown()
        teardown(ns)
