"""The REST API through the real Serve app on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
import ray

from impressions.cluster.config import ClusterConfig
from impressions.cluster.priority import BULK_NICE
from impressions.sketch.store import SketchConfig
from tests.conftest import free_port, processes, thread_priorities, wait_for

KEYS = "reader:read,writer:write,both:read+write"
R = {"Authorization": "Bearer reader"}
W = {"X-API-Key": "writer"}
RW = {"Authorization": "Bearer both"}


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory):
    from ray import serve

    from impressions.cluster.bootstrap import ensure_actors, teardown
    from impressions.cluster.serve import start
    ns = "api"
    cfg = ClusterConfig(sketch=SketchConfig(), shards=2, namespace=ns,
                        storage=f"file://{tmp_path_factory.mktemp('api-store')}")
    ensure_actors(cfg)
    port = free_port()
    url = start(ns, port=port, api_keys=KEYS, max_body=200_000, name="api-test", failed_auth_per_minute=10_000)
    wait_for(lambda: _ok(url + "/healthz"), timeout=60, what="the REST app")
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client
    serve.delete("api-test")
    teardown(ns)


def _ok(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _events(n, now, key="ad-1", start=0):
    return [{"ts": now - i % 600, "key": key, "visitor": f"v{start + i}"} for i in range(n)]


def test_health_is_open_and_ready_when_shards_answer(api):
    assert api.get("/healthz").json() == {"status": "ok", "shards": None, "answering": None}
    r = api.get("/readyz")
    assert r.status_code == 200 and r.json()["answering"] == 2, r.text


def test_auth_on_every_route(api):
    now = time.time()
    for method, path, kw in [("GET", "/v1/unique?last=15m", {}), ("POST", "/v1/unique", {"json": {"keys": [None], "last": "15m"}}),
                             ("GET", "/v1/series?last=1h&step=15m", {}),
                             ("POST", "/v1/events", {"json": _events(1, now)})]:
        r = api.request(method, path, **kw)
        assert r.status_code == 401 and "API key" in r.json()["error"], (path, r.text)
        r = api.request(method, path, headers={"X-API-Key": "nope"}, **kw)
        assert r.status_code == 401 and r.json()["error"] == "unknown API key"
        wrong = W if method == "GET" or path == "/v1/unique" else R
        r = api.request(method, path, headers=wrong, **kw)
        assert r.status_code == 403 and "scope" in r.json()["error"], (path, r.text)
        right = R if wrong is W else W
        assert api.request(method, path, headers=right, **kw).status_code == 200, path
        assert api.request(method, path, headers=RW, **kw).status_code == 200, path


def test_ingest_json_jsonlines_and_arrow_then_query_within_a_second(api):
    now = time.time()
    r = api.post("/v1/events", json=_events(300, now, "ad-json"), headers=W)
    assert r.status_code == 200 and r.json()["accepted"] == 300 and r.json()["rejected"] == 0
    lines = "\n".join(json.dumps(e) for e in _events(200, now, "ad-lines"))
    r = api.post("/v1/events", content=lines, headers={**W, "Content-Type": "application/x-ndjson"})
    assert r.json()["accepted"] == 200
    t = pa.table({"ts": pa.array([now] * 500), "key": pa.array(["ad-arrow"] * 500),
                  "visitor": pa.array([f"a{i}" for i in range(500)])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    r = api.post("/v1/events", content=sink.getvalue().to_pybytes(),
                 headers={**W, "Content-Type": "application/vnd.apache.arrow.stream"})
    assert r.status_code == 200 and r.json()["accepted"] == 500
    t0 = time.time()
    got = api.get("/v1/unique", params={"key": ["ad-json", "ad-lines", "ad-arrow"], "last": "15m"}, headers=R).json()
    assert time.time() - t0 < 1.0
    assert [(x["key"], x["unique_visitors"], x["impressions"], x["exact"]) for x in got["results"]] == [
        ("ad-json", 300, 300, True), ("ad-lines", 200, 200, True), ("ad-arrow", 500, 500, True)]
    # the bodies were parsed and sent on the replica's threads for bulk work, at nice 19 (questions first); the
    # process's main thread kept Ray's priority, and no thread of it is in the idle class
    (replica,) = processes("cmdline", lambda cmd: b"ServeReplica:api-test:ImpressionsApi" in cmd)
    threads = thread_priorities(replica)
    assert threads[replica][1] < BULK_NICE and sum(nice == BULK_NICE for _, nice in threads.values()) >= 1
    assert not any(policy == os.SCHED_IDLE for policy, _ in threads.values())
    one = api.get("/v1/unique", params={"key": "ad-json", "last": "15m"}, headers=R).json()
    assert one["unique_visitors"] == 300 and set(one) == {"key", "start", "end", "unique_visitors", "impressions",
                                                          "relative_error", "interval", "exact", "partial"}
    many = api.post("/v1/unique", json={"keys": ["ad-json", None], "last": "1h"}, headers=R).json()["results"]
    assert many[0]["unique_visitors"] == 300 and many[1]["unique_visitors"] >= 800  # v0..v299 twice, a0..a499
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600))
    r = api.get("/v1/unique", params={"key": "ad-json", "start": iso}, headers=R).json()
    assert r["unique_visitors"] == 300 and r["start"] <= now - 3600
    s = api.get("/v1/series", params={"key": "ad-json", "last": "1h", "step": "15m"}, headers=R).json()
    assert s["step"] == 900 and len(s["points"]) == 4
    assert sum(p["impressions"] for p in s["points"]) == 300
    # the audience questions, each awaited on the replica's event loop
    reach = api.get("/v1/reach", params={"key": ["ad-json", "ad-arrow"], "last": "15m"}, headers=R).json()
    assert (reach["unique_visitors"], reach["impressions"], reach["exact"]) == (800, 800, True), reach
    ov = api.get("/v1/overlap", params=[("a", "ad-json"), ("b", "ad-lines"), ("last", "15m")], headers=R).json()
    assert (ov["a"]["unique_visitors"], ov["b"]["unique_visitors"], ov["both"]["unique_visitors"]) == (300, 200, 200)
    roll = api.get("/v1/rolling", params={"key": "ad-json", "cumulative": "true", "step": "15m", "last": "1h"},
                   headers=R).json()
    assert len(roll["points"]) == 4 and roll["points"][-1]["impressions"] == 300, roll


def test_every_bad_input_is_a_4xx_with_a_message_and_changes_nothing(api):
    now = time.time()
    api.post("/v1/events", json=_events(50, now, "ad-stable"), headers=W)
    before = api.get("/v1/unique", params={"key": "ad-stable", "last": "1h"}, headers=R).json()
    cases = [
        ("GET", "/v1/unique", {"params": {"last": "15x"}}, 400, "must be <integer>"),
        ("GET", "/v1/unique", {"params": {"last": "0m"}}, 400, "must be positive"),
        ("GET", "/v1/unique", {"params": {"last": "-5"}}, 400, "must be"),
        ("GET", "/v1/unique", {"params": {"last": "40d"}}, 400, "exceeds the 30-day retention"),
        ("GET", "/v1/unique", {"params": {"start": now - 40 * 86400}}, 400, "30-day retention"),
        ("GET", "/v1/unique", {"params": {"start": now, "end": now - 3600}}, 400, "must be before end"),
        ("GET", "/v1/unique", {"params": {"start": "yesterday"}}, 400, "epoch seconds or ISO-8601"),
        ("GET", "/v1/unique", {"params": {"last": "1h", "start": now}}, 400, "either"),
        ("GET", "/v1/unique", {}, 400, "give 'last'"),
        ("GET", "/v1/unique", {"params": {"key": [f"k{i}" for i in range(1001)], "last": "1h"}}, 400, "at most 1000"),
        ("POST", "/v1/unique", {"json": {"keys": [5], "last": "1h"}}, 422, "keys"),
        ("POST", "/v1/unique", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, ""),
        ("GET", "/v1/series", {"params": {"last": "30d", "step": "1m"}}, 400, "at most 1500"),
        ("GET", "/v1/series", {"params": {"last": "1h", "step": "7s"}}, 400, "whole number"),
        ("POST", "/v1/events", {"content": b'[{"ts": 1, "key": ', "headers": {"Content-Type": "application/json"}},
         400, "malformed JSON"),
        ("POST", "/v1/events", {"content": b"\x00garbage", "headers": {
            "Content-Type": "application/vnd.apache.arrow.stream"}}, 400, "malformed Arrow"),
        ("POST", "/v1/events", {"json": [{"ts": now, "key": "ad-stable"}]}, 400, "visitor is missing"),
        ("POST", "/v1/events", {"json": [{"ts": now, "visitor": "x"}]}, 400, "key is missing"),
        ("POST", "/v1/events", {"json": [{"ts": now - 40 * 86400, "key": "ad-stable", "visitor": "x"}]}, 400,
         "older than the 30-day retention"),
        ("POST", "/v1/events", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
        ("POST", "/v1/events", {"json": _events(5000, now, "ad-stable", 10_000)}, 413, "over the 200,000-byte limit"),
    ]
    for method, path, kw, status, words in cases:
        headers = {**(W if path == "/v1/events" else R), **kw.pop("headers", {})}
        r = api.request(method, path, headers=headers, **kw)
        assert r.status_code == status, (path, kw, r.status_code, r.text)
        assert words in r.json()["error"], (path, kw, r.text)
    # a batch with some bad rows: the good ones are accepted, the bad ones reported
    r = api.post("/v1/events", json=[{"ts": now, "key": "ad-mixed", "visitor": "x"}, {"key": "ad-mixed"}, 7],
                 headers=W).json()
    assert (r["accepted"], r["rejected"]) == (1, 2) and {e["row"] for e in r["errors"]} == {1, 2}
    after = api.get("/v1/unique", params={"key": "ad-stable", "last": "1h"}, headers=R).json()
    counts = lambda r: (r["unique_visitors"], r["impressions"])  # noqa: E731 - start/end move with the clock
    assert counts(after) == counts(before)


def test_idempotency_key_through_serve(api):
    now = time.time()
    body = [{"ts": now, "key": "ad-idem", "visitor": f"i{i}"} for i in range(40)]
    first = api.post("/v1/events", json=body, headers={**W, "Idempotency-Key": "serve-1"})
    again = api.post("/v1/events", json=body, headers={**W, "Idempotency-Key": "serve-1"})
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    r = api.get("/v1/unique", params={"key": "ad-idem", "last": "15m"}, headers=R).json()
    assert (r["unique_visitors"], r["impressions"]) == (40, 40)
    clash = api.post("/v1/events", json=body[:5], headers={**W, "Idempotency-Key": "serve-1"})
    assert clash.status_code == 409


def test_metrics_reach_prometheus(api):
    api.get("/v1/unique", params={"last": "15m"}, headers=R)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def scraped():
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        return "impressions_query_latency_ms" in text and "impressions_events_total" in text
    wait_for(scraped, timeout=60, interval=2, what="the app's metrics on the Prometheus endpoint")


def test_openapi_fuzz_no_server_errors_and_conformant_responses(api):
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis import checks

    schema = schemathesis.openapi.from_url(str(api.base_url) + "/openapi.json")
    seen = []
    for op in schema.get_all_operations():
        operation = op.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case):
            response = case.call(base_url=str(api.base_url), headers={**RW, **(case.headers or {})})
            assert response.status_code < 500, (case.path, case.query, response.text)
            case.validate_response(response, checks=[checks.response_schema_conformance])
            seen.append(response.status_code)

        from hypothesis import given
        given(strategy)(run)()
    assert len(seen) >= 50


def test_readme_curl_examples_work(api):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## REST API\n.*?```bash\n(.*?)\n```", readme, flags=re.S).group(1)
    import shlex
    import subprocess
    commands = [c for c in block.split("\n") if c.startswith("curl")]
    assert len(commands) >= 4
    for c in commands:
        c = c.replace("http://127.0.0.1:8000", str(api.base_url)).replace("$READ_KEY", "reader").replace(
            "$WRITE_KEY", "writer").replace("$(date +%s%N)", str(time.time_ns())).replace(
            "$(date +%s)", str(int(time.time())))
        out = subprocess.run(shlex.split(c) + ["--silent", "--show-error", "--fail-with-body"], capture_output=True,
                             text=True)
        assert out.returncode == 0, (c, out.stderr, out.stdout)
        json.loads(out.stdout)


def test_rest_answers_stay_complete_while_a_writer_and_a_reader_are_killed(api):
    """Questions awaited on the replica's loop go on to the next copy of a range: with a writer SIGKILLed, and
    then a reader, every answer is a 200, complete and the same."""
    import os
    import signal

    from impressions.cluster.bootstrap import get_coordinator
    coord = get_coordinator("api")
    wait_for(lambda: all(len(r) >= 1 for r in ray.get(coord.read_route.remote())[2]), timeout=60,
             what="a reader for every range")
    assert api.post("/v1/events", json=_events(300, time.time(), "ad-kill"), headers=W).json()["accepted"] == 300
    params = {"key": ["ad-kill", None], "last": "1h"}

    def counts(results):  # what must not change (the range's ends move with the clock)
        return [(x["key"], x["unique_visitors"], x["impressions"], x["partial"]) for x in results]
    want = counts(api.get("/v1/unique", params=params, headers=R).json()["results"])
    assert not any(partial for *_, partial in want) and want[0][1] == 300
    writer = ray.get(coord.shard_handles.remote())[0]
    reader = ray.get(coord.read_route.remote())[2][1][0]
    for victim in (writer, reader):
        pid = ray.get(victim.pid.remote())
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            r = api.get("/v1/unique", params=params, headers=R)
            assert r.status_code == 200 and counts(r.json()["results"]) == want, r.text
            time.sleep(0.05)
        wait_for(lambda v=victim, p=pid: _answers_with_new_pid(v, p), timeout=60, what="the killed copy back")


def _answers_with_new_pid(handle, old: int) -> bool:
    try:
        return ray.get(handle.pid.remote(), timeout=5) != old
    except Exception:  # noqa: BLE001 - still restarting
        return False
