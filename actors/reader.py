"""A reader: a copy of one register range that answers questions, following its writer.

A register range has one writer (``actors.shard.ShardActor``), which alone
logs, applies, maintains and checkpoints, and any number of readers, which
only answer questions.  A reader never writes to the store and never calls
its writer; it builds its copy from what the writer leaves on the store
(``durable.journal``) and from what the writer tells it:

* **Start.** Load the newest checkpoint that verifies (its nodes, with the
  sealed files mapped from the same local copies the writer maps), then
  replay the log entries after it, exactly as the writer's own recovery does.
* **Follow.** After each log entry is durable the writer sends it to its
  readers (``logged(seq, incarnation, batch)``, a message it never waits
  for) before it answers the sender.  A reader applies entry ``seq`` when it
  holds ``seq - 1``; an entry it already holds is ignored; a gap (a message
  lost while the reader restarted, or sent before it existed) is filled from
  the log on the store, which holds every acknowledged entry.
* **Sorted runs.** Each time the writer flushes its memtable it sends the
  sorted runs it made from log positions ``(after, through]``
  (``flushed``), with the names of their key ids.  A reader that holds
  those positions unflushed, under the same key ids, takes the runs in
  place of its own entries and never sorts them: following costs a reader
  the append of each entry, not the sort.  Any other case (runs that came
  early wait for their entries; a reader that flushed past ``after``
  itself, a different key id, an older writer instance) is skipped, and the
  reader sorts its own entries when its memtable reaches ``FOLLOW_FLUSH``
  times the writer's, or when its writer has been quiet for ``QUIET_SORT_S``:
  the runs are a saving, never needed for an answer.
* **Checkpoints.** The writer tells its readers of each manifest
  (``checkpointed(number)``, on the reader's upkeep thread); a reader then
  builds a new store from it (nodes it already loaded are shared, being
  immutable; only new objects are read) and replays the log after it, all
  without the lock, while the writer's messages keep the current copy
  following; then, under the lock, it replays what was logged meanwhile
  and switches to the new copy whole: its own copy never runs rollups or
  sealing, it takes the writer's.  A switch that takes a second never
  holds up a message or a question (it did, when the switch held the lock
  throughout: every question needing a fresh entry answered ``Behind``).
* **A new writer instance.** A message from a newer incarnation of the
  writer for an entry the reader already holds means the older instance was
  superseded (``durable.journal``, fencing): the reader rebuilds from the
  store, where the superseded entries are not replayed.
* **Catching up without messages.** ``maintain()`` (from the coordinator's
  upkeep) reads the store when no message came for ``POLL_S`` or a gap was
  seen: so a reader whose writer is down still gets every entry a new
  writer instance logs, and a reader never depends on messages arriving.

Everything that changes the reader's copy (the writer's messages on its
call thread, in order; ``maintain`` and the end of a switch on its upkeep
thread) runs under one lock, one at a time, and never waits for anything
else while holding it; questions run on threads of their own and read the
published view (``ShardStore.view``), so they never wait for a catch-up or
a switch.  A
reader that cannot load the store stays *unavailable* (it says why) and
tries again; it never answers from a copy it could not build.

Where an asker must read its own writes, it passes the log position its
writer acknowledged (``ShardBase.ask``).  A reader that does not hold it
within ``FRESH_STORE_S`` reads the log on the store for it (an acknowledged
entry is always there: a writer killed after sending its answer may never
have sent its message, and until a new instance writes again nothing else
would tell the reader; a question reads the log only, never builds from a
checkpoint); one that still does not hold it within ``FRESH_WAIT_S``
answers ``Behind`` and the asker asks another copy, and asks it again
while no copy of the range has answered (``actors.questions``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from impressions.durable.journal import CorruptObject, ShardJournal
from impressions.sketch.store import ShardStore, SketchConfig

from .base import Behind, ShardBase
from .telemetry import Telemetry

log = logging.getLogger("impressions.reader")

FRESH_WAIT_S = 0.5  # how long a question waits for the log position its asker needs (messages take ~1 ms)
FRESH_STORE_S = 0.05  # a question still without it after this reads the log on the store for it
POLL_S = 5.0  # without a message for this long, ``maintain`` looks at the store itself
RETRY_START_S = 10.0  # how often an unavailable reader tries to start again
FOLLOW_FLUSH = 4  # a reader sorts its own entries at this many times the writer's memtable (runs missed)
PENDING_RUNS = 16  # runs that came before their entries, kept at most
QUIET_SORT_S = 2.0  # a writer quiet this long sends no runs: the reader sorts what it holds itself


class Followers:
    """Where a writer tells its readers of its log and checkpoints: here, nowhere (a range without readers).
    The runtime gives a writer the real one (``LocalFollowers``, ``cluster.bootstrap.RayFollowers``)."""

    active = False  # whether anyone is told (a writer prepares what it sends only then)

    def logged(self, seq: int, incarnation: int, rb) -> None:
        """Log entry ``seq`` (Arrow record batch ``rb``) is durable."""

    def flushed(self, after: int, through: int, incarnation: int, runs, key_ids, key_names) -> None:
        """The events of log positions ``(after, through]`` were sorted into ``runs`` (``(table, leaves,
        cuts)``: leaf ``leaves[i]``'s run is rows ``cuts[i]:cuts[i + 1]`` of the table) whose key ids
        ``key_ids`` are named ``key_names``."""

    def checkpointed(self, number: int) -> None:
        """Manifest ``number`` is written."""


def _pieces(joined, leaves, cuts) -> list:
    """The writer's runs as sent (one table, leaf ``leaves[i]`` in rows ``cuts[i]:cuts[i + 1]``), a run a leaf,
    in arrays of this process's own: as sent they are views of Ray's object store, which the runs would keep
    pinned there for as long as they live."""
    joined = joined.copy()
    return [(int(j), joined.slice(int(a), int(b))) for j, a, b in zip(leaves, cuts[:-1], cuts[1:])]


def _incarnation(name: str) -> int:
    """The writer incarnation that wrote log entry ``name`` (``<seq>-<incarnation>-<sha>.arrow``)."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) == 3 else 0


class ShardReader(ShardBase):
    """Reader ``replica`` of shard ``shard`` of ``shards``, following the objects of ``storage``."""

    def __init__(self, sketch: SketchConfig, shard: int, shards: int, storage, block_cache_mb: float = 256.0,
                 replica: int = 0, telemetry: Telemetry | None = None, question_hosts=None):
        if storage is None:
            raise ValueError("a reader follows its writer through the store: it needs storage")
        self.sketch, self.shard_index, self.shards, self.replica = sketch, shard, shards, replica
        self.storage = storage
        self.telemetry = telemetry or Telemetry()
        self._set_up_process(block_cache_mb)
        self.journal = ShardJournal(storage.objects(), storage.folder, shard)  # read only: never begin()
        self.store = ShardStore(sketch, shard, shards)
        self.started = time.time()
        self.seq = 0  # the last log entry held
        self.incarnation = 0  # the writer incarnation that wrote it
        self.manifest = 0  # the checkpoint the copy was built from
        self._nodes: dict = {}  # (object, sealed file) -> node loaded for the current manifest (immutable)
        self._keys: dict = {}  # key chunk object -> its table
        self._held = threading.Condition()  # notified when ``seq`` moves
        self._changing = threading.RLock()  # held by whatever changes the copy (see the module text)
        self._heard = 0.0  # when the writer last told this reader something
        self._gap = False
        self.counts = {"followed": 0, "from_store": 0, "switches": 0, "rebuilds": 0, "ignored": 0,
                       "runs_taken": 0, "runs_skipped": 0, "asked_for": 0}
        self._runs: deque = deque()  # runs from the writer waiting for their log entries
        self.unavailable: str | None = "starting"
        self._tried = 0.0
        if question_hosts:  # before the copy is built: a question meanwhile is answered "unavailable", at once
            self._open_port(question_hosts)
        self._start()

    # ------------------------------------------------------------ building the copy
    def _start(self) -> None:
        self._tried = time.time()
        try:
            self._rebuild()
            self.unavailable = None
        except Exception as e:  # noqa: BLE001 - whatever stops a start is reported, and retried
            self.unavailable = f"{type(e).__name__}: {e}"
            log.error("reader %d of shard %d cannot start: %s", self.replica, self.shard_index, self.unavailable)

    def _rebuild(self, number: int | None = None) -> None:
        """Build the copy from manifest ``number`` (default: the newest that loads) and the log after it,
        then switch to it whole (the caller holds ``_changing``, or nothing else runs yet)."""
        self._publish(*self._build(number), switch=number is not None)

    def _build(self, number: int | None = None) -> tuple:
        """A copy from manifest ``number`` (default: the newest that loads) and the log after it:
        ``(store, body, seq, incarnation)``.  It reads the store and touches nothing a question or a message
        reads, so a switch builds it without the lock (see the module text)."""
        numbers = [n for n in self.journal.manifests() if number is None or n <= number]
        got = self._newest_checkpoint(numbers, lambda b: self._store_of(b, self._cached_node), [])
        body, store = (None, ShardStore(self.sketch, self.shard_index, self.shards)) if got is None else got[1:]
        seq = body["log_seq"] if body else 0
        incarnation = int(body.get("incarnation", 0)) if body else 0
        return (store, body, *self._replay(store, seq, incarnation))

    def _replay(self, store: ShardStore, seq: int, incarnation: int) -> tuple[int, int]:
        """Apply to ``store`` the log entries on the store that follow ``seq`` one after another; returns the
        last held and its incarnation.  A gap (entries collected because a newer checkpoint holds them) ends
        the replay and is noted (``_gap``): only a copy built from that checkpoint can go further, which
        ``maintain`` switches to."""
        for s, name in self.journal.log_entries(seq):
            if s != seq + 1:
                self._gap = True
                break
            self._apply_entry(store, self.journal.read_log(name), s)
            seq, incarnation = s, _incarnation(name)
            self.counts["from_store"] += 1
        return seq, incarnation

    def _publish(self, store: ShardStore, body: dict | None, seq: int, incarnation: int, switch: bool) -> None:
        """Make a built copy the one questions read (under ``_changing``)."""
        keep = {self._node_key(e) for e in body["nodes"]} if body else set()
        self._nodes = {k: v for k, v in self._nodes.items() if k in keep}  # what the new copy no longer needs
        chunks = {e["object"] for e in body.get("keys", [])} if body else set()
        self._keys = {k: v for k, v in self._keys.items() if k in chunks}
        store.flush_rows = 1 << 62  # never of itself: the writer's runs come, else ``_sort_own``
        self.store, self.manifest = store, (body or {}).get("number", 0)
        self.counts["switches" if switch else "rebuilds"] += 1
        self._moved(seq, incarnation)

    def _switch(self, number: int) -> None:
        """Switch to a copy built from manifest ``number`` (or the newest before it that loads).  The build
        reads the store without the lock, while messages and questions go on with the current copy; under
        the lock it takes the log entries logged meanwhile (every one the current copy holds is on the store
        before the writer sends it) and is published, unless the current copy is further on."""
        store, body, seq, incarnation = self._build(number)
        with self._changing:
            if (body or {}).get("number", 0) <= self.manifest:
                return  # another switch (or a rebuild) went as far meanwhile
            seq, incarnation = self._replay(store, seq, incarnation)
            if seq < self.seq:
                return  # the log it needs was collected meanwhile: the next round builds from a newer checkpoint
            self._publish(store, body, seq, incarnation, switch=True)

    @staticmethod
    def _node_key(entry: dict) -> tuple:
        return entry.get("object"), entry.get("sealed"), entry["role"], entry["level"], entry["node"]

    def _cached_node(self, entry: dict, store: ShardStore):
        k = self._node_key(entry)
        node = self._nodes.get(k)
        if node is None:
            node = self._nodes[k] = self._load_node(entry, store)
        return node

    def _key_chunk(self, name: str):
        table = self._keys.get(name)
        if table is None:
            table = self._keys[name] = self.journal.read_keys(name)
        return table

    def _moved(self, seq: int, incarnation: int) -> None:
        with self._held:
            self.seq, self.incarnation = seq, incarnation
            self._held.notify_all()
        self._take_runs()
        self._sort_own()

    def _take_runs(self) -> None:
        """Take the writer's runs whose log positions this copy now holds (see the module text)."""
        while self._runs and self._runs[0][1] <= self.seq:
            after, through, incarnation, runs, key_ids, key_names = self._runs.popleft()
            names = self.store.keys.names
            # runs of a newer writer instance stand for the log as it is on the store: they replace whatever
            # this copy holds at those positions (an older instance's entries too, see fencing)
            same = incarnation >= self.incarnation and all(
                i < len(names) and names[i] == n for i, n in zip(np.asarray(key_ids).tolist(), key_names))
            taken = same and self.store.take_runs(after, through, _pieces(*runs))
            self.counts["runs_taken" if taken else "runs_skipped"] += 1

    def _sort_own(self) -> None:
        """Runs missed: past ``FOLLOW_FLUSH`` times the writer's memtable, sort the entries held, all but the
        newest (whose runs may be on their way)."""
        if len(self.store.memtable) > FOLLOW_FLUSH * self.sketch.memtable_rows:
            self.store.flush_through(self.seq - 1)

    def _catch_up(self) -> None:
        """Read what the store holds beyond this copy: a newer checkpoint (switched to, see ``_switch``), else
        the log after ``seq``.  Takes ``_changing`` itself; never called holding it."""
        numbers = self.journal.manifests()
        if numbers and numbers[-1] > self.manifest:
            self._switch(numbers[-1])
            return
        with self._changing:
            self._follow_log()

    def _follow_log(self) -> None:
        """Apply the log entries on the store after ``seq`` (under ``_changing``): what the writer's messages
        did not bring."""
        if self.unavailable is not None:
            return
        self._gap = False
        seq, incarnation = self._replay(self.store, self.seq, self.incarnation)
        if seq != self.seq:
            self._moved(seq, incarnation)

    # ------------------------------------------------------------ what the writer tells
    def logged(self, seq: int, incarnation: int, rb) -> int:
        """Log entry ``seq`` of writer incarnation ``incarnation`` is durable (see the module text)."""
        self._heard = time.monotonic()
        with self._changing:
            return self._logged(int(seq), int(incarnation), rb)

    def _logged(self, seq: int, incarnation: int, rb) -> int:
        if self.unavailable is not None:
            return self.seq
        if incarnation > self.incarnation and seq <= self.seq:
            self._rebuild()  # a newer writer instance re-wrote entries an older one had sent: the store decides
        elif seq <= self.seq or incarnation < self.incarnation:
            self.counts["ignored"] += 1
        elif seq == self.seq + 1:
            self._apply_entry(self.store, rb, seq)
            self.counts["followed"] += 1
            self._moved(seq, incarnation)
        else:  # a gap: fill it from the log on the store (a switch, if it needs one, is left to ``maintain``)
            self._follow_log()
            self._gap = self._gap or self.seq < seq
        return self.seq

    def flushed(self, after: int, through: int, incarnation: int, runs, key_ids, key_names) -> int:
        """The writer sorted log positions ``(after, through]`` into ``runs`` (see the module text)."""
        with self._changing:
            if self.unavailable is None:
                self._runs.append((int(after), int(through), int(incarnation), runs, key_ids, key_names))
                while len(self._runs) > PENDING_RUNS:
                    self._runs.popleft()
                    self.counts["runs_skipped"] += 1
                self._take_runs()
            return self.seq

    def checkpointed(self, number: int) -> int:
        """Manifest ``number`` is on the store: switch to a copy built from it (on the upkeep thread, beside
        the messages that keep the current copy following; see ``_switch``)."""
        self._heard = time.monotonic()
        if self.unavailable is None and int(number) > self.manifest:
            self._switch(int(number))
        return self.manifest

    def maintain(self, now: float | None = None, max_seconds: float | None = None) -> bool:
        """Catch up from the store when the writer has been quiet for ``POLL_S`` or a gap was seen, and drop
        what ``now`` puts beyond the retention (the writer does the same in its upkeep round, on the same
        clock; a copy rebuilt from an older checkpoint drops it again here); an unavailable reader tries to
        start again."""
        with self._changing:
            if not self._maintain(now):
                return False
        if self._gap or time.monotonic() - self._heard >= POLL_S:
            try:
                self._catch_up()
            except (OSError, CorruptObject) as e:  # the store is away: answer from what is held, try later
                log.warning("reader %d of shard %d could not read the store: %s", self.replica, self.shard_index, e)
            self._heard = time.monotonic()
        return True

    def _maintain(self, now: float | None) -> bool:
        if self.unavailable is not None:
            if time.time() - self._tried >= RETRY_START_S:
                self._start()
            return False
        if time.monotonic() - self._heard >= QUIET_SORT_S:
            self.store.flush()  # the writer quiet: no runs are coming for what is held
        else:
            self._sort_own()  # else its runs come (its upkeep round flushes), unless missed
        if now is not None:
            self.store.expire(now)
        return True

    # ------------------------------------------------------------ questions
    def _holds(self, after: int, seconds: float) -> bool:
        with self._held:
            return self._held.wait_for(lambda: self.seq >= after, max(0.0, seconds))

    def _wait_for(self, after: int) -> None:
        """Hold log entry ``after`` before answering: from the writer's message, which comes within a
        millisecond or two; else (the message lost, as with a writer killed between sending it and its
        process dying, or one still on its way behind a long apply) from the log on the store, which holds
        every entry a sender was told of; else, by ``FRESH_WAIT_S``, answer ``Behind``."""
        deadline = time.monotonic() + FRESH_WAIT_S
        if self._holds(after, FRESH_STORE_S):
            return
        # whatever changes the copy takes this lock; a question waits for it no longer than it would have
        # waited for the entry (a rebuild in progress answers for itself: it reads the store too)
        if self._changing.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                if self.seq < after and self.unavailable is None:
                    self.counts["asked_for"] += 1
                    self._follow_log()  # the log only: a switch to a checkpoint is never a question's to make
            except (OSError, CorruptObject) as e:  # the store is away: another copy may answer
                log.warning("reader %d of shard %d could not read the store: %s", self.replica, self.shard_index, e)
            finally:
                self._changing.release()
        if not self._holds(after, deadline - time.monotonic()):
            raise Behind(f"reader {self.replica} of shard {self.shard_index} holds the log up to entry "
                         f"{self.seq}, not {after}")

    def health(self) -> dict:
        return {"shard": self.shard_index, "shards": self.shards, "replica": self.replica,
                "available": self.unavailable is None, "reason": self.unavailable, "log_seq": self.seq,
                "manifest": self.manifest, **self._port_health()}

    def stats(self) -> dict:
        out = {**self.health(), "role": "reader", **self._process_stats(), "incarnation": self.incarnation,
               **self.counts, **self._port_stats()}
        return {**out, **self.store.stats()}
