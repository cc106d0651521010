"""Ledgers on the store: sources already ingested, requests already answered.

    ingested/<digest>.json       a source file ingested whole: re-ingesting it is a no-op
    idempotency/<digest>.json    a POST /v1/events with an Idempotency-Key: its body's hash and answer

A source is known by its identity (URI, size, modification time): the same
bytes under the same name.  A request is known by its ``Idempotency-Key``;
the same key with the same body gets the first answer again (the events
themselves are counted once by the shards, whatever happens in between),
the same key with another body is refused.  Entries are small objects, one
per source or key, written whole; idempotency entries are forgotten after
their time.
"""

from __future__ import annotations

import hashlib
import json
import time

from .objects import ObjectStore


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SourceLedger:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def _path(self, source_id: str) -> str:
        return self.objects.path("ingested", f"{digest(source_id)}.json")

    def done(self, source_id: str) -> dict | None:
        """What was recorded when the source was ingested whole, or None."""
        path = self._path(source_id)
        if not self.objects.exists(path):
            return None
        try:
            return json.loads(self.objects.read(path))
        except (OSError, ValueError):
            return None  # unreadable: not proof that it was ingested

    def record(self, source_id: str, info: dict) -> None:
        self.objects.write(self._path(source_id), json.dumps(dict(info, source=source_id, time=time.time()),
                                                            sort_keys=True).encode())


class IdempotencyLedger:
    def __init__(self, objects: ObjectStore, keep_s: float):
        self.objects, self.keep_s = objects, keep_s

    def _path(self, key: str) -> str:
        return self.objects.path("idempotency", f"{digest(key)}.json")

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not self.objects.exists(path):
            return None
        try:
            entry = json.loads(self.objects.read(path))
        except (OSError, ValueError):
            return None
        return entry if entry.get("expires", 0) >= time.time() else None

    def put(self, key: str, body_sha: str, answer: dict | None) -> None:
        entry = {"body": body_sha, "answer": answer, "expires": time.time() + self.keep_s}
        self.objects.write(self._path(key), json.dumps(entry, sort_keys=True).encode())

    def sweep(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries past their time; returns how many."""
        folder = self.objects.path("idempotency")
        gone = 0
        for name in self.objects.list(folder)[: limit * 4]:
            try:
                entry = json.loads(self.objects.read(f"{folder}/{name}"))
            except (OSError, ValueError):
                continue
            if entry.get("expires", 0) < time.time():
                self.objects.delete(f"{folder}/{name}")
                gone += 1
                if gone >= limit:
                    break
        return gone
