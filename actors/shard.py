"""The shard actor: one register range of every key, every time bucket.

A plain class around ``sketch.store.ShardStore``.  Ray runs its calls one at
a time, so the store needs no locks; each call is short (a batch applied, a
query answered, or a bounded slice of maintenance), which is what keeps
queries from waiting long behind ingest.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from sketch.events import Batch
from sketch.store import ShardStore, SketchConfig


class ShardActor:
    def __init__(self, sketch: SketchConfig, shard: int, shards: int):
        self.store = ShardStore(sketch, shard, shards)
        self.started = time.time()
        self.applied_batches = 0

    def apply(self, batch: Batch) -> int:
        """Add a batch of validated events; returns how many were applied."""
        n = self.store.apply(batch.key_names, batch.key_index, batch.bucket, batch.coupon)
        self.applied_batches += 1
        return n

    def query(self, keys: list, b0: int, b1: int):
        """``(hist, sparse, impressions)`` for each key over buckets ``[b0, b1)``."""
        return self.store.query(keys, b0, b1)

    def registers(self, key, b0: int, b1: int) -> np.ndarray:
        return self.store.registers(key, b0, b1)

    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        return self.store.maintain(now, max_seconds)

    def flush(self) -> None:
        self.store.flush()

    def stats(self) -> dict:
        return {"shard": self.store.shard, "shards": self.store.shards, "pid": os.getpid(),
                "host": socket.gethostname(), "applied_batches": self.applied_batches,
                "uptime_s": round(time.time() - self.started, 1), **self.store.stats()}

    def ping(self) -> int:
        return self.store.shard
