"""Every metric the Grafana dashboard charts is exported by a running cluster, scraped from Ray's
Prometheus endpoint; ``impressions status --json`` reports each shard's node, memory and checkpoint."""

from __future__ import annotations

import json
import re
import time

import httpx
import pyarrow as pa
import ray

from impressions.cluster.cli import main
from impressions.cluster.config import ClusterConfig
from impressions.cluster.metrics import METRICS
from impressions.sketch.store import SketchConfig
from tests.conftest import ROOT, free_port, wait_for

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"


def _dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    return set(re.findall(r"\b(ray_impressions_[a-z_]+)", " ".join(exprs)))


def test_the_dashboard_charts_every_metric_we_define():
    named = {re.sub(r"_(bucket|total)$", "", m).removeprefix("ray_") for m in _dashboard_metrics()}
    assert set(METRICS) <= named, f"not charted: {sorted(set(METRICS) - named)}"


def _scrape() -> str:
    out = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            out.append(httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text)
    return "\n".join(out)


def test_every_dashboard_metric_is_exported(clients, tmp_path, capsys):
    from impressions.cluster.serve import start
    ns = "metrics"
    # no readers: a range whose writer is gone is then gone (with readers its reader answers, and the partial
    # answer below, which the dashboard charts, depends on whether the reader had caught up by then)
    c = clients(ClusterConfig(sketch=SketchConfig(), shards=2, namespace=ns, storage=f"file://{tmp_path}/store",
                              readers=0))
    now = time.time()
    table = pa.table({"ts": [now - 30.0] * 50 + [now + 86_400.0], "key": [f"ad-{i % 5}" for i in range(51)],
                      "visitor": [f"u{i}" for i in range(51)]})
    report = c.ingest(table, now=now)
    assert report.accepted == 50 and report.rejected_total == 1
    for _ in range(5):
        c.unique("ad-1", last="1h")
    c.checkpoint()
    c.maintain()
    # the REST app's own metrics
    port = free_port()
    url = start(ns, port=port, name="metrics-test", route_prefix="/m")
    wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=120, what="the REST app")
    assert httpx.get(f"{url}/v1/unique", params={"last": "1h"}, timeout=30).status_code == 200
    r = httpx.post(f"{url}/v1/events", json=[{"ts": now, "key": "ad-x", "visitor": "v"}], timeout=30)
    assert r.status_code == 200

    # status, per shard, for people and scripts
    assert main(["status", "--namespace", ns, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [s["shard"] for s in st["shards"]] == [0, 1]
    for s in st["shards"]:
        assert s["node"] and s["heap_bytes"] > 0 and s["events"] > 0 and s["checkpoint_age_s"] is not None
        assert s["recovery"]["seconds"] >= 0
    assert main(["status", "--namespace", ns]) == 0
    out = capsys.readouterr().out
    assert "heap MB" in out and "node" in out and "nothing to recover" in out
    # a shard gone: a partial answer, and the shard missing from it
    handles = ray.get(c.coordinator.shard_handles.remote(), timeout=60)
    from impressions.cluster.bootstrap import RayRuntime
    RayRuntime().kill(handles[1])  # gone before the question (``ray.kill`` alone returns at once)
    assert c.unique("ad-1", last="1h")["partial"]

    wanted = _dashboard_metrics()
    exported: set[str] = set()

    def all_there():
        nonlocal exported
        exported = set(re.findall(r"^(ray_impressions_[a-z_]+)\{", _scrape(), flags=re.M))
        return wanted <= exported

    try:
        wait_for(all_there, timeout=90, interval=3, what="every dashboard metric in Ray's Prometheus endpoint")
    except AssertionError:
        raise AssertionError(f"not exported: {sorted(wanted - exported)}") from None
    text = _scrape()
    assert re.search(r'ray_impressions_shard_events_applied_total\{[^}]*cluster="metrics"[^}]*shard="1"', text)
    assert re.search(r'ray_impressions_events_rejected_total\{[^}]*reason="future"', text)

    from ray import serve
    serve.delete("metrics-test")
