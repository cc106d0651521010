"""Sending validated batches to their shards, with bounded calls in flight.

A ``Sender`` cuts each batch by register range (``Batch.split``) and sends
every part straight to its shard, keeping at most ``max_inflight`` calls
pending to each range: memory stays bounded whatever the input size.

**A range that stops answering holds back only its own parts.**  When a
range has finished no call for ``HOLD_S`` while other ranges finished
theirs (its writer restarting, say), the sender stops waiting for it and
goes on sending: the other ranges keep
ingesting, and that range's parts queue for it (Ray delivers them when it
is back), up to ``BACKLOG_EVENTS`` events; beyond that the sender waits for
it, and a REST request's sender gives up at its deadline (503 with
``Retry-After``: nothing it sent is lost, the retry with the same key
completes it).  It is a plain
class: shards are reached through a runtime (``actors.runtime``) and the
current shard map through ``route()`` (the coordinator's), so the ingest
job, the REST app and the tests share it.

Every part of a batch carries the batch's id and the register range it
stands for (``actors.applied``): all of the batch's events in those
registers.  A call the runtime retries, a part re-sent after a shard
restart, a part refused because the shard map changed (``ShardMoved``, or
the old shard gone) and cut again for the new map (each piece standing for
its share of the range), all count once.

Each shard answers a part with its log position (``ShardActor.ingest``);
``positions`` keeps the highest per range of the current map, so that
whoever sent can read its own writes back from any copy of a range
(``actors.questions``, ``Questions.wrote``).

Every wait is bounded: a part that no shard has taken within ``deadline_s``
of being sent (a shard down for good, a re-sharding that never ends) makes
``send``/``drain`` raise ``ShardUnavailable``; what was sent before stays
applied, and sending the batch again with the same id completes it.
"""

from __future__ import annotations

import time

from impressions.sketch.events import Batch

from .runtime import Runtime, ShardUnavailable
from .shard import ShardMoved

JOB_DEADLINE_S = 900.0  # a re-sharding seals, exports and seeds the whole state: a job allows it time
HOLD_S = 1.0  # a range whose oldest call waited this long is held back: the sender goes on with the others
BACKLOG_EVENTS = 4_000_000  # events queued for a held-back range before the sender waits for it (~64 MB)


