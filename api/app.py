"""The REST API: a FastAPI app served by Ray Serve, thin over the coordinator.

Routes (every answer is JSON; every error is ``{"error": "<what was wrong>"}``):

* ``GET /v1/unique?key=ad-1&last=15m`` (or ``start=``/``end=``, epoch seconds or
  ISO-8601; no ``key`` = site-wide; several ``key=`` = several answers) and
  ``POST /v1/unique`` with ``{"keys": [...], "last": "1d"}`` for many keys;
* ``POST /v1/events``: a JSON array or JSON lines of ``{"ts", "key",
  "visitor"}``, or an Arrow IPC stream (``application/vnd.apache.arrow.stream``);
  answered once the accepted events are durable;
* ``GET /v1/series?key=ad-1&last=24h&step=1h``: one real range query per step;
* ``GET /v1/keys?prefix=&limit=`` (keys with impressions in a range, the most first);
* ``GET /healthz`` (the app is up), ``GET /readyz`` (every shard answers);
* ``GET /``: the dashboard (static files in ``api/static``, no build step, no network).

Auth: API keys from ``IMPRESSIONS_API_KEYS`` (``key:read,key2:write,key3:read+write``),
sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.  Reads need the
read scope, ``POST /v1/events`` the write scope; 401 without a key, 403 with
the wrong scope.  With no keys configured the API is open (the local default).
"""

# annotations are evaluated eagerly here: Serve pickles the app by value, and FastAPI must
# still resolve the dependencies' annotations in the replica

import io
import json
import math
import os
import time
from typing import Annotated, Union

import pyarrow as pa
import ray
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from cluster.readers import _json_block, parse_ts
from sketch.timeindex import RangeError, parse_duration, resolve_range

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
MAX_KEYS = 1000
MAX_BODY = 64 * 1024 * 1024
MAX_POINTS = 1500
ARROW_STREAM = "application/vnd.apache.arrow.stream"


# ------------------------------------------------------------------ models

class Unique(BaseModel):
    key: str | None = Field(description="the key (null: site-wide)")
    start: int = Field(description="start of the range covered, epoch seconds (inclusive, bucket-aligned)")
    end: int = Field(description="end of the range covered, epoch seconds (exclusive, bucket-aligned)")
    unique_visitors: int
    impressions: int
    relative_error: float = Field(description="relative standard error of unique_visitors")
    interval: list[int | None] = Field(description="95 % interval of unique_visitors")
    exact: bool = Field(description="counted, not estimated")
    partial: bool = Field(description="some shards did not answer: extrapolated, with wider error bars")


class UniqueMany(BaseModel):
    results: list[Unique]


class UniqueQuery(BaseModel):
    keys: list[str | None] = Field(description="keys (null: site-wide)", max_length=MAX_KEYS)
    last: Union[str, int, None] = Field(default=None, description="e.g. 15m, 24h, 30d, or a number of buckets")
    start: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")
    end: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")


class Rejected(BaseModel):
    row: int
    reason: str
    value: Union[str, int, float, None] = None
    file: str | None = None


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    errors: list[Rejected] = Field(description="the first few rejected rows, with reasons")


class Series(BaseModel):
    key: str | None
    step: int = Field(description="seconds per point")
    points: list[Unique]


class KeyCount(BaseModel):
    key: str
    impressions: int


class Keys(BaseModel):
    start: int
    end: int
    keys: list[KeyCount] = Field(description="the most impressions first")


class Error(BaseModel):
    error: str


class Health(BaseModel):
    status: str
    shards: int | None = None
    answering: int | None = None


ERRORS = {400: {"model": Error, "description": "bad input: the message says what"},
          401: {"model": Error, "description": "no API key"},
          403: {"model": Error, "description": "an API key without the needed scope"},
          422: {"model": Error, "description": "a parameter of the wrong type"},
          503: {"model": Error, "description": "no shard answered in time"}}


# ------------------------------------------------------------------ auth

