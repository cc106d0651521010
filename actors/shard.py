"""The shard actor: one register range of every key, every time bucket.

A plain class around ``sketch.store.ShardStore`` and, when the cluster has
storage, a ``durable.journal.ShardJournal``:

* ``apply(batch, batch_id, keep_s)`` cuts the batch to the registers not yet
  applied under its id (``actors.applied``), appends that to the shard's log
  on the store, applies it, then answers: an acknowledged batch is durable
  and counted once, whoever retries it.
* ``checkpoint()`` writes the nodes whose version changed since the last
  checkpoint (``ShardStore.nodes``) and the applied-batch records that
  changed, then a manifest; the log before the previous checkpoint is then
  dropped.
* On (re)start the constructor checks that the store is this cluster's,
  loads the newest checkpoint that verifies and replays the log after it.
  A shard that cannot do so (a store it cannot read, objects that do not
  verify) does not start empty: it stays *unavailable*, says why in
  ``stats()``, refuses batches and queries with ``ShardUnavailable`` (so
  answers are partial, never silently short) and tries again from
  ``maintain()``.
* ``seal()`` ends the shard's life in a layout (re-sharding): it checkpoints
  and refuses further batches with ``ShardMoved``, so a sender re-routes them.

Ray runs the calls one at a time, so none of this needs a lock; each call is
short (a batch, a query, a bounded slice of maintenance, a checkpoint of what
changed).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
import pyarrow as pa

from impressions.durable.journal import CorruptObject, Fenced, ShardJournal
from impressions.durable.layout import ShardStorage, read_layout
from impressions.sketch import sealed
from impressions.sketch.arrowio import (
    StateError,
    node_batches,
    nodes_from_batches,
    store_from_batches,
    store_to_batches,
)
from impressions.sketch.events import Batch
from impressions.sketch.reshard import reshard
from impressions.sketch.store import ShardStore, SketchConfig
from impressions.sketch.tiers import Slot, TableNode

from .applied import AppliedBatches
from .runtime import ShardUnavailable
from .telemetry import Telemetry, process_memory

log = logging.getLogger("impressions.shard")

CALL_KEEP_S = 600.0  # how long a batch id with no lasting meaning is remembered (the runtime's own retries)
RETRY_START_S = 10.0  # how often an unavailable shard tries to start again
AWAITING_SEED = "waiting for the old shards' registers (a re-sharding)"
REPORT_EVERY_S = 5.0  # how often a shard reports its gauges (after an upkeep slice)


class ShardMoved(RuntimeError):
    """This shard no longer takes batches: the layout changed; re-route."""


class ShardActor:
    """Shard ``shard`` of ``shards``.  A new layout's shard is seeded from the
    old shards whose registers it takes over: ``seed_from`` lists them as
    (old index, old count), ``seed_states`` holds each one's ``export()``."""

    def __init__(self, sketch: SketchConfig, shard: int, shards: int, storage: ShardStorage | None = None,
                 block_cache_mb: float = 256.0, seed_from=(), *seed_states, telemetry: Telemetry | None = None,
                 await_seed: bool = False):
        self.sketch, self.shard_index, self.shards = sketch, shard, shards
        self.storage = storage
        self.telemetry = telemetry or Telemetry()
        self._reported = 0.0
        sealed.CACHE.budget = int(block_cache_mb * (1 << 20))
        self.started = time.time()
        self.applied_batches = 0
        self.checkpointed_at: float | None = None
        self._seed = (list(seed_from), seed_states)
        self._await_seed = await_seed  # the seed comes by ``seed()``, not with the constructor
        self.unavailable: str | None = "starting"
        self._tried = 0.0
        self._start()

    # ------------------------------------------------------------ start and recovery
    def _start(self) -> None:
        """Check the store, load the newest checkpoint and replay the log, or
        stay unavailable saying why (never start empty over an unreadable past)."""
        t0 = time.perf_counter()
        self._tried = time.time()
        self.telemetry.shard_state(self.shard_index, {"recovering": 1})
        self.store = ShardStore(self.sketch, self.shard_index, self.shards)
        self.applied = AppliedBatches()
        self.seq = 0  # last log entry applied
        self.manifest = 0
        self.written: dict = {}  # node (kind, level, number) -> (version written, manifest entry)
        self.applied_written: dict[int, str] = {}  # hour group -> object name
        self.keys_written: dict[int, str] = {}  # key chunk -> object name
        self.sealed = False
        self.recovery: dict = {"manifest": None, "fallbacks": [], "replayed": 0, "incarnation": None}
        self.journal = None
        try:
            if self.storage is not None:
                self._check_store()
                self.journal = ShardJournal(self.storage.objects(), self.storage.folder, self.shard_index)
                self.recovery["incarnation"] = self.journal.begin()
                if self.journal.has_past():
                    self._recover()  # this shard has a past on the store: that wins over any seed
                    self._await_seed = False
                elif self._seed[0]:
                    self._seed_from(*self._seed)
                self.sealed = self.journal.is_sealed()
            elif self._seed[0]:
                self._seed_from(*self._seed)
            self._seed = ([], ())  # the old shards' states are not kept beyond the seeding
            self.unavailable = AWAITING_SEED if self._await_seed else None
        except Exception as e:  # noqa: BLE001 - whatever stops a start is reported, and retried
            self.unavailable = f"{type(e).__name__}: {e}"
            log.error("shard %d of %d cannot start: %s", self.shard_index, self.shards, self.unavailable,
                      exc_info=True)
        self.recovery["seconds"] = round(time.perf_counter() - t0, 3)
        self.recovery["at"] = time.time()
        self._report(force=True)

    def _check_store(self) -> None:
        layout = read_layout(self.storage.objects())
        if layout is None:
            raise RuntimeError(f"the store {self.storage.uri} holds no cluster.json: it is not this cluster's "
                               f"store (a local folder of another machine?), so this shard will not start empty")
        if layout.cluster_id != self.storage.cluster_id:
            raise RuntimeError(f"the store {self.storage.uri} belongs to cluster {layout.cluster_id or '?'}, "
                               f"not {self.storage.cluster_id}")

    def _recover(self) -> None:
        numbers = self.journal.manifests()
        body = None
        for number in reversed(numbers):
            try:
                body = self.journal.read_manifest(number)
                store = ShardStore(self.sketch, self.shard_index, self.shards)
                for entry in body.get("keys", []):  # ids first: sealed files hold ids, not names
                    store.keys.load_chunk(self.journal.read_keys(entry["object"]))
                nodes = [self._load_node(entry, store) for entry in body["nodes"]]
                applied = AppliedBatches()
                for entry in body.get("applied", []):
                    applied.load_group(self.journal.read_applied(entry["object"]))
                store.install(nodes, max_bucket=body["max_bucket"], events=body["events"])
                self.store, self.applied, self.manifest = store, applied, number
                break
            except (CorruptObject, StateError, sealed.SealedError, OSError, KeyError, ValueError) as e:
                self.recovery["fallbacks"].append(f"manifest {number}: {e}")
                body = None
        if numbers and body is None:
            raise CorruptObject(f"none of the {len(numbers)} checkpoints of shard {self.shard_index} could be "
                                f"loaded ({'; '.join(self.recovery['fallbacks'])})")
        if body is not None:
            self.seq = body["log_seq"]
            self.recovery["manifest"] = self.manifest
            self._remember_written(body)
        for seq, name in self.journal.log_entries(self.seq):
            rb = self.journal.read_log(name)  # a corrupt acknowledged entry is a loud failure, never skipped
            meta = rb.schema.metadata or {}
            b = Batch.from_arrow(rb)
            self.store.apply(b.key_names, b.key_index, b.bucket, b.coupon)
            bid = meta.get(b"batch_id", b"").decode()
            if bid:
                rr = self.store.rr
                self.applied.record(bid, int(meta.get(b"lo", rr.lo)), int(meta.get(b"hi", rr.hi)),
                                    float(meta.get(b"at", b"0")), float(meta.get(b"expires", b"0")))
            self.recovery["replayed"] += 1
            self.seq = seq

    def _open_sealed(self, name: str) -> "sealed.SealedFile":
        """A sealed node's file, mapped from this machine (fetched first from a remote store); a
        local copy that does not read as written is dropped and fetched again, once."""
        cache = self.storage.cache_dir
        journal = self.journal

        def refetch() -> str:  # a damaged block found later: a fresh copy, checked against its name
            journal.evict(name, cache)
            return journal.local_path(name, cache)

        for attempt in range(2):
            path = journal.local_path(name, cache)
            try:
                return sealed.SealedFile(path, self.store.rr.R, self._sealed_header(), name,
                                         refetch=None if journal.objects.local else refetch)
            except sealed.SealedError:
                if attempt or journal.objects.local:
                    raise
                journal.evict(name, cache)
        raise AssertionError("unreachable")

    def _sealed_header(self) -> dict:
        return dict(self.sketch.identity(), shard=self.shard_index, shards=self.shards)

    def _load_node(self, entry: dict, store: ShardStore):
        """A node of a manifest: its sealed file, mapped, and/or its object, loaded."""
        runs, tables = (), None
        if entry.get("object"):
            (loaded,), _ = nodes_from_batches(self.journal.read_node(entry["object"]), store)
            if not entry.get("sealed"):
                return loaded
            runs = loaded.runs if isinstance(loaded, Slot) else ()
        f = self._open_sealed(entry["sealed"])
        if entry["role"] == "slot":
            tables = [f.table(0, lvl) for lvl in range(entry["level"] + 1)]
            return Slot(entry["level"], entry["node"], tuple(tables), tuple(runs), sealed=f)
        return TableNode(entry["role"], entry["level"], entry["node"], f.table(0, entry["level"]), sealed=f)

    def _seed_from(self, seed_from: list, seed_states) -> None:
        """Start a new layout from slices of the old shards' states."""
        if len(seed_states) != len(seed_from):
            raise ValueError(f"{len(seed_from)} old shards named to seed from, {len(seed_states)} states given")
        sources, applied = [], []
        for (old_shard, old_shards), (batches, applied_tables) in zip(seed_from, seed_states):
            sources.append(store_from_batches(batches, self.sketch, old_shard, old_shards))
            old = AppliedBatches()
            for t in applied_tables:
                old.load_group(t)
            applied.append(old)
        self.store = reshard(sources, self.shard_index, self.shards)
        rr = self.store.rr
        # retries of batches the old shards applied are recognised here, for the registers they applied
        self.applied = AppliedBatches.merged([a.restrict(rr.lo, rr.hi) for a in applied])
        self._checkpoint()

    def seed(self, seed_from: list, *seed_states) -> int:
        """Take over the registers of old shards (a re-sharding) and checkpoint
        them; returns the events held.  The seed comes by this call rather than
        with the constructor because Ray keeps a restartable actor's creation
        arguments for the actor's whole life: whole states of the old layout
        would stay pinned in the object store (and keep the old nodes busy).
        A call that comes again (a retry, or a shard that recovered its own
        checkpoint) changes nothing."""
        if self.unavailable != AWAITING_SEED:
            self._usable()
            return self.store.events
        try:
            self._seed_from(list(seed_from), seed_states)
        except Exception as e:
            self.unavailable = f"seeding failed: {type(e).__name__}: {e}"
            raise
        self._await_seed = False
        self.unavailable = None
        self._report(force=True)
        return self.store.events

    def _usable(self) -> None:
        if self.unavailable is not None:
            raise ShardUnavailable(f"shard {self.shard_index} of {self.shards} is unavailable: {self.unavailable}")

    # ------------------------------------------------------------ ingest
    def apply(self, batch: Batch, batch_id: str | None = None, keep_s: float = CALL_KEEP_S,
              lo: int | None = None, hi: int | None = None) -> int:
        """Add a batch of validated events, durably, once; returns how many were applied.

        ``batch_id`` names what was sent (every part of it, wherever it goes)
        and ``[lo, hi)`` the registers this part stands for (default: this
        shard's): all of the batch's events there.  Registers already applied
        under that id are cut away, so a retry, however it comes, counts
        nothing twice.  The id is remembered for ``keep_s`` seconds."""
        self._usable()
        if self.sealed:
            raise ShardMoved(f"shard {self.shard_index} of {self.shards} was re-sharded; fetch the new shard map")
        rr = self.store.rr
        lo = rr.lo if lo is None else max(int(lo), rr.lo)
        hi = rr.hi if hi is None else min(int(hi), rr.hi)
        if not rr.owns(batch.coupon) or (len(batch) and (lo >= hi or len(batch.within(self.sketch.p, [(lo, hi)]))
                                                          != len(batch))):
            raise ValueError(f"batch holds visitors of registers outside shard {self.shard_index}'s range "
                             f"{rr.lo}..{rr.hi} (or the part's {lo}..{hi}): cut it with the current shard map")
        now = time.time()
        if batch_id is not None:
            todo = self.applied.unapplied(batch_id, lo, hi, now)
            if not todo:
                return 0  # a retry of a batch already logged and applied
            if todo != [(lo, hi)]:
                batch = batch.within(self.sketch.p, todo)
        expires = now + float(keep_s)
        if self.journal is not None:
            rb = batch.to_arrow()
            if batch_id is not None:
                rb = rb.replace_schema_metadata({b"batch_id": batch_id.encode(), b"at": repr(now).encode(),
                                                 b"expires": repr(expires).encode(), b"lo": str(lo).encode(),
                                                 b"hi": str(hi).encode()})
            t_log = time.perf_counter()
            try:
                self.journal.append(self.seq + 1, rb)
                self.telemetry.log_write(self.shard_index, time.perf_counter() - t_log)
            except Fenced as e:
                self.unavailable = str(e)
                raise ShardUnavailable(str(e)) from None
            self.seq += 1
        n = self.store.apply(batch.key_names, batch.key_index, batch.bucket, batch.coupon)
        if batch_id is not None:
            self.applied.record(batch_id, lo, hi, now, expires)
        self.applied_batches += 1
        self.telemetry.applied(self.shard_index, len(batch))
        return n

    # ------------------------------------------------------------ checkpoints
    @staticmethod
    def _ident(node) -> tuple[str, int, int]:
        return node.kind, node.level, node.node

    def _remember_written(self, body: dict) -> None:
        """After recovery: the nodes just loaded are the manifest's objects."""
        loaded = {self._ident(n): n for n in self.store.nodes()}
        self.written = {}
        for entry in body["nodes"]:
            k = (entry["role"], entry["level"], entry["node"])
            if k in loaded:
                self.written[k] = (loaded[k].version, entry)
        self.applied_written = {int(e["group"]): e["object"] for e in body.get("applied", [])}
        self.keys_written = {int(e["chunk"]): e["object"] for e in body.get("keys", [])}
        self.applied.changed.clear()
        self.store.keys.changed.clear()

    def checkpoint(self) -> dict:
        """Write what changed since the last checkpoint, then a manifest."""
        self._usable()
        return self._checkpoint()

    def _checkpoint(self) -> dict:
        if self.journal is None:
            return {"skipped": "no storage configured"}
        try:
            return self._write_checkpoint(time.perf_counter())
        except Fenced as e:
            self.unavailable = str(e)
            raise ShardUnavailable(str(e)) from None

    def _entry(self, node) -> tuple[dict, int]:
        """A node's manifest entry, writing what it needs; returns (entry, bytes written)."""
        k = self._ident(node)
        entry = {"role": k[0], "level": k[1], "node": k[2], "object": None, "bytes": 0}
        wrote = 0
        if node.sealed is not None:
            entry["sealed"], entry["sealed_bytes"] = node.sealed.name, node.sealed.size
            if isinstance(node, Slot) and node.runs:  # late events on a sealed slot: only they go in an object
                runs_only = Slot(node.level, node.node, None, node.runs)
                entry["object"], entry["bytes"] = self.journal.write_node(node_batches(self.store, runs_only))
                wrote = entry["bytes"]
        else:
            entry["object"], entry["bytes"] = self.journal.write_node(node_batches(self.store, node))
            wrote = entry["bytes"]
        return entry, wrote

    def _write_checkpoint(self, t0: float) -> dict:
        nodes, written, wbytes, n_written = [], {}, 0, 0
        for node in self.store.nodes():
            k = self._ident(node)
            old = self.written.get(k)
            if old is not None and old[0] == node.version:
                entry = old[1]
            else:
                entry, wrote = self._entry(node)
                wbytes += wrote
                n_written += bool(wrote)
            written[k] = (node.version, entry)
            nodes.append(entry)
        self.written = written
        keys = self.store.keys
        for c in keys.chunks():
            if c in keys.changed or c not in self.keys_written:
                self.keys_written[c] = self.journal.write_keys(keys.chunk_table(c))
        keys.changed.clear()
        self.applied.expire(time.time())
        for g in list(self.applied.changed) + [g for g in self.applied.groups() if g not in self.applied_written]:
            if g in self.applied.groups():
                self.applied_written[g] = self.journal.write_applied(self.applied.group_table(g))
            else:
                self.applied_written.pop(g, None)
        self.applied.changed.clear()
        number = self.journal.write_manifest({
            "shard": self.shard_index, "shards": self.shards, "log_seq": self.seq,
            "max_bucket": self.store.max_bucket, "events": self.store.events, "nodes": nodes,
            "keys": [{"chunk": c, "object": o} for c, o in sorted(self.keys_written.items())],
            "applied": [{"group": g, "object": o} for g, o in sorted(self.applied_written.items())],
            "sketch": self.sketch.identity(), "time": time.time()})
        self.manifest = number
        self.checkpointed_at = time.time()
        deleted = self.journal.collect_garbage(self.storage.cache_dir)
        self.telemetry.checkpoint(self.shard_index, time.perf_counter() - t0, wbytes)
        return {"shard": self.shard_index, "manifest": number, "log_seq": self.seq, "nodes": len(nodes),
                "nodes_written": n_written, "bytes_written": wbytes,
                "bytes_total": sum(n["bytes"] + n.get("sealed_bytes", 0) for n in nodes), "deleted": deleted,
                "seconds": round(time.perf_counter() - t0, 4)}

    def seal_nodes(self, max_seconds: float | None = None) -> int:
        """Write the nodes that will not change again as sealed files and read
        them from there (the heap keeps only the open part of time); returns
        how many were sealed.  Without storage nothing is sealed."""
        if self.journal is None:
            return 0
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        n = 0
        for node in self.store.sealable():
            if deadline is not None and time.perf_counter() > deadline:
                break
            data = sealed.encode(node.parts(), self.store.rr.R, dict(self._sealed_header(), kind=node.kind,
                                                                          level=node.level, node=node.node))
            name, size = self.journal.write_sealed(data)
            self.journal.keep_local(name, data, self.storage.cache_dir)
            new = self.store.seal(node, self._open_sealed(name))
            if new is not None:
                entry = {"role": node.kind, "level": node.level, "node": node.node, "object": None, "bytes": 0,
                         "sealed": name, "sealed_bytes": size}
                self.written[self._ident(new)] = (new.version, entry)
                n += 1
        if n:
            pa.default_memory_pool().release_unused()  # hand the encoders' buffers back, not kept by the pool
        return n

    # ------------------------------------------------------------ re-sharding
    def seal(self) -> int:
        """Checkpoint and take no more batches (even after a restart); returns the log position."""
        self._usable()
        if not self.sealed:
            self.checkpoint()
            if self.journal is not None:
                self.journal.seal()
            self.sealed = True
        return self.seq

    def unseal(self) -> bool:
        """Take batches again (a re-sharding that failed is rolled back)."""
        if self.journal is not None:
            self.journal.unseal()
        self.sealed = False
        return True

    def export(self) -> tuple[list[pa.RecordBatch], list[pa.Table]]:
        """The whole state as Arrow record batches, and the applied-batch
        records (to seed a new layout)."""
        self._usable()
        return store_to_batches(self.store), [self.applied.group_table(g) for g in self.applied.groups()]

    # ------------------------------------------------------------ queries and upkeep
    def query(self, keys: list, b0: int, b1: int, sent: float | None = None):
        """``(hist, sparse, impressions)`` for each key over buckets ``[b0, b1)``.
        ``sent``: when the caller sent it (epoch seconds), to report the time
        it waited behind this shard's other calls."""
        return self._timed(sent, self.store.view().query, keys, b0, b1)

    def query_ranges(self, keys: list, ranges: list[tuple[int, int]]) -> list:
        """``query`` for several ranges in one call (a chart's points)."""
        self._usable()
        t0 = time.perf_counter()
        view = self.store.view()
        out = [view.query(keys, b0, b1) for b0, b1 in ranges]
        self.telemetry.shard_query(self.shard_index, time.perf_counter() - t0)
        return out

    def reach(self, names: list, prefix: str | None, b0: int, b1: int, sent: float | None = None):
        """``(hist, sparse, impressions, keys)`` of the union of a key set (``ShardStore.reach``)."""
        return self._timed(sent, self.store.view().reach, names, prefix, b0, b1)

    def overlap(self, a: tuple, b: tuple, b0: int, b1: int, sent: float | None = None):
        """``(joint histogram, counts, impressions)`` of two key sets (``ShardStore.overlap``)."""
        return self._timed(sent, self.store.view().overlap, a, b, b0, b1)

    def series(self, names: list, prefix: str | None, b0: int, g: int, n: int, starts, ends,
               sent: float | None = None):
        """Windows of a key set's union in one pass (``ShardStore.series``)."""
        return self._timed(sent, self.store.view().series, names, prefix, b0, g, n, starts, ends)

    def _timed(self, sent, fn, *args):
        self._usable()
        if sent is not None:
            self.telemetry.shard_wait(self.shard_index, max(0.0, time.time() - float(sent)))
        t0 = time.perf_counter()
        out = fn(*args)
        self.telemetry.shard_query(self.shard_index, time.perf_counter() - t0)
        return out

    def key_impressions(self, b0: int, b1: int, prefix: str = "", limit: int | None = None) -> tuple[list, np.ndarray]:
        self._usable()
        return self.store.view().key_impressions(b0, b1, prefix, limit)

    def impressions_of(self, keys: list, b0: int, b1: int) -> np.ndarray:
        """Exact impressions on this shard of each of ``keys`` over ``[b0, b1)``."""
        self._usable()
        return self.store.view().query(keys, b0, b1)[2]

    def registers(self, key, b0: int, b1: int) -> np.ndarray:
        self._usable()
        return self.store.view().registers(key, b0, b1)

    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        """A slice of upkeep: fold runs, build rollups, drop what ``now`` puts
        beyond the retention, seal what will not change again; an unavailable
        shard tries to start again."""
        if self.unavailable is not None:
            if self.unavailable != AWAITING_SEED and time.time() - self._tried >= RETRY_START_S:
                self._start()
            self._report()
            return False
        if now is not None:
            self.applied.expire(now)
        t0 = time.perf_counter()
        done = self.store.maintain(now, max_seconds)
        left = None if max_seconds is None else max(0.0, max_seconds - (time.perf_counter() - t0))
        if done and (left is None or left > 0):
            try:
                self.seal_nodes(left)
            except (OSError, CorruptObject) as e:  # the store is away: the nodes stay on the heap until next time
                log.warning("shard %d could not seal: %s", self.shard_index, e)
        self._report()
        return done and not self.store.sealable() if self.journal is not None else done

    def flush(self) -> None:
        self._usable()
        self.store.flush()

    def health(self) -> dict:
        """A cheap summary: whether this shard serves, and if not why."""
        return {"shard": self.shard_index, "shards": self.shards, "available": self.unavailable is None,
                "reason": self.unavailable, "sealed": self.sealed,
                "checkpoint_age_s": self._checkpoint_age()}

    def _checkpoint_age(self) -> float | None:
        return None if self.checkpointed_at is None else round(time.time() - self.checkpointed_at, 1)

    def _report(self, force: bool = False) -> None:
        """Gauges for the watchers, at most every ``REPORT_EVERY_S``."""
        if not force and time.monotonic() - self._reported < REPORT_EVERY_S:
            return
        self._reported = time.monotonic()
        st = self.store.stats()
        self.telemetry.shard_state(self.shard_index, {
            "recovering": int(self.unavailable is not None), "checkpoint_age_s": self._checkpoint_age(),
            "rows": st["base_rows"] + st["rollup_rows"], "keys": st["keys"], "events": st["events"],
            **process_memory()})

    def stats(self) -> dict:
        out = {"shard": self.shard_index, "shards": self.shards, "pid": os.getpid(), "host": socket.gethostname(),
               "node": self.telemetry.node() or socket.gethostname(), **process_memory(),
               "available": self.unavailable is None, "reason": self.unavailable,
               "applied_batches": self.applied_batches, "log_seq": self.seq, "manifest": self.manifest,
               "sealed": self.sealed, "recovery": self.recovery, "batch_ids": len(self.applied),
               "checkpoint_age_s": self._checkpoint_age(),
               "uptime_s": round(time.time() - self.started, 1)}
        return {**out, **self.store.stats()}

    def ping(self) -> int:
        return self.shard_index

    def pid(self) -> int:
        return os.getpid()
