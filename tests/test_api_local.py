"""The REST app in this process, over the real coordinator and shards (no Ray):
abuse, idempotency, limits, bounded waits.  ``test_api.py`` runs it on Ray Serve."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from impressions.actors.coordinator import Coordinator
from impressions.actors.runtime import LocalRuntime
from impressions.actors.sender import Sender
from impressions.actors.shard import ShardActor
from impressions.api.app import configure, create_app
from impressions.api.errors import Conflict
from impressions.cluster.config import ClusterConfig
from impressions.durable.layout import ShardStorage
from impressions.sketch.config import SketchConfig
from impressions.sketch.events import IngestReport, prepare

SK = SketchConfig(p=12, leaf_level=4, segment_level=8)
KEYS = "reader:read,writer:write"
R = {"Authorization": "Bearer reader"}
W = {"X-API-Key": "writer"}


class SlowShard(ShardActor):
    """A shard whose applies take ``delay`` seconds (a shard stuck in a long call)."""

    delay = 0.0

    def apply(self, *a, **k):
        time.sleep(SlowShard.delay)
        return super().apply(*a, **k)


class LocalBackend:
    """The app's backend over an in-process coordinator (the real one, with real shards)."""

    def __init__(self, tmp_path, deadline_s: float = 5.0):
        storage = f"file://{tmp_path}/store"
        self.config = ClusterConfig(sketch=SK, shards=2, storage=storage, query_timeout_s=2,
                                    maintain_interval_s=3600, checkpoint_interval_s=3600)
        self.sketch = SK
        self.runtime = LocalRuntime(lambda i, layout, seed_from, *states: SlowShard(
            SK, i, layout.shards, ShardStorage(storage, None, layout.cluster_id, layout.folder), 32.0, seed_from, *states))
        self.coordinator = Coordinator(self.config, self.runtime)
        self.coordinator.start()
        self.deadline_s = deadline_s
        self.answers: dict[str, dict] = {}

    async def query(self, keys, rng):
        return await asyncio.to_thread(self.coordinator.query, keys, rng)

    async def series(self, key, rng, step):
        return await asyncio.to_thread(self.coordinator.series, key, rng, step)

    async def keys(self, rng, prefix, limit):
        return await asyncio.to_thread(self.coordinator.keys, rng, prefix, limit)

    async def reach(self, keys, prefix, rng):
        return await asyncio.to_thread(self.coordinator.reach, keys, prefix, rng)

    async def overlap(self, a, b, rng):
        return await asyncio.to_thread(self.coordinator.overlap, a, b, rng)

    async def rolling(self, keys, prefix, rng, step, window):
        return await asyncio.to_thread(self.coordinator.rolling, keys, prefix, rng, step, window)

    async def health(self):
        return await asyncio.to_thread(self.coordinator.health)

    def _ingest(self, table, malformed, key, body_sha):
        if key is not None:
            prior = self.answers.get(key)
            if prior is not None and prior["body"] != body_sha:
                raise Conflict("this Idempotency-Key was used with another body")
            if prior is not None:
                return prior["answer"]
        ts = table.column("ts")
        from impressions.sketch.formats import parse_ts
        secs, bad = parse_ts(ts)
        batch, report = prepare(secs, table.column("key"), visitors=table.column("visitor"), now=time.time(),
                                bucket_seconds=SK.bucket_seconds, retention_buckets=SK.retention_buckets,
                                future_seconds=SK.future_seconds, ts_bad=bad, ts_raw=ts, malformed=malformed)
        sender = Sender(self.runtime, self.coordinator.route, SK.p, 4, deadline_s=self.deadline_s)
        if len(batch):
            sender.send(batch, f"idem-{key}" if key else f"call-{time.time_ns()}", 3600)
            sender.drain()
        answer = _answer(report)
        if key is not None:
            self.answers[key] = {"body": body_sha, "answer": answer}
        return answer

    async def ingest(self, table, malformed, idempotency_key, body_sha):
        return await asyncio.to_thread(self._ingest, table, malformed, idempotency_key, body_sha)


def _answer(report: IngestReport) -> dict:
    return {"accepted": report.accepted, "rejected": report.rejected_total,
            "rejected_by_reason": dict(report.rejected), "errors": report.samples}


