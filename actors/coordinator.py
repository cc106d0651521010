"""The coordinator actor: the shard map, query fan-out, answer combination.

It holds no sketch data.  A query goes to every shard at once; each answers
with its register-value histograms (``K x 52`` integers for K keys), which
are summed and estimated here (``sketch.answer``), so what crosses the
network per key is a few hundred bytes whatever the sketch size.  A shard
that does not answer within ``query_timeout_s`` is left out and the answer
is flagged partial, with the wider error that implies; the query never hangs.

It also drives upkeep: every ``maintain_interval_s`` a background thread
asks each shard for a bounded slice of work (folding runs, building
rollups), and every ``checkpoint_interval_s`` for a checkpoint.  It keeps the
cluster's layout (shard count, sketch parameters) on the store, so a
restarted cluster finds its shards' data, and it re-shards on request.

Concurrency without locks: Ray runs the coordinator's calls on a pool of
threads (``max_concurrency``), so many queries fan out at once.  Its state
is one immutable snapshot (configuration and shard handles), replaced by a
single assignment and read once per call, so no call ever sees it half
changed.  It never waits on anything that waits on it (shards never call
the coordinator), so nothing here can deadlock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray

from cluster.config import ClusterConfig
from cluster.journal import Store, read_layout, write_layout
from sketch.answer import RangeResult, combine_answers
from sketch.hll import Precision
from sketch.reshard import sources_of
from sketch.store import SketchConfig
from sketch.timeindex import resolve_range


@dataclass(frozen=True)
class ShardMap:
    """Which actor owns which register range (an immutable snapshot)."""

    handles: tuple
    registers_per_shard: int
    epoch: int = 0

    def ranges(self) -> list[tuple[int, int]]:
        R = self.registers_per_shard
        return [(i * R, (i + 1) * R) for i in range(len(self.handles))]


class Coordinator:
    def __init__(self, config_json: str, make_shard=None):
        self.config = ClusterConfig.from_json(config_json)
        self._make_shard = make_shard  # (index, shards, seed) -> actor handle; set by the bootstrap
        self.map: ShardMap | None = None
        self.prec = Precision(self.config.sketch.p, self.config.shards)
        self._maint: threading.Thread | None = None
        self._rescaling = threading.Lock()  # an atomic test-and-set: one re-sharding at a time, never waited on
        self.queries = 0
        self.events: list[str] = []

    def _storage(self) -> Store | None:
        return Store(self.config.storage, self.config.s3_endpoint) if self.config.storage else None

    def _ensure(self) -> ShardMap:
        if self.map is None:  # first call, or first after a restart
            self.start()
        return self.map

    def start(self) -> int:
        """Adopt the layout recorded on the store (or record this one), create
        or find the shards, and start the maintenance thread."""
        if self.map is None:
            store = self._storage()
            layout = read_layout(store) if store is not None else None
            if layout is not None:
                sketch = SketchConfig(**layout["sketch"])
                if sketch != self.config.sketch or layout["shards"] != self.config.shards:
                    self.events.append(f"adopted the layout on the store: {layout['shards']} shards")
                self.config = dataclasses.replace(self.config, shards=layout["shards"], sketch=sketch)
                epoch = layout.get("epoch", 0)
            else:
                epoch = 0
                if store is not None:
                    write_layout(store, {"shards": self.config.shards, "sketch": dataclasses.asdict(self.config.sketch),
                                         "epoch": 0})
            self.prec = Precision(self.config.sketch.p, self.config.shards)
            handles = tuple(self._make_shard(i, self.config.shards, None) for i in range(self.config.shards))
            ray.get([h.ping.remote() for h in handles])
            self.map = ShardMap(handles, self.prec.R, epoch)
        if self._maint is None:
            self._maint = threading.Thread(target=self._maintain_loop, name="maintain", daemon=True)
            self._maint.start()
        return len(self.map.handles)

    def pid(self) -> int:
        import os
        return os.getpid()

    def config_json(self) -> str:
        self._ensure()
        return self.config.to_json()

    def shard_handles(self) -> list:
        return list(self._ensure().handles)

    def route(self) -> tuple[int, list]:
        """(epoch, shard handles): what a sender needs to route batches."""
        m = self._ensure()
        return m.epoch, list(m.handles)

    def shard_map(self) -> dict:
        m = self._ensure()
        return {"epoch": m.epoch, "shards": [{"shard": i, "registers": list(r)} for i, r in enumerate(m.ranges())]}

    def _fan_out(self, method: str, *args, timeout: float | None, shard_map: ShardMap | None = None):
        """Call ``method`` on every shard; answers of shards slower than
        ``timeout`` (or failing) are None."""
        m = shard_map or self._ensure()
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
        """Unique visitors and impressions of each key (None = site-wide).

        Shards that do not answer within ``query_timeout_s`` (restarting, or
        gone) are left out: the answer is then ``partial``, extrapolated from
        the register ranges that answered, with the wider error that implies."""
        m = self._ensure()
        cfg = self.config
        rng = resolve_range(bucket_seconds=cfg.sketch.bucket_seconds, retention_buckets=cfg.sketch.retention_buckets,
                            now=time.time() if now is None else now, last=last, start=start, end=end)
        keys = list(keys)
        answers = [a for a in self._fan_out("query", keys, rng.b0, rng.b1, timeout=cfg.query_timeout_s, shard_map=m)
                   if a is not None]
        self.queries += 1
        if not answers:
            raise TimeoutError(f"no shard answered within {cfg.query_timeout_s} s")
        prec = Precision(cfg.sketch.p, len(m.handles))
        combined = combine_answers(answers, prec.m, prec.R, len(m.handles))
        return [RangeResult(k, rng.start, rng.end, est, imp).to_dict() for k, (est, imp) in zip(keys, combined)]

    def series(self, key, b0: int, b1: int, step: int) -> list[dict]:
        """One answer per step-wide range in ``[b0, b1)``: a chart's points,
        each a real range query, all in one call per shard."""
        m = self._ensure()
        ranges = [(a, min(a + step, b1)) for a in range(b0, b1, step)]
        per_shard = [a for a in self._fan_out("query_ranges", [key], ranges, timeout=self.config.query_timeout_s * 2,
                                              shard_map=m) if a is not None]
        if not per_shard:
            raise TimeoutError(f"no shard answered within {self.config.query_timeout_s * 2} s")
        prec = Precision(self.config.sketch.p, len(m.handles))
        w = self.config.sketch.bucket_seconds
        out = []
        for i, (a, b) in enumerate(ranges):
            (est, imp), = combine_answers([s[i] for s in per_shard], prec.m, prec.R, len(m.handles))
            out.append(RangeResult(key, a * w, b * w, est, imp).to_dict())
        self.queries += 1
        return out

    def keys(self, b0: int, b1: int, prefix: str = "", limit: int = 20) -> list[dict]:
        """Keys with impressions in ``[b0, b1)`` whose name starts with ``prefix``,
        the most impressions first (for pickers and top-keys tables)."""
        m = self._ensure()
        totals: dict[str, int] = {}
        for part in self._fan_out("key_impressions", b0, b1, prefix, timeout=self.config.query_timeout_s * 5,
                                  shard_map=m):
            if part is None:
                continue
            for name, n in zip(part[0], part[1].tolist()):
                totals[name] = totals.get(name, 0) + n
        top = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return [{"key": k, "impressions": n} for k, n in top]

    def registers(self, key, b0: int, b1: int) -> np.ndarray:
        """The whole dense sketch of ``key`` over ``[b0, b1)``: all shards' slices, in order."""
        return np.concatenate(ray.get([h.registers.remote(key, b0, b1) for h in self._ensure().handles]))

    def maintain(self, now: float | None = None) -> None:
        """Flush every shard and run its maintenance to the end."""
        ray.get([h.maintain.remote(now) for h in self._ensure().handles])

    def checkpoint(self) -> list[dict]:
        """Checkpoint every shard now."""
        return ray.get([h.checkpoint.remote() for h in self._ensure().handles])

    def stats(self) -> dict:
        m = self._ensure()
        shard_stats = self._fan_out("stats", timeout=self.config.query_timeout_s * 5, shard_map=m)
        return {"shards": shard_stats, "epoch": m.epoch, "queries": self.queries, "config": self.config.to_json(),
                "events": self.events[-20:]}

    def rescale(self, shards: int) -> dict:
        """Change the number of shards on the live cluster.

        Old shards are sealed (checkpointed; further batches are refused with
        ``ShardMoved`` and senders re-route them), their states exported,
        new shards seeded with register slices and checkpointed, the layout
        on the store switched (one object written), then the shard map.
        Queries use the old shards until the switch and the new ones after;
        no acknowledged batch can be lost, since the old shards stop taking
        batches before their state is exported."""
        old = self._ensure()
        m = 1 << self.config.sketch.p
        if shards < 1 or shards & (shards - 1) or shards > m:
            raise ValueError(f"shards={shards} must be a power of two between 1 and {m}")
        if shards == len(old.handles):
            return {"shards": shards, "changed": False}
        if not self._rescaling.acquire(blocking=False):
            raise RuntimeError("a re-sharding is already under way")
        try:
            t0 = time.perf_counter()
            s_old = len(old.handles)
            handles = ()
            try:
                ray.get([h.seal.remote() for h in old.handles])
                exports = [h.export.remote() for h in old.handles]
                seeds = [[(j, s_old, exports[j]) for j in sources_of(i, shards, s_old)] for i in range(shards)]
                handles = tuple(self._make_shard(i, shards, seeds[i]) for i in range(shards))
                ray.get([h.ping.remote() for h in handles], timeout=600)
            except Exception as e:
                # roll back: the new shards go, the old ones take batches again; nothing was switched
                for h in handles:
                    ray.kill(h, no_restart=True)
                store = self._storage()
                if store is not None:
                    try:
                        store.fs.delete_dir(store.path(f"shards-{shards}"))
                    except OSError:
                        pass
                ray.get([h.unseal.remote() for h in old.handles])
                self.events.append(f"re-sharding {s_old} -> {shards} failed and was rolled back: {e}")
                raise RuntimeError(f"re-sharding {s_old} -> {shards} failed and was rolled back: {e}") from e
            store = self._storage()
            if store is not None:
                write_layout(store, {"shards": shards, "sketch": dataclasses.asdict(self.config.sketch),
                                     "epoch": old.epoch + 1})
            self.config = dataclasses.replace(self.config, shards=shards)
            self.prec = Precision(self.config.sketch.p, shards)
            self.map = ShardMap(handles, self.prec.R, old.epoch + 1)
            for h in old.handles:
                ray.kill(h, no_restart=True)
            if store is not None:  # the old layout is superseded
                try:
                    store.fs.delete_dir(store.path(f"shards-{s_old}"))
                except OSError:
                    pass
            took = time.perf_counter() - t0
            self.events.append(f"re-sharded {s_old} -> {shards} in {took:.2f} s")
            return {"shards": shards, "from": s_old, "changed": True, "seconds": round(took, 3), "epoch": self.map.epoch}
        finally:
            self._rescaling.release()

    def _maintain_loop(self):
        last_ckpt = time.time()
        while True:
            time.sleep(self.config.maintain_interval_s)
            try:
                m = self.map
                if m is None:
                    continue
                self._fan_out("maintain", None, 0.2, timeout=None, shard_map=m)
                if self.config.storage and time.time() - last_ckpt >= self.config.checkpoint_interval_s:
                    self._fan_out("checkpoint", timeout=None, shard_map=m)
                    last_ckpt = time.time()
            except Exception:  # a shard restarting, or a re-sharding: the next round retries
                pass
