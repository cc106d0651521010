"""Readers: copies of a register range that follow their writer and answer its questions.

In-process (``LocalRuntime``, real storage in a temporary folder): readers
answer register for register as the writer and the reference do, through
checkpoints, sealing and a writer restart; a question reads the asker's
own writes even from a reader that lags; a writer gone or a reader gone
leaves answers complete; a reader started late, or one that missed the
writer's messages, fills in from the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import ClassVar

import numpy as np
import pytest

from impressions.actors import reader as reader_mod
from impressions.actors.coordinator import Coordinator
from impressions.actors.questions import DirectQuestions
from impressions.actors.reader import ShardReader
from impressions.actors.runtime import LocalRuntime
from impressions.actors.sender import Sender
from impressions.actors.shard import ShardActor
from impressions.cluster.config import ClusterConfig
from impressions.durable.layout import ShardStorage
from impressions.sketch.counter import LocalCounter
from tests.test_coordinator import KEYS, NOW, SK, stream  # noqa: F401 - the same stream and reference


class SlowReader(ShardReader):
    """A reader that takes ``DELAY`` seconds over every message from its writer (it lags)."""

    DELAY = 0.0
    DEAF = False  # drops the writer's messages altogether (as if they were lost)
    ASK_DELAY: ClassVar[dict] = {}  # shard -> seconds every question to its readers takes on top of its own work
    ASKED: ClassVar[list] = []  # (shard, replica) of every question asked of a reader
    BEHIND_UNTIL: ClassVar[dict] = {}  # shard -> until when (monotonic) its readers answer Behind, as a lagging one
    BUILD_DELAY = 0.0  # seconds added to every copy built from a checkpoint (a large one, a slow store)

    def ask_packed(self, q):
        SlowReader.ASKED.append((self.shard_index, self.replica))
        time.sleep(SlowReader.ASK_DELAY.get(self.shard_index, 0.0))
        if time.monotonic() < SlowReader.BEHIND_UNTIL.get(self.shard_index, 0.0):
            time.sleep(0.1)
            raise reader_mod.Behind(f"reader {self.replica} of shard {self.shard_index} is behind")
        return super().ask_packed(q)

    def _store_of(self, body, load_node=None):
        time.sleep(SlowReader.BUILD_DELAY)
        return super()._store_of(body, load_node)

    def logged(self, *a):
        if SlowReader.DEAF:
            return self.seq
        time.sleep(SlowReader.DELAY)
        return super().logged(*a)


@pytest.fixture(autouse=True)
def _reset():
    def reset():
        SlowReader.DELAY, SlowReader.DEAF, SlowReader.ASK_DELAY, SlowReader.ASKED = 0.0, False, {}, []
        SlowReader.BEHIND_UNTIL, SlowReader.BUILD_DELAY = {}, 0.0
    reset()
    yield
    reset()


def _cluster(tmp_path, shards=2, readers=2):
    storage = f"file://{tmp_path}/store"
    cfg = ClusterConfig(sketch=SK, shards=shards, storage=storage, maintain_interval_s=3600,
                        checkpoint_interval_s=3600, query_timeout_s=5, readers=readers, hedge_s=0.25)

    def st(layout):
        return ShardStorage(storage, None, layout.cluster_id, layout.folder)
    runtime = LocalRuntime(
        lambda i, layout, seed_from, *states: ShardActor(SK, i, layout.shards, st(layout), 32.0, seed_from, *states),
        lambda i, r, layout: SlowReader(SK, i, layout.shards, st(layout), 32.0, r))
    coord = Coordinator(cfg, runtime)
    coord.start()
    assert coord.watch_readers() == [readers] * shards
    return coord, runtime


def _parts(batch, parts):
    for ix in np.array_split(np.arange(len(batch)), parts):
        yield type(batch)(batch.key_names, batch.key_index[ix], batch.bucket[ix], batch.coupon[ix])


def _ingest(coord, runtime, batch, parts=4, tag="part", asker=None):
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    for n, part in enumerate(_parts(batch, parts)):
        sender.send(part, f"{tag}-{n}", 3600)
    sender.drain()
    if asker is not None:
        asker.wrote(sender.epoch, sender.positions)
    return sender


def _ingested(tmp_path, batch, readers=2):
    """A cluster that took ``batch`` through a direct asker, every copy settled: (coordinator, runtime, asker)."""
    coord, runtime = _cluster(tmp_path, readers=readers)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    _ingest(coord, runtime, batch, asker=direct)
    _settled(runtime, coord)
    return coord, runtime, direct


def _ask(runtime, h, method, *args):
    return runtime.result(runtime.call(h, "ask", method, 0, *args), 30)


def _settled(runtime, coord):
    """Wait until every reader's calls so far have run (messages on its call thread, upkeep on its own)."""
    for h in runtime.reader_handles():
        runtime.result(runtime.call(h, "ping"), 30)
        runtime.result(runtime.call(h, "maintain"), 30)


