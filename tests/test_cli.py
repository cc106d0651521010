"""The ``impressions`` command line on the session cluster."""

import json
import time

import pyarrow.parquet as pq

from impressions.cluster.cli import main
from impressions.cluster.config import ClusterConfig
from impressions.cluster.workload import generate
from impressions.sketch.store import SketchConfig


def test_ingest_query_status_checkpoint_rescale(clients, tmp_path, capsys):
    ns = "cli"
    clients(ClusterConfig(sketch=SketchConfig(), shards=2, namespace=ns))
    end = float(int(time.time()) // 60 * 60 - 60)
    t = generate(20_000, days=1, visitors=5_000, keys=10, seed=5, end=end)
    pq.write_table(t, tmp_path / "events.parquet")
    assert main(["--namespace", ns, "ingest", str(tmp_path / "events.parquet")]) == 0
    out = capsys.readouterr().out
    assert "20,000 accepted, 0 rejected" in out
    assert main(["--namespace", ns, "query", "ad-0", "*", "--last", "2d", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in got] == ["ad-0", None] and got[1]["impressions"] == 20_000
    assert main(["--namespace", ns, "query", "ad-0", "--last", "2d"]) == 0
    assert "ad-0" in capsys.readouterr().out
    assert main(["--namespace", ns, "reach", "ad-0", "ad-1", "--last", "2d", "--json"]) == 0
    reach = json.loads(capsys.readouterr().out)
    assert reach["keys"] == 2 and 0 < reach["unique_visitors"] <= 5_000
    assert main(["--namespace", ns, "reach", "--prefix", "ad-", "--last", "2d"]) == 0
    assert "impressions     20,000" in capsys.readouterr().out
    assert main(["--namespace", ns, "overlap", "ad-0", "ad-1,ad-2", "--last", "2d", "--json"]) == 0
    ov = json.loads(capsys.readouterr().out)
    assert ov["both"]["unique_visitors"] <= min(ov["a"]["unique_visitors"], ov["b"]["unique_visitors"]) + 50
    assert main(["--namespace", ns, "overlap", "ad-0", "ad-1", "--last", "2d"]) == 0
    assert "jaccard" in capsys.readouterr().out
    assert main(["--namespace", ns, "query", "ad-0", "--rolling", "6h", "--step", "1h", "--last", "1d", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["points"]) == 19
    assert main(["--namespace", ns, "query", "--cumulative", "--step", "6h", "--last", "1d"]) == 0
    assert "cumulative since the start" in capsys.readouterr().out
    assert main(["--namespace", ns, "query", "ad-0", "--rolling", "2d", "--step", "1h", "--last", "1d"]) == 2
    assert "longer than the range" in capsys.readouterr().err
    assert main(["--namespace", ns, "query", "ad-0", "--rolling", "6h"]) == 2
    assert "--step is needed" in capsys.readouterr().err
    assert main(["--namespace", ns, "checkpoint"]) == 0
    assert "shard 1: checkpoint" in capsys.readouterr().out
    assert main(["--namespace", ns, "rescale", "4"]) == 0
    assert "now 4 shards (from 2" in capsys.readouterr().out
    assert main(["--namespace", ns, "status"]) == 0
    out = capsys.readouterr().out
    assert "4 shards (layout epoch 1)" in out and "re-sharded 2 -> 4" in out
    assert main(["--namespace", ns, "query", "--last", "2d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["impressions"] == 20_000


def test_clear_messages(ray_cluster, capsys):
    assert main(["--namespace", "nothing-here", "query", "--last", "1h"]) == 2
    assert "no impressions cluster in Ray namespace 'nothing-here'" in capsys.readouterr().err
    assert main(["--namespace", "nothing-here", "status"]) == 2
    # the options are also taken after the command
    assert main(["status", "--namespace", "nothing-here"]) == 2
    assert "no impressions cluster in Ray namespace 'nothing-here'" in capsys.readouterr().err


def test_a_local_folder_store_is_refused_on_a_cluster_of_several_nodes(monkeypatch):
    import ray

    from impressions.cluster.bootstrap import ClusterNotRunning, check_storage_reach
    from impressions.cluster.config import ClusterConfig
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    import pytest
    with pytest.raises(ClusterNotRunning, match="2 nodes but the storage file:///data is a local folder"):
        check_storage_reach(ClusterConfig(storage="file:///data"))
    check_storage_reach(ClusterConfig(storage="s3://bucket/prefix"))  # an object store every node reaches
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_storage_reach(ClusterConfig(storage="file:///data"))  # one node: its own disk is the store


def test_up_beyond_loopback_needs_keys_and_refuses_placeholders(monkeypatch, capsys):
    from impressions.cluster.cli import main
    monkeypatch.delenv("IMPRESSIONS_API_KEYS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert main(["up", "--host", "0.0.0.0"]) == 2
    assert "without API keys" in capsys.readouterr().err
    monkeypatch.setenv("IMPRESSIONS_API_KEYS", "change-me-read:read")
    assert main(["up", "--host", "0.0.0.0"]) == 2
    assert "placeholders" in capsys.readouterr().err
