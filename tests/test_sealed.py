"""Sealed nodes: files read block by block answer exactly as the heap did."""

from __future__ import annotations

import numpy as np
import pytest

from impressions.sketch import sealed
from impressions.sketch.counter import LocalCounter
from impressions.sketch.sealed import BlockCache, SealedError, SealedFile, encode
from tests.reference import Events
from tests.test_store import KEYS, NOW, SMALL, _check_ranges, _ingest, _stream


def seal_all(store, folder, cache=None) -> int:
    """Write every sealable node of ``store`` to a file in ``folder`` and read it from there."""
    n = 0
    for node in store.sealable():
        # a new name for every file: a mapped file is never written over
        path = folder / f"s{store.shard}-{node.kind}-{node.level}-{node.node}-{node.version}-{len(list(folder.iterdir()))}.arrow"
        path.write_bytes(encode(node.parts(), store.rr.R, {"p": store.config.p}))
        store.seal(node, SealedFile(str(path), store.rr.R, {"p": store.config.p}, cache=cache))
        n += 1
    return n


def _check_key_impressions(c, ev, rng, b_lo, b_hi, n=10):
    """Every key's impressions (what top-keys reads) summed over shards, against the reference."""
    for _ in range(n):
        b0 = int(rng.integers(b_lo - 5, b_hi))
        b1 = int(rng.integers(b0 + 1, b_hi + 6))
        got: dict = {}
        for st in c.stores:
            names, totals = st.key_impressions(b0, b1)
            for name, v in zip(names, totals):
                got[name] = got.get(name, 0) + int(v)
        want = {k: ev.impressions(k, b0, b1) for k in KEYS}
        assert got == {k: v for k, v in want.items() if v}, (b0, b1)


def _check_one_key_totals(store, monkeypatch):
    """A sealed table's remembered one-key totals (``key_impression``) are its per-key totals, however many
    keys are asked one at a time (the memory is bounded, then starts afresh)."""
    monkeypatch.setattr(sealed, "ONE_KEYS", 3)
    tables = [t for slot in store.tiers.slots.values() for t in slot.base_tables() if isinstance(t, sealed.BlockedTable)
              and t.level == 0]
    assert tables
    for t in tables:
        ids = t.key_ids.tolist() + [max(t.key_ids.tolist()) + 1, 10**9]  # and keys it does not hold
        want = t.key_impressions(np.array(ids, np.int64)).tolist()
        for _ in range(2):  # asked, then remembered (or forgotten and asked again)
            assert [t.key_impression(k) for k in ids] == want
            assert len(t._one) <= 3


