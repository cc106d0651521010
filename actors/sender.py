"""Sending validated batches to their shards, with bounded calls in flight.

A ``Sender`` cuts each batch by register range (``Batch.split``) and sends
every part straight to its shard, never keeping more than ``max_inflight``
calls pending: memory stays bounded whatever the input size.  It is a plain
class: shards are reached through a runtime (``actors.runtime``) and the
current shard map through ``route()`` (the coordinator's), so the ingest
job, the REST app and the tests share it.

Every part gets a batch id, so a call that the runtime retries after a shard
restart is applied once.  A part refused because the shard map changed
(``ShardMoved``, or the old shard gone) is cut again for the new map and
sent with its original id as parent: if the old shard applied it before it
was sealed, the new shard knows, and does not apply it twice.
"""

from __future__ import annotations

import time
import uuid

from sketch.events import Batch

from .runtime import Runtime, ShardUnavailable
from .shard import ShardMoved


class Sender:
    REROUTE_DEADLINE_S = 900.0  # a re-sharding seals, exports and seeds the whole state: allow it time

    def __init__(self, runtime: Runtime, route, p: int, max_inflight: int):
        self.runtime, self.route, self.p, self.max_inflight = runtime, route, p, max_inflight
        self.epoch, self.shards = route()
        self.inflight: dict = {}  # pending -> (part, batch id, parent id)
        self.peak = 0
        self.batches = 0
        self._prefix = uuid.uuid4().hex[:16]
        self._n = 0

    def send(self, batch: Batch, parent: str | None = None) -> None:
        for shard, part in enumerate(batch.split(self.p, len(self.shards))):
            if len(part):
                self._call(shard, part.compact(), parent)
        self.peak = max(self.peak, len(self.inflight))
        while len(self.inflight) > self.max_inflight:
            self._settle(self._first_done())

    def drain(self) -> None:
        """Wait until every part sent is applied (or raise what stopped one)."""
        while self.inflight:
            self._settle(self._first_done())

    def _first_done(self):
        ready, _ = self.runtime.wait(list(self.inflight), None, num_returns=1)
        return ready[0]

    def _next_id(self) -> str:
        self._n += 1
        return f"{self._prefix}:{self._n}"

    def _call(self, shard: int, part: Batch, parent: str | None) -> None:
        bid = self._next_id()
        self.inflight[self.runtime.call(self.shards[shard], "apply", part, bid, parent)] = (part, bid, parent)
        self.batches += 1

    def _settle(self, pending) -> None:
        part, bid, parent = self.inflight.pop(pending)
        parent = parent or bid  # retries name the batch first sent, which the old shard may have applied
        deadline = time.time() + self.REROUTE_DEADLINE_S
        while True:
            try:
                self.runtime.result(pending)
                return
            except (ShardMoved, ShardUnavailable):
                # a shard gone for good is one a re-sharding retired: re-route like ShardMoved
                if time.time() > deadline:
                    raise
            # the map is changing: wait for the new one (or for the old shard to
            # take batches again, if the re-sharding was rolled back), then cut the
            # part again for the map now known: it may have been cut for an older one
            time.sleep(0.2)
            epoch, shards = self.route()
            if epoch != self.epoch:
                self.epoch, self.shards = epoch, shards
            subs = [(i, sub) for i, sub in enumerate(part.split(self.p, len(self.shards))) if len(sub)]
            if len(subs) > 1:
                for i, sub in subs:
                    self._call(i, sub.compact(), parent)
                return
            shard, part = subs[0]
            pending = self.runtime.call(self.shards[shard], "apply", part, self._next_id(), parent)
