"""API keys and scopes.

Keys come as ``key1:read,key2:write,key3:read+write`` (``ClusterConfig.api_keys``)
and are sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.  Reads
need the read scope, ``POST /v1/events`` the write scope; 401 without a key
or with an unknown one, 403 with the wrong scope.  With no keys configured
the API is open (the local default).
"""

import hmac
import threading
import time
from collections import deque
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

SCOPES = ("read", "write")


def parse_api_keys(text: str | None) -> dict[str, set[str]]:
    """``"k1:read,k2:write,k3:read+write"`` -> {key: scopes}."""
    keys: dict[str, set[str]] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, scopes = item.partition(":")
        got = {s for s in scopes.replace("+", " ").split()} or {"read"}
        bad = got - set(SCOPES)
        if bad or not key:
            raise ValueError(f"API keys entry {item!r}: expected <key>:read, :write or :read+write")
        if "change-me" in key.lower():
            raise ValueError(f"API key {key!r} is the example file's placeholder: set keys of your own")
        keys[key] = got
    return keys


def scopes_of(keys: dict[str, set[str]], presented: str) -> set[str] | None:
    """The scopes of the presented key, or None; every configured key is
    compared, in constant time, so timing tells nothing of which keys exist."""
    found = None
    given = presented.encode()
    for key, scopes in keys.items():
        if hmac.compare_digest(key.encode(), given):
            found = scopes
    return found


class FailedAuth:
    """Failed authentications per client: past ``limit`` in ``window_s``
    seconds, a client is refused (429) until its old failures age out, so
    keys cannot be guessed at speed.  Bounded: at most ``clients`` tracked."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, clients: int = 10_000):
        self.limit, self.window_s, self.clients = limit, window_s, clients
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque:
        q = self._seen.get(client)
        if q is None:
            if len(self._seen) >= self.clients:  # forget the quietest half rather than grow
                for c in sorted(self._seen, key=lambda c: self._seen[c][-1] if self._seen[c] else 0)[
                        : self.clients // 2]:
                    del self._seen[c]
            q = self._seen[client] = deque()
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None if it may now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(client, now)
            return q[0] + self.window_s - now if len(q) >= self.limit else None

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, time.monotonic()).append(time.monotonic())


_bearer = HTTPBearer(auto_error=False, description="an API key")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def require(needed: str):
    """A route dependency: the request carries a key with scope ``needed``.  A coroutine: FastAPI runs a
    plain function dependency on its thread pool, a hand-off to another thread and back on every request
    for a check of a few dictionary lookups."""
    async def check(request: Request,
                    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
                    header: Annotated[str | None, Security(_header)] = None) -> None:
        keys = request.app.state.api_keys
        if not keys:
            return
        client = request.client.host if request.client else "?"
        failures: FailedAuth = request.app.state.failed_auth
        wait = failures.retry_after(client)
        if wait is not None:
            raise HTTPException(429, f"too many failed authentications from this client; retry in {wait:.0f} s",
                                headers={"Retry-After": str(max(1, int(wait + 1)))})
        key = bearer.credentials if bearer is not None else header
        if not key:
            raise HTTPException(401, "an API key is required (Authorization: Bearer <key> or X-API-Key)")
        scopes = scopes_of(keys, key)
        if scopes is None:
            failures.failed(client)
            raise HTTPException(401, "unknown API key")
        if needed not in scopes:
            raise HTTPException(403, f"this API key has no {needed} scope")
    return check


READ = [Security(require("read"))]
WRITE = [Security(require("write"))]
