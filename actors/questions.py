"""The questions every register range answers, and how their answers merge.

A question (unique visitors of keys, the reach of a key set, an overlap, a
rolling series) goes to every shard of one shard map at once; each shard
answers with small histograms of its register slice, and the merge here
sums and estimates them (``sketch.answer``).  ``Questions`` is written once
and asked two ways:

* by the coordinator (``actors.coordinator.Coordinator``), which owns the
  shard map: the REST app and older clients ask it, two actor hops;
* by ``DirectQuestions``, which keeps a copy of the shard map and asks the
  shards itself: one hop (the Python client).  The copy is the
  coordinator's ``read_route`` (epoch, writers, readers), kept for ``MAP_TTL_S`` and
  fetched again at once when a shard does not answer: after a re-sharding
  the old shards are stopped, so a stale copy shows itself by a missing
  answer, and the question is asked again of the new layout (answers of two
  layouts are never merged).  A shard that is restarting, or gone without a
  new layout, leaves the answer partial, exactly as through the coordinator.

Each register range has copies: its readers (``actors.reader``) and, last,
its writer.  A question goes to one copy of every range, the reader chosen
by its keys (the same keys, the same reader, whose cache holds their
blocks; other keys spread over the others), and moves on to the next copy of a
range whose copy failed (gone, restarting, or ``Behind`` the asker's own
writes) or is late (a copy that is slow or being restarted by Ray: the
next copy is asked too, the first answer wins, the other call is
cancelled).  Late is measured against the other ranges, which got the same
question: a range not answered by ``hedge_s`` *and* by ``HEDGE_RATIO``
times the slowest answer of the ranges done, or, while none is done, by
``HEDGE_ALONE`` times ``hedge_s``.  A heavy question (many keys, blocks
decoded for the first time) is slow on every range alike, and asking a
second copy of each would only double its work on the same cores (a
second copy starts cold, and a cancelled question runs to its end); a
copy slower than its peers is what a second copy can help.  A copy that
failed is tried after the others for ``SUSPECT_S``.  A copy that answered
``Behind`` (it does not hold the asker's own writes yet: a reader whose
writer's messages were lost, or that is catching up) has not failed: once
every copy of its range was asked, it is asked again (``REASK_BEHIND``
times at most; each ``Behind`` takes the reader's own wait, so this never
spins) while no copy has answered and time is left, so a range whose
writer is restarting is answered by its readers as soon as they hold the
asker's writes.  Only when every copy of a range failed, or none answered
within the query timeout, is the answer partial.

Nothing here holds a lock or waits on anything that waits on it: a question
is a fan-out with a deadline and a pure merge.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from typing import Callable

from impressions.sketch.answer import (
    RangeResult,
    merge_answers,
    merge_overlap,
    merge_reach,
    series_answer,
    series_points,
)
from impressions.sketch.hll import RegisterRange
from impressions.sketch.timeindex import BucketRange
from impressions.sketch.windows import plan_series

from .base import QUESTIONS, Behind, pack_question, unpack_answer
from .runtime import Runtime, ShardUnavailable, gather
from .telemetry import Telemetry
from .wire import PortFailed, encode_question

MAP_TTL_S = 10.0  # how long a direct asker trusts its copy of the shard map without news
HEDGE_S = 0.25  # a copy that has not answered by then (and is late against the others) is joined by the next
HEDGE_RATIO = 2.0  # late: not answered by this many times the slowest answer of the other ranges
HEDGE_ALONE = 4.0  # with no other range answered yet, late at this many times ``hedge_s``
SUSPECT_S = 5.0  # a copy that failed is asked after the others for this long
REASK_BEHIND = 8  # a range with every copy asked: its copies that said Behind are asked again, up to this often
BEHIND_MARGIN_S = 0.1  # ...while at least this much of the question's time is left


@dataclass(frozen=True)
class ShardMap:
    """Which shard owns which register range (an immutable snapshot)."""

    handles: tuple  # the writers, by register range
    rr: RegisterRange  # the register range of shard 0; shard i's starts at i * rr.R
    epoch: int = 0
    readers: tuple = ()  # per register range, the readers that answer (may be empty)
    ports: tuple = ()  # per register range, where each of those readers answers on a port of its own (or None)
    writer_ports: tuple = ()  # per register range, where its writer does (or None)

    def address(self, i: int, h):
        """Where copy ``h`` of range ``i`` answers on a port of its own (``actors.wire.Address``), or None."""
        if i < len(self.handles) and h == self.handles[i]:
            return self.writer_ports[i] if i < len(self.writer_ports) else None
        if i < len(self.ports):
            for r, a in zip(self.readers[i], self.ports[i]):
                if r == h:
                    return a
        return None

    def copies(self, i: int, turn: int, suspect=lambda h: False) -> list:
        """The copies of range ``i`` in the order to ask them: its readers from ``turn`` on (questions
        with different turns spread over them), its writer, then readers that failed lately."""
        rs = list(self.readers[i]) if i < len(self.readers) else []
        if rs:
            k = turn % len(rs)
            rs = rs[k:] + rs[:k]
        return [h for h in rs if not suspect(h)] + [self.handles[i]] + [h for h in rs if suspect(h)]

    @property
    def registers_per_shard(self) -> int:
        return self.rr.R

    def ranges(self) -> list[tuple[int, int]]:
        R = self.rr.R
        return [(i * R, (i + 1) * R) for i in range(len(self.handles))]


def range_answers(m: ShardMap, keys: list, answers: list, start: int, end: int) -> list[dict]:
    """One answer per key from the shards' answers (None: a shard that did not answer)."""
    got = [a for a in answers if a is not None]
    if not got:
        raise ShardUnavailable("no shard answered in time")
    merged = merge_answers(got, m.rr.prec.m, m.rr.R, len(m.handles))
    return [RangeResult(k, start, end, est, imp).to_dict() for k, (est, imp) in zip(keys, merged)]