def _same_everywhere(coord, runtime, ref, direct):
    now_b = int(NOW // 60)
    for b0, b1 in [(now_b - 2880, now_b + 1), (now_b - 700, now_b - 90), (now_b - 3, now_b + 1)]:
        rng = SK.resolve(now=NOW, start=b0 * 60, end=b1 * 60)
        want = [r.to_dict() for r in ref.query_range(KEYS, rng)]
        for i, readers in enumerate(coord._readers):
            for h in [coord.map.handles[i], *readers]:
                for key in KEYS[:3]:
                    got = _ask(runtime, h, "registers", key, b0, b1)
                    assert np.array_equal(got, ref.registers(key, b0, b1)[i * len(got):(i + 1) * len(got)]), \
                        (i, key, b0, b1)
        assert direct.query(KEYS, rng) == want


def test_readers_answer_register_for_register_as_the_writer_through_checkpoints_and_sealing(tmp_path, stream):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    _ingest(coord, runtime, batch)
    _settled(runtime, coord)
    for h in runtime.reader_handles():  # the writers' flushes came as sorted runs, taken in place of the entries
        s = runtime.result(runtime.call(h, "stats"), 30)
        assert s["runs_taken"] >= 1 and s["runs_skipped"] == 0, s
    _same_everywhere(coord, runtime, ref, direct)  # followed entry by entry
    coord.maintain()
    coord.checkpoint()  # rollups, sealed files, a manifest: the readers switch to it
    _settled(runtime, coord)
    for h in runtime.reader_handles():
        s = runtime.result(runtime.call(h, "stats"), 30)
        assert s["switches"] >= 1 and s["manifest"] >= 1 and s["log_seq"] > 0, s
    _same_everywhere(coord, runtime, ref, direct)
    assert direct.query(KEYS, SK.resolve(now=NOW, last="2d"))[0]["partial"] is False


def test_a_question_reads_its_own_writes_even_from_a_lagging_reader(tmp_path, stream):
    """The asker passes the log positions its writes were acknowledged at: a reader that does not hold
    them reads the log on the store for them (or says it is behind and the writer answers); either way the
    answer holds every acknowledged event.  An asker that wrote nothing takes a reader's copy as it is."""
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    SlowReader.DEAF = True  # the readers hear nothing: they hold only what they loaded at start (nothing)
    _ingest(coord, runtime, batch, asker=direct)
    rng = SK.resolve(now=NOW, last="2d")
    # an asker that wrote nothing takes the readers' copy as it is: behind, never wrong about what it holds
    stale = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    assert stale.query([None], rng)[0]["impressions"] == 0
    # the readers catch up from the store without any message (the writer quiet for POLL_S)
    reader_mod.POLL_S, old = 0.0, reader_mod.POLL_S
    try:
        coord.watch_readers()
        _settled(runtime, coord)
    finally:
        reader_mod.POLL_S = old
    assert stale.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]
    # a second stream, again unheard: the asker that wrote it gets it whole at once
    more = type(batch)(batch.key_names, batch.key_index, batch.bucket + 1, batch.coupon)
    _ingest(coord, runtime, more, tag="more", asker=direct)
    ref = LocalCounter(SK)
    for b in (batch, more):
        ref.stores[0].apply(b.key_names, b.key_index, b.bucket, b.coupon)
    t0 = time.perf_counter()
    assert direct.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]
    assert time.perf_counter() - t0 < 5 * reader_mod.FRESH_WAIT_S


