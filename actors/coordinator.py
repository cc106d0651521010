"""The coordinator: the shard map, query fan-out, answer merging, upkeep, re-sharding.

It holds no sketch data.  A query goes to every shard at once; each answers
with its register-value histograms (``K x 52`` integers for K keys), which
are summed and estimated here (``sketch.answer``), so what crosses the
network per key is a few hundred bytes whatever the sketch size.  A shard
that does not answer within ``query_timeout_s`` is left out and the answer
is flagged partial, with the wider error that implies; the query never hangs.

It also drives upkeep: every ``maintain_interval_s`` a background thread
asks each shard for a bounded slice of work (folding runs, building rollups, sealing; on the shard's
upkeep thread, beside its applies), and every ``checkpoint_interval_s`` for
a checkpoint.  It starts
``readers`` readers per register range (``actors.reader``) and, in each
upkeep round, gives them a catch-up slice and publishes in the map those
that answer (``read_route``, for the askers).  It keeps the
cluster's layout on the store (``durable.layout``), so a restarted cluster
finds its shards' data, and it re-shards on request.

It is a plain class.  How shards are created, called and stopped comes from
a *runtime* (``actors.runtime``): Ray actors on a cluster
(``cluster.bootstrap``), objects of this process in the unit tests.  Its
configuration is any object with the fields it reads (``sketch``,
``shards``, ``storage``, ``s3_endpoint``, the timeouts and intervals) and a
``replace(**changes)`` method; the cluster passes its ``ClusterConfig``.

Concurrency without locks: the coordinator's calls may run on many threads
at once (Ray's ``max_concurrency``).  Its state is one immutable snapshot
(configuration and shard map), replaced by a single assignment and read once
per call, so no call ever sees it half changed (the two writers of the map,
upkeep and a re-sharding, replace it under one short lock that guards
nothing else and is held for no call).  It never waits on anything
that waits on it (shards never call the coordinator), so nothing here can
deadlock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import numpy as np

from impressions.durable.journal import ShardJournal
from impressions.durable.layout import (
    Layout,
    clear_intent,
    drop_folder,
    read_intent,
    read_layout,
    write_intent,
    write_layout,
)
from impressions.durable.objects import ObjectStore
from impressions.sketch.hll import RegisterRange, check_shards
from impressions.sketch.reshard import sources_of
from impressions.sketch.timeindex import BucketRange

from .questions import Questions, ShardMap, range_answers
from .runtime import Runtime, gather
from .telemetry import Telemetry

log = logging.getLogger("impressions.coordinator")

START_TIMEOUT_S = 120.0  # how long start() waits for shards to answer before going on without them
RESCALE_TIMEOUT_S = 600.0  # how long a re-sharding waits for the new shards (they load whole states)
AUTO_READERS = 2  # readers per range when the configuration leaves it to the room the cluster has
READER_MISSES = 3  # upkeep rounds a published reader may miss its health call before it is unpublished
UPKEEP_SLICE_S = 0.2  # the work a shard's upkeep does a round before it stops between units (beside its applies)
CALL_TIMEOUT_S = 600.0  # the longest any other call waits for a shard (a whole maintenance, a checkpoint)
SERIES_CHUNK = 64  # points per shard call of a series: no single call holds a shard for long
KEYS_FACTOR = 4  # candidates per shard for a top-keys list: KEYS_FACTOR x the keys asked for


class RescaleFailed(RuntimeError):
    """A re-sharding failed and was rolled back: the old shards serve on."""


class Coordinator(Questions):
    def __init__(self, config, runtime: Runtime, telemetry: Telemetry | None = None):
        self.config = config
        self.runtime = runtime
        self.telemetry = telemetry or Telemetry()
        self._asking: set = set()  # the questions being answered (set.add and discard are atomic)
        self.map: ShardMap | None = None
        self.layout: Layout | None = None
        self._readers: tuple = ()  # per register range, every reader started (``map.readers``: those that answer)
        self._reader_upkeep: dict = {}  # reader -> its catch-up call still out
        self._misses: dict = {}  # reader -> upkeep rounds in a row it did not answer its health call
        self._ports: dict = {}  # writer or reader -> (its port's ident, ``actors.wire.Address``) as last asked
        self._suspects: dict = {}
        self._ports_down: dict = {}
        self._map_lock = threading.Lock()  # the map is replaced whole, by upkeep (readers) or a re-sharding
        self._maint: threading.Thread | None = None
        self._starting = threading.Lock()  # start runs once, even when the first calls come at once
        self._rescaling = threading.Lock()  # an atomic test-and-set: one re-sharding at a time, never waited on
        self.queries = 0
        self.events: list[str] = []

    def _note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {text}")
        del self.events[:-100]

    def _objects(self) -> ObjectStore | None:
        return ObjectStore(self.config.storage, self.config.s3_endpoint) if self.config.storage else None

    def _now(self) -> float:
        """This machine's clock, moved by ``clock_offset_s`` (drills and tests)."""
        return time.time() + float(getattr(self.config, "clock_offset_s", 0.0))

    def _ensure(self) -> ShardMap:
        if self.map is None:  # first call, or first after a restart
            self.start()
        return self.map

    def start(self) -> int:
        """Settle a re-sharding a crash interrupted, adopt the layout recorded
        on the store (or record this one), create or find the shards, and start
        the maintenance thread.  Shards that do not answer within
        ``START_TIMEOUT_S`` are left to come up later (their ranges are
        missing from answers until then)."""
        with self._starting:
            if self.map is None:
                self._start()
        if self._maint is None:
            self._maint = threading.Thread(target=self._maintain_loop, name="maintain", daemon=True)
            self._maint.start()
        return len(self.map.handles)

    def _start(self) -> None:
        objects = self._objects()
        rolled_back = False
        if objects is not None:
            rolled_back = self._settle_intent(objects)
            layout = read_layout(objects)
            if layout is None:
                layout = Layout.new(self.config.shards, self.config.sketch)
                write_layout(objects, layout)
            else:
                if not layout.cluster_id:  # a layout from before cluster ids: give it one
                    layout = Layout(layout.shards, layout.sketch, layout.epoch, Layout.new(1, layout.sketch).cluster_id,
                                    layout.folder)
                    write_layout(objects, layout)
                if layout.sketch != self.config.sketch or layout.shards != self.config.shards:
                    self._note(f"adopted the layout on the store: {layout.shards} shards")
        else:
            layout = Layout.new(self.config.shards, self.config.sketch)
        self.config = self.config.replace(shards=layout.shards, sketch=layout.sketch)
        self.layout = layout
        rt = self.runtime
        handles = tuple(rt.create_shard(i, layout, []) for i in range(layout.shards))
        answers = gather(rt, [rt.call(h, "unseal" if rolled_back else "ping") for h in handles], START_TIMEOUT_S)
        missing = [i for i, (h, a) in enumerate(zip(handles, answers)) if a is None and not rolled_back]
        if missing:
            self._note(f"shards {missing} did not answer within {START_TIMEOUT_S:g} s of start")
        self._readers = self._create_readers(layout, handles)
        self.map = ShardMap(handles, RegisterRange(layout.sketch.p, layout.shards), layout.epoch)

    def _create_readers(self, layout: Layout, writers: tuple) -> tuple:
        """Start (or find) ``config.readers`` readers per register range; they join the map (``readers``)
        once they answer.  None without storage: readers follow their writer through the store.

        Reader ``r`` of range ``i`` is placed near the writer of range ``i + 1 + r`` (a node that holds
        shards anyway, and not its own writer's when there are others): a writer's node lost takes its
        readers elsewhere with it, never its own range's, and a node left with no writer (scaled in) is
        left with no reader either, so an autoscaler can take it back."""
        if not self.config.storage or not getattr(self.runtime, "readers", False):
            return ()
        rt, S = self.runtime, layout.shards
        n = getattr(self.config, "readers", 0)
        if n is None:  # room: a reader for each CPU a range has beyond its writer's, at most AUTO_READERS
            n = max(0, min(AUTO_READERS, int(rt.cpus() // S) - 1))
        if n <= 0:
            return ()
        nodes = gather(rt, [rt.call(h, "node") for h in writers], self.config.query_timeout_s * 5)
        return tuple(tuple(rt.create_reader(i, r, layout, nodes[(i + 1 + r) % S]) for r in range(n))
                     for i in range(S))

    def watch_readers(self) -> list[int]:
        """One round of ``_watch_readers`` now (upkeep does it every round); returns the readers
        answering per register range."""
        self._watch_copies(self._ensure())
        return [len(r) for r in self.map.readers]

    def _watch_copies(self, m: ShardMap) -> None:
        """Publish the readers that answer, and where every copy answers on a port of its own."""
        self._watch_readers(m)
        if getattr(self.config, "question_ports", True):
            self._watch_writer_ports(self.map)  # the map as the readers' round left it

    def _watch_readers(self, m: ShardMap) -> None:
        """Give every reader a catch-up slice (unless its last one is still running) and publish, in the map,
        the readers that answer and serve."""
        rt, rs = self.runtime, self._readers
        if not rs:
            return
        flat = [(i, h) for i, hs in enumerate(rs) for h in hs]
        for _, h in flat:
            p = self._reader_upkeep.get(h)
            if p is None or rt.wait([p], 0)[0]:
                if p is not None:
                    _failed(rt, p)  # its outcome read, so that an error is not left unread
                self._reader_upkeep[h] = rt.call(h, "maintain", self._now())
        health = gather(rt, [rt.call(h, "health") for _, h in flat], self.config.query_timeout_s)
        published = {h for hs in m.readers for h in hs}
        live: list[list] = [[] for _ in rs]
        for (i, h), a in zip(flat, health):
            # a published reader that does not answer (a saturated node, or gone) stays for READER_MISSES rounds,
            # askers passing it by meanwhile (``SUSPECT_S``); one that says it cannot serve leaves at once
            self._misses[h] = 0 if a is not None else self._misses.get(h, 0) + 1
            if (a is not None and a.get("available")) or (a is None and h in published
                                                          and self._misses[h] < READER_MISSES):
                live[i].append(h)
        self._look_up_ports(flat, health)
        readers = tuple(tuple(x) for x in live)
        ports = tuple(tuple(self._ports.get(h, (None, None))[1] for h in x) for x in live)
        with self._map_lock:
            if self.map is m and (m.readers != readers or m.ports != ports):
                self.map = dataclasses.replace(m, readers=readers, ports=ports)
                if m.readers != readers:
                    self._note(f"readers answering per range: {[len(x) for x in readers]}")

    def _watch_writer_ports(self, m: ShardMap) -> None:
        """Publish where each writer answers on a port of its own (``actors.wire``): a writer restarted by Ray
        listens on a new one, named by its ``health``."""
        rt = self.runtime
        flat = list(enumerate(m.handles))
        health = gather(rt, [rt.call(h, "health") for _, h in flat], self.config.query_timeout_s)
        self._look_up_ports(flat, health)
        # a writer that did not answer is asked through Ray (its port may be on a node that is gone, where a
        # connection would only time out) until it answers again
        ports = tuple(self._ports.get(h, (None, None))[1] if a is not None else None
                      for h, a in zip(m.handles, health))
        with self._map_lock:
            if self.map is m and m.writer_ports != ports:
                self.map = dataclasses.replace(m, writer_ports=ports)

    def _look_up_ports(self, flat: list, health: list) -> None:
        """Where each copy of ``flat`` answers questions (``actors.wire``): asked of a copy whose port ``health``
        names differently from the one known (started, or restarted with a new port); forgotten for one
        without."""
        rt = self.runtime
        ask = [h for (_, h), a in zip(flat, health)
               if a is not None and a.get("port") and self._ports.get(h, (None,))[0] != a["port"]]
        for (_, h), a in zip(flat, health):
            if a is not None and not a.get("port"):
                self._ports.pop(h, None)
        for h, addr in zip(ask, gather(rt, [rt.call(h, "question_address") for h in ask],
                                       self.config.query_timeout_s)):
            if addr is not None:
                self._ports[h] = (addr.ident, addr)
            else:  # not told: asked through Ray until it is
                self._ports.pop(h, None)

    def _settle_intent(self, objects: ObjectStore) -> bool:
        """A re-sharding interrupted by a crash: finished if the layout was
        switched (the old shards go), else rolled back (the new ones go, the old
        ones take batches again).  Returns True when it rolled one back."""
        intent = read_intent(objects)
        if intent is None:
            return False
        old, new = intent["from"], intent["to"]
        current = read_layout(objects)
        switched = current is not None and current.epoch == new.epoch
        gone, kept = (old, new) if switched else (new, old)
        for i in range(gone.shards):
            h = self.runtime.find_shard(i, gone)
            if h is not None:
                self.runtime.kill(h)
            for r in range(reader_slots(self.config)):
                h = self.runtime.find_reader(i, r, gone) if getattr(self.runtime, "readers", False) else None
                if h is not None:
                    self.runtime.kill(h)
        drop_folder(objects, gone.folder)
        if not switched:  # the old layout serves on: it must take batches again, even if no shard of it runs now
            for i in range(old.shards):
                ShardJournal(objects, old.folder, i).unseal()
        clear_intent(objects)
        verb = "finished" if switched else "rolled back"
        self._note(f"an interrupted re-sharding {old.shards} -> {new.shards} (epoch {new.epoch}) was {verb}")
        log.warning("an interrupted re-sharding %d -> %d was %s", old.shards, new.shards, verb)
        return not switched

    def pid(self) -> int:
        return os.getpid()

    def cluster_config(self):
        """The configuration every driver works with (the layout adopted from the store)."""
        self._ensure()
        return self.config

    def shard_handles(self) -> list:
        return list(self._ensure().handles)

    def route(self) -> tuple[int, list]:
        """(epoch, shard handles): what a sender needs to route batches."""
        m = self._ensure()
        return m.epoch, list(m.handles)

    def read_route(self) -> tuple[int, list, list, list, list]:
        """(epoch, writers, readers per register range, where each reader answers on a port of its own or
        None, where each writer does or None): what an asker needs (``DirectQuestions``).  The ports' tokens
        are in it: it is for askers inside the cluster, never shown by the REST API."""
        m = self._ensure()
        return (m.epoch, list(m.handles), [list(r) for r in m.readers], [list(p) for p in m.ports],
                list(m.writer_ports))

    def shard_map(self) -> dict:
        m = self._ensure()
        return {"epoch": m.epoch, "shards": [{"shard": i, "registers": list(r)} for i, r in enumerate(m.ranges())]}

    # ------------------------------------------------------------ questions (``Questions``)
    def _shard_map(self, refresh: bool = False) -> ShardMap:
        return self._ensure()

    def series(self, key, rng: BucketRange, step: int) -> list[dict]:
        """One answer per ``step`` buckets of ``rng``: a chart's points, each a
        real range query, in calls of at most ``SERIES_CHUNK`` points a shard."""
        m = self._ensure()
        ranges = [(a, min(a + step, rng.b1)) for a in range(rng.b0, rng.b1, step)]
        w = rng.bucket_seconds
        out = []
        for c in range(0, len(ranges), SERIES_CHUNK):
            chunk = ranges[c:c + SERIES_CHUNK]
            per_shard = self._fan_out(m, "query_ranges", [key], chunk, timeout=self.config.query_timeout_s * 2)
            for i, (a, b) in enumerate(chunk):
                out += range_answers(m, [key], [None if s is None else s[i] for s in per_shard], a * w, b * w)
        self.queries += 1
        return out

    def keys(self, rng: BucketRange, prefix: str = "", limit: int = 20) -> list[dict]:
        """Keys with impressions in ``rng`` whose name starts with ``prefix``,
        the most impressions first (for pickers and top-keys tables).

        Every shard holds every key (a slice of its visitors), with about the
        same share of each key's impressions, so each names its own top
        ``KEYS_FACTOR x limit``; their union's exact totals are then summed."""
        m = self._ensure()
        timeout = self.config.query_timeout_s * 5
        candidates: set[str] = set()
        for part in self._fan_out(m, "key_impressions", rng.b0, rng.b1, prefix, KEYS_FACTOR * limit,
                                  timeout=timeout):
            if part is not None:
                candidates.update(part[0])
        names = sorted(candidates)
        totals = np.zeros(len(names), np.int64)
        for part in self._fan_out(m, "impressions_of", names, rng.b0, rng.b1, timeout=timeout):
            if part is not None:
                totals += part
        top = sorted(zip(names, totals.tolist()), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return [{"key": k, "impressions": n} for k, n in top if n > 0]

    def registers(self, key, rng: BucketRange) -> np.ndarray:
        """The whole dense sketch of ``key`` over ``rng``: all shards' slices, in order."""
        m = self._ensure()
        rt = self.runtime
        return np.concatenate([rt.result(p, CALL_TIMEOUT_S) for p in [rt.call(h, "registers", key, rng.b0, rng.b1)
                                                                      for h in m.handles]])

    # ------------------------------------------------------------ upkeep
    def maintain(self, now: float | None = None) -> None:
        """Flush every shard and run its maintenance to the end (expiring what
        ``now`` puts beyond the retention, when given)."""
        rt = self.runtime
        for p in [rt.call(h, "maintain", now) for h in self._ensure().handles]:
            rt.result(p, CALL_TIMEOUT_S)

    def checkpoint(self) -> list[dict]:
        """Checkpoint every shard now."""
        rt = self.runtime
        return [rt.result(p, CALL_TIMEOUT_S) for p in [rt.call(h, "checkpoint") for h in self._ensure().handles]]

    def stats(self) -> dict:
        m = self._ensure()
        shard_stats = self._fan_out(m, "stats", timeout=self.config.query_timeout_s * 5)
        rt = self.runtime
        flat = [h for hs in self._readers for h in hs]
        reader_stats = gather(rt, [rt.call(h, "stats") for h in flat], self.config.query_timeout_s * 5)
        return {"shards": shard_stats, "readers": reader_stats, "epoch": m.epoch, "queries": self.queries, "config": self.config,
                "events": self.events[-20:]}

    def health(self) -> dict:
        """Cheap readiness: which shards answer and serve, and why not."""
        m = self._ensure()
        got = self._fan_out(m, "health", timeout=self.config.query_timeout_s)
        shards = [{"shard": i, "available": False, "reason": "did not answer in time"} if h is None else h
                  for i, h in enumerate(got)]
        for i, s in enumerate(shards):
            s["readers"] = len(m.readers[i]) if i < len(m.readers) else 0
        return {"epoch": m.epoch, "shards": shards, "answering": sum(1 for h in shards if h["available"])}

    def _maintain_loop(self) -> None:
        last_ckpt = time.time()
        while True:
            # every interval, not back to back when work is left: on a small machine the questions and the
            # applies need the CPU more (a writer's restart drill answered partial with the rounds back to back)
            time.sleep(self.config.maintain_interval_s)
            m = self.map
            if m is None:
                continue
            due = bool(self.config.storage) and time.time() - last_ckpt >= self.config.checkpoint_interval_s
            try:
                self._upkeep(m, checkpoint=due)
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one round; the next retries
                log.warning("upkeep round failed: %s", e, exc_info=True)
                self._note(f"upkeep round failed: {type(e).__name__}: {e}")
            if due:
                last_ckpt = time.time()

    def _upkeep(self, m: ShardMap, checkpoint: bool) -> None:
        """One round: a bounded slice of maintenance on every shard (retention
        enforced on this machine's clock), and a checkpoint when one is due."""
        rt = self.runtime
        maint = [rt.call(h, "maintain", self._now(), UPKEEP_SLICE_S) for h in m.handles]
        self._watch_copies(m)
        rt.wait(maint, CALL_TIMEOUT_S)
        failed = [i for i, p in enumerate(maint) if _failed(rt, p)]
        if checkpoint:
            ckpt = [rt.call(h, "checkpoint") for h in m.handles]
            rt.wait(ckpt, CALL_TIMEOUT_S)
            failed += [i for i, p in enumerate(ckpt) if _failed(rt, p)]
        if failed:
            raise RuntimeError(f"shards {sorted(set(failed))} failed their upkeep (restarting, or see their logs)")

    # ------------------------------------------------------------ re-sharding
    def rescale(self, shards: int) -> dict:
        """Change the number of shards on the live cluster.

        Old shards are sealed (checkpointed; further batches are refused with
        ``ShardMoved`` and senders re-route them), their states exported,
        new shards seeded with register slices and checkpointed, the layout
        on the store switched (one object written), then the shard map.
        Queries use the old shards until the switch and the new ones after;
        no acknowledged batch can be lost, since the old shards stop taking
        batches before their state is exported.  A failure at any step before
        the switch rolls back: the new shards and their objects go, the old
        shards take batches again, and ``RescaleFailed`` says what failed."""
        old = self._ensure()
        check_shards(shards, self.config.sketch.p)
        if shards == len(old.handles):
            return {"shards": shards, "changed": False}
        if not self._rescaling.acquire(blocking=False):
            raise RuntimeError("a re-sharding is already under way")
        try:
            return self._rescale(old, shards)
        finally:
            self._rescaling.release()

    def _rescale(self, old: ShardMap, shards: int) -> dict:
        rt = self.runtime
        t0 = time.perf_counter()
        s_old = len(old.handles)
        old_layout = self.layout
        new_layout = old_layout.next(shards)
        handles = []
        objects = self._objects()
        if objects is not None:  # from here a crash is settled by the next start (see _settle_intent)
            write_intent(objects, old_layout, new_layout)
        try:
            for p in [rt.call(h, "seal") for h in old.handles]:
                rt.result(p, RESCALE_TIMEOUT_S)
            exports = [rt.call(h, "export") for h in old.handles]
            for i in range(shards):
                handles.append(rt.create_shard(i, new_layout, [(j, s_old, exports[j])
                                                               for j in sources_of(i, shards, s_old)]))
            del exports  # the old states: held by the seeding calls until they are done, not by this frame
            for p in [rt.call(h, "ping") for h in handles]:  # behind its seed (one call thread, in order)
                rt.result(p, RESCALE_TIMEOUT_S)
            if objects is not None:  # on the upkeep thread: after the ping, so after the seed
                for p in [rt.call(h, "checkpoint") for h in handles]:
                    rt.result(p, RESCALE_TIMEOUT_S)  # a shard that could not start says why here
        except Exception as e:
            # roll back: the new shards go, the old ones take batches again; nothing was switched
            for h in handles:
                rt.kill(h)
            if objects is not None:
                drop_folder(objects, new_layout.folder)
            unsealed = gather(rt, [rt.call(h, "unseal") for h in old.handles], RESCALE_TIMEOUT_S)
            if objects is not None:
                clear_intent(objects)
            stuck = [i for i, u in enumerate(unsealed) if u is None]
            note = f"re-sharding {s_old} -> {shards} failed and was rolled back: {type(e).__name__}: {e}"
            if stuck:
                note += f" (old shards {stuck} could not be unsealed yet)"
            self._note(note)
            raise RescaleFailed(note) from e
        if objects is not None:
            write_layout(objects, new_layout)  # the switch: one object, written whole
        self.config = self.config.replace(shards=shards)
        self.layout = new_layout
        old_readers, self._readers = self._readers, self._create_readers(new_layout, tuple(handles))
        with self._map_lock:
            self.map = ShardMap(tuple(handles), RegisterRange(self.config.sketch.p, shards), new_layout.epoch)
        for h in list(old.handles) + [h for hs in old_readers for h in hs]:
            rt.kill(h)
            self._reader_upkeep.pop(h, None)
            self._ports.pop(h, None)
        if objects is not None:  # the old layout is superseded
            drop_folder(objects, old_layout.folder)
            clear_intent(objects)
        took = time.perf_counter() - t0
        self._note(f"re-sharded {s_old} -> {shards} in {took:.2f} s")
        return {"shards": shards, "from": s_old, "changed": True, "seconds": round(took, 3),
                "epoch": new_layout.epoch}


def reader_slots(config) -> int:
    """The most readers a range of this configuration may have (names to look for)."""
    n = getattr(config, "readers", 0)
    return AUTO_READERS if n is None else int(n)


def _failed(rt: Runtime, pending) -> bool:
    try:
        rt.result(pending, 0)
        return False
    except Exception:  # noqa: BLE001 - reported by the caller
        return True
