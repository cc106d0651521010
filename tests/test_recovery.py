"""Never silently empty, never stale: recovery, fencing, re-sharding crashes, retention (no Ray)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import impressions.actors.coordinator as coordinator_module
from impressions.actors.coordinator import Coordinator
from impressions.actors.runtime import ShardUnavailable
from impressions.actors.sender import Sender
from impressions.actors.shard import ShardActor
from impressions.durable.journal import ShardJournal
from impressions.durable.layout import Layout, ShardStorage, read_layout, write_layout
from impressions.durable.objects import ObjectStore
from tests.test_coordinator import NOW, SK, _assert_equal, _cluster, _layout
from tests.test_exactly_once import _batch
from tests.test_journal import _storage

KEEP = 3600.0


def _shard_with_two_checkpoints(uri):
    a = ShardActor(SK, 0, 1, _storage(uri))
    for i in range(6):
        a.apply(_batch(2000, seed=i), f"b{i}", KEEP)
        a.maintain()
        if i in (2, 4):
            a.checkpoint()
    return a


def test_a_corrupt_object_both_checkpoints_share_leaves_the_shard_unavailable_never_empty(tmp_path):
    uri = f"file://{tmp_path}/store"
    _shard_with_two_checkpoints(uri)
    j = ShardJournal(ObjectStore(uri), "epoch-0", 0)
    first, second = (j.read_manifest(n) for n in j.manifests())
    objects = lambda m: {n[k] for n in m["nodes"] for k in ("object", "sealed") if n.get(k)}  # noqa: E731
    shared = sorted(objects(first) & objects(second))
    assert shared, "the two checkpoints share no object: make the test's stream longer"
    victim = tmp_path / "store" / "epoch-0" / "shard-0" / "nodes" / shared[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    b = ShardActor(SK, 0, 1, _storage(uri))
    assert b.unavailable and "none of the 2 checkpoints" in b.unavailable and len(b.recovery["fallbacks"]) == 2
    assert b.health()["available"] is False and "checksum" in b.health()["reason"]
    with pytest.raises(ShardUnavailable, match="unavailable"):
        b.query([None], 0, 1 << 30)
    with pytest.raises(ShardUnavailable):
        b.apply(_batch(10, seed=99), "new", KEEP)
    # repaired (the object restored), it starts on its next try, with everything
    victim.write_bytes(data)
    b._tried = 0
    b.maintain()
    assert b.unavailable is None and b.store.events == 6 * 2000


def test_manifests_are_numbered_from_the_store_and_collection_keeps_the_new_ones(tmp_path):
    uri = f"file://{tmp_path}/store"
    a = _shard_with_two_checkpoints(uri)
    j = ShardJournal(ObjectStore(uri), "epoch-0", 0)
    newest = tmp_path / "store" / "epoch-0" / "shard-0" / f"manifest-{j.manifests()[-1]:012d}.json"
    newest.write_bytes(newest.read_bytes()[:-10])  # the newest torn: the start falls back to the older one
    b = ShardActor(SK, 0, 1, _storage(uri))
    assert b.unavailable is None and b.recovery["manifest"] == j.manifests()[0]
    for _ in range(3):
        assert b.checkpoint()["manifest"] > 2  # never number 1 again, whatever was loaded
    c = ShardActor(SK, 0, 1, _storage(uri))
    assert c.recovery["manifest"] == max(j.manifests()) and c.store.events == a.store.events


class FlakyFS:
    """A filesystem whose first reads of checkpoint objects fail, as a network does."""

    def __init__(self, fs, fails: dict):
        self._fs, self.fails = fs, fails

    def open_input_stream(self, path, *a, **k):
        if self.fails["left"] > 0 and "/nodes/" in path:
            self.fails["left"] -= 1
            raise OSError("connection reset by peer")
        return self._fs.open_input_stream(path, *a, **k)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_transient_read_errors_are_retried(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/store"
    _shard_with_two_checkpoints(uri)
    fails = {"left": 2}

    def objects(self):
        o = ObjectStore(self.uri, self.s3_endpoint)
        o.fs = FlakyFS(o.fs, fails)
        return o
    monkeypatch.setattr(ShardStorage, "objects", objects)
    b = ShardActor(SK, 0, 1, _storage(uri))
    assert b.unavailable is None and not b.recovery["fallbacks"] and fails["left"] == 0
    assert b.store.events == 6 * 2000


def test_a_shard_refuses_a_store_that_is_not_its_clusters(tmp_path):
    uri = f"file://{tmp_path}/store"
    lost = ShardActor(SK, 0, 1, ShardStorage(uri, None, "abc", "epoch-0"))  # no cluster.json there
    assert lost.unavailable and "holds no cluster.json" in lost.unavailable
    write_layout(ObjectStore(uri), Layout.new(1, SK))
    other = ShardActor(SK, 0, 1, ShardStorage(uri, None, "not-this-one", "epoch-0"))
    assert other.unavailable and "belongs to cluster" in other.unavailable


def test_an_older_instance_is_fenced_and_its_late_writes_are_not_replayed(tmp_path):
    uri = f"file://{tmp_path}/store"
    old = ShardActor(SK, 0, 1, _storage(uri))
    old.apply(_batch(1000, seed=1), "a", KEEP)
    new = ShardActor(SK, 0, 1, _storage(uri))  # a restart while the old process still runs
    new.apply(_batch(1000, seed=2), "b", KEEP)
    old.apply(_batch(1000, seed=3), "c", KEEP)  # a late write of the superseded instance
    with pytest.raises(ShardUnavailable, match="superseded"):
        old.checkpoint()
    assert old.unavailable and "superseded" in old.unavailable
    third = ShardActor(SK, 0, 1, _storage(uri))
    assert third.store.events == 2000  # "a" and "b"; "c" came after the fence


class Crash(BaseException):
    """A process dying at a chosen point (not an error anyone handles)."""


STEPS = ["write_intent", "seal", "export", "checkpoint", "write_layout", "drop_folder"]


@pytest.mark.parametrize("step", STEPS)
def test_a_coordinator_that_dies_at_any_step_of_a_rescale_is_settled_by_the_next(tmp_path, stream_small,
                                                                              monkeypatch, step):
    batch, ref = stream_small
    coord, runtime = _cluster(tmp_path, shards=2)
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    sender.send(batch, "all", KEEP)
    sender.drain()
    if step in ("write_intent", "write_layout", "drop_folder"):
        real = getattr(coordinator_module, step)
        calls = {"n": 0}

        def dies(*a, **k):
            calls["n"] += 1
            if step != "write_layout" or calls["n"] == 1:
                if step == "write_intent":
                    real(*a, **k)  # the intent is written, then the process dies
                raise Crash()
            return real(*a, **k)
        monkeypatch.setattr(coordinator_module, step, dies)
    else:
        real_call = runtime.call

        target = "epoch-0" if step in ("seal", "export") else "epoch-1"  # the old shards, or the new

        def call(handle, method, *args):
            if method == step and target in handle.name:
                raise Crash()
            return real_call(handle, method, *args)
        monkeypatch.setattr(runtime, "call", call)
    with pytest.raises(Crash):
        coord.rescale(4)
    monkeypatch.undo()
    # a new coordinator (the old process is gone) on the same store and shards
    again = Coordinator(coord.config, runtime)
    again.start()
    layout = _layout(tmp_path)
    assert not (tmp_path / "store" / "rescale.json").exists()
    folders = sorted(p.name for p in (tmp_path / "store").iterdir() if p.is_dir())
    assert folders == [layout["folder"]], folders  # the abandoned layout's objects are gone
    assert layout["shards"] == (4 if step == "drop_folder" else 2)
    _assert_equal(again, ref)
    # and it takes batches: nothing is left sealed
    sender = Sender(runtime, again.route, SK.p, max_inflight=2, deadline_s=10)
    sender.send(_batch(100, seed=5), "after", KEEP)
    sender.drain()


def test_rescales_two_four_two_four_while_ingesting_change_no_register(tmp_path, stream_small):
    batch, ref = stream_small
    coord, runtime = _cluster(tmp_path, shards=2)
    n = len(batch)
    parts = [np.arange(n)[i::8] for i in range(8)]
    errors = []

    def ingest():
        try:
            s = Sender(runtime, coord.route, SK.p, max_inflight=2)
            for i, ix in enumerate(parts):
                s.send(type(batch)(batch.key_names, batch.key_index[ix], batch.bucket[ix], batch.coupon[ix]),
                       f"part-{i}", KEEP)
                if i % 2:
                    s.drain()
            s.drain()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
    t = threading.Thread(target=ingest)
    t.start()
    for shards in (4, 2, 4):
        coord.rescale(shards)
    t.join(120)
    assert not errors, errors
    coord.maintain()
    _assert_equal(coord, ref)
    assert _layout(tmp_path)["epoch"] == 3


def test_retention_is_enforced_by_the_upkeep_loop_and_keys_go_with_their_rows(tmp_path, stream_small):
    batch, _ = stream_small
    coord, runtime = _cluster(tmp_path, shards=2)
    sender = Sender(runtime, coord.route, SK.p, max_inflight=2)
    sender.send(batch, "all", KEEP)
    sender.drain()
    coord.maintain()
    coord.checkpoint()
    before = coord.stats()["shards"]
    assert all(s["keys"] > 1 and s["base_rows"] > 0 for s in before)
    # the loop's clock moved past the retention of every event
    coord.config = coord.config.replace(clock_offset_s=NOW - __import__("time").time() + SK.retention_seconds
                                        + 4 * 86400, maintain_interval_s=0.05)
    coord._maint = None
    coord.start()
    from tests.conftest import wait_for
    wait_for(lambda: all(s["base_rows"] == 0 for s in coord.stats()["shards"]), timeout=30, what="expiry")
    after = coord.stats()["shards"]
    assert all(s["keys"] == 1 and s["slots"] == 0 and s["upper_nodes"] == 0 for s in after), after
    for _ in range(3):  # the two newest checkpoints are kept, so the third after the expiry drops the objects
        coord.checkpoint()
    nodes = [os.listdir(tmp_path / "store" / "epoch-0" / f"shard-{i}" / "nodes") for i in range(2)]
    assert all(len(n) == 0 for n in nodes), nodes  # and so do their objects


def test_layouts_from_before_epochs_are_adopted(tmp_path, stream_small):
    """A store written before layouts had ids and epoch folders keeps working."""
    uri = f"file://{tmp_path}/store"
    objects = ObjectStore(uri)
    objects.write(objects.path("cluster.json"), b'{"shards": 1, "sketch": %s, "epoch": 0}' %
                  __import__("json").dumps(__import__("dataclasses").asdict(SK)).encode())
    legacy = read_layout(objects)
    assert legacy.folder == "shards-1" and legacy.cluster_id == ""
    coord, _ = _cluster(tmp_path, shards=1)
    layout = read_layout(objects)
    assert layout.folder == "shards-1" and layout.cluster_id  # given an id, same folder
