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
import contextvars
import functools
import hashlib
import json
import math
import os
import time
from concurrent.futures import Executor
from typing import Annotated, Protocol, Union

import pyarrow as pa
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from impressions.sketch.config import SketchConfig
from impressions.sketch.timeindex import BucketRange, parse_duration
from impressions.sketch.windows import plan_series

from . import errors
from .auth import READ, WRITE, FailedAuth, parse_api_keys
from .bodies import ARROW_STREAM, events_table
from .errors import BadRequest
from .models import (
    ERRORS,
    MAX_KEY_BYTES,
    MAX_KEYS,
    Error,
    Health,
    IngestResult,
    Keys,
    Overlap,
    OverlapQuery,
    Reach,
    ReachQuery,
    Rolling,
    Series,
    Unique,
    UniqueMany,
    UniqueQuery,
)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8",
                # uPlot, vendored from the npm registry (api/static/VENDORED.md): no network at run time
                "uPlot.iife.min.js": "text/javascript; charset=utf-8", "uPlot.min.css": "text/css; charset=utf-8",
                "uPlot.LICENSE": "text/plain; charset=utf-8"}
MAX_BODY = 64 * 1024 * 1024  # bytes of a POST /v1/events body
MAX_ROWS = 1_000_000  # events in one POST /v1/events (a compressed Arrow stream can hold far more than its bytes)
MAX_QUERY_BODY = 1024 * 1024  # bytes of any other POST body
MAX_POINTS = 1500
MAX_IDEMPOTENCY_KEY = 255
READY_CACHE_S = 2.0  # /readyz answers from a cache this fresh: probes never pile calls on the cluster


class Backend(Protocol):
    """What the app asks the cluster (every method a coroutine)."""

    sketch: SketchConfig

    async def query(self, keys: list, rng: BucketRange) -> list[dict]: ...

    async def series(self, key, rng: BucketRange, step: int) -> list[dict]: ...

    async def keys(self, rng: BucketRange, prefix: str, limit: int) -> list[dict]: ...

    async def reach(self, keys: list, prefix: str | None, rng: BucketRange) -> dict: ...

    async def overlap(self, a: tuple, b: tuple, rng: BucketRange) -> dict: ...

    async def rolling(self, keys: list, prefix: str | None, rng: BucketRange, step: int,
                      window: int | None) -> dict: ...

    async def ingest(self, table: pa.Table, malformed: list[int], idempotency_key: str | None,
                     body_sha: str) -> dict:
        """Count the events; the answer (``IngestResult``'s fields).  With an
        idempotency key: the first answer again for the same key and body
        (counted once), ``Conflict`` for the same key with another body."""

    async def health(self) -> dict:
        """``{"shards": [{"available", "reason", ...}], "answering": n}``."""


class Metrics:
    """What the app measures; this one records nothing (``cluster.serve`` exports them)."""

    def events(self, result: str, n: int) -> None: ...

    def latency(self, route: str, ms: float) -> None: ...

    def checkpoint_age(self, seconds: float) -> None: ...


