"""The shard actor: one register range of every key, every time bucket.

A plain class around ``sketch.store.ShardStore`` and, when the cluster has
storage, a ``durable.journal.ShardJournal``:

* ``apply(batch, batch_id, keep_s)`` cuts the batch to the registers not yet
  applied under its id (``actors.applied``), appends that to the shard's log
  on the store, tells the range's readers (``followers``: a message sent,
  never waited for), applies it, then answers: an acknowledged batch is
  durable and counted once, whoever retries it.
* ``checkpoint()`` writes the nodes whose version changed since the last
  checkpoint (``ShardStore.nodes``) and the applied-batch records that
  changed, then a manifest (and tells the readers); the log before the
  previous checkpoint is then dropped.
* On (re)start the constructor checks that the store is this cluster's,
  loads the newest checkpoint that verifies and replays the log after it.
  A shard that cannot do so (a store it cannot read, objects that do not
  verify) does not start empty: it stays *unavailable*, says why in
  ``stats()``, refuses batches and queries with ``ShardUnavailable`` (so
  answers are partial, never silently short) and tries again from
  ``maintain()``.
* ``seal()`` ends the shard's life in a layout (re-sharding): it checkpoints
  and refuses further batches with ``ShardMoved``, so a sender re-routes them.

Three kinds of call, on threads of their own (``actors.runtime``):

* batches (``apply``) and the rest, one at a time, in order;
* upkeep (``maintain``, ``checkpoint``; ``UPKEEP_METHODS``), one at a time
  on a thread of its own: rollups, sealing and checkpoints are built
  beside the applies and never hold a batch up.  An apply and the upkeep
  meet only on the store's lock (``ShardStore.lock``), held for a change
  itself, never for a build, an encode or a write to the store: the
  upkeep takes its inputs under it, builds without it and puts the result
  in place under it (``sketch.rollup``); a checkpoint takes the state it
  writes (log position, nodes, key chunks, batch records) under it in one
  go, then writes without it.  Checkpoints, sealing and re-sharding are
  kept from overlapping each other by ``_upkeep_lock``: the garbage a
  checkpoint collects is never a sealed file written but not yet listed.
* questions (``actors.base``), on threads of their own, reading the store's
  published view: they never wait for either.

No call holds one lock while waiting for the other the other way round
(``_upkeep_lock`` is only ever taken first), so they cannot deadlock.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pyarrow as pa

from impressions.durable.journal import CorruptObject, Fenced, ShardJournal
from impressions.durable.layout import ShardStorage, read_layout
from impressions.sketch import npx, sealed
from impressions.sketch.arrowio import (
    node_batches,
    store_from_batches,
    store_to_batches,
)
from impressions.sketch.events import Batch
from impressions.sketch.reshard import reshard
from impressions.sketch.rows import code_keys, concat
from impressions.sketch.store import ShardStore, SketchConfig
from impressions.sketch.tiers import Slot

from .applied import AppliedBatches
from .base import ShardBase
from .reader import Followers
from .runtime import ShardUnavailable
from .telemetry import Telemetry, process_memory

log = logging.getLogger("impressions.shard")

CALL_KEEP_S = 600.0  # how long a batch id with no lasting meaning is remembered (the runtime's own retries)
RETRY_START_S = 10.0  # how often an unavailable shard tries to start again
AWAITING_SEED = "waiting for the old shards' registers (a re-sharding)"
REPORT_EVERY_S = 5.0  # how often a shard reports its gauges (after an upkeep slice)


class ShardMoved(RuntimeError):
    """This shard no longer takes batches: the layout changed; re-route."""


class ShardActor(ShardBase):
    """Shard ``shard`` of ``shards``.  A new layout's shard is seeded from the
    old shards whose registers it takes over: ``seed_from`` lists them as
    (old index, old count), ``seed_states`` holds each one's ``export()``."""

    def __init__(self, sketch: SketchConfig, shard: int, shards: int, storage: ShardStorage | None = None,
                 block_cache_mb: float = 256.0, seed_from=(), *seed_states, telemetry: Telemetry | None = None,
                 await_seed: bool = False, followers: Followers | None = None, question_hosts=None):
        self.sketch, self.shard_index, self.shards = sketch, shard, shards
        self.followers = followers or Followers()  # this range's readers: told of each log entry and checkpoint
        self.storage = storage
        self.telemetry = telemetry or Telemetry()
        self._reported = 0.0
        self._set_up_process(block_cache_mb)
        self.started = time.time()
        self.applied_batches = 0
        self.first_apply_at: float | None = None  # the first batch this process applied
        self.checkpointed_at: float | None = None
        self._seed = (list(seed_from), seed_states)
        self._await_seed = await_seed  # the seed comes by ``seed()``, not with the constructor
        self.unavailable: str | None = "starting"
        self._tried = 0.0
        self._upkeep_lock = threading.RLock()  # checkpoints, sealing, re-sharding and restarts: one at a time
        if question_hosts:  # questions on a port of its own too (``actors.wire``): "unavailable" until started
            self._open_port(question_hosts)
        with self._upkeep_lock:
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
            self.store.on_flush = self._flushed
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
        def load(body: dict):
            applied = AppliedBatches()
            for entry in body.get("applied", []):
                applied.load_group(self.journal.read_applied(entry["object"]))
            return self._store_of(body), applied
        got = self._newest_checkpoint(self.journal.manifests(), load, self.recovery["fallbacks"])
        if got is not None:
            self.manifest, body, (self.store, self.applied) = got
            self.seq = body["log_seq"]
            self.recovery["manifest"] = self.manifest
            self._remember_written(body)
        for seq, name in self.journal.log_entries(self.seq):
            rb = self.journal.read_log(name)  # a corrupt acknowledged entry is a loud failure, never skipped
            meta = rb.schema.metadata or {}
            self._apply_entry(self.store, rb, seq)
            bid = meta.get(b"batch_id", b"").decode()
            if bid:
                rr = self.store.rr
                self.applied.record(bid, int(meta.get(b"lo", rr.lo)), int(meta.get(b"hi", rr.hi)),
                                    float(meta.get(b"at", b"0")), float(meta.get(b"expires", b"0")))
            self.recovery["replayed"] += 1
            self.seq = seq

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
        with self._upkeep_lock:
            if self.unavailable != AWAITING_SEED:
                self._usable()
                return self.store.events
            try:
                self._seed_from(list(seed_from), seed_states)
                self.store.on_flush = self._flushed
            except Exception as e:
                self.unavailable = f"seeding failed: {type(e).__name__}: {e}"
                raise
            self._await_seed = False
            self.unavailable = None
            self._report(force=True)
            return self.store.events

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
            with self.store.lock:
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
            # never waits for them; before the apply, so that runs a flush makes of it come after it
            self._tell("logged", lambda: (self.seq + 1, self.journal.incarnation, rb))
        with self.store.lock:  # a checkpoint takes log position, registers and batch records together
            if self.journal is not None:
                self.seq += 1
            n = self.store.apply(batch.key_names, batch.key_index, batch.bucket, batch.coupon,
                                 tag=self.seq if self.journal is not None else None)
            if batch_id is not None:
                self.applied.record(batch_id, lo, hi, now, expires)
        self.applied_batches += 1
        if self.first_apply_at is None:
            self.first_apply_at = time.time()
        self.telemetry.applied(self.shard_index, len(batch))
        return n

    def _flushed(self, after: int, through: int, runs) -> None:
        """The store sorted log positions ``(after, through]`` into ``runs``: the readers take them instead of
        sorting those entries again (``actors.reader``).  Under the store's lock, so the names are the ids'."""
        if self.journal is None or not runs:
            return
        self._tell("flushed", lambda: (after, through, self.journal.incarnation, *self._runs_message(runs)))

    def _runs_message(self, runs) -> tuple:
        joined = concat([run for _, run in runs], 0)  # one table to send, not one per leaf
        ids = npx.unique(code_keys(joined.code))
        names = self.store.keys.names
        cuts = np.cumsum([0] + [len(run) for _, run in runs])
        return (joined, np.array([jf for jf, _ in runs], np.int64), cuts), ids, [names[i] for i in ids.tolist()]

    def _tell(self, what: str, args) -> None:
        """Tell the readers (``followers``) ``what``, with the arguments ``args()`` makes (only when there are
        readers); a failure to tell is theirs to make up (they catch up from the store), never the batch's or
        the flush's."""
        try:
            if self.followers.active:
                getattr(self.followers, what)(*args())
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("shard %d could not tell its readers (%s): %s", self.shard_index, what, e)

    def ingest(self, batch: Batch, batch_id: str | None = None, keep_s: float = CALL_KEEP_S,
               lo: int | None = None, hi: int | None = None) -> tuple[int, int]:
        """``apply``, answering ``(events applied, log position)``: a sender keeps the position, so that
        its writer's questions wait for a reader to hold what it wrote (``ShardBase.ask``)."""
        return self.apply(batch, batch_id, keep_s, lo, hi), self.seq

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
        with self._upkeep_lock:  # usable after a restart that may be under way on the upkeep thread
            self._usable()
            return self._checkpoint()

    def _checkpoint(self) -> dict:
        if self.journal is None:
            return {"skipped": "no storage configured"}
        try:
            with self._upkeep_lock:
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

    def _taken(self) -> tuple:
        """What a checkpoint writes, taken at one log position under the store's lock: (log position,
        nodes, newest bucket, events, changed key chunks, changed batch-record groups, all groups)."""
        store, applied = self.store, self.applied
        with store.lock:
            nodes = store.nodes()  # the memtable flushed first: everything up to ``seq`` is in them
            keys = store.keys
            chunks = {c: keys.chunk_table(c) for c in keys.chunks() if c in keys.changed or
                      c not in self.keys_written}
            keys.changed.clear()
            applied.expire(time.time())
            groups = set(applied.groups())
            tables = {g: applied.group_table(g) for g in set(applied.changed) | (groups - set(self.applied_written))
                      if g in groups}
            applied.changed.clear()
            return self.seq, nodes, store.max_bucket, store.events, chunks, tables, groups

    def _write_checkpoint(self, t0: float) -> dict:
        seq, store_nodes, max_bucket, events, chunks, tables, groups = self._taken()
        nodes, written, wbytes, n_written = [], {}, 0, 0
        for node in store_nodes:
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
        for c, table in chunks.items():
            self.keys_written[c] = self.journal.write_keys(table)
        for g, table in tables.items():
            self.applied_written[g] = self.journal.write_applied(table)
        for g in set(self.applied_written) - groups:
            del self.applied_written[g]
        number = self.journal.write_manifest({
            "shard": self.shard_index, "shards": self.shards, "log_seq": seq,
            "max_bucket": max_bucket, "events": events, "nodes": nodes,
            "keys": [{"chunk": c, "object": o} for c, o in sorted(self.keys_written.items())],
            "applied": [{"group": g, "object": o} for g, o in sorted(self.applied_written.items())],
            "sketch": self.sketch.identity(), "time": time.time()})
        self.manifest = number
        self.checkpointed_at = time.time()
        self._tell("checkpointed", lambda: (number,))
        deleted = self.journal.collect_garbage(self.storage.cache_dir)
        self.telemetry.checkpoint(self.shard_index, time.perf_counter() - t0, wbytes)
        return {"shard": self.shard_index, "manifest": number, "log_seq": seq, "nodes": len(nodes),
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
        with self._upkeep_lock:  # no checkpoint collects the file between its writing and the store mapping it
            for node in self.store.sealable():
                if deadline is not None and time.perf_counter() > deadline:
                    break
                data = sealed.encode(node.parts(), self.store.rr.R, dict(self._sealed_header(), kind=node.kind,
                                                                              level=node.level, node=node.node))
                name, size = self.journal.write_sealed(data)
                self.journal.keep_local(name, data, self.storage.cache_dir)
                f = self._open_sealed(name)
                new = self.store.seal(node, f)
                if new is None:  # the node changed while it was encoded (late events): sealed on a later pass
                    f.close()  # the next checkpoint's collection deletes the file, listed nowhere
                    continue
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
        with self._upkeep_lock:
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
        with self._upkeep_lock, self.store.lock:
            return store_to_batches(self.store), [self.applied.group_table(g) for g in self.applied.groups()]

    # ------------------------------------------------------------ upkeep
    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        """A slice of upkeep: fold runs, build rollups, drop what ``now`` puts
        beyond the retention, seal what will not change again; an unavailable
        shard tries to start again.  Runs beside the applies (see the module text)."""
        with self._upkeep_lock:
            return self._maintain(now, max_seconds)

    def _maintain(self, now: float | None, max_seconds: float | None) -> bool:
        if self.unavailable is not None:
            if self.unavailable != AWAITING_SEED and time.time() - self._tried >= RETRY_START_S:
                self._start()
            self._report()
            return False
        if now is not None:
            with self.store.lock:
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
                "checkpoint_age_s": self._checkpoint_age(), **self._port_health()}

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
            "run_rows": st["run_rows"], **process_memory()})

    def stats(self) -> dict:
        out = {"shard": self.shard_index, "shards": self.shards, **self._process_stats(),
               "available": self.unavailable is None, "reason": self.unavailable,
               "applied_batches": self.applied_batches, "first_apply_at": self.first_apply_at, "log_seq": self.seq, "manifest": self.manifest,
               "sealed": self.sealed, "recovery": self.recovery, "batch_ids": len(self.applied),
               "checkpoint_age_s": self._checkpoint_age(), **self._port_stats()}
        return {**out, **self.store.stats()}
