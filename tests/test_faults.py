"""Exactly once and never stale on a real Ray cluster: job reruns, task retries,
bad files, retention in the running cluster."""

from __future__ import annotations

import datetime
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from impressions.cluster.config import ClusterConfig
from impressions.cluster.workload import generate
from impressions.sketch.store import SketchConfig
from tests.conftest import wait_for

SMALL = SketchConfig(p=12, leaf_level=4, segment_level=8, memtable_rows=20_000)


def _events(tmp_path, n=30_000, files=2, seed=3):
    end = float(int(time.time()) // 60 * 60 - 120)
    t = generate(n, days=1, visitors=10_000, keys=10, seed=seed, end=end)
    folder = tmp_path / "events"
    folder.mkdir()
    per = n // files
    for i in range(files):
        pq.write_table(t.slice(i * per, per), folder / f"part-{i}.parquet", row_group_size=per // 3)
    return folder, t.num_rows, end


def test_a_rerun_job_counts_nothing_twice_and_force_counts_again(clients, tmp_path):
    folder, n, end = _events(tmp_path)
    c = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="rerun", batch_rows=4_000))
    first = c.ingest_files([str(folder)], progress=False)
    assert first.report.accepted == n and not first.skipped_files
    again = c.ingest_files([str(folder)], progress=False)
    assert again.report.accepted == 0 and len(again.skipped_files) == 2 and "skipped 2 files" in again.text()
    assert c.unique(None, last="2d")["impressions"] == n
    forced = c.ingest_files([str(folder)], progress=False, force=True)
    assert forced.report.accepted == n and c.unique(None, last="2d")["impressions"] == 2 * n


def test_a_retried_ingest_task_counts_once(clients, tmp_path):
    """Ray retries a task that died (a node lost, the memory monitor): the same
    fragment is read and sent again, under the same batch ids."""
    from impressions.cluster.ingest import ingest_fragment
    from impressions.cluster.readers import fragments
    from impressions.cluster.sources import list_sources
    folder, n, end = _events(tmp_path, files=1)
    c = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="retry", batch_rows=3_000))
    cfg = c.config
    frags = fragments(list_sources([str(folder)]))
    cols = {"ts": "ts", "key": "key", "visitor": "visitor"}
    for attempt in range(2):  # the first run and its retry
        outs = ray.get([ingest_fragment.remote(f, cols, cfg, c.coordinator, time.time(), "auto") for f in frags])
        assert sum(o["report"]["accepted"] for o in outs) == n
        for o in outs:  # the client reads back what the tasks wrote, as ``ingest_files`` does
            c.questions.wrote(*o["positions"])
    assert c.unique(None, last="2d")["impressions"] == n


def test_bad_values_and_a_bad_file_never_stop_a_job(clients, tmp_path):
    folder, n, end = _events(tmp_path, files=1)
    far = pa.table({"ts": pa.array([datetime.datetime(3000, 1, 1), datetime.datetime(1600, 1, 1),
                                    datetime.datetime.fromtimestamp(end, datetime.timezone.utc).replace(tzinfo=None)],
                                   pa.timestamp("s")),
                    "key": ["ad-far", "ad-far", "ad-far"], "visitor": ["a", "b", "c"]})
    pq.write_table(far, folder / "far.parquet")
    pq.write_table(pa.table({"ts": pa.array([1e20, -1e20, float("inf"), end]), "key": ["ad-num"] * 4,
                             "visitor": ["a", "b", "c", "d"]}), folder / "numbers.parquet")
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    c = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="badjob"))
    s = c.ingest_files([str(folder)], progress=False)
    assert s.report.accepted == n + 2 and s.report.rejected == {"future": 2, "expired": 2, "bad_ts": 1}, s.to_dict()
    assert len(s.failed_files) == 1 and "broken.parquet" in s.failed_files[0]
    assert c.unique("ad-far", last="2d")["impressions"] == 1 and c.unique("ad-num", last="2d")["impressions"] == 1
    # the broken file is not in the ledger: fixed and ingested again, it counts; the others are skipped
    pq.write_table(pa.table({"ts": [end], "key": ["ad-fixed"], "visitor": ["z"]}), folder / "broken.parquet")
    again = c.ingest_files([str(folder)], progress=False)
    assert again.report.accepted == 1 and len(again.skipped_files) == 3


def test_retention_is_enforced_in_the_running_cluster(clients, tmp_path):
    folder, n, end = _events(tmp_path, files=1)
    cfg = ClusterConfig(sketch=SMALL, shards=2, namespace="retention", maintain_interval_s=0.3,
                        checkpoint_interval_s=1.0)
    c = clients(cfg)
    c.ingest_files([str(folder)], progress=False)
    st = c.stats()["shards"]
    assert all(s["keys"] == 11 for s in st)  # ten ads and the site-wide key
    # the same cluster, its upkeep's clock 31 days ahead: everything is past the retention
    from impressions.cluster.bootstrap import teardown
    teardown(cfg.namespace)
    later = clients(cfg.replace(clock_offset_s=31 * 86400.0, storage=c.config.storage))
    wait_for(lambda: all(s is not None and s["base_rows"] == 0 and s["keys"] == 1
                         for s in later.stats()["shards"]), timeout=60, what="the upkeep loop to expire everything")
    # the readers drop it in the same rounds, on the same clock
    wait_for(lambda: later.unique(None, last="1h")["impressions"] == 0, timeout=30, what="the readers to expire it")
    assert all(r is not None and r["events"] >= 0 and r["keys"] == 1 for r in later.stats()["readers"])
    np.testing.assert_equal([s["memtable_rows"] for s in later.stats()["shards"]], [0, 0])
