"""What a shard's writer and its readers share: loading a checkpoint, and the questions.

A register range is served by one writer (``actors.shard.ShardActor``: it
logs, applies, maintains and checkpoints) and any number of readers
(``actors.reader.ShardReader``: they follow the writer's log and
checkpoints and answer questions).  Both hold a ``sketch.store.ShardStore``
built the same way from the same objects on the store, and answer the same
questions from its published view, so an answer does not depend on which
one gave it: the registers are the same, up to how far each has read the
log (a reader may trail the writer by the entries in flight to it).

``ask(method, after, *args)`` is how the askers (``actors.questions``)
reach either: it answers ``method`` once this copy holds the writer's log up
to entry ``after`` (an asker's own acknowledged writes, so that it reads
them back); a writer always does, a reader waits a little for its log to
get there, else it says it is ``Behind`` and the asker goes to the next copy.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time

from impressions.durable.journal import CorruptObject, ShardJournal
from impressions.sketch import sealed, simd
from impressions.sketch.arrowio import StateError, nodes_from_batches
from impressions.sketch.events import Batch
from impressions.sketch.store import ShardStore, SketchConfig
from impressions.sketch.tiers import Slot, TableNode

from . import pauses
from .memory import keep_freed_memory
from .runtime import ShardUnavailable
from .telemetry import Telemetry, process_memory


class Behind(ShardUnavailable):
    """A reader has not read the writer's log as far as the asker needs; ask another copy."""