@pytest.fixture
def api(tmp_path):
    SlowShard.delay = 0.0
    backend = LocalBackend(tmp_path)
    app = configure(create_app(), backend, api_keys=KEYS, max_body=100_000, max_rows=500)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.backend = backend
        yield client


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _count(api, key, last="1h"):
    r = api.get("/v1/unique", params={"key": key, "last": last}, headers=R).json()
    return r["unique_visitors"], r["impressions"]


def test_every_bad_body_is_a_4xx_that_says_why_and_counts_nothing(api):
    now = time.time()
    api.post("/v1/events", json=[{"ts": now, "key": "ad-stable", "visitor": f"v{i}"} for i in range(20)], headers=W)
    before = _count(api, "ad-stable")
    deep = "[" + '{"ts": 1, "key": "k", "visitor": ' + "[" * 200 + "]" * 200 + "}]"
    struct = pa.table({"ts": [now], "key": ["ad-stable"], "visitor": pa.array([{"a": 1}])})
    wrong_dict = pa.table({"ts": [now], "key": pa.array([1]).dictionary_encode(),
                           "visitor": pa.array([[1, 2]], pa.list_(pa.int64()))})
    good = pa.table({"ts": [now, now], "key": ["ad-stable", "ad-stable"], "visitor": ["x", "y"]})
    raw = bytearray(_arrow(good))
    broken = bytes(raw).replace(b"ad-stable", b"ad-st\xffble")  # invalid UTF-8 inside a string column
    idx = pa.DictionaryArray.from_arrays(pa.array([0, 5], pa.int32()), pa.array(["ad-stable"]), safe=False)
    past_end = pa.RecordBatch.from_arrays([pa.array([now, now]), idx, pa.array(["x", "y"])], ["ts", "key", "visitor"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, past_end.schema) as w:
        w.write_batch(past_end, )
    cases = [
        (deep.encode(), "application/json", 400, "nested more than"),
        (b'[{"ts": NaN, "key": "ad-stable", "visitor": "v"}]', "application/json", 400, "NaN is not JSON"),
        (b"[]", "application/json", 400, "no events"),
        (b'{"ts": 1}', "application/json", 400, ""),
        (b"\xff\xfe[]", "application/json", 400, "not UTF-8"),
        (_arrow(struct), "application/vnd.apache.arrow.stream", 400, "'visitor' column is struct"),
        (_arrow(wrong_dict), "application/vnd.apache.arrow.stream", 400, "column is"),
        (broken, "application/vnd.apache.arrow.stream", 400, "malformed Arrow"),
        (sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream", 400, "malformed Arrow"),
        (_arrow(good)[:-30], "application/vnd.apache.arrow.stream", 400, "malformed Arrow"),
        (b"ts,key,visitor\n1,a,b\n", "text/csv", 415, "is not one this route reads"),
        (json.dumps([{"ts": now, "key": "ad-stable", "visitor": str(i)} for i in range(501)]).encode(),
         "application/json", 413, "at most 500"),
        (b"x" * 100_001, "application/json", 413, "100,000-byte limit"),
    ]
    for body, ctype, status, words in cases:
        r = api.post("/v1/events", content=body, headers={**W, "Content-Type": ctype})
        assert r.status_code == status, (words, r.status_code, r.text)
        assert words in r.json()["error"], (words, r.text)
        assert "Traceback" not in r.text and "File \"" not in r.text
    r = api.post("/v1/unique", content=b'{"keys": [' + b'"k",' * 300_000 + b'"k"]}',
                 headers={**R, "Content-Type": "application/json"})
    assert r.status_code == 413 and "byte limit" in r.json()["error"]
    r = api.get("/v1/unique", params={"key": "k" * 300, "last": "1h"}, headers=R)
    assert r.status_code == 400 and "at most 256" in r.json()["error"]
    assert _count(api, "ad-stable") == before


def test_a_visitor_is_the_same_whatever_carried_it(api):
    now = time.time()
    api.post("/v1/events", json=[{"ts": now, "key": "ad-v", "visitor": 12345678901234567890},
                                 {"ts": now, "key": "ad-v", "visitor": "12345678901234567890"},
                                 {"ts": now, "key": "ad-v", "visitor": 7}, {"ts": str(now), "key": "ad-v", "visitor": 7.0}],
             headers=W)
    lines = "\n".join(json.dumps(x) for x in [{"ts": now, "key": "ad-v", "visitor": "7"},
                                              {"ts": now, "key": "ad-v", "visitor": 12345678901234567890}])
    api.post("/v1/events", content=lines, headers={**W, "Content-Type": "application/x-ndjson"})
    t = pa.table({"ts": [now, now], "key": ["ad-v", "ad-v"], "visitor": pa.array([7, 12345678901234567890],
                                                                                  pa.uint64())})
    api.post("/v1/events", content=_arrow(t), headers={**W, "Content-Type": "application/vnd.apache.arrow.stream"})
    assert _count(api, "ad-v") == (2, 8)


def test_an_idempotency_key_counts_a_request_once_and_answers_it_the_same(api):
    now = time.time()
    body = [{"ts": now, "key": "ad-idem", "visitor": f"u{i}"} for i in range(50)] + [{"key": "ad-idem"}]
    first = api.post("/v1/events", json=body, headers={**W, "Idempotency-Key": "req-1"})
    again = api.post("/v1/events", json=body, headers={**W, "Idempotency-Key": "req-1"})
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert first.json()["accepted"] == 50 and first.json()["rejected"] == 1
    assert _count(api, "ad-idem") == (50, 50)
    other = api.post("/v1/events", json=body[:10], headers={**W, "Idempotency-Key": "req-1"})
    assert other.status_code == 409 and "another body" in other.json()["error"]
    api.post("/v1/events", json=body, headers=W)  # no key: a new request, counted again
    assert _count(api, "ad-idem") == (50, 100)


def test_a_request_is_refused_whole_before_anything_is_sent(api):
    now = time.time()
    ok = [{"ts": now, "key": "ad-whole", "visitor": f"u{i}"} for i in range(300)]
    r = api.post("/v1/events", json=ok + [{"ts": now, "key": "ad-whole", "visitor": "x"}] * 300, headers=W)
    assert r.status_code == 413  # over the row limit: refused whole
    assert _count(api, "ad-whole") == (0, 0)
    r = api.post("/v1/events", json=ok[:3] + [{"ts": 1e300, "key": "ad-whole", "visitor": "far"}], headers=W)
    assert r.status_code == 200 and r.json()["accepted"] == 3 and r.json()["rejected_by_reason"] == {"future": 1}
    assert r.json()["errors"][0]["reason"] == "more than 300 s in the future"


def test_a_stuck_shard_gives_a_503_with_retry_after_not_a_hang(api):
    api.backend.deadline_s = 1.0
    SlowShard.delay = 3.0
    t = time.perf_counter()
    r = api.post("/v1/events", json=[{"ts": time.time(), "key": "ad-slow", "visitor": "u"}],
                 headers={**W, "Idempotency-Key": "slow-1"})
    assert r.status_code == 503 and r.headers.get("Retry-After") and "retry" in r.json()["error"]
    assert time.perf_counter() - t < 2.5
    SlowShard.delay = 0.0


def test_failed_authentication_is_rate_limited_per_client(api):
    for _ in range(20):
        assert api.get("/v1/unique", params={"last": "1h"}, headers={"X-API-Key": "guess"}).status_code == 401
    r = api.get("/v1/unique", params={"last": "1h"}, headers=R)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and "too many" in r.json()["error"]


def test_readyz_says_which_shard_is_down_and_why(api):
    assert api.get("/readyz").json()["status"] == "ok"
    h = api.backend.coordinator.route()[1][1]
    h.actor.unavailable = "checkpoints do not verify"
    api.app.state.ready = (0.0, None)
    r = api.get("/readyz")
    assert r.status_code == 503 and "shard 1: checkpoints do not verify" in r.json()["status"]
    got = api.get("/v1/unique", params={"last": "1h"}, headers=R).json()
    assert got["partial"] is True
    assert np.isfinite(got["relative_error"])


def test_audience_routes_answer_and_refuse_bad_sets_saying_why(api):
    now = time.time()
    rows = [{"ts": now - 120 - i % 3000, "key": f"camp-1/ad-{i % 3}", "visitor": f"v{i % 400}"} for i in range(450)]
    assert api.post("/v1/events", json=rows, headers=W).status_code == 200
    reach = api.get("/v1/reach", params={"prefix": "camp-1/", "last": "2h"}, headers=R).json()
    assert reach["unique_visitors"] == 400 and reach["impressions"] == 450 and reach["exact"], reach
    assert reach["keys"] == 3 and reach["frequency"] == pytest.approx(450 / 400, rel=1e-3)
    posted = api.post("/v1/reach", json={"keys": ["camp-1/ad-0", "camp-1/ad-1", "camp-1/ad-2"], "last": "2h"},
                      headers=R).json()
    assert {k: posted[k] for k in ("unique_visitors", "impressions", "interval")} == \
        {k: reach[k] for k in ("unique_visitors", "impressions", "interval")}
    ov = api.get("/v1/overlap", params=[("a", "camp-1/ad-0"), ("b", "camp-1/ad-1"), ("last", "2h")], headers=R).json()
    # visitor v{j} saw ad-(i % 3) for i = j, j + 400: ad-0 and ad-1 share the visitors with j % 3 == 0 and j + 400 ...
    want_a = {i % 400 for i in range(450) if i % 3 == 0}
    want_b = {i % 400 for i in range(450) if i % 3 == 1}
    assert ov["a"]["unique_visitors"] == len(want_a) and ov["b"]["unique_visitors"] == len(want_b)
    assert ov["both"]["unique_visitors"] == len(want_a & want_b) and ov["both"]["method"] == "coupons"
    ov2 = api.post("/v1/overlap", json={"a": {"keys": ["camp-1/ad-0"]}, "b": {"prefix": "camp-1/ad-1"},
                                        "last": "2h"}, headers=R).json()
    assert ov2["both"] == ov["both"]
    roll = api.get("/v1/rolling", params={"key": "camp-1/ad-0", "window": "30m", "step": "10m", "last": "2h"},
                   headers=R).json()
    assert len(roll["points"]) == (120 - 30) // 10 + 1 and roll["window"] == 1800 and not roll["cumulative"]
    assert roll["points"][-1]["complete"] is False and roll["points"][0]["complete"] is True
    cum = api.get("/v1/rolling", params={"cumulative": "true", "step": "30m", "last": "2h"}, headers=R).json()
    assert cum["points"][-1]["impressions"] == 450 and cum["keys"] == [None]
    bad = [("/v1/reach", {"last": "1h"}, "needs keys, a prefix"),
           ("/v1/reach", {"prefix": "", "last": "1h"}, "prefix must be"),
           ("/v1/reach", {"key": "x" * 300}, "keys are at most"),
           ("/v1/overlap", {"a": "k", "last": "1h"}, "(b) needs keys"),
           ("/v1/rolling", {"key": "k", "window": "3h", "step": "1h", "last": "2h"}, "longer than the range"),
           ("/v1/rolling", {"key": "k", "step": "1h", "last": "2h"}, "give a window"),
           ("/v1/rolling", {"key": "k", "window": "1h", "cumulative": "true", "last": "2h"}, "not both"),
           ("/v1/rolling", {"window": "1m", "step": "1m", "last": "30d"}, "points asked for"),
           ("/v1/rolling", {"window": "bogus", "step": "1h", "last": "1d"}, "'window' must be")]
    for route, params, words in bad:
        r = api.get(route, params=params, headers=R)
        assert r.status_code == 400 and words in r.json()["error"], (route, params, r.status_code, r.text)
    r = api.post("/v1/reach", json={"keys": ["k"] * 1001}, headers=R)
    assert r.status_code in (400, 422) and "1000" in r.text
    assert api.get("/v1/reach", params={"prefix": "camp-1/"}).status_code == 401  # same auth as every read
    spec = api.get("/openapi.json").json()
    for path in ("/v1/reach", "/v1/overlap", "/v1/rolling"):
        assert path in spec["paths"]
    assert "too small to tell from zero" in json.dumps(spec["paths"]["/v1/overlap"]) or \
        "noisy" in json.dumps(spec["paths"]["/v1/overlap"])