def test_a_slow_reader_is_joined_by_the_next_copy(tmp_path, stream):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path, readers=1)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    SlowReader.DELAY = 0.6  # each message takes longer than the wait a question allows for its writes
    _ingest(coord, runtime, batch, parts=2, asker=direct)
    rng = SK.resolve(now=NOW, last="2d")
    assert direct.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]


def test_a_copy_late_against_the_other_ranges_is_joined_by_the_next(tmp_path, stream):
    """One range's reader hangs while the other range answers at once: by ``hedge_s`` its writer is asked
    too, and answers."""
    batch, ref = stream
    _, _, direct = _ingested(tmp_path, batch, readers=1)
    rng = SK.resolve(now=NOW, last="2d")
    SlowReader.ASK_DELAY = {0: 1.5}
    t0 = time.perf_counter()
    got = direct.query(KEYS, rng)
    took = time.perf_counter() - t0
    assert got == [r.to_dict() for r in ref.query_range(KEYS, rng)] and not got[0]["partial"]
    assert took < 1.0, took


def test_a_question_slow_on_every_range_is_not_asked_twice(tmp_path, stream):
    """Every range's readers take longer than ``hedge_s``, alike (a heavy question, cold blocks): asking a
    second copy of each would only double the work on the same cores, so each range is asked once; a
    range left alone longer than ``HEDGE_ALONE`` times ``hedge_s`` is joined all the same."""
    from impressions.actors import questions
    batch, ref = stream
    _, _, direct = _ingested(tmp_path, batch)
    rng = SK.resolve(now=NOW, last="2d")
    want = [r.to_dict() for r in ref.query_range(KEYS, rng)]
    SlowReader.ASK_DELAY = {0: 0.4, 1: 0.45}
    assert direct.query(KEYS, rng) == want
    assert sorted(s for s, _ in SlowReader.ASKED) == [0, 1], SlowReader.ASKED
    # slower than the other range by more than HEDGE_RATIO: range 1 is joined by its second reader
    SlowReader.ASKED = []
    SlowReader.ASK_DELAY = {0: 0.3, 1: 0.3 * questions.HEDGE_RATIO + 0.6}
    assert direct.query(KEYS, rng) == want
    assert sorted(s for s, _ in SlowReader.ASKED) == [0, 1, 1], SlowReader.ASKED
    # every range slow past HEDGE_ALONE * hedge_s: each joined by its second reader
    SlowReader.ASKED = []
    SlowReader.ASK_DELAY = {0: 1.3, 1: 1.3}
    assert direct.query(KEYS, rng) == want
    assert sorted(SlowReader.ASKED) == [(0, 0), (0, 1), (1, 0), (1, 1)], SlowReader.ASKED


def test_with_a_writer_gone_the_readers_answer_complete(tmp_path, stream):
    batch, ref = stream
    coord, runtime, direct = _ingested(tmp_path, batch)
    runtime.kill(coord.map.handles[0])
    rng = SK.resolve(now=NOW, last="2d")
    got = direct.query(KEYS, rng)
    assert got == [r.to_dict() for r in ref.query_range(KEYS, rng)] and not got[0]["partial"]
    assert direct.reach(["ad-0", "ad-3"], None, rng) == coord.reach(["ad-0", "ad-3"], None, rng)


