"""The actor cluster on a real local Ray: same answers as the core alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from impressions.cluster.client import Client
from impressions.cluster.config import ClusterConfig
from impressions.cluster.priority import BULK_NICE
from impressions.cluster.workload import generate
from impressions.sketch import simd
from impressions.sketch.counter import LocalCounter
from impressions.sketch.store import SketchConfig

NOW = 1_800_000_000.0
SMALL = SketchConfig(p=12, leaf_level=4, segment_level=8, memtable_rows=20_000)


@pytest.fixture(scope="module")
def stream():
    return generate(60_000, days=2, visitors=20_000, keys=30, seed=11, end=NOW)


def _reference(table: pa.Table, sketch=SMALL) -> LocalCounter:
    ref = LocalCounter(sketch)
    rep = ref.ingest(table["ts"].to_numpy(), table["key"], visitors=table["visitor"], now=NOW)
    assert rep.rejected_total == 0
    return ref


def _compare(client: Client, ref: LocalCounter, ranges, keys):
    for b0, b1 in ranges:
        for key in keys:
            assert np.array_equal(client.registers(key, b0, b1), ref.registers(key, b0, b1)), (key, b0, b1)
        w = ref.config.bucket_seconds
        got = client.query(keys, start=b0 * w, end=b1 * w, now=NOW)
        want = [r.to_dict() for r in ref.query(keys, start=b0 * w, end=b1 * w, now=NOW)]
        assert got == want


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_cluster_equals_the_core_register_for_register(clients, stream, shards):
    cfg = ClusterConfig(sketch=SMALL, shards=shards, namespace=f"equal-{shards}", maintain_interval_s=0.3)
    client = clients(cfg)
    assert len(client.stats()["shards"]) == shards
    copies = client.stats()["shards"]
    if simd.STATE["chosen"]:  # a CPU where numpy's AVX-512 kernels are turned off: the copies' numpy runs without
        assert [s["numpy_avx512"] for s in copies] == [False] * shards
    assert all(len(s["gc_runs"]) == len(s["gc_longest_ms"]) == 3 for s in copies)  # the collector's pauses, timed
    rep = client.ingest(stream, now=NOW)
    assert rep.accepted == stream.num_rows
    ref = _reference(stream)
    now_b = int(NOW // 60)
    ranges = [(now_b - 2 * 1440, now_b + 1), (now_b - 700, now_b - 100), (now_b - 15, now_b + 1), (now_b - 1, now_b)]
    keys = [None, "ad-0", "ad-7", "ad-29", "no-such-ad"]
    _compare(client, ref, ranges, keys)  # fresh: memtables and runs
    client.maintain()
    _compare(client, ref, ranges, keys)  # after rollups


def test_audience_questions_equal_the_core(clients, stream):
    """Reach, overlap and rolling series through the client (one call a shard each) answer what the
    in-process reference answers, before and after the rollups, and after a re-sharding."""
    client = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="audience", maintain_interval_s=3600))
    client.ingest(stream, now=NOW)
    ref = _reference(stream)
    ref_sharded = LocalCounter(SMALL, shards=2)
    ref_sharded.ingest(stream["ts"].to_numpy(), stream["key"], visitors=stream["visitor"], now=NOW)

    def ask(c, ref_):
        for rng in ({"last": "2d"}, {"last": "3h"}):
            got = c.reach(["ad-0", "ad-3"], prefix="ad-1", now=NOW, **rng)
            assert got == ref_.reach(["ad-0", "ad-3"], "ad-1", now=NOW, **rng)
            got = c.overlap(["ad-0", "ad-1"], "ad-2", b_prefix="ad-1", now=NOW, **rng)
            assert got == ref_.overlap((["ad-0", "ad-1"], None), (["ad-2"], "ad-1"), now=NOW, **rng)
        got = c.rolling("ad-0", step="1h", window="6h", last="2d", now=NOW)
        want = ref_.rolling(["ad-0"], step=60, window=360, last="2d", now=NOW)
        assert [{k: v for k, v in p.items() if k != "complete"} for p in got["points"]] == \
            [{k: v for k, v in p.items() if k != "complete"} for p in want["points"]]
        assert len(got["points"]) == (2 * 1440 - 360) // 60 + 1
        got = c.rolling(None, step="2h", cumulative=True, last="2d", now=NOW)
        whole = c.unique(None, last="2d", now=NOW)  # 2 days are 24 whole steps: the last point is the range
        assert {k: got["points"][-1][k] for k in whole if k != "key"} == {k: v for k, v in whole.items() if k != "key"}
    ask(client, ref_sharded)
    client.maintain()
    ask(client, ref_sharded)
    # every answer is a merge of register slices: the same registers whatever the shard count
    client.rescale(4)
    a = client.reach(["ad-0", "ad-3"], prefix="ad-1", last="2d", now=NOW)
    b = ref.reach(["ad-0", "ad-3"], "ad-1", last="2d", now=NOW)
    assert a["impressions"] == b["impressions"] and abs(a["unique_visitors"] / b["unique_visitors"] - 1) < 0.03
    with pytest.raises(ValueError, match="longer than the range"):
        client.rolling("ad-0", step="1h", window="3d", last="2d")
    with pytest.raises(ValueError, match="needs keys, a prefix"):
        client.reach([])


def test_ingest_files_in_every_format(clients, stream, tmp_path):
    n = stream.num_rows
    parts = [stream.slice(0, n // 3), stream.slice(n // 3, n // 3), stream.slice(2 * (n // 3))]
    pq.write_table(parts[0], tmp_path / "a.parquet", row_group_size=5000)
    pa.csv.write_csv(parts[1], tmp_path / "b.csv")
    with open(tmp_path / "c.jsonl", "w") as f:
        for r in parts[2].to_pylist():
            # epoch milliseconds in JSON, as many producers send them
            f.write(json.dumps({"ts": int(r["ts"] * 1000), "key": r["key"], "visitor": r["visitor"]}) + "\n")
    client = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="files"))
    summary = client.ingest_files([str(tmp_path)], now=NOW, progress=False)
    assert summary.files == 3 and summary.report.accepted == n, summary.to_dict()
    ref = _reference(pa.concat_tables([parts[0], parts[1], parts[2]]))
    # JSON held milliseconds: its events round to the same buckets
    now_b = int(NOW // 60)
    for key in [None, "ad-0", "ad-3"]:
        got = client.unique(key, last="2d", now=NOW)
        want = ref.unique(key, last="2d", now=NOW).to_dict()
        assert got["impressions"] == want["impressions"]
        assert np.array_equal(client.registers(key, now_b - 2880, now_b + 1), ref.registers(key, now_b - 2880, now_b + 1))


def test_bad_rows_are_reported_by_reason_and_good_rows_all_counted(clients, tmp_path):
    good = [(NOW - 60 * i, f"ad-{i % 3}", f"u{i}") for i in range(100)]
    lines = [json.dumps({"ts": t, "key": k, "visitor": v}) for t, k, v in good]
    lines[10] = "{not json"                                            # malformed
    lines[20] = json.dumps({"key": "ad-1", "visitor": "x"})            # no ts
    lines[30] = json.dumps({"ts": "yesterday", "key": "ad-1", "visitor": "x"})   # unparseable
    lines[40] = json.dumps({"ts": NOW - 40 * 86400, "key": "ad-1", "visitor": "x"})  # beyond retention
    lines[50] = json.dumps({"ts": NOW, "key": "ad-1"})                 # no visitor
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "more.csv", "w") as f:
        f.write("ts,key,visitor\n")
        f.write(f"{NOW},ad-9,w1\n2026-13-45T00:00:00Z,ad-9,w2\n{NOW},,w3\n{NOW + 86400},ad-9,w4\n")
    client = clients(ClusterConfig(sketch=SMALL, shards=2, namespace="badrows"))
    s = client.ingest_files([str(tmp_path)], now=NOW, progress=False)
    r = s.report
    assert r.rejected == {"malformed": 1, "missing_ts": 1, "bad_ts": 2, "expired": 1, "missing_visitor": 1,
                          "missing_key": 1, "future": 1}, r.rejected
    assert r.accepted == 100 - 5 + 1
    samples = {(os.path.basename(x["file"]), x["row"]): x for x in r.samples}
    assert samples[("events.jsonl", 10)]["reason"] == "row could not be parsed"
    assert samples[("events.jsonl", 30)]["value"] == "yesterday"
    assert samples[("more.csv", 1)]["reason"] == "timestamp could not be parsed"
    kept = [g for i, g in enumerate(good) if i not in (10, 20, 30, 40, 50)]
    got = client.unique(None, last="2h", now=NOW)
    assert got["impressions"] == len(kept) + 1 and got["unique_visitors"] == len(kept) + 1 and got["exact"]
    assert "rejected 2: timestamp could not be parsed" in s.text()


def test_a_file_larger_than_the_inflight_bound_streams_in_bounded_batches(clients, tmp_path):
    t = generate(120_000, days=1, visitors=30_000, keys=10, seed=3, end=NOW)
    pq.write_table(t, tmp_path / "big.parquet", row_group_size=200_000)  # one row group: one task
    cfg = ClusterConfig(sketch=SMALL, shards=2, namespace="bounded", batch_rows=4000, max_inflight=2)
    client = clients(cfg)
    s = client.ingest_files([str(tmp_path / "big.parquet")], now=NOW, progress=False)
    assert s.report.accepted == t.num_rows
    assert s.batches >= 2 * (t.num_rows // 4000)  # read and sent in many small batches...
    assert s.peak_inflight <= cfg.max_inflight + cfg.shards  # ...never more than the bound in flight
    assert client.unique(None, last="2d", now=NOW)["impressions"] == t.num_rows


def test_ingest_job_with_ray_job_submit_then_query_from_another_driver(ray_cluster, clients, tmp_path):
    import time
    end = float(int(time.time()) // 60 * 60 - 120)  # the job validates against the real clock
    stream = generate(60_000, days=2, visitors=20_000, keys=30, seed=12, end=end)
    pq.write_table(stream, tmp_path / "events.parquet", row_group_size=20_000)
    ns = "job"
    store = tmp_path.parent / (tmp_path.name + "-store")
    clients(ClusterConfig(sketch=SMALL, shards=2, namespace=ns, storage=f"file://{store}"))
    env = dict(os.environ, IMPRESSIONS_NAMESPACE=ns)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    runtime_env = json.dumps({"env_vars": {"IMPRESSIONS_NAMESPACE": ns, "RAY_AUTH_MODE": "disabled"}})
    out = subprocess.run([ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--runtime-env-json",
                          runtime_env, "--", sys.executable, "-m", "impressions.cluster.ingest", str(tmp_path),
                          "--json",
                          "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith('{"files"')))
    assert summary["accepted"] == stream.num_rows and summary["rejected"] == 0
    # another driver, in its own process, reads the answers
    code = ("import json; from impressions.cluster.client import Client; "
            f"c = Client(start=False, namespace={ns!r}); "
            f"print(json.dumps(c.query([None, 'ad-0', 'ad-3'], last='2d', now={end})))")
    q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert q.returncode == 0, q.stderr
    got = json.loads(q.stdout.strip().splitlines()[-1])
    ref = LocalCounter(SMALL)
    ref.ingest(stream["ts"].to_numpy(), stream["key"], visitors=stream["visitor"], now=end)
    want = [r.to_dict() for r in ref.query([None, "ad-0", "ad-3"], last="2d", now=end)]
    assert got == want


def _bulk_workers() -> list[int]:
    """The processes on this machine started for ingest tasks with questions first (``priority.BULK_ENV``)."""
    from tests.conftest import processes
    return processes("environ", lambda env: b"IMPRESSIONS_BULK_WORKER=1" in env.split(b"\0"))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="thread scheduling classes are Linux's")
def test_bulk_threads_give_way_where_questions_come_first_and_answers_are_the_same(clients, stream, tmp_path):
    """With ``questions_first`` every writer and reader runs its writes on threads at nice 19 while its main
    thread and its question threads keep Ray's 15 (no thread of theirs in the idle class, where a thread holding
    the interpreter lock would keep it from their questions), and the ingest tasks run in processes of their
    own in the idle class; off, no thread of theirs gave way.  Either way the answers are the core's."""
    from tests.conftest import thread_priorities, wait_for
    pq.write_table(stream, tmp_path / "events.parquet", row_group_size=20_000)
    ref = _reference(stream)
    for first in (True, False):
        client = clients(ClusterConfig(sketch=SMALL, shards=2, namespace=f"priority-{int(first)}", readers=1,
                                       questions_first=first))
        before = set(_bulk_workers())
        summary = client.ingest_files([str(tmp_path)], now=NOW, progress=False)
        assert summary.report.accepted == stream.num_rows
        client.maintain()
        client.checkpoint()
        wait_for(lambda c=client: len(c.stats().get("readers", [])) == 2 and all(c.stats()["readers"]),
                 what="both readers' stats")
        st = client.stats()
        for copy in st["shards"] + st["readers"]:
            threads = thread_priorities(copy["pid"])
            main = threads[copy["pid"]]
            lowered = [t for t, (policy, nice) in threads.items() if nice > main[1]]
            assert main[1] < BULK_NICE and not any(policy == os.SCHED_IDLE for policy, _ in threads.values())
            # the writes' thread and the upkeep thread, and what they started; the question threads not
            assert (2 <= len(lowered) < len(threads) - 2) if first else not lowered, (copy["pid"], lowered)
            assert all(threads[t][1] == BULK_NICE for t in lowered)
        if first:  # started now, or by an earlier ingest of this driver (Ray keeps a job's idle workers a while)
            workers = _bulk_workers()
            assert workers and all(thread_priorities(p)[p][0] == os.SCHED_IDLE for p in workers)
        else:
            assert not set(_bulk_workers()) - before
        for key in (None, "ad-0", "ad-7"):
            assert client.unique(key, last="2d", now=NOW) == ref.unique(key, last="2d", now=NOW).to_dict()