async def on_threads(pool: Executor | None, fn, *args):
    """``fn(*args)`` on a thread of ``pool`` (None: the event loop's own pool), in the caller's context, as
    ``asyncio.to_thread`` runs it on the loop's pool."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


def configure(app: FastAPI, backend: Backend, *, api_keys: str | None = None, max_body: int = MAX_BODY,
              max_rows: int = MAX_ROWS, failed_auth_per_minute: int = 20, metrics: Metrics | None = None,
              bulk: Executor | None = None) -> FastAPI:
    """Give the app what answers, its keys and limits; ``bulk``, the threads that parse ingest bodies (default:
    the event loop's own pool)."""
    app.state.backend = backend
    app.state.bulk = bulk
    app.state.api_keys = parse_api_keys(api_keys)
    app.state.failed_auth = FailedAuth(limit=failed_auth_per_minute)
    app.state.max_body = max_body
    app.state.max_rows = max_rows
    app.state.metrics = metrics or Metrics()
    app.state.ready = (0.0, None)
    return app


class BodyLimit:
    """Every POST body is bounded: ``/v1/events`` by the app's ``max_body``,
    any other by ``MAX_QUERY_BODY``; past it, 413 before the body is read on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        state = scope["app"].state if "app" in scope else None
        limit = MAX_QUERY_BODY
        if scope.get("path", "").rstrip("/").endswith("/v1/events") and state is not None:
            limit = getattr(state, "max_body", MAX_BODY)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _Oversize(limit)
            return message
        try:
            await self.app(scope, bounded, send)
        except _Oversize as e:
            body = json.dumps({"error": f"body is over the {e.limit:,}-byte limit"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


class _Oversize(HTTPException):
    """Raised while the body is read, so FastAPI's own body parsing passes it on as it is."""

    def __init__(self, limit: int):
        super().__init__(413, f"body is over the {limit:,}-byte limit")
        self.limit = limit


def create_app() -> FastAPI:
    """The app, its routes and error handling; ``configure`` it before serving."""
    app = FastAPI(title="impressions", version="1", description=__doc__,
                  openapi_tags=[{"name": "queries"}, {"name": "audiences"}, {"name": "ingest"},
                                {"name": "health"}])
    errors.install(app)
    app.add_middleware(BodyLimit)

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

    def key_set(keys, prefix, name: str = "") -> tuple[list, str | None]:
        keys = list(keys or [])
        check_keys(keys)
        if any(k is None for k in keys):
            raise BadRequest(f"a key set{name} holds keys (strings); the site-wide key is not one")
        if prefix is not None and (not prefix or len(prefix.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES):
            raise BadRequest(f"a prefix{name} must be 1 to {MAX_KEY_BYTES} bytes")
        if not keys and not prefix:
            raise BadRequest(f"a key set{name} needs keys, a prefix, or both")
        return keys, prefix

    async def timed(request: Request, route: str, call):
        t = time.perf_counter()
        out = await call
        request.app.state.metrics.latency(route, (time.perf_counter() - t) * 1e3)
        return out

    async def reach_of(request: Request, keys, prefix, last, start, end) -> dict:
        keys, prefix = key_set(keys, prefix)
        rng = resolve(request, last, start, end)
        return await timed(request, "reach", backend(request).reach(keys, prefix, rng))

    @app.get("/v1/reach", tags=["audiences"], response_model=Reach, responses=ERRORS, dependencies=READ,
             summary="unique visitors of a set of keys together (a campaign's reach), deduplicated")
    async def reach(request: Request,
                    key: Annotated[list[str] | None, Query(description="repeat for each key of the set")] = None,
                    prefix: Annotated[str | None, Query(description="and every key starting with this")] = None,
                    last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                    end: Annotated[str | None, Query()] = None):
        """A visitor who saw several keys of the set counts once.  Impressions
        are summed over the set; ``frequency`` is impressions per unique visitor."""
        return await reach_of(request, key, prefix, last, start, end)

    @app.post("/v1/reach", tags=["audiences"], response_model=Reach, responses=ERRORS, dependencies=READ,
              summary="reach of up to 1,000 listed keys (and a prefix)")
    async def reach_post(request: Request, q: ReachQuery):
        return await reach_of(request, q.keys, q.prefix, q.last, q.start, q.end)

    async def overlap_of(request: Request, a: tuple, b: tuple, last, start, end) -> dict:
        a, b = key_set(*a, name=" (a)"), key_set(*b, name=" (b)")
        rng = resolve(request, last, start, end)
        return await timed(request, "overlap", backend(request).overlap(a, b, rng))

    overlap_doc = """Visitors who saw both A and B (each a key, a list of keys, or a prefix).

        HyperLogLog answers an intersection through the union's registers, so
        its error is of the order of the *union's* error (about 0.8 % of it at
        p = 14), whatever the overlap: a small overlap is a noisy one.  The
        estimate is Ertl's joint maximum likelihood on the two sketches (more
        precise than inclusion-exclusion, which is reported beside it), with a
        95 % interval from its observed information; ``distinguishable`` is
        false, and ``note`` says so, when that interval reaches 0.  While every
        part is sparse the coupons are counted instead (near-exact)."""

    @app.get("/v1/overlap", tags=["audiences"], response_model=Overlap, responses=ERRORS, dependencies=READ,
             summary="visitors of both A and B, Jaccard and shares, with honest error bars", description=overlap_doc)
    async def overlap(request: Request,
                      a: Annotated[list[str] | None, Query(description="a key of A (repeat)")] = None,
                      b: Annotated[list[str] | None, Query(description="a key of B (repeat)")] = None,
                      a_prefix: Annotated[str | None, Query(description="and keys starting so, in A")] = None,
                      b_prefix: Annotated[str | None, Query(description="and keys starting so, in B")] = None,
                      last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                      end: Annotated[str | None, Query()] = None):
        return await overlap_of(request, (a, a_prefix), (b, b_prefix), last, start, end)

    @app.post("/v1/overlap", tags=["audiences"], response_model=Overlap, responses=ERRORS, dependencies=READ,
              summary="overlap of two key sets", description=overlap_doc)
    async def overlap_post(request: Request, q: OverlapQuery):
        return await overlap_of(request, (q.a.keys, q.a.prefix), (q.b.keys, q.b.prefix), q.last, q.start, q.end)

    @app.get("/v1/rolling", tags=["audiences"], response_model=Rolling, responses=ERRORS, dependencies=READ,
             summary="trailing-window or cumulative unique visitors at every step of a range")
    async def rolling(request: Request,
                      key: Annotated[list[str] | None, Query(description="repeat for a set; none: site-wide")] = None,
                      prefix: Annotated[str | None, Query(description="and every key starting with this")] = None,
                      window: Annotated[str | None, Query(description="e.g. 24h (not with cumulative)")] = None,
                      step: Annotated[str, Query(description="between points, e.g. 1h")] = "1h",
                      cumulative: Annotated[bool, Query(description="since the start, every step")] = False,
                      last: Annotated[str | None, Query()] = None, start: Annotated[str | None, Query()] = None,
                      end: Annotated[str | None, Query()] = None):
        """Each point is the answer of a range query over its window (the same
        registers, interval and flags), all computed in one pass per shard that
        shares the nodes neighbouring windows have in common.  Windows lie
        inside the range, the last ending at its end."""
        if key or prefix is not None:
            keys, prefix = key_set(key, prefix)
        else:
            keys, prefix = [None], None
        if cumulative == (window is not None):
            raise BadRequest("give a window (trailing series) or cumulative=true, not both and not neither")
        rng = resolve(request, last, start, end)
        n = parse_duration(step, rng.bucket_seconds, "step")
        w = None if cumulative else parse_duration(window, rng.bucket_seconds, "window")
        plan_series(rng.b0, rng.b1, n, w)  # refuses a series it cannot answer (400), before asking the cluster
        return await timed(request, "rolling", backend(request).rolling(keys, prefix, rng, n, w))

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
    async def events(request: Request,
                     idempotency_key: Annotated[str | None, Header(
                         max_length=MAX_IDEMPOTENCY_KEY,
                         description="send the same request again with the same key: counted once, same answer")] = None):
        state = request.app.state
        limit = state.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"body of {int(length):,} bytes is over the {limit:,}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"body is over the {limit:,}-byte limit")
        body = bytes(body)
        # parsing is CPU work: off the event loop, on the threads for bulk work
        table, malformed = await on_threads(state.bulk, events_table, body, request.headers.get("content-type", ""),
                                            state.max_rows)
        out = await backend(request).ingest(table, malformed, idempotency_key or None, hashlib.sha256(body).hexdigest())
        state.metrics.events("accepted", out["accepted"])
        state.metrics.events("rejected", out["rejected"])
        if out["accepted"] == 0 and out["rejected"] > 0:
            return JSONResponse(out | {"error": f"none of the {out['rejected']} events was accepted; "
                                                f"first reason: {out['errors'][0]['reason']}"}, status_code=400)
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
        state = request.app.state
        at, body = state.ready
        if body is None or time.monotonic() - at > READY_CACHE_S:
            body = await _ready(request)
            state.ready = (time.monotonic(), body)
        return body if body["status"] == "ok" else JSONResponse(body, status_code=503)

    async def _ready(request: Request) -> dict:
        try:
            health = await asyncio.wait_for(backend(request).health(), 10)
        except Exception as e:  # noqa: BLE001 - the coordinator itself is restarting: not ready, whatever the cause
            return {"status": f"not ready: the coordinator did not answer ({type(e).__name__})"}
        shards = health["shards"]
        down = [s for s in shards if not s.get("available")]
        ages = [s["checkpoint_age_s"] for s in shards if s.get("checkpoint_age_s") is not None]
        if ages:
            request.app.state.metrics.checkpoint_age(max(ages))
        status = "ok" if not down else "not ready: " + "; ".join(
            f"shard {s['shard']}: {str(s.get('reason'))[:200]}" for s in down[:4])
        return {"status": status, "shards": len(shards), "answering": len(shards) - len(down)}

    return app


def _static(name: str) -> Response:
    with open(os.path.join(STATIC, name), "rb") as f:
        return Response(f.read(), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})