def test_a_writer_killed_before_its_messages_went_out_leaves_its_readers_answering_complete(tmp_path, stream):
    """The asker's writes were acknowledged, but the readers never heard of them (the writer's messages lost
    with its process) and the writer is gone: the readers find them in the log on the store and answer
    complete, long before a new writer instance would tell them anything."""
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    SlowReader.DEAF = True
    _ingest(coord, runtime, batch, asker=direct)
    for h in coord.map.handles:
        runtime.kill(h)
    rng = SK.resolve(now=NOW, last="2d")
    t0 = time.perf_counter()
    got = direct.query(KEYS, rng)
    assert got == [r.to_dict() for r in ref.query_range(KEYS, rng)] and not got[0]["partial"]
    assert time.perf_counter() - t0 < 2 * reader_mod.FRESH_WAIT_S
    asked = [runtime.result(runtime.call(h, "stats"), 30)["asked_for"] for rs in coord._readers for h in rs]
    assert sum(asked) >= 2, asked  # one reader of each range read the store for the question


def test_readers_behind_while_their_writer_restarts_are_asked_again_not_left_out(tmp_path, stream):
    """Range 0's writer is gone and both its readers answer Behind for a while (they do not hold the asker's
    writes yet): Behind is "not yet", so they are asked again until one answers, and the answer is complete
    as soon as they hold the writes, not partial."""
    batch, ref = stream
    coord, runtime, direct = _ingested(tmp_path, batch)
    runtime.kill(coord.map.handles[0])
    rng = SK.resolve(now=NOW, last="2d")
    SlowReader.BEHIND_UNTIL = {0: time.monotonic() + 0.8}
    t0 = time.perf_counter()
    got = direct.query(KEYS, rng)
    took = time.perf_counter() - t0
    assert got == [r.to_dict() for r in ref.query_range(KEYS, rng)] and not got[0]["partial"]
    assert 0.8 <= took < 2.0, took
    assert sum(s == 0 for s, _ in SlowReader.ASKED) > 2, SlowReader.ASKED  # its readers asked more than once


