"""The ``impressions`` command line on the session cluster."""

import json
import time

import pyarrow.parquet as pq

from cluster.cli import main
from cluster.config import ClusterConfig
from cluster.workload import generate
from sketch.store import SketchConfig


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
