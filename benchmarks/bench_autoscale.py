"""Ray's autoscaler driving shard placement, on this machine.

    python -m benchmarks.bench_autoscale            # writes the "autoscale" section of docs/benchmarks.md

Ray's standard autoscaler runs against its ``fake_multinode`` provider (worker
"nodes" are raylets started on this machine; the autoscaler, its monitor and
its idle timeouts are Ray's own code).  The worker type is ray-cluster.yaml's
``shard_worker`` (its custom resources and min/max workers; CPU given, since a
local process has no instance type to detect it from) and the store is an
S3-protocol server on 127.0.0.1.  The scenario:

1. the head starts and the autoscaler brings the minimum of workers up;
2. a cluster of 4 shards is created and given events;
3. re-sharding to 8 asks for more shard slots than the workers hold: the
   autoscaler adds workers, the new shards land there, the old ones go;
4. idle workers are removed; re-sharding back to 4 needs room for both
   layouts for a moment (one more worker), then the idle ones go again.

Answers are checked after each step.  Nodes over time and the seconds each
step took are printed and written to docs/benchmarks.md.  It stops every Ray
process on this machine first (``ray stop --force``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.report import free_port, machine, table, write_section

ROOT = Path(__file__).resolve().parent.parent
RESOURCE = "impressions_shard"
BASE = {"cluster_name": "fake_multinode", "max_workers": 8,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


def _ray(*args, env=None, check=True):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], capture_output=True, text=True, timeout=300, env=env, check=check)


def worker_type() -> dict:
    """ray-cluster.yaml's shard worker type, as the fake provider needs it."""
    cfg = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    w = cfg["available_node_types"]["shard_worker"]
    return {"resources": {"CPU": 2, **w["resources"]}, "node_config": {}, "min_workers": w["min_workers"],
            "max_workers": w["max_workers"]}