def _retrieved(f: asyncio.Future) -> None:
    """Take a finished future's outcome, so a call nobody waited for is not reported as an error never seen."""
    if not f.cancelled():
        f.exception()


class MapChanged(Exception):
    """The shard map changed while a question was out: ask again on the new one."""


class Questions:
    """The questions; a subclass says where the shard map comes from
    (``_shard_map``) and gives ``config`` (``query_timeout_s``), ``runtime``
    (how shards are called), ``telemetry`` and an empty ``_asking`` set."""

    config = None
    runtime: Runtime
    telemetry: Telemetry
    queries = 0
    _suspects: dict  # copies that failed lately -> until when (a subclass gives its own)
    _ports_down: dict  # copies whose port failed lately -> until when they are asked through Ray (the same)
    _wrote: tuple = (None, {})  # (epoch, {range: log position}) of this asker's acknowledged writes

    def _shard_map(self, refresh: bool = False) -> ShardMap:
        raise NotImplementedError

    def wrote(self, epoch: int, positions: dict) -> None:
        """This asker's writes were acknowledged up to these log positions (``Sender.positions``): its
        questions are answered by copies that hold them."""
        old_epoch, old = self._wrote
        seen = dict(old) if old_epoch == epoch else {}
        for i, seq in positions.items():
            seen[int(i)] = max(int(seq), seen.get(int(i), 0))
        self._wrote = (epoch, seen)

    def _suspect(self, h) -> bool:
        until = self._suspects.get(h)
        return until is not None and until > time.monotonic()

    def _fan_out(self, m: ShardMap, method: str, *args, timeout: float | None) -> list:
        """Call ``method`` on every register range of ``m``: a question (``QUESTIONS``) on one copy
        of each, moving on as the module text says (``_steps``, its waits done here); anything else on
        the writers.  The answer of a range that no copy gave within ``timeout`` is None."""
        rt = self.runtime
        if method not in QUESTIONS:
            return gather(rt, [rt.call(h, method, *args) for h in m.handles], timeout)
        steps = self._steps(m, method, *args, timeout=timeout)
        try:
            pending, seconds = next(steps)
            while True:
                ready, _ = rt.wait(pending, seconds, num_returns=1)
                pending, seconds = steps.send(ready)
        except StopIteration as done:
            return done.value

    async def _afan_out(self, m: ShardMap, method: str, *args, timeout: float | None) -> list:
        """``_fan_out`` of a question for an event loop: the same steps, each wait awaited (the loop goes on
        with other requests meanwhile, and no thread is handed the question)."""
        rt, futures = self.runtime, {}
        steps = self._steps(m, method, *args, timeout=timeout)
        try:
            pending, seconds = next(steps)
            while True:
                for p in pending:
                    if p not in futures:
                        futures[p] = asyncio.wrap_future(rt.future(p))
                done, _ = await asyncio.wait([futures[p] for p in pending], timeout=seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                pending, seconds = steps.send([p for p in pending if futures[p] in done])
        except StopIteration as done:
            return done.value
        finally:
            for f in futures.values():  # a call left behind (cancelled, or late) is never waited for
                f.add_done_callback(_retrieved)

    def _steps(self, m: ShardMap, method: str, *args, timeout: float | None):
        """The fan-out of a question, as steps: yields ``(pending calls, seconds)`` to wait until one of
        them is done or that time passed, and is sent back the calls done; returns the answers."""
        rt = self.runtime
        epoch, wrote = self._wrote
        after = [wrote.get(i, 0) if epoch == m.epoch else 0 for i in range(len(m.handles))]
        # the same keys go to the same reader of a range (each reader keeps its own cache of decoded blocks,
        # so a key set's blocks are read once, not once per reader); different key sets spread over them
        turn = zlib.crc32(repr(args[0] if args else method).encode())
        order = [m.copies(i, turn, self._suspect) for i in range(len(m.handles))]
        answers: list = [None] * len(order)
        done, asked = [False] * len(order), [0] * len(order)
        pending: dict = {}
        packed: dict = {}  # the question as sent, by the log position it must reflect
        wired: dict = {}  # the same for a copy's own port (``actors.wire``): None where it cannot go there
        by_port = getattr(rt, "ask_at", None)

        def question(after: int) -> bytes:
            q = packed.get(after)
            if q is None:
                q = packed[after] = pack_question(method, after, args)
            return q

        def wire_question(after: int) -> bytes | None:
            if after not in wired:
                wired[after] = encode_question(method, after, args)
            return wired[after]

        ports_down = self._ports_down

        def ask(i: int, h=None, by_ray: bool = False) -> None:
            if h is None:
                h = order[i][asked[i]]
                asked[i] += 1
            at = m.address(i, h) if by_port is not None and not by_ray and ports_down.get(h, 0) < time.monotonic() \
                else None
            body = wire_question(after[i]) if at is not None else None
            p = by_port(at, body) if body is not None else rt.call(h, "ask_packed", question(after[i]))
            pending[p] = (i, h)

        for i in range(len(order)):
            ask(i)
        start = time.monotonic()
        deadline = start + (timeout or self.config.query_timeout_s)
        hedge_s = float(getattr(self.config, "hedge_s", HEDGE_S))
        hedging = any(len(o) > 1 for o in order)
        slowest = None  # how long the slowest range answered so far took
        behind: list = [[] for _ in order]  # by range, the copies that answered Behind
        again = [REASK_BEHIND] * len(order)  # how many more times a range's copies that said Behind are asked

        def hedge_at() -> float:
            """When a range not answered yet is late (see the module text)."""
            if slowest is None:
                return start + HEDGE_ALONE * hedge_s
            return start + max(hedge_s, HEDGE_RATIO * slowest)

        while pending and not all(done):
            now = time.monotonic()
            if now >= deadline:
                break
            until = min(deadline, hedge_at()) if hedging else deadline
            ready = yield list(pending), max(0.0, until - now)
            for p in ready:
                i, h = pending.pop(p)
                if done[i]:
                    continue
                try:
                    answers[i], done[i] = unpack_answer(rt.result(p, 0)), True
                    slowest = time.monotonic() - start
                except PortFailed:
                    # the port did not carry it (refused, full, a stranger on it): the same copy through Ray,
                    # which says whether the copy itself is there; its port passed by for a while
                    ports_down[h] = time.monotonic() + SUSPECT_S
                    ask(i, h, by_ray=True)
                except Exception as e:  # noqa: BLE001 - a copy's failure sends the question on, never up
                    if isinstance(e, Behind):
                        if h not in behind[i]:
                            behind[i].append(h)
                    else:
                        self._suspects[h] = time.monotonic() + SUSPECT_S
                        if h in behind[i]:
                            behind[i].remove(h)
                    if asked[i] < len(order[i]):
                        ask(i)
                    # "not yet" is not a failure: with every copy asked, one that said it is asked again (in
                    # turn) whenever none of them is being asked, while time is left
                    if (asked[i] >= len(order[i]) and behind[i] and again[i] > 0
                            and deadline - time.monotonic() > BEHIND_MARGIN_S
                            and not any(j == i and g in behind[i] for j, g in pending.values())):
                        again[i] -= 1
                        g = behind[i].pop(0)
                        behind[i].append(g)
                        ask(i, g)
            if hedging and not all(done) and time.monotonic() >= hedge_at():
                hedging = False  # once: a range whose two copies are both slow waits for them, not for a third
                for i in range(len(order)):
                    if not done[i] and asked[i] < len(order[i]):
                        ask(i)
        for p in pending:
            rt.cancel(p)
        return answers

    def _ask(self, m: ShardMap, method: str, *args, timeout: float | None = None) -> list:
        """A question to every shard (``_fan_out``, with the time it was sent
        last), counted in the questions in flight and the answer metrics: one
        answer per shard, None where it did not answer; ``ShardUnavailable``
        when none did."""
        timeout = timeout or self.config.query_timeout_s
        t0, token = self._asked_in()
        try:
            answers = self._fan_out(m, method, *args, time.time(), timeout=timeout)
        finally:
            self._asking.discard(token)
        if self._counted(answers, t0):
            self._missed(m)
        return self._complete_enough(answers, timeout)

    async def _aask(self, m: ShardMap, method: str, *args, timeout: float | None = None) -> list:
        """``_ask`` for an event loop (``_afan_out``; the look at the map after a missing answer, which may
        call the coordinator, on a thread)."""
        timeout = timeout or self.config.query_timeout_s
        t0, token = self._asked_in()
        try:
            answers = await self._afan_out(m, method, *args, time.time(), timeout=timeout)
        finally:
            self._asking.discard(token)
        if self._counted(answers, t0):
            await asyncio.to_thread(self._missed, m)
        return self._complete_enough(answers, timeout)

    def _asked_in(self) -> tuple[float, object]:
        token = object()
        self._asking.add(token)
        self.telemetry.in_flight(len(self._asking))
        return time.perf_counter(), token

    def _counted(self, answers: list, t0: float) -> list:
        """Count a question in the metrics; returns the ranges that did not answer."""
        self.queries += 1
        missing = [i for i, a in enumerate(answers) if a is None]
        self.telemetry.answer(time.perf_counter() - t0, bool(missing), missing)
        return missing

    @staticmethod
    def _complete_enough(answers: list, timeout: float) -> list:
        if all(a is None for a in answers):
            raise ShardUnavailable(f"no shard answered within {timeout} s")
        return answers

    def _missed(self, m: ShardMap) -> None:
        """Some shard of ``m`` did not answer (a subclass whose map may be stale raises ``MapChanged``)."""

    def _on_map(self, question):
        """``question(m)`` on the current map; once more on the new one if the map changed meanwhile
        (``_ask`` fetched it when it saw the change)."""
        try:
            return question(self._shard_map())
        except MapChanged:
            return question(self._shard_map())

    def _map_at_hand(self) -> ShardMap | None:
        """The shard map if it can be had without a call (a subclass that keeps a copy gives it)."""
        return None

    async def _amap(self) -> ShardMap:
        m = self._map_at_hand()
        return m if m is not None else await asyncio.to_thread(self._shard_map)

    # A question is a *plan*: ``plan(m)`` is a generator that yields ``(method, args, timeout)`` for each fan-out
    # over map ``m`` it needs, is sent back the answers, and returns the merged answer.  ``_asked`` runs it from a
    # thread, ``_aasked`` on an event loop (the REST replicas), each on the current map and once more on the new
    # one if the map changed meanwhile.

    def _asked(self, plan):
        def run(m: ShardMap):
            steps = plan(m)
            try:
                method, args, timeout = next(steps)
                while True:
                    method, args, timeout = steps.send(self._ask(m, method, *args, timeout=timeout))
            except StopIteration as done:
                return done.value
        return self._on_map(run)

    async def _aasked(self, plan):
        async def run(m: ShardMap):
            steps = plan(m)
            try:
                method, args, timeout = next(steps)
                while True:
                    method, args, timeout = steps.send(await self._aask(m, method, *args, timeout=timeout))
            except StopIteration as done:
                return done.value
        try:
            return await run(await self._amap())
        except MapChanged:
            return await run(await self._amap())

    @staticmethod
    def _one(method: str, args: tuple, merge):
        """The plan of a question that is one fan-out, its answers merged by ``merge(m, answers)``."""
        def plan(m: ShardMap):
            answers = yield method, args, None
            return merge(m, answers)
        return plan

    @staticmethod
    def _got(answers: list) -> list:
        return [a for a in answers if a is not None]

    # Each question below is a plan (``_q_*``), asked either way: from a thread (``query``, ...) or on an event
    # loop (``aquery``, ...).

    def query(self, keys: list, rng: BucketRange) -> list[dict]:
        """Unique visitors and impressions of each key (None = site-wide) over ``rng``.

        Shards that do not answer within ``query_timeout_s`` (restarting, or
        gone) are left out: the answer is then ``partial``, extrapolated from
        the register ranges that answered, with the wider error that implies."""
        return self._asked(self._q_query(keys, rng))

    async def aquery(self, keys: list, rng: BucketRange) -> list[dict]:
        return await self._aasked(self._q_query(keys, rng))

    def _q_query(self, keys: list, rng: BucketRange):
        keys = list(keys)
        return self._one("query", (keys, rng.b0, rng.b1),
                         lambda m, answers: range_answers(m, keys, answers, rng.start, rng.end))

    def reach(self, keys: list, prefix: str | None, rng: BucketRange) -> dict:
        """Unique visitors of the union of a key set (listed ``keys`` and every
        key starting with ``prefix``) over ``rng``, with summed impressions and
        the average frequency: one call per shard, which merges the set's
        registers and answers one histogram."""
        return self._asked(self._q_reach(keys, prefix, rng))

    async def areach(self, keys: list, prefix: str | None, rng: BucketRange) -> dict:
        return await self._aasked(self._q_reach(keys, prefix, rng))

    def _q_reach(self, keys: list, prefix: str | None, rng: BucketRange):
        def merge(m: ShardMap, answers: list) -> dict:
            return merge_reach(self._got(answers), m.rr.prec.m, m.rr.R, len(m.handles), rng.start, rng.end, prefix)
        return self._one("reach", (list(keys), prefix or None, rng.b0, rng.b1), merge)

    def overlap(self, a: tuple, b: tuple, rng: BucketRange) -> dict:
        """Visitors of both key sets ``a`` and ``b`` (each ``(keys, prefix)``)
        over ``rng``: the joint estimate with its interval, inclusion-exclusion
        beside it, Jaccard and each side's share (``sketch.sets``)."""
        return self._asked(self._q_overlap(a, b, rng))

    async def aoverlap(self, a: tuple, b: tuple, rng: BucketRange) -> dict:
        return await self._aasked(self._q_overlap(a, b, rng))

    def _q_overlap(self, a: tuple, b: tuple, rng: BucketRange):
        a, b = (list(a[0]), a[1] or None), (list(b[0]), b[1] or None)

        def merge(m: ShardMap, answers: list) -> dict:
            return merge_overlap(self._got(answers), m.rr.prec.m, m.rr.R, len(m.handles), rng.start, rng.end)
        return self._one("overlap", (a, b, rng.b0, rng.b1), merge)

    def rolling(self, keys: list, prefix: str | None, rng: BucketRange, step: int, window: int | None) -> dict:
        """A series over ``rng``: with ``window``, the trailing ``window`` buckets
        every ``step`` buckets, each window inside the range, the last ending
        at its end; without, the cumulative unique visitors since the range's
        start at every step.  Each point is a real range answer (its registers
        are those of the range query over the same buckets), computed by
        every shard in one pass over the cells the windows share
        (``sketch.windows``).  The start is moved forward to a whole number
        of steps before the end; points report what they cover."""
        return self._asked(self._q_rolling(keys, prefix, rng, step, window))

    async def arolling(self, keys: list, prefix: str | None, rng: BucketRange, step: int, window: int | None) -> dict:
        return await self._aasked(self._q_rolling(keys, prefix, rng, step, window))

    def _q_rolling(self, keys: list, prefix: str | None, rng: BucketRange, step: int, window: int | None):
        chunks = plan_series(rng.b0, rng.b1, step, window)
        w = rng.bucket_seconds

        def plan(m: ShardMap):
            now = time.time()
            points = []
            for first, g, n, starts, ends in chunks:
                answers = yield "series", (list(keys), prefix or None, first, g, n, starts, ends), \
                    self.config.query_timeout_s * 2
                points += series_points(self._got(answers), m.rr.prec.m, m.rr.R, len(m.handles), first, g, starts,
                                        ends, w, now)
            return series_answer(keys, prefix, step, window, w, points)
        return plan


class DirectQuestions(Questions):
    """Questions asked of the shards directly, on a copy of the shard map.

    ``route()`` fetches ``(epoch, writers, readers, reader ports, writer ports)`` from the coordinator
    (``Coordinator.read_route``; the ports may be missing: then every copy is asked through Ray); ``p`` is the
    sketch precision (the register ranges follow from it and the shard count)."""

    def __init__(self, route: Callable[[], tuple], runtime: Runtime, config, p: int,
                 telemetry: Telemetry | None = None):
        self.route, self.runtime, self.config, self.p = route, runtime, config, p
        self.telemetry = telemetry or Telemetry()
        self._asking: set = set()  # the questions out now (set.add and discard are atomic)
        self._suspects: dict = {}
        self._ports_down: dict = {}
        self._map: ShardMap | None = None
        self._fetched = 0.0
        self.refreshes = 0

    def _shard_map(self, refresh: bool = False) -> ShardMap:
        m = self._map  # read once: another thread may replace it, never change it
        if refresh or m is None or time.monotonic() - self._fetched > MAP_TTL_S:
            epoch, handles, *rest = self.route()
            readers = tuple(tuple(r) for r in rest[0]) if rest else ()
            ports = tuple(tuple(p) for p in rest[1]) if len(rest) > 1 else ()
            writer_ports = tuple(rest[2]) if len(rest) > 2 and len(rest[2]) == len(handles) else ()
            m = ShardMap(tuple(handles), RegisterRange(self.p, len(handles)), epoch, readers, ports, writer_ports)
            self._map, self._fetched = m, time.monotonic()
            self.refreshes += 1
        return m

    def _map_at_hand(self) -> ShardMap | None:
        m = self._map
        return m if m is not None and time.monotonic() - self._fetched <= MAP_TTL_S else None

    def _missed(self, m: ShardMap) -> None:
        if self._shard_map(refresh=True).epoch != m.epoch:  # re-sharded away, or merely slow or restarting?
            raise MapChanged()
