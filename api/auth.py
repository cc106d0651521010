"""API keys and scopes.

Keys come as ``key1:read,key2:write,key3:read+write`` (``ClusterConfig.api_keys``)
and are sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.  Reads
need the read scope, ``POST /v1/events`` the write scope; 401 without a key
or with an unknown one, 403 with the wrong scope.  With no keys configured
the API is open (the local default).
"""

import hmac
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


_bearer = HTTPBearer(auto_error=False, description="an API key")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def require(needed: str):
    """A route dependency: the request carries a key with scope ``needed``."""
    def check(request: Request,
              bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
              header: Annotated[str | None, Security(_header)] = None) -> None:
        keys = request.app.state.api_keys
        if not keys:
            return
        key = bearer.credentials if bearer is not None else header
        if not key:
            raise HTTPException(401, "an API key is required (Authorization: Bearer <key> or X-API-Key)")
        scopes = scopes_of(keys, key)
        if scopes is None:
            raise HTTPException(401, "unknown API key")
        if needed not in scopes:
            raise HTTPException(403, f"this API key has no {needed} scope")
    return check


READ = [Security(require("read"))]
WRITE = [Security(require("write"))]