class ShardBase:
    """State every copy of a register range has: ``sketch``, ``shard_index``,
    ``shards``, ``storage``, ``journal``, ``store``, ``telemetry``,
    ``unavailable`` (None when it serves, else why not)."""

    sketch: SketchConfig
    shard_index: int
    shards: int
    storage = None
    journal: ShardJournal | None = None
    store: ShardStore
    telemetry: Telemetry
    unavailable: str | None = None
    seq = 0  # the last log entry this copy holds

    @staticmethod
    def _set_up_process(block_cache_mb: float) -> None:
        """What a copy's process holds for its questions: a block cache of ``block_cache_mb``, and the memory
        a question frees kept for the next (``actors.memory``); the cycle collector's pauses timed
        (``actors.pauses``)."""
        sealed.CACHE.budget = int(block_cache_mb * (1 << 20))
        keep_freed_memory()
        pauses.watch()

    # ------------------------------------------------------------ loading a checkpoint
    def _sealed_header(self) -> dict:
        return dict(self.sketch.identity(), shard=self.shard_index, shards=self.shards)

    def _open_sealed(self, name: str) -> sealed.SealedFile:
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

    def _store_of(self, body: dict, load_node=None) -> ShardStore:
        """The store a manifest describes (its key table first: sealed files hold ids, not names)."""
        store = ShardStore(self.sketch, self.shard_index, self.shards)
        for entry in body.get("keys", []):
            store.keys.load_chunk(self._key_chunk(entry["object"]))
        load_node = load_node or self._load_node
        nodes = [load_node(entry, store) for entry in body["nodes"]]
        store.install(nodes, max_bucket=body["max_bucket"], events=body["events"])
        store.tagged = store.flushed = int(body.get("log_seq", 0))  # its memtable holds the log after that
        return store

    def _key_chunk(self, name: str):
        return self.journal.read_keys(name)

    def _newest_checkpoint(self, numbers: list[int], load, failed: list[str]):
        """``(number, body, load(body))`` of the newest of manifests ``numbers`` that loads whole (each that
        does not is noted in ``failed``); None when there is none; ``CorruptObject`` when none loads."""
        for n in reversed(numbers):
            try:
                body = self.journal.read_manifest(n)
                return n, body, load(body)
            except (CorruptObject, StateError, sealed.SealedError, OSError, KeyError, ValueError) as e:
                failed.append(f"manifest {n}: {e}")
        if numbers:
            raise CorruptObject(f"none of the {len(numbers)} checkpoints of shard {self.shard_index} could be "
                                f"loaded ({'; '.join(failed)})")
        return None

    @staticmethod
    def _apply_entry(store: ShardStore, rb, seq: int) -> Batch:
        """Apply log entry ``seq`` to ``store``; returns it as a batch."""
        b = Batch.from_arrow(rb)
        store.apply(b.key_names, b.key_index, b.bucket, b.coupon, tag=seq)
        return b

    # ------------------------------------------------------------ questions
    def _usable(self) -> None:
        if self.unavailable is not None:
            raise ShardUnavailable(f"shard {self.shard_index} of {self.shards} is unavailable: {self.unavailable}")

    def _wait_for(self, after: int) -> None:
        """Return once this copy holds log entry ``after`` (a writer always does)."""

    def ask(self, method: str, after: int, *args):
        """``method(*args)`` (one of the questions below), answered once this copy holds the writer's log up
        to entry ``after``; a reader that does not get there soon raises ``Behind``."""
        if method not in QUESTIONS:
            raise ValueError(f"{method!r} is not a question a shard answers")
        self._usable()
        if after:
            self._wait_for(int(after))
        return getattr(self, method)(*args)

    # ------------------------------------------------------------ questions on a port of this copy's own
    port = None  # ``actors.wire.QuestionPort`` when this copy answers on one

    def _open_port(self, hosts) -> None:
        """Answer questions on a TCP port of this copy's own too (``actors.wire``), on each of ``hosts`` (a list,
        or a function of none that gives it: run here, in the copy's process).  A port that cannot open is
        logged and done without: askers then ask through Ray."""
        from .wire import QuestionPort
        try:
            hosts = hosts() if callable(hosts) else hosts
            self.port = QuestionPort(self._answer_wire, list(hosts), name=f"shard-{self.shard_index}-questions")
        except OSError as e:
            logging.getLogger("impressions.shard").error("shard %d: no question port (%s); asked through Ray only",
                                                         self.shard_index, e)

    def _answer_wire(self, method: str, after: int, args: list) -> bytes:
        return pickle.dumps(self.ask(method, after, *args), protocol=pickle.HIGHEST_PROTOCOL)

    def question_address(self):
        """Where this copy answers questions (``actors.wire.Address``, its token with it: for the coordinator,
        which publishes it to askers in ``read_route``), or None."""
        return None if self.port is None else self.port.address

    def close_port(self) -> None:
        """Stop answering on the port (before this copy is stopped for good: a process Ray has killed may
        linger a moment, and must not answer meanwhile)."""
        if self.port is not None:
            self.port.close()

    def _port_health(self) -> dict:
        """What ``health`` says of the port: which one it is, never its token."""
        return {"port": self.port.address.ident if self.port is not None and self.port.serving else None}

    def _port_stats(self) -> dict:
        """What ``stats`` says of the port: ``_port_health`` and its counts."""
        return {**self._port_health(), **(self.port.stats() if self.port is not None else {})}

    def ask_packed(self, question: bytes) -> bytes:
        """``ask`` with the question and its answer each packed in one bytes object (``pack_question``,
        ``unpack_answer``): Ray serializes each argument of a call and each array of its answer apart, about
        0.3 ms a question on this machine for six arguments and three arrays, where one bytes object each
        way costs one."""
        method, after, args = pickle.loads(question)
        return pickle.dumps(self.ask(method, after, *args), protocol=pickle.HIGHEST_PROTOCOL)

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

    def key_impressions(self, b0: int, b1: int, prefix: str = "", limit: int | None = None):
        self._usable()
        return self.store.view().key_impressions(b0, b1, prefix, limit)

    def impressions_of(self, keys: list, b0: int, b1: int):
        """Exact impressions on this shard of each of ``keys`` over ``[b0, b1)``."""
        self._usable()
        return self.store.view().query(keys, b0, b1)[2]

    def registers(self, key, b0: int, b1: int):
        self._usable()
        return self.store.view().registers(key, b0, b1)

    def _process_stats(self) -> dict:
        """What a writer's and a reader's stats say of their process: where it runs, its memory, its CPU
        time (all threads), its block cache, the vector kernels its numpy runs (``sketch.simd``) and the
        cycle collector's pauses (``actors.pauses``)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": self.telemetry.node() or socket.gethostname(),
                **process_memory(), "uptime_s": round(time.time() - self.started, 1),
                "cpu_s": round(time.process_time(), 3), **sealed.CACHE.stats(), **simd.stats(),
                **pauses.stats()}

    def ping(self) -> int:
        return self.shard_index

    def node(self) -> str | None:
        """The node this copy runs on, as the runtime names it (None: unknown)."""
        return self.telemetry.node()

    def pid(self) -> int:
        return os.getpid()


def pack_question(method: str, after: int, args: tuple) -> bytes:
    """A question for ``ShardBase.ask_packed``: sent between this cluster's own processes only, as Ray sends
    every call (pickled)."""
    return pickle.dumps((method, int(after), tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)


def unpack_answer(answer: bytes):
    return pickle.loads(answer)


QUESTIONS = frozenset({"query", "query_ranges", "reach", "overlap", "series", "key_impressions", "impressions_of",
                       "registers"})
