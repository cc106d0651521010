"""From exceptions to HTTP answers: every error is ``{"error": "<what was wrong>"}``.

* our own input errors (``BadRequest``, a range that cannot be answered,
  a body without the event columns) are 400 with their message;
* parameters of the wrong type are 422 (FastAPI's validation), in one line;
* a cluster that does not answer in time is 503 with ``Retry-After``;
* anything else is a bug or a fault: 500 with a generic message, logged
  here in full; no response ever carries a traceback.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from impressions.actors.runtime import ShardUnavailable
from impressions.sketch.formats import MissingColumn
from impressions.sketch.timeindex import RangeError

log = logging.getLogger("impressions.api")
RETRY_AFTER_S = 2


class BadRequest(ValueError):
    """Input the API refuses, with a message that says what was wrong (400, or
    the ``status`` of a subclass)."""

    status = 400


class Conflict(BadRequest):
    """An ``Idempotency-Key`` used again with another body."""

    status = 409


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(BadRequest)
    @app.exception_handler(RangeError)
    @app.exception_handler(MissingColumn)
    async def _bad_input(request: Request, exc: Exception):
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))

    @app.exception_handler(ShardUnavailable)
    @app.exception_handler(TimeoutError)
    async def _unavailable(request: Request, exc: Exception):
        return JSONResponse({"error": f"the cluster did not answer in time, retry shortly ({exc})"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error; it has been logged"}, status_code=500)