class Sender:
    def __init__(self, runtime: Runtime, route, p: int, max_inflight: int, deadline_s: float = JOB_DEADLINE_S):
        self.runtime, self.route, self.p, self.max_inflight = runtime, route, p, max_inflight
        self.deadline_s = deadline_s
        self.epoch, self.shards = route()
        self.inflight: dict = {}  # pending -> (part, batch id, keep_s, when first sent, (lo, hi), shard, sent)
        self.positions: dict[int, int] = {}  # range -> highest log position acknowledged, in map ``epoch``
        self.peak = 0  # the most calls pending to one range
        self.held: list[int] = []  # ranges held back after the last send
        self._done_at: dict[int, float] = {}  # range -> when a call to it last finished
        self.batches = 0

    def send(self, batch: Batch, batch_id: str, keep_s: float) -> None:
        """Send every part of ``batch`` under ``batch_id``, remembered for ``keep_s`` seconds."""
        now = time.monotonic()
        for shard, part in enumerate(batch.split(self.p, len(self.shards))):
            if len(part):
                self._call(shard, part.compact(), batch_id, keep_s, now, self._range(shard, len(self.shards)))
        self._bound()

    def _settle_ready(self) -> None:
        if self.inflight:
            ready, _ = self.runtime.wait(list(self.inflight), 0)
            for pending in ready:
                self._settle(pending)

    def _bound(self) -> None:
        """Wait until no range has more than ``max_inflight`` calls pending, except ranges held back: those
        that finished nothing for ``HOLD_S`` while another range did (when every range is slow, the sender
        waits: that is backpressure, not a range down)."""
        self._settle_ready()
        while True:
            count: dict[int, int] = {}
            events: dict[int, int] = {}
            oldest: dict[int, float] = {}
            for part, *_, shard, sent in self.inflight.values():
                count[shard] = count.get(shard, 0) + 1
                events[shard] = events.get(shard, 0) + len(part)
                oldest[shard] = min(sent, oldest.get(shard, sent))
            self.peak = max([self.peak, *count.values()])
            over = [i for i, c in count.items() if c > self.max_inflight]
            now = time.monotonic()
            quiet = {i: now - max(oldest[i], self._done_at.get(i, 0.0)) for i in over}  # since it last moved
            others_move = {i: any(now - t < HOLD_S for j, t in self._done_at.items() if j != i) for i in over}
            waiting = [i for i in over if quiet[i] < HOLD_S or not others_move[i] or events[i] > BACKLOG_EVENTS]
            if not waiting:
                self.held = sorted(over)
                return
            # wait for a call to finish, at most until a range may turn held back
            soon = min(now - quiet[i] + HOLD_S for i in waiting) if any(quiet[i] < HOLD_S for i in waiting) \
                else now + HOLD_S
            done = self._first_done(None if soon <= now else soon - now)
            if done is not None:
                self._settle(done)

    def drain(self) -> None:
        """Wait until every part sent is applied (or raise what stopped one)."""
        while self.inflight:
            self._settle(self._first_done())

    def _range(self, shard: int, shards: int) -> tuple[int, int]:
        R = (1 << self.p) // shards
        return shard * R, (shard + 1) * R

    def _call(self, shard: int, part: Batch, batch_id: str, keep_s: float, since: float,
              rng: tuple[int, int]) -> None:
        pending = self.runtime.call(self.shards[shard], "ingest", part, batch_id, keep_s, *rng)
        self.inflight[pending] = (part, batch_id, keep_s, since, rng, shard, time.monotonic())
        self.batches += 1

    def _first_done(self, limit: float | None = None):
        """The first pending call to finish; None if none did within ``limit`` seconds; ``ShardUnavailable``
        when the oldest part's deadline passed first."""
        oldest = min(v[3] for v in self.inflight.values())
        left = self.deadline_s - (time.monotonic() - oldest)
        wait = left if limit is None else min(left, limit)
        ready, _ = self.runtime.wait(list(self.inflight), max(0.0, wait), num_returns=1)
        if ready:
            return ready[0]
        if limit is not None and limit < left:
            return None
        for pending in self.inflight:
            self.runtime.cancel(pending)
        self.inflight.clear()
        raise ShardUnavailable(f"a shard did not take its part of a batch within {self.deadline_s:g} s")

    def _settle(self, pending) -> None:
        part, batch_id, keep_s, since, rng, shard, _ = self.inflight.pop(pending)
        while True:
            try:
                _, seq = self.runtime.result(pending, 0)
                self.positions[shard] = max(seq, self.positions.get(shard, 0))
                self._done_at[shard] = time.monotonic()
                return
            except (ShardMoved, ShardUnavailable) as e:
                # a shard gone for good is one a re-sharding retired: re-route like ShardMoved
                if time.monotonic() - since > self.deadline_s:
                    raise ShardUnavailable(f"a part of a batch found no shard to take it within "
                                           f"{self.deadline_s:g} s ({e})") from None
            # the map is changing: wait for the new one (or for the old shard to
            # take batches again, if the re-sharding was rolled back), then cut the
            # part again for the map now known: it may have been cut for an older one
            time.sleep(0.2)
            epoch, shards = self.route()
            if epoch != self.epoch:
                self.epoch, self.shards = epoch, shards
                self.positions = {}  # positions are per layout
            subs = []  # (shard, piece, its share of the part's range)
            for i, sub in enumerate(part.split(self.p, len(self.shards))):
                lo, hi = self._range(i, len(self.shards))
                share = (max(lo, rng[0]), min(hi, rng[1]))
                if len(sub) and share[0] < share[1]:
                    subs.append((i, sub, share))
            if not subs:
                return  # the part held no events (it was only a claim on its range)
            for i, sub, share in subs[1:]:
                self._call(i, sub.compact(), batch_id, keep_s, since, share)
            shard, part, rng = subs[0]
            pending = self.runtime.call(self.shards[shard], "ingest", part, batch_id, keep_s, *rng)
            self.runtime.wait([pending], max(0.0, self.deadline_s - (time.monotonic() - since)))