@pytest.mark.parametrize("shards", [1, 4])
def test_sealed_nodes_answer_register_for_register(tmp_path, shards, monkeypatch):
    rng = np.random.default_rng(shards + 40)
    c = LocalCounter(SMALL, shards=shards)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 3000, now_b - 10
    _ingest(c, ev, *_stream(rng, 40_000, b_lo, b_hi))
    c.maintain()
    tiny = BlockCache(budget=200_000)  # a cache far smaller than the data: blocks come and go
    assert sum(seal_all(s, tmp_path, tiny) for s in c.stores) > 0
    assert all(not s.sealable() for s in c.stores)
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)
    _check_key_impressions(c, ev, rng, b_lo, b_hi)
    _check_one_key_totals(c.stores[0], monkeypatch)
    # late events on sealed segments become runs there, and maintenance rebuilds from the files
    _ingest(c, ev, *_stream(rng, 4000, b_lo, b_hi))
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    c.maintain()
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    seal_all(c.stores[0], tmp_path, tiny)
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    st = c.stores[0].stats()
    assert st["sealed_nodes"] > 0 and st["sealed_bytes"] > 0
    cs = tiny.stats()  # the cache reports its use (a shard's and a reader's stats carry it)
    assert cs["block_cache_misses"] > 0 and cs["block_cache_hits"] > 0
    assert 0 < cs["block_cache_bytes"] <= cs["block_cache_budget"] + max(t.nbytes for _, t in tiny.items())


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    c = LocalCounter(SMALL)
    _ingest(c, Events(KEYS), *_stream(rng, 20_000, int(NOW // 60) - 2000, int(NOW // 60) - 10))
    c.maintain()
    node = max(c.stores[0].sealable(), key=lambda n: sum(len(t) for _, t in n.parts()))
    data = encode(node.parts(), c.stores[0].rr.R, {"p": SMALL.p})
    good = tmp_path / "good.arrow"
    good.write_bytes(data)
    with pytest.raises(SealedError, match="p=11, this store has p=12"):
        SealedFile(str(good), c.stores[0].rr.R, {"p": 12})
    with pytest.raises(SealedError, match="not a readable sealed file"):
        (tmp_path / "short.arrow").write_bytes(data[: len(data) // 2])
        SealedFile(str(tmp_path / "short.arrow"), c.stores[0].rr.R, {"p": SMALL.p})
    # a flipped byte anywhere: the file is refused when opened, or the block it hit when read; a block
    # that reads is exactly what was written
    f = SealedFile(str(good), c.stores[0].rr.R, {"p": SMALL.p})
    raw = bytearray(data)
    refused_blocks = 0
    for offset in range(8, len(raw) - 8, max(1, len(raw) // 60)):
        raw2 = bytearray(raw)
        raw2[offset] ^= 0x04
        bad = tmp_path / f"bad-{offset}.arrow"  # never write over a mapped file
        bad.write_bytes(bytes(raw2))
        try:
            g = SealedFile(str(bad), c.stores[0].rr.R, {"p": SMALL.p}, cache=BlockCache())
        except SealedError:
            continue
        for bt in g.tables:
            for i in range(len(bt.first)):
                try:
                    got = bt._decode(i)
                except SealedError:
                    refused_blocks += 1
                    continue
                ref = f.tables[bt.index]._decode(i)
                for name in ("code", "off", "dense", "coupons", "regs", "imp"):
                    assert np.array_equal(getattr(got, name), getattr(ref, name)), (offset, name)
    assert refused_blocks > 0
    f.close()


def test_sealed_after_a_split_keeps_every_count(tmp_path):
    """A split gives a row's impressions to one new shard and its coupons to both: a sealed
    row may hold fewer impressions than coupons, and must read back as it was."""
    from tests.test_reshard import _reshaped
    rng = np.random.default_rng(77)
    c = LocalCounter(SMALL, shards=2)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 2500, now_b - 10
    _ingest(c, ev, *_stream(rng, 30_000, b_lo, b_hi))
    c.maintain()
    c = _reshaped(c, 4)
    c.maintain()
    for s in c.stores:
        seal_all(s, tmp_path)
    _check_ranges(c, ev, rng, b_lo, b_hi, 20)


def test_rows_read_back_whatever_the_order_of_keys_and_nodes():
    """Nodes are stored above the table's lowest node, whichever key holds it: a
    first key whose nodes are later than another key's must not wrap around."""
    from impressions.sketch.rows import RowTable, code_keys, code_nodes, make_code
    R = 8
    keys = np.array([1, 1, 2, 2, 5, 7], np.int64)
    nodes = np.array([900, 905, 40, 41, 899, 3], np.int64)  # the first key's nodes are the latest
    code = make_code(keys, nodes)
    lengths = np.array([2, 0, 1, 3, 0, 1], np.int64)
    off = np.r_[0, np.cumsum(lengths)]
    dense = np.array([-1, 0, -1, -1, 1, -1], np.int32)
    coupons = np.array([70, 130, 5, 1, 66, 300, 9], np.uint32)
    regs = np.arange(2 * R, dtype=np.uint8).reshape(2, R)
    t = RowTable(0, code, off, dense, coupons, regs, lengths + 3)
    f = SealedFile(encode([(0, t)], R, {"p": 11}), R, {"p": 11}, cache=BlockCache())
    got = f.table(0, 0).materialize()
    assert np.array_equal(code_keys(got.code), keys) and np.array_equal(code_nodes(got.code), nodes)
    assert np.array_equal(got.off, off) and np.array_equal(got.coupons, coupons)
    assert np.array_equal(got.dense, dense) and np.array_equal(got.regs, regs)
    assert np.array_equal(got.imp, lengths + 3)


class _Block:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def _held(cache: BlockCache) -> int:
    return sum(t.nbytes for _, t in cache.items())


def test_the_block_cache_keeps_blocks_asked_for_again_through_a_scan_of_blocks_asked_for_once():
    cache = BlockCache(budget=100_000)
    cache.CORRELATED_S = 0.0  # every get a later question's
    hot = [("f", 0, i) for i in range(6)]
    for k in hot:  # a dashboard's blocks: decoded once, then asked for again
        cache.put(k, _Block(10_000))
        assert cache.get(k) is not None
    cache.CORRELATED_S = 60.0  # a block asked for again at once: the same question's
    for i in range(200):  # questions over random hours: every block new, asked for by its question alone
        k = ("g", 0, i)
        assert cache.get(k) is None
        cache.put(k, _Block(10_000))
        assert cache.get(k) is not None  # twice in one question (a join, then its totals): not promoted
        assert cache.bytes == _held(cache) <= cache.budget
    assert all(cache.get(k) is not None for k in hot)  # none of them was evicted by the scan
    # protected blocks fill at most PROTECTED of the budget: past it, the least recent go back on probation
    cache.CORRELATED_S = 0.0
    for i in range(12):
        k = ("h", 0, i)
        cache.put(k, _Block(10_000))
        cache.get(k)
    assert cache.stats()["block_cache_protected_bytes"] <= BlockCache.PROTECTED * cache.budget
    assert cache.bytes == _held(cache) <= cache.budget
    assert cache.get(hot[0]) is None  # the least recent hot block: demoted, then evicted
    cache.drop("h")
    assert not any(k[0] == "h" for k, _ in cache.items()) and cache.bytes == _held(cache)
    cache.clear()
    assert not cache.items() and cache.bytes == 0 and cache.stats()["block_cache_protected_bytes"] == 0


def test_view_keys_holds_every_row_of_the_keys_asked_however_far_apart(monkeypatch):
    """A few keys far apart read only the blocks holding them: every row of theirs is in the view, from the
    first block to the last, whether their blocks run on or not."""
    from impressions.sketch.rows import RowTable, code_keys, code_nodes, make_code
    monkeypatch.setattr(sealed, "BLOCK_BYTES", 512)
    R, rng = 8, np.random.default_rng(3)
    keys = np.repeat(np.arange(600, dtype=np.int64), 4)
    nodes = np.tile(np.array([10, 11, 30, 31], np.int64), 600)
    lengths = rng.integers(1, 6, len(keys))
    off = np.r_[0, np.cumsum(lengths)]
    coupons = rng.integers(0, 1 << 30, int(off[-1])).astype(np.uint32)
    t = RowTable(0, make_code(keys, nodes), off, np.full(len(keys), -1, np.int32), coupons,
                 np.zeros((0, R), np.uint8), lengths.copy())
    table = SealedFile(encode([(0, t)], R, {"p": 11}), R, {"p": 11}, cache=BlockCache()).table(0, 0)
    assert len(table.first) > 20
    for ids in ([0], [599], [0, 599], [0, 300, 599], [5, 6, 7], sorted(rng.choice(600, 40, replace=False))):
        for n0, n1 in ((0, 100), (11, 31), (30, 32)):
            got = table.view_keys(np.array(ids, np.int64), n0, n1)
            gk, gn = code_keys(got.code), code_nodes(got.code)
            mine = np.isin(gk, ids) & (gn >= n0) & (gn < n1)
            want = np.isin(keys, ids) & (nodes >= n0) & (nodes < n1)
            assert np.array_equal(got.code[mine], t.code[want]), (ids, n0, n1)
            assert np.array_equal(np.diff(got.off)[mine], lengths[want])


# ---------------------------------------------------------------- the local cache of a remote store

def _answers(shard, names, now_b):
    out = []
    for n in (60, 700, 1440, 2000):
        hist, sparse, imp = shard.query(names, now_b + 1 - n, now_b + 1)
        out.append((hist.tolist(), sparse.tolist(), imp.tolist()))
    out.append(sorted(zip(*shard.key_impressions(now_b - 1500, now_b + 1))))
    return out


def _remote_shard(tmp_path, s3_server, stream_small, bucket):
    import pyarrow.fs as pafs

    from impressions.actors.shard import ShardActor
    from impressions.durable.layout import Layout, ShardStorage, write_layout
    from impressions.durable.objects import ObjectStore
    from tests.test_coordinator import SK
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1",
                           access_key="test", secret_key="test", allow_bucket_creation=True)
    fs.create_dir(bucket)
    uri = f"s3://{bucket}/cluster"
    layout = Layout.new(1, SK)
    write_layout(ObjectStore(uri, s3_server), layout)
    cache = tmp_path / "cache"

    def start():
        return ShardActor(SK, 0, 1, ShardStorage(uri, s3_server, layout.cluster_id, layout.folder,
                                                  cache_dir=str(cache)))

    a = start()
    batch, _ = stream_small
    a.apply(batch, "all", 3600.0)
    a.maintain()
    a.checkpoint()
    assert a.store.stats()["sealed_nodes"] > 0
    return a, start, cache


def test_sealed_files_of_a_remote_store_are_fetched_again_when_missing_truncated_or_damaged(
        tmp_path, s3_server, stream_small, monkeypatch):
    import hashlib

    from tests.test_coordinator import NOW
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    a, start, cache = _remote_shard(tmp_path, s3_server, stream_small, "sealed-cache")
    names = [None] + [f"ad-{i}" for i in range(20)]
    now_b = int(NOW // 60)
    want = _answers(a, names, now_b)
    files = sorted(cache.rglob("*.arrow"), key=lambda p: p.stat().st_size)
    assert files, "sealed files are kept in the local cache as they are written"

    def whole(p) -> bool:
        return p.exists() and hashlib.sha256(p.read_bytes()).hexdigest()[:len(p.stem)] == p.stem

    assert all(whole(p) for p in files)
    # missing: fetched when the shard starts
    for p in files:
        p.unlink()
    b = start()
    assert _answers(b, names, now_b) == want and all(whole(p) for p in files)
    # truncated: refused when opened, fetched again
    big = files[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    c = start()
    assert _answers(c, names, now_b) == want and whole(big)
    # a damaged byte inside blocks (the file still opens): the block fails its checksum, the copy is
    # fetched again and the block read from it; never an answer from damaged bytes
    data = bytearray(big.read_bytes())
    for at in range(len(data) // 5, 4 * len(data) // 5, max(1, len(data) // 40)):
        data[at] ^= 0x20
    big.write_bytes(bytes(data))
    d = start()
    for node in d.store.nodes():  # read every block of every node
        for _, t in node.parts():
            if hasattr(t, "materialize"):
                t.materialize()
    assert whole(big)
    assert sum(n.sealed.refetched for n in d.store.nodes() if n.sealed is not None) >= 1
    assert _answers(d, names, now_b) == want


def test_a_damaged_block_on_a_local_store_is_refused_never_read(tmp_path, stream_small):
    from impressions.actors.shard import ShardActor
    from tests.test_coordinator import SK
    from tests.test_journal import _storage
    uri = f"file://{tmp_path}/store"
    a = ShardActor(SK, 0, 1, _storage(uri))
    batch, _ = stream_small
    a.apply(batch, "all", 3600.0)
    a.maintain()
    a.checkpoint()
    files = sorted((tmp_path / "store").rglob("nodes/*.arrow"), key=lambda p: p.stat().st_size)
    big = files[-1]
    b = ShardActor(SK, 0, 1, _storage(uri))
    f = next(n.sealed for n in b.store.nodes() if n.sealed is not None and n.sealed.size == big.stat().st_size)
    # damage it in place of a copy (a mapped file is never written over: write a new one at the same path)
    data = bytearray(big.read_bytes())
    for at in range(len(data) // 5, 4 * len(data) // 5, max(1, len(data) // 40)):
        data[at] ^= 0x20
    big.unlink()
    big.write_bytes(bytes(data))
    c = ShardActor(SK, 0, 1, _storage(uri))
    g = next(n.sealed for n in c.store.nodes() if n.sealed is not None and n.sealed.name == f.name)
    with pytest.raises(SealedError, match="checksum"):
        for t in g.tables:
            t.materialize()
