"""How the coordinator and the senders reach shards, whatever runs them.

The coordinator and the ingest senders are plain classes: they start calls
on shards and collect the results through a *runtime*, which alone knows
how shards are run.  ``cluster.bootstrap.RayRuntime`` runs each shard as a
Ray actor; ``LocalRuntime`` (here) runs them in this process, each shard's
calls one at a time on a thread of its own, as Ray runs an actor's calls.
The unit tests drive the coordinator (queries, upkeep, re-sharding with a
fault at every step) through ``LocalRuntime``.

A runtime offers:

``create_shard(index, layout, seeds)`` -> handle
    start shard ``index`` of ``layout`` (a ``durable.layout.Layout``: shard
    count, sketch parameters, cluster id, folder), or find it if it already
    runs.  ``seeds`` lists the pending exports of the old shards whose
    registers it takes over, ``[(old index, old count, pending export)]``.
``cpus()`` -> float
    the CPUs of the cluster (how many readers it has room for).
``find_shard(index, layout)`` -> handle or None
    the shard if it runs, never starting one.
``create_reader(index, replica, layout, near)`` -> handle
    start reader ``replica`` of shard ``index`` (``actors.reader``), or find
    it, on node ``near`` if it has room (None: anywhere); a runtime without
    readers (``readers`` False) has none.
``call(handle, method, *args)`` -> pending
    start a call; never blocks.
``wait(pending, timeout, num_returns=None)`` -> (ready, not ready)
    wait until every call (or ``num_returns`` of them) is done, or
    ``timeout`` seconds passed.
``future(pending)`` -> concurrent.futures.Future
    done when the call is (for an event loop to await; its value is still
    taken with ``result``).
``result(pending, timeout)``
    the call's value; raises the shard's own exception (``ShardMoved``,
    ``ValueError``, ...) as it was raised, or ``ShardUnavailable`` when the
    shard is gone or did not answer within ``timeout``.
``cancel(pending)``
    drop a call that is no longer wanted (if it has not started).
``kill(handle, timeout)``
    stop a shard for good; returns once it runs no more of its code (or
    after ``timeout`` seconds), so nothing it was doing can land after.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from typing import Any, Protocol


class ShardUnavailable(RuntimeError):
    """A shard did not answer: it is gone, restarting, or too slow."""


class Runtime(Protocol):
    def create_shard(self, index: int, layout, seeds: list) -> Any: ...

    def find_shard(self, index: int, layout) -> Any | None: ...

    def cancel(self, pending) -> None: ...

    def call(self, handle, method: str, *args) -> Any: ...

    def wait(self, pending: list, timeout: float | None = None,
             num_returns: int | None = None) -> tuple[list, list]: ...

    def future(self, pending) -> cf.Future: ...

    def result(self, pending, timeout: float | None = None) -> Any: ...

    def kill(self, handle, timeout: float = 30.0) -> None: ...


def gather(runtime: Runtime, pending: list, timeout: float | None) -> list:
    """The values of ``pending`` calls, None for each that failed or did not
    answer within ``timeout`` seconds (all waited for at once; the late ones
    are cancelled, so they do not pile up behind a slow shard)."""
    _, late = runtime.wait(pending, timeout)
    for p in late:
        runtime.cancel(p)
    out = []
    for p in pending:
        try:
            out.append(runtime.result(p, 0))
        except Exception:  # noqa: BLE001 - a shard's failure makes its answer missing, never the caller's
            out.append(None)
    return out


# A shard's questions: they read an immutable view of its store (``ShardStore.view``), so they run on
# threads of their own, beside the one that runs applies and every other call in order and the one that
# runs upkeep: a question never waits behind an apply or a maintenance slice, and writes never wait for
# questions.
READ_METHODS = frozenset({"ask", "ask_packed", "question_address", "close_port", "health", "query", "query_ranges",
                          "reach", "overlap", "series", "key_impressions", "impressions_of", "registers"})
READ_THREADS = 2
# Upkeep: on a thread of its own too, beside the applies (``actors.shard``); a reader's switches to its writer's
# checkpoints (``checkpointed``) too, beside the messages that keep its copy following (``actors.reader``)
UPKEEP_METHODS = frozenset({"maintain", "checkpoint", "checkpointed"})


class LocalShard:
    """A shard actor object in this process: its calls run one at a time, in
    order, its upkeep (``UPKEEP_METHODS``) on a thread of its own and its
    questions (``READ_METHODS``) on threads of their own, as on Ray."""

    def __init__(self, name: str, make):
        self.name = name
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._reads = cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix=f"{name}-reads")
        self._upkeep = cf.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-upkeep")
        self._calls: set[cf.Future] = set()  # submitted and not yet done
        self._ready = self._track(self._pool.submit(make))  # constructed on its own thread, as an actor is
        self.dead = False

    def _track(self, f: cf.Future) -> cf.Future:
        self._calls.add(f)
        f.add_done_callback(self._calls.discard)
        return f

    def submit(self, method: str, args) -> cf.Future:
        pool = self._reads if method in READ_METHODS else self._upkeep if method in UPKEEP_METHODS else self._pool
        try:
            if not self.dead:
                return self._track(pool.submit(self._run, method, args))
        except RuntimeError:  # the interpreter is exiting: its pools take nothing more
            pass
        f = cf.Future()
        f.set_exception(ShardUnavailable(f"{self.name} was stopped"))
        return f

    def _run(self, method: str, args):
        return getattr(self._ready.result(), method)(*args)

    @property
    def actor(self):
        """The shard object itself (for tests that look inside)."""
        return self._ready.result()

    def stop(self, timeout: float) -> None:
        """Refuse new calls, drop queued ones, and wait for the running one."""
        self.dead = True
        if self._ready.done() and self._ready.exception() is None:  # its port, if any, answers no more either
            close = getattr(self._ready.result(), "close_port", None)
            if close is not None:
                close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._upkeep.shutdown(wait=False, cancel_futures=True)
        # a cancelled future never counts as done for cf.wait: wait for the others
        cf.wait([f for f in list(self._calls) if not f.cancelled()], timeout=timeout)


class LocalFollowers:
    """A writer's readers in this process (``actors.reader.Followers``): each told by a call on its own
    thread, never waited for."""

    def __init__(self, runtime: "LocalRuntime", index: int, folder: str):
        self.runtime, self.index, self.folder = runtime, index, folder

    def _tell(self, method: str, *args) -> None:
        for h in self.runtime.readers_of(self.index, self.folder):
            h.submit(method, args)

    @property
    def active(self) -> bool:
        return bool(self.runtime.readers_of(self.index, self.folder))

    def logged(self, seq: int, incarnation: int, rb) -> None:
        self._tell("logged", seq, incarnation, rb)

    def flushed(self, after: int, through: int, incarnation: int, runs, key_ids, key_names) -> None:
        self._tell("flushed", after, through, incarnation, runs, key_ids, key_names)

    def checkpointed(self, number: int) -> None:
        self._tell("checkpointed", number)


class LocalRuntime:
    """Shards as objects of this process: ``factory(index, layout, seed_from,
    *seed_states)`` makes one (``actors.shard.ShardActor`` with its storage
    settings bound, or a variant that fails on purpose in a test), and
    ``reader_factory(index, replica, layout)`` a reader, if given."""

    def __init__(self, factory, reader_factory=None):
        self.factory = factory
        self.reader_factory = reader_factory
        self._shards: dict[tuple[int, str], LocalShard] = {}
        self._readers: dict[tuple[int, str, int], LocalShard] = {}
        self._lock = threading.Lock()

    @property
    def readers(self) -> bool:
        return self.reader_factory is not None

    def cpus(self) -> float:
        return float(os.cpu_count() or 1)

    def create_shard(self, index: int, layout, seeds: list = ()) -> LocalShard:
        with self._lock:
            h = self._shards.get((index, layout.folder))
            if h is not None and not h.dead:
                return h
            seed_from = [(i, n) for i, n, _ in seeds]
            pending = [p for _, _, p in seeds]

            def make():
                actor = self.factory(index, layout, seed_from, *[self.result(p) for p in pending])
                if self.readers:
                    actor.followers = LocalFollowers(self, index, layout.folder)
                return actor
            h = self._shards[(index, layout.folder)] = LocalShard(
                f"shard-{index}-of-{layout.shards}-{layout.folder}", make)
            return h

    def create_reader(self, index: int, replica: int, layout, near=None) -> LocalShard:
        with self._lock:
            h = self._readers.get((index, layout.folder, replica))
            if h is None or h.dead:
                h = self._readers[(index, layout.folder, replica)] = LocalShard(
                    f"reader-{replica}-of-shard-{index}-of-{layout.shards}-{layout.folder}",
                    lambda: self.reader_factory(index, replica, layout))
            return h

    def find_reader(self, index: int, replica: int, layout) -> LocalShard | None:
        h = self._readers.get((index, layout.folder, replica))
        return h if h is not None and not h.dead else None

    def readers_of(self, index: int, folder: str) -> list[LocalShard]:
        return [h for (i, f, _), h in list(self._readers.items()) if i == index and f == folder and not h.dead]

    def find_shard(self, index: int, layout) -> LocalShard | None:
        h = self._shards.get((index, layout.folder))
        return h if h is not None and not h.dead else None

    def cancel(self, pending: cf.Future) -> None:
        pending.cancel()

    def call(self, handle: LocalShard, method: str, *args) -> cf.Future:
        return handle.submit(method, args)

    def wait(self, pending: list, timeout: float | None = None,
             num_returns: int | None = None) -> tuple[list, list]:
        deadline = None if timeout is None else time.monotonic() + timeout
        want = len(pending) if num_returns is None else min(num_returns, len(pending))
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, rest = cf.wait(pending, timeout=left,
                                 return_when=cf.ALL_COMPLETED if want == len(pending) else cf.FIRST_COMPLETED)
            if len(done) >= want or left == 0.0:
                return [p for p in pending if p in done], [p for p in pending if p in rest]

    def future(self, pending: cf.Future) -> cf.Future:
        return pending

    def result(self, pending: cf.Future, timeout: float | None = None):
        try:
            return pending.result(timeout)
        except cf.TimeoutError:
            raise ShardUnavailable(f"no answer within {timeout} s") from None
        except cf.CancelledError:
            raise ShardUnavailable("the shard was stopped before answering") from None

    def kill(self, handle: LocalShard, timeout: float = 30.0) -> None:
        handle.stop(timeout)

    def handles(self) -> list[LocalShard]:
        return [h for h in self._shards.values() if not h.dead]

    def reader_handles(self) -> list[LocalShard]:
        return [h for h in self._readers.values() if not h.dead]
