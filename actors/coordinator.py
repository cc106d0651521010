"""The coordinator actor: the shard map, query fan-out, answer combination.

It holds no sketch data.  A query goes to every shard at once; each answers
with its register-value histograms (``K x 52`` integers for K keys), which
are summed and estimated here (``sketch.answer``), so what crosses the
network per key is a few hundred bytes whatever the sketch size.  A shard
that does not answer within ``query_timeout_s`` is left out and the answer
is flagged partial, with the wider error that implies; the query never hangs.

It also drives maintenance: every ``maintain_interval_s`` a background
thread asks each shard for a bounded slice of work (folding runs, building
rollups).

Concurrency without locks: Ray runs the coordinator's calls on a pool of
threads (``max_concurrency``), so many queries fan out at once.  Its state
is one immutable snapshot (configuration and shard handles), replaced by a
single assignment and read once per call, so no call ever sees it half
changed.  It never waits on anything that waits on it (shards never call
the coordinator), so nothing here can deadlock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import ray

from cluster.config import ClusterConfig
from sketch.answer import RangeResult, combine_answers
from sketch.hll import Precision
from sketch.timeindex import resolve_range


@dataclass(frozen=True)
class ShardMap:
    """Which actor owns which register range (an immutable snapshot)."""

    handles: tuple
    registers_per_shard: int

    def ranges(self) -> list[tuple[int, int]]:
        R = self.registers_per_shard
        return [(i * R, (i + 1) * R) for i in range(len(self.handles))]


class Coordinator:
    def __init__(self, config_json: str, make_shard=None):
        self.config = ClusterConfig.from_json(config_json)
        self._make_shard = make_shard  # (shard index) -> actor handle; set by the bootstrap
        self.map: ShardMap | None = None
        self.prec = Precision(self.config.sketch.p, self.config.shards)
        self._maint: threading.Thread | None = None
        self.queries = 0

    def start(self) -> int:
        """Create (or find) the shards and start the maintenance thread."""
        if self.map is None:
            handles = tuple(self._make_shard(i) for i in range(self.config.shards))
            ray.get([h.ping.remote() for h in handles])
            self.map = ShardMap(handles, self.prec.R)
        if self._maint is None:
            self._maint = threading.Thread(target=self._maintain_loop, name="maintain", daemon=True)
            self._maint.start()
        return len(self.map.handles)

    def config_json(self) -> str:
        return self.config.to_json()

    def shard_handles(self) -> list:
        return list(self.map.handles)

    def shard_map(self) -> list[dict]:
        return [{"shard": i, "registers": list(r)} for i, r in enumerate(self.map.ranges())]

    def _fan_out(self, method: str, *args, timeout: float | None):
        """Call ``method`` on every shard; answers of shards slower than
        ``timeout`` (or failing) are None."""
        m = self.map
        refs = [getattr(h, method).remote(*args) for h in m.handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready = set(ready)
        out = []
        for r in refs:
            try:
                out.append(ray.get(r) if r in ready else None)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                out.append(None)
        return out

    def query(self, keys: list, last=None, start=None, end=None, now: float | None = None) -> list[dict]:
        """Unique visitors and impressions of each key (None = site-wide)."""
        cfg = self.config
        rng = resolve_range(bucket_seconds=cfg.sketch.bucket_seconds, retention_buckets=cfg.sketch.retention_buckets,
                            now=time.time() if now is None else now, last=last, start=start, end=end)
        keys = list(keys)
        answers = [a for a in self._fan_out("query", keys, rng.b0, rng.b1, timeout=cfg.query_timeout_s)
                   if a is not None]
        self.queries += 1
        if not answers:
            raise TimeoutError(f"no shard answered within {cfg.query_timeout_s} s")
        combined = combine_answers(answers, self.prec.m, self.prec.R, len(self.map.handles))
        return [RangeResult(k, rng.start, rng.end, est, imp).to_dict() for k, (est, imp) in zip(keys, combined)]

    def registers(self, key, b0: int, b1: int) -> np.ndarray:
        """The whole dense sketch of ``key`` over ``[b0, b1)``: all shards' slices, in order."""
        return np.concatenate(ray.get([h.registers.remote(key, b0, b1) for h in self.map.handles]))

    def maintain(self, now: float | None = None) -> None:
        """Flush every shard and run its maintenance to the end."""
        ray.get([h.maintain.remote(now) for h in self.map.handles])

    def stats(self) -> dict:
        shard_stats = ray.get([h.stats.remote() for h in self.map.handles])
        return {"shards": shard_stats, "queries": self.queries, "config": self.config.to_json()}

    def _maintain_loop(self):
        while True:
            time.sleep(self.config.maintain_interval_s)
            try:
                self._fan_out("maintain", None, 0.2, timeout=None)
            except Exception:  # a shard restarting: the next round retries
                pass