def test_readers_answer_on_ports_of_their_own_as_through_ray(clients, stream):
    """Questions go to the readers' (and writers') own ports (``actors.wire``): the same answer, byte for byte,
    as the same question through Ray and as the core's; the ports' tokens are in the askers' route only, never in stats or
    health; a reader killed leaves answers complete, and comes back on a new port that askers use; with the
    setting off, no port and the same answers."""
    import signal

    import ray

    from impressions.actors.base import pack_question
    from impressions.actors.wire import answer_of, encode_question, wire_client
    from tests.conftest import wait_for
    ref = _reference(stream)
    for ports in (True, False):
        client = clients(ClusterConfig(sketch=SMALL, shards=2, namespace=f"ports-{int(ports)}", readers=1,
                                       question_ports=ports))
        client.ingest(stream, now=NOW)
        client.maintain()
        client.checkpoint()

        def route(c=client, ports=ports):
            m = c.questions._shard_map(refresh=True)
            return m if len(m.readers) == 2 and all(len(r) == 1 for r in m.readers) and \
                (not ports or all(a is not None for p in m.ports + (m.writer_ports,) for a in p)) else None
        m = wait_for(route, what="both readers published")
        if not ports:
            assert all(a is None for p in m.ports + (m.writer_ports,) for a in p)
        for key in (None, "ad-0", "ad-7"):
            assert client.unique(key, last="2d", now=NOW) == ref.unique(key, last="2d", now=NOW).to_dict()
        assert client.reach(["ad-0", "ad-3"], prefix="ad-1", last="2d", now=NOW) == \
            ref.reach(["ad-0", "ad-3"], "ad-1", last="2d", now=NOW)
        st = client.stats()
        asked = sum(r.get("port_questions", 0) for r in st["readers"])
        if not ports:
            assert asked == 0 and all(r["port"] is None for r in st["readers"])
            continue
        assert asked >= 4
        b0, b1 = SMALL.resolve(now=NOW, last="2d").b0, SMALL.resolve(now=NOW, last="2d").b1
        args = ([None, "ad-0", "no-such-ad"], b0, b1)
        copies = [(h, m.ports[i][0]) for i, (h,) in enumerate(m.readers)] + list(zip(m.handles, m.writer_ports))
        for h, a in copies:
            over_port = answer_of(wire_client().ask(a.route(ray.util.get_node_ip_address()), a.token,
                                                    encode_question("query", 0, args)).result(10))
            through_ray = ray.get(h.ask_packed.options(concurrency_group="reads").remote(
                pack_question("query", 0, args)))
            assert over_port == through_ray
            # the token opens the port; it is shown nowhere else
            assert a.token not in json.dumps(st, default=str) and a.ident in json.dumps(st, default=str)
            assert a.token not in json.dumps(ray.get(h.health.remote()), default=str)
        # a reader killed: answers stay complete; it comes back on a new port, which askers are given
        before = m.ports[0][0]
        pid = next(r["pid"] for r in st["readers"] if r["shard"] == 0)
        os.kill(pid, signal.SIGKILL)

        def back(c=client, before=before):
            got = c.unique(None, last="2d", now=NOW)
            assert got["partial"] is False and got == ref.unique(None, last="2d", now=NOW).to_dict()
            new = route()
            return new is not None and new.ports[0][0].ident != before.ident
        wait_for(back, timeout=60, interval=0, what="the restarted reader's port published")

        def on_new_port(c=client):  # once it is no longer suspect to the asker (``SUSPECT_S`` after it failed)
            assert c.unique(None, last="2d", now=NOW) == ref.unique(None, last="2d", now=NOW).to_dict()
            return sum(r.get("port_questions", 0) for r in c.stats()["readers"] if r["shard"] == 0) > 0
        wait_for(on_new_port, timeout=30, interval=0.5, what="questions on the restarted reader's port")