class Nodes(threading.Thread):
    """Samples the alive worker nodes (those with shard slots) every half second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.stop = False

    def count(self) -> int:
        import ray
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(RESOURCE))

    def run(self):
        while not self.stop:
            try:
                n = self.count()
                if not self.samples or self.samples[-1][1] != n:
                    self.samples.append((round(time.perf_counter() - self.t0, 1), n))
            except Exception:  # noqa: BLE001 - a sample missed while a node comes or goes
                pass
            time.sleep(0.5)

    def wait(self, cond, timeout: float) -> float:
        t = time.perf_counter()
        while time.perf_counter() - t < timeout:
            if cond(self.count()):
                return time.perf_counter() - t
            time.sleep(0.5)
        status = _ray("status", "-v", check=False).stdout[-1500:]
        try:
            import ray
            from ray.util.state import list_actors, list_workers
            status += "\nactors: " + repr([(a.class_name, a.node_id[-5:], a.state) for a in list_actors()
                                            if a.state == "ALIVE"])
            status += "\nworkers: " + repr([(w.worker_type, w.node_id[-5:] if w.node_id else None, w.is_alive)
                                             for w in list_workers() if w.is_alive])
            status += "\nnodes: " + repr([(n["NodeID"][-5:], n["Alive"], n.get("NodeName")) for n in ray.nodes()])
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            status += f"\n({e})"
        raise TimeoutError(f"the workers did not reach the expected count within {timeout:g} s "
                           f"(now {self.count()}; history {self.samples}); ray status:\n{status}")


def scenario(s3_endpoint: str, out=print, events: int = 50_000) -> dict:
    """Run the scenario on a fresh autoscaling cluster; every Ray process here is stopped before and after."""
    import pyarrow.fs as pafs
    import ray

    from impressions.cluster.bootstrap import teardown
    from impressions.cluster.client import Client
    from impressions.cluster.config import ClusterConfig
    from impressions.cluster.workload import generate

    wt = worker_type()
    slots = wt["resources"][RESOURCE]
    config = {**BASE, "available_node_types": {
        "shard_worker": wt, "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}}}
    path = Path(tempfile.mkdtemp()) / "autoscale.yaml"
    path.write_text(json.dumps(config))
    ray.shutdown()
    _ray("stop", "--force", check=False)
    env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")
    env.pop("RAY_ADDRESS", None)
    saved = os.environ.pop("RAY_ADDRESS", None)
    _ray("start", "--head", f"--autoscaling-config={path}", "--num-cpus=2", "--disable-usage-stats",
         "--dashboard-host=127.0.0.1", env=env)
    figures: dict = {"worker": wt, "slots": slots}
    try:
        ray.init(address="auto", log_to_driver=False)
        nodes = Nodes()
        nodes.start()
        figures["seconds_to_min_workers"] = round(nodes.wait(lambda n: n >= wt["min_workers"], 120), 1)
        fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.split("://")[1], scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("autoscale")
        cfg = ClusterConfig(shards=4, namespace="autoscale", storage="s3://autoscale/cluster",
                            s3_endpoint=s3_endpoint, shard_resource=RESOURCE)
        client = Client(config=cfg, start=True)
        now = time.time()
        client.ingest(generate(events, days=1, visitors=events // 4, keys=10, seed=5, end=now - 60), now=now)
        want = client.query([None, "ad-0", "ad-1"], last="2d", now=now)

        def same(tag):
            # exact impressions; the same estimate within its error bars (an estimate may switch between the
            # near-exact sparse form and the register form when the shard count changes: each shard decides
            # on its own slice)
            got = client.query([None, "ad-0", "ad-1"], last="2d", now=now)
            for g, w in zip(got, want):
                assert not g["partial"] and g["impressions"] == w["impressions"], (tag, g, w)
                assert w["interval"][0] <= g["unique_visitors"] <= w["interval"][1] or \
                    g["interval"][0] <= w["unique_visitors"] <= g["interval"][1], (tag, g, w)

        def placed():
            return sorted({s["node"] for s in client.stats()["shards"]})

        steps = []
        for target in (8, 4):
            before = nodes.count()
            first = len(nodes.samples) - 1  # the sample in force when this step begins
            t = time.perf_counter()
            r = client.rescale(target)
            took = time.perf_counter() - t
            peak = max(n for _, n in nodes.samples[first:])
            used = placed()
            same(f"after re-sharding to {target}")
            idle = nodes.wait(lambda n, k=len(used): n <= max(k, wt["min_workers"]), 180)
            steps.append({"shards": f"{r['from']} -> {target}", "workers_before": before, "rescale_s": round(took, 1),
                          "workers_peak": peak, "nodes_used": len(used), "idle_removed_s": round(idle, 1),
                          "workers_after": nodes.count()})
            out(f"re-sharded to {target} in {took:.1f} s; shards on {len(used)} workers; idle workers gone "
                f"{idle:.1f} s later")
            nodes.samples.append((round(time.perf_counter() - nodes.t0, 1), nodes.count()))
        same("at the end")
        figures["steps"] = steps
        figures["timeline"] = list(nodes.samples)
        nodes.stop = True
        teardown("autoscale")
    finally:
        ray.shutdown()
        _ray("stop", "--force", check=False)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return figures


def report(f: dict) -> str:
    w = f["worker"]
    rows = [[s["shards"], s["workers_before"], s["rescale_s"], s["workers_peak"], s["nodes_used"],
             s["idle_removed_s"], s["workers_after"]] for s in f["steps"]]
    timeline = ", ".join(f"{t:g} s: {n}" for t, n in f["timeline"])
    return (f"## Autoscaling: re-sharding drives Ray's autoscaler (`python -m benchmarks.bench_autoscale`)\n\n"
            f"Machine: {machine()}.  Ray's autoscaler with its `fake_multinode` provider (worker nodes are raylets "
            f"on this machine), the worker type of ray-cluster.yaml: {w['resources'][RESOURCE]} shard slots "
            f"(`{RESOURCE}`), min {w['min_workers']}, max {w['max_workers']} workers, idle timeout 6 s; store on "
            f"an S3-protocol server on 127.0.0.1.  The minimum of workers was up {f['seconds_to_min_workers']} s "
            f"after the head.\n\n"
            + table(["re-sharding", "workers before", "seconds to re-shard (workers added included)",
                     "workers at the peak", "workers holding shards", "seconds until idle workers were removed",
                     "workers after"], rows)
            + f"\n\nWorkers over time (seconds: workers): {timeline}.\n\n"
            "A re-sharding runs both layouts until the new shards are seeded, so it briefly needs slots for both: "
            "going down also adds a worker for a moment, which the autoscaler removes once idle.\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        f = scenario(f"http://127.0.0.1:{port}", events=a.events)
    finally:
        server.stop()
    body = report(f)
    print(body)
    if not a.no_write:
        write_section("autoscale", body)
    return f


if __name__ == "__main__":
    main()