def test_a_reader_switching_to_a_slow_checkpoint_follows_and_answers_meanwhile(tmp_path, stream):
    """A reader builds the copy of a new checkpoint slowly (a large one, a slow store): meanwhile it goes on
    following its writer and answers, complete and at once, questions that need the newest writes; then it
    switches, register for register the same."""
    batch, ref = stream
    first, second = (type(batch)(batch.key_names, batch.key_index[s], batch.bucket[s], batch.coupon[s])
                     for s in (slice(0, len(batch) // 2), slice(len(batch) // 2, None)))
    coord, runtime = _cluster(tmp_path, readers=1)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    _ingest(coord, runtime, first, parts=3, tag="first", asker=direct)
    _settled(runtime, coord)
    SlowReader.BUILD_DELAY = 1.5
    coord.checkpoint()  # each reader is told, and builds its new copy for 1.5 s
    _ingest(coord, runtime, second, parts=3, tag="second", asker=direct)
    for h in coord.map.handles:  # only the readers can answer
        runtime.kill(h)
    rng = SK.resolve(now=NOW, last="2d")
    t0 = time.perf_counter()
    got = direct.query(KEYS, rng)
    took = time.perf_counter() - t0
    assert got == [r.to_dict() for r in ref.query_range(KEYS, rng)] and not got[0]["partial"]
    assert took < 1.0, took  # neither waited for the switch nor answered Behind
    _settled(runtime, coord)
    for h in runtime.reader_handles():
        assert runtime.result(runtime.call(h, "stats"), 30)["switches"] >= 1
    SlowReader.BUILD_DELAY = 0.0
    assert direct.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]


def test_questions_on_an_event_loop_hedge_and_ask_behind_copies_again_without_blocking_it(tmp_path, stream):
    """The REST replicas ask on their event loop (``aquery``): the same answers as from a thread, a late
    range joined by its next copy, Behind copies asked again with the writer gone, and the loop free all
    along (another task on it runs every 10 ms while the questions wait)."""
    import asyncio

    batch, ref = stream
    coord, runtime, direct = _ingested(tmp_path, batch, readers=1)
    rng = SK.resolve(now=NOW, last="2d")
    want = [r.to_dict() for r in ref.query_range(KEYS, rng)]

    async def ticking(question):  # question() on the loop, and how long the loop went without running the ticks
        gaps, stop = [], asyncio.Event()

        async def tick():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()
        ticker = asyncio.create_task(tick())
        t0 = time.perf_counter()
        try:
            got = await question()
        finally:
            took = time.perf_counter() - t0
            stop.set()
            await ticker
        return got, took, max(gaps)

    got, _, _ = asyncio.run(ticking(lambda: asyncio.gather(*[direct.aquery(KEYS, rng) for _ in range(8)])))
    assert got == [want] * 8
    SlowReader.ASK_DELAY = {0: 1.5}  # range 0's reader hangs: by the hedge its writer answers
    got, took, gap = asyncio.run(ticking(lambda: direct.aquery(KEYS, rng)))
    assert got == want and took < 1.2 and gap < 0.2, (took, gap)
    SlowReader.ASK_DELAY = {}
    runtime.kill(coord.map.handles[0])
    SlowReader.BEHIND_UNTIL = {0: time.monotonic() + 0.8}  # and its reader behind for a while
    got, took, gap = asyncio.run(ticking(lambda: direct.aquery(KEYS, rng)))
    assert got == want and not got[0]["partial"] and 0.8 <= took < 2.0 and gap < 0.2, (took, gap)


def test_with_readers_gone_questions_stay_complete_and_quick(tmp_path, stream):
    batch, ref = stream
    coord, runtime, direct = _ingested(tmp_path, batch)
    rng = SK.resolve(now=NOW, last="2d")
    want = [r.to_dict() for r in ref.query_range(KEYS, rng)]
    runtime.kill(coord._readers[0][0])
    runtime.kill(coord._readers[1][1])
    for _ in range(4):  # every turn of the readers: the one gone is passed over
        t0 = time.perf_counter()
        assert direct.query(KEYS, rng) == want
        assert time.perf_counter() - t0 < 1.0
    from impressions.actors.coordinator import READER_MISSES
    for _ in range(READER_MISSES - 1):  # missing their health calls, they stay published a few rounds...
        assert coord.watch_readers() == [2, 2]
    assert coord.watch_readers() == [1, 1]  # ...then upkeep no longer publishes them
    for h in coord._readers[0][1:] + coord._readers[1][:1]:
        runtime.kill(h)
    assert direct.query(KEYS, rng) == want  # no reader at all: the writers answer


def test_a_reader_started_late_or_deaf_fills_in_from_the_store_and_follows_a_new_writer(tmp_path, stream):
    batch, ref = stream
    first, second = (type(batch)(batch.key_names, batch.key_index[s], batch.bucket[s], batch.coupon[s])
                     for s in (slice(0, len(batch) // 2), slice(len(batch) // 2, None)))
    coord, runtime = _cluster(tmp_path, readers=1)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    SlowReader.DEAF = True
    _ingest(coord, runtime, first, parts=3, tag="first")
    coord.checkpoint()  # a manifest it was not told of either
    SlowReader.DEAF = False
    # the writer of range 0 restarts (a new incarnation) and goes on; its next message shows the gap
    w0 = coord.map.handles[0]
    runtime.kill(w0)
    runtime._shards.pop((0, coord.layout.folder))
    coord.map = type(coord.map)((runtime.create_shard(0, coord.layout), *coord.map.handles[1:]), coord.map.rr,
                                coord.map.epoch, coord.map.readers)
    _ingest(coord, runtime, second, parts=3, tag="second", asker=direct)
    _settled(runtime, coord)
    for i, (h,) in enumerate(coord._readers):
        s = runtime.result(runtime.call(h, "stats"), 30)
        w = runtime.result(runtime.call(coord.map.handles[i], "stats"), 30)
        assert s["available"] and s["switches"] + s["from_store"] >= 1 and s["log_seq"] == w["log_seq"], s
    late = runtime.create_reader(1, 5, coord.layout)  # a reader started after everything
    got = runtime.result(runtime.call(late, "stats"), 30)
    assert got["log_seq"] == runtime.result(runtime.call(coord.map.handles[1], "stats"), 30)["log_seq"]
    b0, b1 = int(NOW // 60) - 2880, int(NOW // 60) + 1
    regs = _ask(runtime, late, "registers", "ad-0", b0, b1)
    assert np.array_equal(regs, ref.registers("ad-0", b0, b1)[len(regs):])
    rng = SK.resolve(now=NOW, last="2d")
    stale = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)  # no writes of its own: readers only
    assert stale.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]


def test_a_reader_without_storage_is_refused_and_one_of_an_unreadable_store_is_never_published(tmp_path, stream):
    with pytest.raises(ValueError, match="needs storage"):
        ShardReader(SK, 0, 1, None)
    batch, _ = stream
    coord, runtime = _cluster(tmp_path, readers=1)
    _ingest(coord, runtime, batch)
    coord.checkpoint()
    for m in (tmp_path / "store").glob(f"{coord.layout.folder}/shard-0/manifest-*.json"):
        m.write_bytes(m.read_bytes()[:-20])  # every checkpoint of range 0 torn
    bad = runtime.create_reader(0, 3, coord.layout)
    s = runtime.result(runtime.call(bad, "health"), 30)
    assert not s["available"] and "could be loaded" in s["reason"], s
    with pytest.raises(Exception, match="unavailable"):
        _ask(runtime, bad, "query", [None], 0, 1)
    coord._readers = ((bad,), coord._readers[1])
    assert coord.watch_readers() == [0, 1]


def test_upkeep_and_checkpoints_beside_ingest_keep_every_copy_exact(tmp_path, stream):
    """Rollups, sealing and checkpoints run on the writers' upkeep threads while batches apply: the
    writers, their readers, and writers restarted from what the checkpoints and the log hold all answer
    register for register as the reference."""
    from tests.conftest import looping

    batch, ref = stream
    coord, runtime = _cluster(tmp_path, readers=1)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    SlowReader.BUILD_DELAY = 0.05  # the readers' switches overlap the entries and runs their writers send
    with looping(lambda: (coord.maintain(NOW), coord.checkpoint())) as upkeep:
        _ingest(coord, runtime, batch, parts=200)
    assert not upkeep.errors and upkeep.rounds >= 2, (upkeep.errors, upkeep.rounds)
    _settled(runtime, coord)
    stats = [runtime.result(runtime.call(h, "stats"), 30) for h in runtime.reader_handles()]
    assert all(st["switches"] >= 1 and st["runs_taken"] >= 1 for st in stats), stats
    _same_everywhere(coord, runtime, ref, direct)
    coord.maintain(NOW)
    coord.checkpoint()
    _settled(runtime, coord)
    sealed_nodes = sum(runtime.result(runtime.call(h, "stats"), 30)["sealed_nodes"] for h in coord.map.handles)
    assert sealed_nodes > 0
    _same_everywhere(coord, runtime, ref, direct)
    # every writer restarted from the store: the checkpoints taken beside the applies, and the log after them
    handles = []
    for i in range(len(coord.map.handles)):
        runtime.kill(coord.map.handles[i])
        runtime._shards.pop((i, coord.layout.folder))
        handles.append(runtime.create_shard(i, coord.layout))
    coord.map = type(coord.map)(tuple(handles), coord.map.rr, coord.map.epoch, coord.map.readers)
    for h in handles:
        assert runtime.result(runtime.call(h, "stats"), 30)["recovery"]["manifest"], "recovered from a checkpoint"
    _same_everywhere(coord, runtime, ref, direct)


class PortRuntime(LocalRuntime):
    """``LocalRuntime`` whose copies also answer on ports of their own (127.0.0.1), asked there as on Ray
    (``RayRuntime.ask_at``); ``BROKEN`` makes every port call fail as a refused or foreign port does."""

    BROKEN = False

    def ask_at(self, address, body):
        from impressions.actors.wire import PortFailed, answer_of, wire_client
        out = cf.Future()
        if PortRuntime.BROKEN:
            out.set_exception(PortFailed("refused"))
            return out
        sent = wire_client().ask(address.route(None), address.token, body)

        def done(f):
            try:
                out.set_result(answer_of(f.result()))
            except Exception as e:  # noqa: BLE001 - handed to the asker as the copy raised it
                out.set_exception(e)
        sent.add_done_callback(done)
        return out


def test_questions_on_the_copies_ports_answer_the_same_and_a_broken_port_falls_back_to_ray(tmp_path, stream):
    """Every copy (writer and readers) answers on a port of its own, published by the coordinator; the answers
    are the reference's whichever way they are asked; with every port failing, each question asks the same
    copies through the runtime instead: complete, the same, and no copy taken for gone."""
    batch, ref = stream
    storage = f"file://{tmp_path}/store"
    cfg = ClusterConfig(sketch=SK, shards=2, storage=storage, maintain_interval_s=3600, checkpoint_interval_s=3600,
                        query_timeout_s=5, readers=1, hedge_s=0.25)

    def st(layout):
        return ShardStorage(storage, None, layout.cluster_id, layout.folder)
    here = ["127.0.0.1"]
    runtime = PortRuntime(
        lambda i, layout, seed_from, *states: ShardActor(SK, i, layout.shards, st(layout), 32.0, seed_from, *states,
                                                         question_hosts=here),
        lambda i, r, layout: ShardReader(SK, i, layout.shards, st(layout), 32.0, r, question_hosts=here))
    coord = Coordinator(cfg, runtime)
    coord.start()
    assert coord.watch_readers() == [1, 1]
    _, writers, readers, ports, writer_ports = coord.read_route()
    assert all(a is not None for a in writer_ports) and all(a is not None for p in ports for a in p)
    direct = DirectQuestions(coord.read_route, runtime, coord.config, SK.p)
    _ingest(coord, runtime, batch, asker=direct)
    _settled(runtime, coord)
    rng = SK.resolve(now=NOW, last="2d")
    want = [r.to_dict() for r in ref.query_range(KEYS, rng)]

    def served():
        return sum(runtime.result(runtime.call(h, "stats"), 10).get("port_questions", 0)
                   for h in [*writers, *(r for rs in readers for r in rs)])
    before = served()
    assert direct.query(KEYS, rng) == want
    assert served() > before  # asked on the ports
    PortRuntime.BROKEN = True
    try:
        before = served()
        for _ in range(3):
            assert direct.query(KEYS, rng) == want
        assert served() == before and not direct._suspects  # through the runtime, no copy suspected
        assert direct._ports_down
    finally:
        PortRuntime.BROKEN = False
    # a copy stopped for good answers on its port no more (a process Ray killed may linger a moment)
    from impressions.actors.wire import PortFailed, encode_question, wire_client
    for h, a in [*zip(writers, writer_ports), *((r, a) for rs, ps in zip(readers, ports) for r, a in zip(rs, ps))]:
        runtime.kill(h)
        with pytest.raises(PortFailed):
            wire_client().ask(a.route(None), a.token, encode_question("query", 0, (KEYS, rng.b0, rng.b1))).result(5)
