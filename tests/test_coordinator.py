"""The coordinator as a plain class: shards in this process, real storage, no Ray.

Queries, re-sharding and its rollback are driven through ``LocalRuntime``,
with a fault injected at every step of a re-sharding.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from impressions.actors.coordinator import Coordinator, RescaleFailed
from impressions.actors.runtime import LocalRuntime
from impressions.actors.sender import Sender
from impressions.actors.shard import ShardActor
from impressions.cluster.config import ClusterConfig
from impressions.cluster.workload import generate
from impressions.durable.layout import ShardStorage
from impressions.sketch.counter import LocalCounter
from impressions.sketch.events import prepare
from impressions.sketch.store import SketchConfig

NOW = 1_800_000_000.0
SK = SketchConfig(p=12, leaf_level=4, segment_level=8, memtable_rows=5_000)
KEYS = [None, "ad-0", "ad-3", "ad-17", "never-seen"]
FAULTS: dict[tuple[str, int], str] = {}  # (method, shard count) -> message of the OSError it raises


class FaultyShard(ShardActor):
    """A real shard that fails a chosen call, for shards of a chosen layout."""

    def __init__(self, sketch, shard, shards, *rest):
        self._shards_of = shards
        self._fault("init")
        super().__init__(sketch, shard, shards, *rest)

    def _fault(self, method: str) -> None:
        msg = FAULTS.get((method, self._shards_of))
        if msg:
            raise OSError(msg)

    def seal(self):
        self._fault("seal")
        return super().seal()

    def export(self):
        self._fault("export")
        return super().export()

    def checkpoint(self):
        self._fault("checkpoint")
        return super().checkpoint()


@pytest.fixture(autouse=True)
def _no_faults():
    FAULTS.clear()
    yield
    FAULTS.clear()


@pytest.fixture(scope="module")
def stream():
    t = generate(40_000, days=2, visitors=15_000, keys=30, seed=5, end=NOW)
    batch, report = prepare(t["ts"].to_numpy(), t["key"], visitors=t["visitor"], now=NOW, bucket_seconds=60,
                            retention_buckets=SK.retention_buckets, future_seconds=SK.future_seconds)
    assert report.rejected_total == 0
    ref = LocalCounter(SK)
    ref.ingest(t["ts"].to_numpy(), t["key"], visitors=t["visitor"], now=NOW)
    return batch, ref


def _cluster(tmp_path, shards=2):
    storage = f"file://{tmp_path}/store"
    cfg = ClusterConfig(sketch=SK, shards=shards, storage=storage, maintain_interval_s=3600,
                        checkpoint_interval_s=3600, query_timeout_s=5)
    runtime = LocalRuntime(lambda i, layout, seed_from, *states: FaultyShard(
        SK, i, layout.shards, ShardStorage(storage, None, layout.cluster_id, layout.folder), 32.0, seed_from, *states))
    coord = Coordinator(cfg, runtime)
    coord.start()
    return coord, runtime


def _ingest(coord, runtime, batch, parts=4):
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    for n, ix in enumerate(np.array_split(np.arange(len(batch)), parts)):
        sender.send(type(batch)(batch.key_names, batch.key_index[ix], batch.bucket[ix], batch.coupon[ix]),
                    f"part-{n}", 3600)
    sender.drain()
    return sender


def _assert_equal(coord, ref):
    now_b = int(NOW // 60)
    for b0, b1 in [(now_b - 2880, now_b + 1), (now_b - 700, now_b - 90), (now_b - 3, now_b + 1)]:
        rng = SK.resolve(now=NOW, start=b0 * 60, end=b1 * 60)
        for key in KEYS[:4]:
            assert np.array_equal(coord.registers(key, rng), ref.registers(key, b0, b1)), (key, b0, b1)
        assert coord.query(KEYS, rng) == [r.to_dict() for r in ref.query_range(KEYS, rng)]


def _layout(tmp_path) -> dict:
    return json.loads((tmp_path / "store" / "cluster.json").read_text())


def test_answers_equal_the_in_process_reference(tmp_path, stream):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    _ingest(coord, runtime, batch)
    _assert_equal(coord, ref)  # memtables and runs
    coord.maintain()
    _assert_equal(coord, ref)  # rollups built
    series = coord.series("ad-0", SK.resolve(now=NOW, last="2h"), 30)
    assert [p["end"] - p["start"] for p in series] == [1800] * 4
    assert sum(p["impressions"] for p in series) == ref.unique("ad-0", last="2h", now=NOW).impressions
    top = coord.keys(SK.resolve(now=NOW, last="2d"), "ad-", 3)
    assert [k["key"] for k in top] == ["ad-0", "ad-1", "ad-2"]


def test_rescale_two_four_one_keeps_every_answer_and_ingest_goes_on(tmp_path, stream):
    batch, ref = stream
    half = len(batch) // 2
    first = type(batch)(batch.key_names, batch.key_index[:half], batch.bucket[:half], batch.coupon[:half])
    rest = type(batch)(batch.key_names, batch.key_index[half:], batch.bucket[half:], batch.coupon[half:])
    coord, runtime = _cluster(tmp_path)
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    sender.send(first, "first", 3600)
    sender.drain()
    assert coord.rescale(4)["epoch"] == 1 and _layout(tmp_path)["shards"] == 4
    sender.send(rest, "rest", 3600)  # cut for the old map: refused by the retired shards, cut again for the new one
    sender.drain()
    _assert_equal(coord, ref)
    assert coord.rescale(1)["epoch"] == 2 and _layout(tmp_path)["epoch"] == 2
    coord.maintain()
    _assert_equal(coord, ref)
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if p.is_dir()) == ["epoch-2"]


@pytest.mark.parametrize("step", ["seal", "export", "init", "checkpoint"])
def test_a_failed_rescale_rolls_back_at_every_step(tmp_path, stream, step):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    _ingest(coord, runtime, batch, parts=2)
    before = coord.route()
    FAULTS[(step, 2 if step in ("seal", "export") else 4)] = f"injected {step} failure"
    with pytest.raises(RescaleFailed, match=f"injected {step} failure"):
        coord.rescale(4)
    # nothing switched: same map, same layout, no trace of the abandoned one
    assert coord.route() == before and _layout(tmp_path)["shards"] == 2 and _layout(tmp_path)["epoch"] == 0
    assert not (tmp_path / "store" / "epoch-1").exists() and not (tmp_path / "store" / "rescale.json").exists()
    assert any("rolled back" in e for e in coord.events)
    # the old shards take batches again and answer as before
    assert not any(h.actor.sealed for h in before[1])
    _assert_equal(coord, ref)
    FAULTS.clear()
    assert coord.rescale(4)["changed"]
    _assert_equal(coord, ref)


def test_rescale_after_sealing_keeps_every_answer(tmp_path, stream):
    """Sealed nodes (files) are exported and re-sharded like heap ones."""
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    _ingest(coord, runtime, batch)
    coord.maintain()
    assert all(s["sealed_nodes"] > 0 for s in coord.stats()["shards"])
    coord.rescale(4)
    _assert_equal(coord, ref)
    coord.maintain()
    coord.rescale(1)
    _assert_equal(coord, ref)


def test_a_shard_gone_makes_answers_partial_never_failed(tmp_path, stream):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path, shards=4)
    _ingest(coord, runtime, batch)
    rng = SK.resolve(now=NOW, last="2d")
    full = coord.query([None], rng)[0]
    runtime.kill(coord.route()[1][1])
    part = coord.query([None], rng)[0]
    true = ref.unique(None, last="2d", now=NOW).unique_visitors
    assert part["partial"] and not full["partial"] and part["relative_error"] > full["relative_error"]
    assert part["interval"][0] <= true <= part["interval"][1]
    assert coord.stats()["shards"][1] is None


def test_a_restarted_coordinator_adopts_the_layout_on_the_store(tmp_path, stream):
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    _ingest(coord, runtime, batch)
    coord.rescale(4)
    coord.checkpoint()
    for h in runtime.handles():
        runtime.kill(h)
    # a new coordinator configured for 2 shards finds 4 on the store, and their data
    again, _ = _cluster(tmp_path, shards=2)
    assert again.cluster_config().shards == 4 and again.route()[0] == 1
    _assert_equal(again, ref)


def test_direct_questions_answer_as_the_coordinator_and_follow_a_re_sharding(tmp_path, stream):
    """The one-hop path (a copy of the shard map, the shards asked directly): the same answers as
    through the coordinator; after a re-sharding its stale copy is noticed (the old shards are
    stopped) and the question asked again of the new layout; a shard gone leaves it partial."""
    from impressions.actors.questions import DirectQuestions
    batch, ref = stream
    coord, runtime = _cluster(tmp_path)
    _ingest(coord, runtime, batch)
    direct = DirectQuestions(coord.route, runtime, coord.config, SK.p)
    now_b = int(NOW // 60)
    rng = SK.resolve(now=NOW, start=(now_b - 700) * 60, end=(now_b + 1) * 60)

    def on_loop(question):  # as a REST replica asks: on an event loop
        return asyncio.run(question)

    def same():
        want = [r.to_dict() for r in ref.query_range(KEYS, rng)]
        assert on_loop(direct.aquery(KEYS, rng)) == direct.query(KEYS, rng) == coord.query(KEYS, rng) == want
        want = coord.reach(["ad-0", "ad-3"], "ad-1", rng)
        assert direct.reach(["ad-0", "ad-3"], "ad-1", rng) == on_loop(direct.areach(["ad-0", "ad-3"], "ad-1", rng)) \
            == want
        want = coord.overlap((["ad-0"], None), ([], "ad-1"), rng)
        assert direct.overlap((["ad-0"], None), ([], "ad-1"), rng) == want
        assert on_loop(direct.aoverlap((["ad-0"], None), ([], "ad-1"), rng)) == want
        a, b = (x.rolling(["ad-0"], None, rng, 60, 240) for x in (direct, coord))
        c = on_loop(direct.arolling(["ad-0"], None, rng, 60, 240))
        assert [{k: v for k, v in p.items() if k != "complete"} for p in a["points"]] == \
            [{k: v for k, v in p.items() if k != "complete"} for p in b["points"]] == \
            [{k: v for k, v in p.items() if k != "complete"} for p in c["points"]]
        assert len(c["points"]) > 1
    same()
    assert direct.refreshes == 1
    coord.rescale(4)  # the copy still names the two old shards, now stopped
    # asked on an event loop first: the stale copy noticed there, the question asked again of the new layout
    assert on_loop(direct.aquery(KEYS, rng)) == [r.to_dict() for r in ref.query_range(KEYS, rng)]
    assert direct.refreshes == 2 and len(direct._shard_map().handles) == 4
    same()
    assert direct.refreshes == 2
    runtime.kill(coord.map.handles[3])  # a shard gone, no new layout: partial, from the three that answer
    got = direct.query(["ad-0"], rng)[0]
    assert got["partial"] and got == coord.query(["ad-0"], rng)[0] == on_loop(direct.aquery(["ad-0"], rng))[0]


class NappingShard(FaultyShard):
    """A shard whose applies stay in the call for ``NAP`` seconds after the batch is in."""

    NAP = 0.0

    def apply(self, *a, **k):
        out = super().apply(*a, **k)
        time.sleep(NappingShard.NAP)
        return out


def test_questions_never_wait_behind_writes_and_always_see_whole_states(tmp_path, stream):
    """Questions run beside the writer's calls, on immutable views: one asked during a slow apply is
    answered at once; while batches, flushes, rollups and sealing go on, every answer is a whole
    state (site-wide impressions never fall, never pass what was sent); the last equals the reference."""
    import threading
    batch, ref = stream
    storage = f"file://{tmp_path}/store"
    sk = SketchConfig(p=12, leaf_level=4, segment_level=8, memtable_rows=2_000)  # flushes all the time
    cfg = ClusterConfig(sketch=sk, shards=2, storage=storage, maintain_interval_s=3600,
                        checkpoint_interval_s=3600, query_timeout_s=5)
    runtime = LocalRuntime(lambda i, layout, seed_from, *states: NappingShard(
        sk, i, layout.shards, ShardStorage(storage, None, layout.cluster_id, layout.folder), 32.0, seed_from, *states))
    coord = Coordinator(cfg, runtime)
    coord.start()
    rng = sk.resolve(now=NOW, last="3d")  # every event of the stream
    NappingShard.NAP = 1.5
    sender = Sender(runtime, coord.route, sk.p, max_inflight=2)
    first = type(batch)(batch.key_names, batch.key_index[:1000], batch.bucket[:1000], batch.coupon[:1000])
    sender.send(first, "first", 3600)
    time.sleep(0.3)  # the applies are in, the calls still running
    t0 = time.perf_counter()
    got = coord.query([None], rng)[0]
    assert time.perf_counter() - t0 < 0.5, "a question waited behind an apply"
    assert got["impressions"] == 1000 and not got["partial"]
    sender.drain()
    NappingShard.NAP = 0.0
    seen, stop, errors = ([], []), threading.Event(), []

    def ask(mine: list):
        while not stop.is_set():
            try:
                mine.append(coord.query([None], rng)[0]["impressions"])
            except Exception as e:  # noqa: BLE001 - collected, the test fails on any
                errors.append(e)

    readers = [threading.Thread(target=ask, args=(mine,)) for mine in seen]
    for t in readers:
        t.start()
    rest = np.arange(1000, len(batch))
    for n, ix in enumerate(np.array_split(rest, 12)):
        sender.send(type(batch)(batch.key_names, batch.key_index[ix], batch.bucket[ix], batch.coupon[ix]),
                    f"part-{n}", 3600)
        if n % 4 == 3:
            sender.drain()
            coord.maintain()  # flush, fold, build rollups (and the shards seal what will not change)
            for p in [runtime.call(h, "seal_nodes") for h in coord.map.handles]:
                runtime.result(p, 60)
    sender.drain()
    coord.maintain()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    for mine in seen:  # one reader's answers, in the order it got them, never fall: each view is a later state
        assert len(mine) > 10 and all(1000 <= v <= len(batch) for v in mine)
        assert all(b >= a for a, b in zip(mine, mine[1:])), mine
    final = coord.query(KEYS, rng)
    assert final == [r.to_dict() for r in ref.query_range(KEYS, rng)]


class StallingShard(FaultyShard):
    """A shard whose applies wait while ``GATE`` is closed, for shard ``WHICH`` (a writer restarting)."""

    import threading as _t
    GATE = _t.Event()
    WHICH = 0

    def apply(self, *a, **k):
        if self.shard_index == StallingShard.WHICH:
            StallingShard.GATE.wait(30)
        return super().apply(*a, **k)


def test_a_range_that_stops_answering_holds_back_only_its_own_parts(tmp_path, stream):
    """While one range takes nothing, the sender goes on: the other range ingests every batch, the stalled
    range's parts queue (bounded), and when it answers again everything lands once."""
    from impressions.actors import sender as sender_mod
    batch, ref = stream
    storage = f"file://{tmp_path}/store"
    cfg = ClusterConfig(sketch=SK, shards=2, storage=storage, maintain_interval_s=3600, checkpoint_interval_s=3600,
                        query_timeout_s=5, readers=0)
    runtime = LocalRuntime(lambda i, layout, seed_from, *states: StallingShard(
        SK, i, layout.shards, ShardStorage(storage, None, layout.cluster_id, layout.folder), 32.0, seed_from, *states))
    coord = Coordinator(cfg, runtime)
    coord.start()
    StallingShard.GATE.clear()
    try:
        sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
        t0 = time.perf_counter()
        parts = list(np.array_split(np.arange(len(batch)), 20))
        for n, ix in enumerate(parts):
            sender.send(type(batch)(batch.key_names, batch.key_index[ix], batch.bucket[ix], batch.coupon[ix]),
                        f"p-{n}", 3600)
        took = time.perf_counter() - t0
        assert sender.held == [0]
        assert took < sender_mod.HOLD_S + 5  # waited once for range 0 to turn held back, then went on
        other = runtime.result(runtime.call(coord.map.handles[1], "stats"), 10)
        assert other["applied_batches"] >= 18  # range 1 took (nearly) everything meanwhile
    finally:
        StallingShard.GATE.set()
    sender.drain()
    _assert_equal(coord, ref)