def parse_api_keys(text: str | None) -> dict[str, set[str]]:
    """``"k1:read,k2:write,k3:read+write"`` -> {key: scopes}."""
    keys: dict[str, set[str]] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, scopes = item.partition(":")
        got = {s for s in scopes.replace("+", " ").split()} or {"read"}
        bad = got - {"read", "write"}
        if bad or not key:
            raise ValueError(f"IMPRESSIONS_API_KEYS entry {item!r}: expected <key>:read, :write or :read+write")
        keys[key] = got
    return keys


app = FastAPI(title="impressions", version="1", description=__doc__,
              openapi_tags=[{"name": "queries"}, {"name": "ingest"}, {"name": "health"}])
app.state.api_keys = parse_api_keys(os.environ.get("IMPRESSIONS_API_KEYS"))
_bearer = HTTPBearer(auto_error=False, description="an API key")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def _scope(needed: str):
    def check(bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
              header: Annotated[str | None, Security(_header)] = None) -> None:
        keys = app.state.api_keys
        if not keys:
            return
        key = bearer.credentials if bearer is not None else header
        if not key:
            raise HTTPException(401, "an API key is required (Authorization: Bearer <key> or X-API-Key)")
        scopes = keys.get(key)
        if scopes is None:
            raise HTTPException(401, "unknown API key")
        if needed not in scopes:
            raise HTTPException(403, f"this API key has no {needed} scope")
    return check


READ = [Security(_scope("read"))]
WRITE = [Security(_scope("write"))]


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)


@app.exception_handler(RangeError)
@app.exception_handler(ValueError)
async def _bad_input(request: Request, exc: Exception):
    return JSONResponse({"error": str(exc)}, status_code=400)


@app.exception_handler(TimeoutError)
async def _unavailable(request: Request, exc: Exception):
    return JSONResponse({"error": str(exc)}, status_code=503)


# ------------------------------------------------------------------ helpers

def parse_time(name: str, value) -> float | None:
    """Epoch seconds (a number) or ISO-8601 -> float seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"'{name}' must be epoch seconds or ISO-8601, not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"'{name}' must be a finite number of seconds")
        return float(value)
    secs, bad = parse_ts(pa.array([str(value)]), "s")
    if bad[0] or math.isnan(secs[0]):
        raise ValueError(f"'{name}' must be epoch seconds or ISO-8601, not {value!r}")
    return float(secs[0])


def _last(value):
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _events_table(body: bytes, content_type: str) -> tuple[pa.Table, list[int]]:
    """The request body as (table of ts/key/visitor, malformed row numbers)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    cols = {"ts": "ts", "key": "key", "visitor": "visitor"}
    if ctype == ARROW_STREAM:
        try:
            table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"malformed Arrow IPC stream: {e}") from None
        missing = [c for c in cols if c not in table.schema.names]
        if missing:
            raise ValueError(f"the Arrow stream has no {', '.join(repr(c) for c in missing)} column "
                             f"(its columns: {', '.join(table.schema.names) or 'none'})")
        return table.select(list(cols)), []
    text = body.strip()
    if not text:
        raise ValueError("the request body is empty: send a JSON array, JSON lines or an Arrow IPC stream")
    if text[:1] == b"[":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise ValueError(f"malformed JSON: {e}") from None
        text = b"\n".join(json.dumps(r).encode() for r in rows)  # one event per line, checked per row below
    table, _, malformed = next(_json_block(text + b"\n", "request body", cols, 0))
    return table, malformed


# ------------------------------------------------------------------ the deployment

try:
    from ray import serve
