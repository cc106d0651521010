"""The coordinator actor: the shard map, query fan-out, answer combination.

It holds no sketch data.  A query goes to every shard at once; each answers
with its register-value histograms (``K x 52`` integers for K keys), which
are summed and estimated here (``sketch.answer``), so what crosses the
network per key is a few hundred bytes whatever the sketch size.  A shard
that does not answer within ``query_timeout_s`` is left out and the answer
is flagged partial, with the wider error that implies; the query never hangs.

It also drives maintenance: every ``maintain_interval_s`` it asks each shard
for a bounded slice of work (folding runs, building rollups).

Concurrency: an asyncio actor.  Its only state is the configuration and the
shard handles, set once in ``start``; no await ever leaves shared state half
changed, and it never waits on anything that waits on it (shards never call
the coordinator), so nothing here can deadlock.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cluster.config import ClusterConfig
from sketch.answer import RangeResult, combine_answers
from sketch.hll import Precision
from sketch.timeindex import resolve_range


class Coordinator:
    def __init__(self, config_json: str, make_shard=None):
        self.config = ClusterConfig.from_json(config_json)
        self._make_shard = make_shard  # (shard index) -> actor handle; set by the bootstrap
        self.shards: list = []
        self._maint_task = None
        self.queries = 0

    async def start(self) -> int:
        """Create (or find) the shards and start the maintenance loop."""
        if not self.shards:
            self.shards = [self._make_shard(i) for i in range(self.config.shards)]
            await asyncio.gather(*[h.ping.remote() for h in self.shards])
        if self._maint_task is None:
            self._maint_task = asyncio.get_running_loop().create_task(self._maintain_loop())
        return len(self.shards)

    def config_json(self) -> str:
        return self.config.to_json()

    def shard_handles(self) -> list:
        return list(self.shards)

    def shard_map(self) -> list[dict]:
        R = (1 << self.config.sketch.p) // self.config.shards
        return [{"shard": i, "registers": [i * R, (i + 1) * R]} for i in range(len(self.shards))]

    async def _gather(self, calls, timeout: float | None):
        futs = [asyncio.ensure_future(self._await(c)) for c in calls]
        done, pending = await asyncio.wait(futs, timeout=timeout)
        for f in pending:
            f.cancel()
        return [f.result() if f in done and not f.exception() else None for f in futs]

    @staticmethod
    async def _await(ref):
        return await ref

    async def query(self, keys: list, last=None, start=None, end=None, now: float | None = None) -> list[dict]:
        """Unique visitors and impressions of each key (None = site-wide)."""
        cfg = self.config
        rng = resolve_range(bucket_seconds=cfg.sketch.bucket_seconds, retention_buckets=cfg.sketch.retention_buckets,
                            now=time.time() if now is None else now, last=last, start=start, end=end)
        keys = list(keys)
        answers = await self._gather([h.query.remote(keys, rng.b0, rng.b1) for h in self.shards],
                                     cfg.query_timeout_s)
        got = [a for a in answers if a is not None]
        self.queries += 1
        prec = Precision(cfg.sketch.p, cfg.shards)
        if not got:
            raise TimeoutError(f"no shard answered within {cfg.query_timeout_s} s")
        combined = combine_answers(got, prec.m, prec.R, len(self.shards))
        return [RangeResult(k, rng.start, rng.end, est, imp).to_dict() for k, (est, imp) in zip(keys, combined)]

    async def registers(self, key, b0: int, b1: int) -> np.ndarray:
        """The whole dense sketch of ``key`` over ``[b0, b1)``: all shards' slices, in order."""
        parts = await asyncio.gather(*[h.registers.remote(key, b0, b1) for h in self.shards])
        return np.concatenate(parts)

    async def maintain(self, now: float | None = None) -> None:
        """Flush every shard and run its maintenance to the end."""
        await asyncio.gather(*[h.maintain.remote(now) for h in self.shards])

    async def stats(self) -> dict:
        shard_stats = await asyncio.gather(*[h.stats.remote() for h in self.shards])
        return {"shards": shard_stats, "queries": self.queries, "config": self.config.to_json()}

    async def _maintain_loop(self):
        while True:
            await asyncio.sleep(self.config.maintain_interval_s)
            try:
                await self._gather([h.maintain.remote(None, 0.2) for h in self.shards], None)
            except Exception:  # a shard restarting: the next round retries
                pass
