"""Exactly once, end to end: retries from anywhere, restarts, re-sharding (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from impressions.actors.applied import AppliedBatches
from impressions.actors.sender import Sender
from impressions.sketch.events import Batch, prepare
from tests.test_coordinator import NOW, SK, _assert_equal, _cluster
from tests.test_journal import _storage

KEEP = 3600.0


def test_applied_records_cut_restrict_merge_expire_and_round_trip():
    a = AppliedBatches()
    assert a.unapplied("x", 0, 100, now=0) == [(0, 100)]
    a.record("x", 0, 50, now=0, expires=10)
    assert a.unapplied("x", 0, 100, now=5) == [(50, 100)]
    assert a.unapplied("x", 0, 50, now=5) == []
    assert a.unapplied("x", 0, 100, now=11) == [(0, 100)]  # forgotten after its time
    # a split hands each half what was applied of it; a merge joins them again
    left, right = a.restrict(0, 25), a.restrict(25, 100)
    assert left.unapplied("x", 0, 25, now=5) == [] and right.unapplied("x", 25, 100, now=5) == [(50, 100)]
    both = AppliedBatches.merged([left, right])
    assert both.unapplied("x", 0, 100, now=5) == [(50, 100)]
    back = AppliedBatches()
    for g in both.groups():
        back.load_group(both.group_table(g))
    assert back.unapplied("x", 0, 100, now=5) == [(50, 100)] and len(back) == 1
    assert back.expire(now=11) == 1 and len(back) == 0
    with pytest.raises(ValueError, match="malformed"):
        back.load_group(pa.table({"id": ["y"], "lo": pa.array([5], pa.int32()), "hi": pa.array([1], pa.int32()),
                                  "expires": [1.0]}, schema=both.group_table(both.groups()[0]).schema))


def _batch(n=3000, seed=1, key="ad-1"):
    rng = np.random.default_rng(seed)
    b, rep = prepare(NOW - rng.integers(0, 3000, n).astype(float), [key] * n, hashes=rng.integers(0, 2**64, n,
                     dtype=np.uint64), now=NOW, bucket_seconds=60, retention_buckets=SK.retention_buckets,
                     future_seconds=300)
    assert rep.accepted == n
    return b


def test_a_shard_counts_a_batch_once_across_retries_restarts_and_checkpoints(tmp_path):
    from impressions.actors.shard import ShardActor
    uri = f"file://{tmp_path}/store"
    a = ShardActor(SK, 0, 1, _storage(uri))
    b1, b2 = _batch(seed=1), _batch(seed=2)
    assert a.apply(b1, "job:f1:0", KEEP) == len(b1)
    assert a.apply(b1, "job:f1:0", KEEP) == 0  # a retry
    a.checkpoint()
    assert a.apply(b2, "job:f1:1", KEEP) == len(b2)
    again = ShardActor(SK, 0, 1, _storage(uri))  # a restart: the checkpoint's records and the log's
    assert again.apply(b1, "job:f1:0", KEEP) == 0 and again.apply(b2, "job:f1:1", KEEP) == 0
    assert again.store.events == len(b1) + len(b2)
    # bounded by time: a record past its time is forgotten, and the same id counts anew
    assert again.apply(b1, "short", 0.0) == len(b1)
    assert again.apply(b1, "short", 0.0) == len(b1)


def test_retries_across_a_split_and_a_merge_count_once(tmp_path, stream_small):
    batch, ref = stream_small
    coord, runtime = _cluster(tmp_path, shards=2)
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    sender.send(batch, "slice-0", KEEP)
    sender.drain()
    coord.rescale(4)
    # the same slice again (a job's task retried after the split): the new shards know it
    sender.send(batch, "slice-0", KEEP)
    sender.drain()
    _assert_equal(coord, ref)
    # a merge where only some old shards had applied a slice: the new shard applies the rest only
    h = coord.route()[1]
    other = batch.split(SK.p, 4)
    runtime.result(runtime.call(h[0], "apply", other[0], "slice-1", KEEP))  # shard 0 of 4 took its part...
    coord.rescale(2)  # ...then the layout changed before shard 1 of 4 got its own
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    sender.send(batch, "slice-1", KEEP)  # the job retries the whole slice
    sender.drain()
    st = [runtime.result(runtime.call(x, "stats")) for x in coord.route()[1]]
    assert sum(s["events"] for s in st) == 2 * len(batch)  # slice-0 once, slice-1 once: nothing twice, nothing lost


def test_a_batch_cut_again_after_a_rescale_keeps_its_id(tmp_path, stream_small):
    """A part refused by a retired shard is re-cut for the new map under the same id."""
    batch, ref = stream_small
    coord, runtime = _cluster(tmp_path, shards=2)
    stale = Sender(runtime, coord.route, SK.p, max_inflight=8)  # knows the 2-shard map
    coord.rescale(4)
    stale.send(batch, "late", KEEP)
    stale.drain()
    stale.send(batch, "late", KEEP)  # and a retry of the whole thing
    stale.drain()
    _assert_equal(coord, ref)


def test_within_keeps_the_events_of_the_ranges():
    b = _batch(2000)
    from impressions.sketch.hll import coupon_register
    reg = coupon_register(b.coupon, SK.p)
    part = b.within(SK.p, [(0, 1000), (3000, 4000)])
    r2 = coupon_register(part.coupon, SK.p)
    assert (((r2 >= 0) & (r2 < 1000)) | ((r2 >= 3000) & (r2 < 4000))).all()
    assert len(part) == int((((reg >= 0) & (reg < 1000)) | ((reg >= 3000) & (reg < 4000))).sum())
    assert isinstance(part, Batch)


def test_a_part_records_only_the_registers_it_stands_for():
    """A piece cut for a finer shard map claims its share of the registers, not the shard's whole range."""
    from impressions.actors.shard import ShardActor
    a = ShardActor(SK, 0, 1, None)
    quarters = _batch(3000).split(SK.p, 4)
    m = 1 << SK.p
    assert a.apply(quarters[2], "x", KEEP, m // 2, 3 * m // 4) == len(quarters[2])
    assert a.apply(quarters[3], "x", KEEP, 3 * m // 4, m) == len(quarters[3])  # the same batch's other piece
    assert a.apply(quarters[3], "x", KEEP, 3 * m // 4, m) == 0  # now a retry
    with pytest.raises(ValueError, match="outside"):
        a.apply(quarters[1], "y", KEEP, m // 2, m)  # events outside the registers the part claims


def test_a_new_shard_awaits_its_seed_and_takes_it_once():
    """A re-sharding's new shard is seeded by a call (not creation arguments, which Ray keeps pinned for the
    actor's life): until then it serves nothing, upkeep does not start it empty, and a retried seed is a no-op."""
    from impressions.actors.runtime import ShardUnavailable
    from impressions.actors.shard import ShardActor
    old = ShardActor(SK, 0, 1, None)
    old.apply(_batch(3000), "x", KEEP)
    state = old.export()
    new = ShardActor(SK, 1, 2, None, await_seed=True)
    b1 = int(NOW // 60) + 1
    with pytest.raises(ShardUnavailable, match="waiting for the old shards"):
        new.query(["ad-1"], b1 - 100, b1)
    assert new.maintain() is False
    with pytest.raises(ShardUnavailable, match="waiting for the old shards"):
        new.checkpoint()
    n = new.seed([(0, 1)], state)
    ref = ShardActor(SK, 1, 2, None, 32.0, [(0, 1)], state)  # seeded through its constructor
    assert n == ref.store.events
    got = new.registers("ad-1", b1 - 100, b1)
    assert got.any() and np.array_equal(got, ref.registers("ad-1", b1 - 100, b1))
    assert new.seed([(0, 1)], state) == n  # a retried call changes nothing
    assert np.array_equal(new.registers("ad-1", b1 - 100, b1), ref.registers("ad-1", b1 - 100, b1))
