"""Durability of one shard, as a plain class: log, checkpoints, recovery."""

import os

import numpy as np
import pytest

from impressions.actors.shard import ShardActor, ShardMoved
from impressions.durable.journal import ShardJournal
from impressions.durable.layout import Layout, ShardStorage, read_layout, write_layout
from impressions.durable.objects import ObjectStore
from impressions.sketch.events import prepare
from tests.test_store import KEYS, NOW, SMALL, _stream


def _storage(uri: str, shards: int = 1) -> ShardStorage:
    """The store of a cluster (its layout written, as the coordinator writes it), for a shard of it."""
    objects = ObjectStore(uri)
    layout = read_layout(objects)
    if layout is None:
        layout = Layout.new(shards, SMALL)
        write_layout(objects, layout)
    return ShardStorage(uri, None, layout.cluster_id, layout.folder)


def _batches(rng, n_batches, per, b_lo, b_hi):
    out = []
    for _ in range(n_batches):
        k, b, h = _stream(rng, per, b_lo, b_hi)
        batch, rep = prepare(b * 60.0 + 1, [KEYS[i] for i in k], hashes=h, now=NOW, bucket_seconds=60,
                             retention_buckets=SMALL.retention_buckets, future_seconds=300)
        assert rep.accepted == per
        out.append((batch, k, b, h))
    return out


def _same(a: ShardActor, b: ShardActor, ranges):
    for b0, b1 in ranges:
        for key in [None, KEYS[0], KEYS[5], "nope"]:
            assert np.array_equal(a.registers(key, b0, b1), b.registers(key, b0, b1)), (key, b0, b1)
        ha, sa, ia = a.query([None, KEYS[0], KEYS[5]], b0, b1)
        hb, sb, ib = b.query([None, KEYS[0], KEYS[5]], b0, b1)
        assert np.array_equal(ha, hb) and np.array_equal(sa, sb) and np.array_equal(ia, ib), (b0, b1)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(8)
    now_b = int(NOW // 60)
    batches = _batches(rng, 12, 3000, now_b - 2500, now_b - 3)
    ranges = [(now_b - 2500, now_b + 1), (now_b - 900, now_b - 40), (now_b - 10, now_b + 1)]
    return f"file://{tmp_path}/store", batches, ranges


def test_restart_recovers_checkpoint_and_log(setup):
    uri, batches, ranges = setup
    a = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    ref = ShardActor(SMALL, 0, 1, None)  # the same events, no storage, no faults
    for i, (batch, *_) in enumerate(batches):
        a.apply(batch, f"b{i}")
        ref.apply(batch, f"b{i}")
        if i == 4:
            a.maintain()
            c1 = a.checkpoint()
            # every node is in the checkpoint: written now, or sealed (written when it was sealed)
            assert c1["nodes"] > 0 and c1["nodes_written"] + a.store.stats()["sealed_nodes"] >= c1["nodes"]
        if i == 8:
            a.maintain()
            c2 = a.checkpoint()
            assert 0 < c2["nodes_written"] < c2["nodes"] + 1  # incremental: unchanged nodes are not rewritten
    # a crash: a new process starts from the store
    b = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    assert b.recovery["manifest"] == 2 and b.recovery["replayed"] == 3 and not b.recovery["fallbacks"]
    _same(b, ref, ranges)
    # a retried batch (its answer was lost in the crash) is not counted twice
    assert b.apply(batches[-1][0], "b11") == 0
    _same(b, ref, ranges)


def test_torn_or_flipped_checkpoint_object_falls_back_to_the_previous(setup):
    uri, batches, ranges = setup
    for damage in ("truncate", "flip"):
        path = uri[len("file://"):] + "-" + damage
        a = ShardActor(SMALL, 0, 1, _storage("file://" + path, 1))
        ref = ShardActor(SMALL, 0, 1, None)
        for i, (batch, *_) in enumerate(batches):
            a.apply(batch, f"b{i}")
            ref.apply(batch, f"b{i}")
            if i in (3, 7):
                a.maintain()
                a.checkpoint()
        j = ShardJournal(ObjectStore("file://" + path), "epoch-0", 0)
        first, second = (j.read_manifest(n) for n in j.manifests())
        only_second = sorted({n["object"] for n in second["nodes"]} - {n["object"] for n in first["nodes"]})
        victim = os.path.join(path, "epoch-0", "shard-0", "nodes", only_second[0])
        data = open(victim, "rb").read()
        with open(victim, "wb") as f:
            if damage == "truncate":
                f.write(data[: len(data) // 2])
            else:
                f.write(data[:100] + bytes([data[100] ^ 0x10]) + data[101:])
        b = ShardActor(SMALL, 0, 1, _storage("file://" + path, 1))
        assert b.recovery["manifest"] == 1 and "does not match its checksum" in b.recovery["fallbacks"][0]
        _same(b, ref, ranges)  # nothing lost: the log since manifest 1 was kept


def test_torn_manifest_is_ignored(setup):
    uri, batches, ranges = setup
    a = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    for i, (batch, *_) in enumerate(batches[:6]):
        a.apply(batch, f"b{i}")
        if i in (2, 4):
            a.checkpoint()
    path = uri[len("file://"):]
    newest = os.path.join(path, "epoch-0", "shard-0", "manifest-000000000002.json")
    open(newest, "wb").write(open(newest, "rb").read()[:-20])
    b = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    assert b.recovery["manifest"] == 1
    _same(b, a, ranges)


def test_garbage_collection_keeps_what_the_fallback_needs(setup):
    uri, batches, ranges = setup
    a = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    for i, (batch, *_) in enumerate(batches):
        a.apply(batch, f"b{i}")
        a.maintain()
        a.checkpoint()
    j = ShardJournal(ObjectStore(uri), "epoch-0", 0)
    assert j.manifests() == [11, 12]
    older = j.read_manifest(11)
    assert [s for s, _ in j.log_entries(0)] == list(range(older["log_seq"] + 1, 13))
    named = {n[k] for m in (11, 12) for n in j.read_manifest(m)["nodes"] for k in ("object", "sealed") if n.get(k)}
    assert set(j.objects.list(j.base + "/nodes")) == named


def test_a_sealed_shard_refuses_batches_even_after_a_restart(setup):
    uri, batches, _ = setup
    a = ShardActor(SMALL, 0, 1, _storage(uri, 1))
    a.apply(batches[0][0], "b0")
    a.seal()
    with pytest.raises(ShardMoved):
        a.apply(batches[1][0], "b1")
    with pytest.raises(ShardMoved):
        ShardActor(SMALL, 0, 1, _storage(uri, 1)).apply(batches[1][0], "b1")


def test_a_shard_refuses_visitors_of_other_registers(tmp_path):
    from impressions.sketch.events import Batch
    a = ShardActor(SMALL, 0, 2, _storage(f"file://{tmp_path}/s", 2))
    top = np.array([(1 << 31) | 1], np.uint32)  # a coupon of the upper half: shard 1's
    with pytest.raises(ValueError, match="outside shard 0's range"):
        a.apply(Batch(["k"], np.zeros(1, np.int32), np.array([29_000_000]), top), "x")
    assert a.seq == 0  # nothing logged
