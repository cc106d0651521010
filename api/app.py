"""The REST API: a FastAPI app, thin over the coordinator.

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

Auth: API keys (``api.auth``).  Reads need the read scope, ``POST
/v1/events`` the write scope; 401 without a key, 403 with the wrong scope.
With no keys configured the API is open (the local default).

The app resolves every question's range itself, once (``SketchConfig.resolve``
on its clock), and hands the cluster whole buckets.  What answers is a
*backend* (``Backend`` below): ``cluster.serve`` wires the Ray one (the
coordinator actor and the ingest sender) and serves this app with Ray Serve.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Annotated, Protocol, Union

import pyarrow as pa
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sketch.config import SketchConfig
from sketch.events import IngestReport
from sketch.timeindex import BucketRange, parse_duration

from . import errors
from .auth import READ, WRITE, parse_api_keys
from .bodies import ARROW_STREAM, events_table
from .errors import BadRequest
from .models import (ERRORS, MAX_KEY_BYTES, MAX_KEYS, Error, Health, IngestResult, Keys, Series, Unique, UniqueMany,
                     UniqueQuery)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
MAX_BODY = 64 * 1024 * 1024
MAX_POINTS = 1500


class Backend(Protocol):
    """What the app asks the cluster (every method a coroutine)."""

    sketch: SketchConfig

    async def query(self, keys: list, rng: BucketRange) -> list[dict]: ...

    async def series(self, key, rng: BucketRange, step: int) -> list[dict]: ...

    async def keys(self, rng: BucketRange, prefix: str, limit: int) -> list[dict]: ...

    async def ingest(self, table: pa.Table, malformed: list[int]) -> IngestReport: ...

    async def stats(self) -> dict: ...


class Metrics:
    """What the app measures; this one records nothing (``cluster.serve`` exports them)."""

    def events(self, result: str, n: int) -> None: ...

    def latency(self, route: str, ms: float) -> None: ...

    def checkpoint_age(self, seconds: float) -> None: ...


def configure(app: FastAPI, backend: Backend, *, api_keys: str | None = None, max_body: int = MAX_BODY,
              metrics: Metrics | None = None) -> FastAPI:
    """Give the app what answers, its keys and limits."""
    app.state.backend = backend
    app.state.api_keys = parse_api_keys(api_keys)
    app.state.max_body = max_body
    app.state.metrics = metrics or Metrics()
    return app


def create_app() -> FastAPI:
    """The app, its routes and error handling; ``configure`` it before serving."""
    app = FastAPI(title="impressions", version="1", description=__doc__,
                  openapi_tags=[{"name": "queries"}, {"name": "ingest"}, {"name": "health"}])
    errors.install(app)

    def backend(request: Request) -> Backend:
        return request.app.state.backend

    def resolve(request: Request, last, start, end) -> BucketRange:
        return backend(request).sketch.resolve(now=time.time(), last=last, start=start, end=end)

    def check_keys(keys: list) -> None:
        if len(keys) > MAX_KEYS:
            raise BadRequest(f"{len(keys)} keys in one query; at most {MAX_KEYS}")
        for k in keys:
            if k is not None and not isinstance(k, str):
                raise BadRequest(f"keys must be strings or null, not {k!r}")
            if k is not None and len(k.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                raise BadRequest(f"a key of {len(k.encode('utf-8', 'surrogatepass'))} bytes; keys are at most "
                                 f"{MAX_KEY_BYTES}")

    async def answer(request: Request, keys: list, last, start, end) -> list[dict]:
        check_keys(keys)
        rng = resolve(request, last, start, end)  # bad input is a 400 here and never reaches the cluster
        t = time.perf_counter()
        out = await backend(request).query(keys, rng)
        request.app.state.metrics.latency("unique", (time.perf_counter() - t) * 1e3)
        return out

    @app.get("/v1/unique", tags=["queries"], response_model=Union[Unique, UniqueMany], responses=ERRORS,
             dependencies=READ, summary="unique visitors and impressions of one key (or several) over a range")
    async def unique(request: Request,
                     key: Annotated[list[str] | None, Query(description="repeat for several keys; omit for site-wide")] = None,
                     last: Annotated[str | None, Query(description="15m, 24h, 30d, ... or a number of buckets")] = None,
                     start: Annotated[str | None, Query(description="epoch seconds or ISO-8601")] = None,
                     end: Annotated[str | None, Query(description="epoch seconds or ISO-8601 (default: now)")] = None):
        keys = list(key) if key else [None]
        out = await answer(request, keys, last, start, end)
        return out[0] if len(keys) == 1 else {"results": out}

    @app.post("/v1/unique", tags=["queries"], response_model=UniqueMany, responses=ERRORS, dependencies=READ,
              summary="many keys at once")
    async def unique_many(request: Request, q: UniqueQuery):
        return {"results": await answer(request, list(q.keys), q.last, q.start, q.end)}

    @app.get("/v1/series", tags=["queries"], response_model=Series, responses=ERRORS, dependencies=READ,
             summary="unique visitors per step over a range (one range query per point)")
    async def series(request: Request, key: Annotated[str | None, Query(description="omit for site-wide")] = None,
                     last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                     end: Annotated[str | None, Query()] = None,
                     step: Annotated[str, Query(description="e.g. 1h, 5m, or a number of buckets")] = "1h"):
        check_keys([key])
        rng = resolve(request, last, start, end)
        n = parse_duration(step, rng.bucket_seconds)
        points = math.ceil(rng.buckets / n)
        if points > MAX_POINTS:
            raise BadRequest(f"{points} points ({rng.buckets} buckets in steps of {n}); at most {MAX_POINTS}")
        t = time.perf_counter()
        out = await backend(request).series(key, rng, n)
        request.app.state.metrics.latency("series", (time.perf_counter() - t) * 1e3)
        return {"key": key, "step": n * rng.bucket_seconds, "points": out}

    @app.get("/v1/keys", tags=["queries"], response_model=Keys, responses=ERRORS, dependencies=READ,
             summary="keys with impressions in a range (default: the retention), the most impressions first")
    async def keys(request: Request, prefix: Annotated[str, Query(max_length=MAX_KEY_BYTES)] = "",
                   limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                   last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                   end: Annotated[str | None, Query()] = None):
        if last is None and start is None:
            last = backend(request).sketch.retention_buckets
        rng = resolve(request, last, start, end)
        out = await backend(request).keys(rng, prefix, limit)
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
    async def events(request: Request):
        limit = request.app.state.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"body of {int(length):,} bytes is over the {limit:,}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"body is over the {limit:,}-byte limit")
        # parsing is CPU work: off the event loop
        table, malformed = await asyncio.to_thread(events_table, bytes(body), request.headers.get("content-type", ""))
        report = await backend(request).ingest(table, malformed)
        metrics = request.app.state.metrics
        metrics.events("accepted", report.accepted)
        metrics.events("rejected", report.rejected_total)
        out = {"accepted": report.accepted, "rejected": report.rejected_total,
               "rejected_by_reason": dict(report.rejected), "errors": report.samples}
        if report.accepted == 0 and report.received > 0:
            return JSONResponse(out | {"error": f"none of the {report.received} events was accepted; "
                                                f"first reason: {report.samples[0]['reason']}"}, status_code=400)
        return out

    @app.get("/", include_in_schema=False)
    async def dashboard():
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name!r}")
        return _static(name)

    @app.get("/healthz", tags=["health"], response_model=Health, summary="the app is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Health, responses={503: {"model": Health}},
             summary="every shard answers")
    async def readyz(request: Request):
        try:
            stats = await asyncio.wait_for(backend(request).stats(), 10)
        except Exception as e:  # noqa: BLE001 - the coordinator itself is restarting: not ready, whatever the cause
            return JSONResponse({"status": f"not ready: {type(e).__name__}"}, status_code=503)
        shards = stats["shards"]
        up = [s for s in shards if s is not None]
        ages = [s["checkpoint_age_s"] for s in up if s.get("checkpoint_age_s") is not None]
        if ages:
            request.app.state.metrics.checkpoint_age(max(ages))
        body = {"status": "ok" if len(up) == len(shards) else "not ready", "shards": len(shards),
                "answering": len(up)}
        return body if len(up) == len(shards) else JSONResponse(body, status_code=503)

    return app


def _static(name: str) -> Response:
    with open(os.path.join(STATIC, name), "rb") as f:
        return Response(f.read(), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})
