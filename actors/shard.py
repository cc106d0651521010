"""The shard actor: one register range of every key, every time bucket.

A plain class around ``sketch.store.ShardStore`` and, when the cluster has
storage, a ``durable.journal.ShardJournal``:

* ``apply(batch, batch_id)`` appends the batch to the shard's log on the
  store, then applies it, then answers: an acknowledged batch is durable.
  A batch id seen before (a retry after a lost answer) is acknowledged
  without being applied twice, so impressions stay exact.
* ``checkpoint()`` writes the nodes whose version changed since the last
  checkpoint (``ShardStore.nodes``), then a manifest; the log before the
  previous checkpoint is then dropped.
* On (re)start the constructor loads the newest checkpoint that verifies and
  replays the log after it.
* ``seal()`` ends the shard's life in a layout (re-sharding): it checkpoints
  and refuses further batches with ``ShardMoved``, so a sender re-routes them.

Ray runs the calls one at a time, so none of this needs a lock; each call is
short (a batch, a query, a bounded slice of maintenance, a checkpoint of what
changed).
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from durable.journal import CorruptObject, ShardJournal
from durable.objects import ObjectStore
from sketch.arrowio import StateError, node_batches, nodes_from_batches, store_from_batches, store_to_batches
from sketch.events import Batch
from sketch.reshard import reshard
from sketch.store import ShardStore, SketchConfig

RECENT_IDS = 20_000  # batch ids remembered for deduplicating retries (kept in checkpoints too)


class ShardMoved(RuntimeError):
    """This shard no longer takes batches: the layout changed; re-route."""


class ShardActor:
    """Shard ``shard`` of ``shards``.  A new layout's shard is seeded from the
    old shards whose registers it takes over: ``seed_from`` lists them as
    (old index, old count), ``seed_states`` holds each one's ``export()``."""

    def __init__(self, sketch: SketchConfig, shard: int, shards: int, storage: str | None = None,
                 s3_endpoint: str | None = None, seed_from=(), *seed_states):
        t0 = time.perf_counter()
        self.sketch, self.shard_index, self.shards = sketch, shard, shards
        self.journal = ShardJournal(ObjectStore(storage, s3_endpoint), shard, shards) if storage else None
        self.store = ShardStore(sketch, shard, shards)
        self.seq = 0  # last log entry applied
        self.recent: OrderedDict[str, int] = OrderedDict()
        self.manifest = 0
        self.written: dict = {}  # node (kind, level, number) -> (version written, object name, bytes)
        self.sealed = False
        self.started = time.time()
        self.checkpointed_at: float | None = None
        self.applied_batches = 0
        self.recovery: dict = {"manifest": None, "fallbacks": [], "replayed": 0, "skipped_duplicates": 0}
        if self.journal is not None and (self.journal.manifests() or self.journal.log_entries(0)):
            self._recover()  # this shard has a past on the store: that wins over any seed
        elif seed_from:
            self._seed(list(seed_from), seed_states)
        self.sealed = self.journal is not None and self.journal.is_sealed()
        self.recovery["seconds"] = round(time.perf_counter() - t0, 3)

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        body = None
        for number in reversed(self.journal.manifests()):
            try:
                body = self.journal.read_manifest(number)
                store = ShardStore(self.sketch, self.shard_index, self.shards)
                nodes = []
                for entry in body["nodes"]:
                    nodes += nodes_from_batches(self.journal.read_node(entry["object"]), store)[0]
                store.install(nodes, max_bucket=body["max_bucket"], events=body["events"])
                self.store, self.manifest = store, number
                break
            except (CorruptObject, StateError, OSError, KeyError, ValueError) as e:
                self.recovery["fallbacks"].append(f"manifest {number}: {e}")
                body = None
        if body is not None:
            self.seq = body["log_seq"]
            for bid in body.get("recent_ids", []):
                self.recent[bid] = 0
            self.recovery["manifest"] = self.manifest
            self._remember_written(body)
        else:
            self.store = ShardStore(self.sketch, self.shard_index, self.shards)
        for seq, name in self.journal.log_entries(self.seq):
            rb = self.journal.read_log(name)  # a corrupt acknowledged entry is a loud failure, never skipped
            bid = (rb.schema.metadata or {}).get(b"batch_id", b"").decode() or None
            if bid is not None and bid in self.recent:
                self.recovery["skipped_duplicates"] += 1
            else:
                b = Batch.from_arrow(rb)
                self.store.apply(b.key_names, b.key_index, b.bucket, b.coupon)
                self.recovery["replayed"] += 1
                self._remember(bid, seq)
            self.seq = seq

    def _seed(self, seed_from: list, seed_states) -> None:
        """Start a new layout from slices of the old shards' states."""
        if len(seed_states) != len(seed_from):
            raise ValueError(f"{len(seed_from)} old shards named to seed from, {len(seed_states)} states given")
        sources = []
        for (old_shard, old_shards), (batches, recent) in zip(seed_from, seed_states):
            sources.append(store_from_batches(batches, self.sketch, old_shard, old_shards))
            for bid in recent:  # retries of batches the old shards applied are recognised here
                self.recent[bid] = 0
        self.store = reshard(sources, self.shard_index, self.shards)
        if self.journal is not None:
            self.checkpoint()

    def _remember(self, bid: str | None, seq: int) -> None:
        if bid is None:
            return
        self.recent[bid] = seq
        while len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)

    # ------------------------------------------------------------ ingest
    def apply(self, batch: Batch, batch_id: str | None = None, parent_id: str | None = None) -> int:
        """Add a batch of validated events, durably; returns how many were applied.

        ``parent_id`` names the batch this one was cut from when a sender
        re-routed it after a re-sharding: if the parent was applied before
        the old shard was sealed, so was this part of it."""
        if self.sealed:
            raise ShardMoved(f"shard {self.shard_index} of {self.shards} was re-sharded; fetch the new shard map")
        if batch_id is not None and (batch_id in self.recent or (parent_id is not None and parent_id in self.recent)):
            return 0  # a retry of a batch already logged and applied
        rr = self.store.rr
        if not rr.owns(batch.coupon):
            raise ValueError(f"batch holds visitors of registers outside shard {self.shard_index}'s range "
                             f"{rr.lo}..{rr.hi}: cut it with the current shard map")
        if self.journal is not None:
            rb = batch.to_arrow()
            if batch_id is not None:
                rb = rb.replace_schema_metadata({b"batch_id": batch_id.encode()})
            self.journal.append(self.seq + 1, rb)
            self.seq += 1
        n = self.store.apply(batch.key_names, batch.key_index, batch.bucket, batch.coupon)
        self._remember(batch_id, self.seq)
        self.applied_batches += 1
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
                self.written[k] = (loaded[k].version, entry["object"], entry["bytes"])

    def checkpoint(self) -> dict:
        """Write the nodes that changed since the last checkpoint, then a manifest."""
        if self.journal is None:
            return {"skipped": "no storage configured"}
        t0 = time.perf_counter()
        nodes, written, wbytes, n_written = [], {}, 0, 0
        for node in self.store.nodes():
            k = self._ident(node)
            old = self.written.get(k)
            if old is not None and old[0] == node.version:
                name, size = old[1], old[2]
            else:
                name, size = self.journal.write_node(node_batches(self.store, node))
                wbytes += size
                n_written += 1
            written[k] = (node.version, name, size)
            nodes.append({"role": k[0], "level": k[1], "node": k[2], "object": name, "bytes": size})
        self.written = written
        number = self.manifest + 1
        self.journal.write_manifest(number, {
            "shard": self.shard_index, "shards": self.shards, "number": number, "log_seq": self.seq,
            "max_bucket": self.store.max_bucket, "events": self.store.events, "nodes": nodes,
            "recent_ids": list(self.recent)[-RECENT_IDS:], "sketch": self.sketch.identity(), "time": time.time()})
        self.manifest = number
        self.checkpointed_at = time.time()
        deleted = self.journal.collect_garbage()
        return {"shard": self.shard_index, "manifest": number, "log_seq": self.seq, "nodes": len(nodes),
                "nodes_written": n_written, "bytes_written": wbytes,
                "bytes_total": sum(n["bytes"] for n in nodes), "deleted": deleted,
                "seconds": round(time.perf_counter() - t0, 4)}

    # ------------------------------------------------------------ re-sharding
    def seal(self) -> int:
        """Checkpoint and take no more batches (even after a restart); returns the log position."""
        if not self.sealed:
            self.checkpoint()
            if self.journal is not None:
                self.journal.seal()
            self.sealed = True
        return self.seq

    def unseal(self) -> None:
        """Take batches again (a re-sharding that failed is rolled back)."""
        if self.journal is not None:
            self.journal.unseal()
        self.sealed = False

    def export(self) -> tuple[list[pa.RecordBatch], list[str]]:
        """The whole state as Arrow record batches, and the recent batch ids (to seed a new layout)."""
        return store_to_batches(self.store), list(self.recent)

    # ------------------------------------------------------------ queries and upkeep
    def query(self, keys: list, b0: int, b1: int):
        """``(hist, sparse, impressions)`` for each key over buckets ``[b0, b1)``."""
        return self.store.query(keys, b0, b1)

    def query_ranges(self, keys: list, ranges: list[tuple[int, int]]) -> list:
        """``query`` for several ranges in one call (a chart's points)."""
        return [self.store.query(keys, b0, b1) for b0, b1 in ranges]

    def key_impressions(self, b0: int, b1: int, prefix: str = "") -> tuple[list, np.ndarray]:
        return self.store.key_impressions(b0, b1, prefix)

    def registers(self, key, b0: int, b1: int) -> np.ndarray:
        return self.store.registers(key, b0, b1)

    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        return self.store.maintain(now, max_seconds)

    def flush(self) -> None:
        self.store.flush()

    def stats(self) -> dict:
        return {"shard": self.shard_index, "shards": self.shards, "pid": os.getpid(),
                "host": socket.gethostname(), "applied_batches": self.applied_batches, "log_seq": self.seq,
                "manifest": self.manifest, "sealed": self.sealed, "recovery": self.recovery,
                "checkpoint_age_s": None if self.checkpointed_at is None else round(time.time() - self.checkpointed_at, 1),
                "uptime_s": round(time.time() - self.started, 1), **self.store.stats()}

    def ping(self) -> int:
        return self.shard_index

    def pid(self) -> int:
        return os.getpid()