except ImportError:  # pragma: no cover - ray[serve] is a dependency
    serve = None


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60})
@serve.ingress(app)
class ImpressionsApi:
    def __init__(self, namespace: str = "impressions", api_keys: str | None = None, max_body: int = MAX_BODY):
        from ray.util import metrics
        if api_keys is not None:
            app.state.api_keys = parse_api_keys(api_keys)
        self.max_body = max_body
        self.coordinator = ray.get_actor("coordinator", namespace=namespace)
        self.config = json.loads(ray.get(self.coordinator.config_json.remote()))
        sk = self.config["sketch"]
        self.bucket_seconds, self.retention_buckets = sk["bucket_seconds"], sk["retention_seconds"] // sk["bucket_seconds"]
        self.m_events = metrics.Counter("impressions_events_total", description="events received over REST",
                                        tag_keys=("result",))
        self.m_latency = metrics.Histogram("impressions_query_latency_ms", description="query latency over REST",
                                           boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("route",))
        self.m_ckpt_age = metrics.Gauge("impressions_checkpoint_age_seconds",
                                        description="age of the oldest shard checkpoint (readyz)")

    async def _query(self, keys, last, start, end) -> list[dict]:
        if len(keys) > MAX_KEYS:
            raise ValueError(f"{len(keys)} keys in one query; at most {MAX_KEYS}")
        for k in keys:
            if k is not None and not isinstance(k, str):
                raise ValueError(f"keys must be strings or null, not {k!r}")
        s, e = parse_time("start", start), parse_time("end", end)
        # validate here, so that bad input is a 400 and never reaches the cluster
        resolve_range(bucket_seconds=self.bucket_seconds, retention_buckets=self.retention_buckets, now=time.time(),
                      last=_last(last), start=s, end=e)
        t = time.perf_counter()
        out = await self.coordinator.query.remote(keys, _last(last), s, e, None)
        self.m_latency.observe((time.perf_counter() - t) * 1e3, tags={"route": "unique"})
        return out

    @app.get("/v1/unique", tags=["queries"], response_model=Union[Unique, UniqueMany], responses=ERRORS,
             dependencies=READ, summary="unique visitors and impressions of one key (or several) over a range")
    async def unique(self, key: Annotated[list[str] | None, Query(description="repeat for several keys; omit for site-wide")] = None,
                     last: Annotated[str | None, Query(description="15m, 24h, 30d, ... or a number of buckets")] = None,
                     start: Annotated[str | None, Query(description="epoch seconds or ISO-8601")] = None,
                     end: Annotated[str | None, Query(description="epoch seconds or ISO-8601 (default: now)")] = None):
        keys = list(key) if key else [None]
        out = await self._query(keys, last, start, end)
        return out[0] if len(keys) == 1 else {"results": out}

    @app.post("/v1/unique", tags=["queries"], response_model=UniqueMany, responses=ERRORS, dependencies=READ,
              summary="many keys at once")
    async def unique_many(self, q: UniqueQuery):
        return {"results": await self._query(list(q.keys), q.last, q.start, q.end)}

    @app.get("/v1/series", tags=["queries"], response_model=Series, responses=ERRORS, dependencies=READ,
             summary="unique visitors per step over a range (one range query per point)")
    async def series(self, key: Annotated[str | None, Query(description="omit for site-wide")] = None,
                     last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                     end: Annotated[str | None, Query()] = None,
                     step: Annotated[str, Query(description="e.g. 1h, 5m, or a number of buckets")] = "1h"):
        rng = resolve_range(bucket_seconds=self.bucket_seconds, retention_buckets=self.retention_buckets,
                            now=time.time(), last=_last(last), start=parse_time("start", start),
                            end=parse_time("end", end))
        n = parse_duration(_last(step), self.bucket_seconds)
        points = math.ceil(rng.buckets / n)
        if points > MAX_POINTS:
            raise ValueError(f"{points} points ({rng.buckets} buckets in steps of {n}); at most {MAX_POINTS}")
        t = time.perf_counter()
        out = await self.coordinator.series.remote(key, rng.b0, rng.b1, n)
        self.m_latency.observe((time.perf_counter() - t) * 1e3, tags={"route": "series"})
        return {"key": key, "step": n * self.bucket_seconds, "points": out}

    @app.get("/v1/keys", tags=["queries"], response_model=Keys, responses=ERRORS, dependencies=READ,
             summary="keys with impressions in a range (default: the retention), the most impressions first")
    async def keys(self, prefix: Annotated[str, Query(max_length=256)] = "",
                   limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                   last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                   end: Annotated[str | None, Query()] = None):
        if last is None and start is None:
            last = self.retention_buckets
        rng = resolve_range(bucket_seconds=self.bucket_seconds, retention_buckets=self.retention_buckets,
                            now=time.time(), last=_last(last), start=parse_time("start", start),
                            end=parse_time("end", end))
        out = await self.coordinator.keys.remote(rng.b0, rng.b1, prefix, limit)
        return {"start": rng.start, "end": rng.end, "keys": out}

    @app.post("/v1/events", tags=["ingest"], response_model=IngestResult, responses={**ERRORS, 413: {
        "model": Error, "description": "body over the size limit"}}, dependencies=WRITE,
        summary="add events (JSON array, JSON lines or Arrow IPC stream); answered once durable",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"type": "array", "items": {"type": "object", "properties": {
                "ts": {"oneOf": [{"type": "number"}, {"type": "string"}]}, "key": {"type": "string"},
                "visitor": {"type": "string"}}}}},
            "application/x-ndjson": {"schema": {"type": "string"}},
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
    async def events(self, request: Request):
        import asyncio

        from cluster.ingest import ingest_table
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HTTPException(413, f"body of {int(length):,} bytes is over the {self.max_body:,}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise HTTPException(413, f"body is over the {self.max_body:,}-byte limit")
        table, malformed = _events_table(bytes(body), request.headers.get("content-type", ""))
        # the shard calls block until the batches are durable: on a thread, not the event loop
        report = await asyncio.to_thread(ingest_table, table, self.coordinator, malformed=malformed)
        if report.accepted:  # Ray's counters refuse an increment of 0
            self.m_events.inc(report.accepted, tags={"result": "accepted"})
        if report.rejected_total:
            self.m_events.inc(report.rejected_total, tags={"result": "rejected"})
        out = {"accepted": report.accepted, "rejected": report.rejected_total,
               "rejected_by_reason": dict(report.rejected), "errors": report.samples}
        if report.accepted == 0 and report.received > 0:
            return JSONResponse(out | {"error": f"none of the {report.received} events was accepted; "
                                                f"first reason: {report.samples[0]['reason']}"}, status_code=400)
        return out

    @app.get("/", include_in_schema=False)
    async def dashboard(self):
        return self._static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name!r}")
        return self._static(name)

    @staticmethod
    def _static(name: str):
        from fastapi.responses import Response
        with open(os.path.join(STATIC, name), "rb") as f:
            return Response(f.read(), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["health"], response_model=Health, summary="the app is up")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Health, responses={503: {"model": Health}},
             summary="every shard answers")
    async def readyz(self):
        import asyncio
        try:
            stats = await asyncio.wait_for(self.coordinator.stats.remote(), 10)
        except Exception as e:  # the coordinator itself is restarting
            return JSONResponse({"status": f"not ready: {type(e).__name__}: {e}"[:300]}, status_code=503)
        shards = stats["shards"]
        up = [s for s in shards if s is not None]
        ages = [s["checkpoint_age_s"] for s in up if s.get("checkpoint_age_s") is not None]
        if ages:
            self.m_ckpt_age.set(max(ages))
        body = {"status": "ok" if len(up) == len(shards) else "not ready", "shards": len(shards),
                "answering": len(up)}
        return body if len(up) == len(shards) else JSONResponse(body, status_code=503)


def build(args: dict | None = None):
    """The Serve application (``serve run api.app:build``)."""
    args = args or {}
    return ImpressionsApi.bind(args.get("namespace", os.environ.get("IMPRESSIONS_NAMESPACE", "impressions")),
                               args.get("api_keys", os.environ.get("IMPRESSIONS_API_KEYS")))


def start(namespace: str, *, host: str = "127.0.0.1", port: int = 8000, api_keys: str | None = None,
          name: str = "impressions", route_prefix: str = "/", max_body: int = MAX_BODY) -> str:
    """Start (or update) the REST app on the connected Ray cluster; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(ImpressionsApi.bind(namespace, api_keys if api_keys is not None else os.environ.get(
        "IMPRESSIONS_API_KEYS"), max_body), name=name, route_prefix=route_prefix, blocking=False)
    try:  # Serve keeps the host and port it first started with: report those (ray==2.60 is pinned)
        from ray.serve.context import _get_global_client
        cfg = _get_global_client().http_config
        host, port = cfg.host, cfg.port
    except Exception:
        pass
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
