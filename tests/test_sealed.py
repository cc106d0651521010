"""Sealed nodes: files read block by block answer exactly as the heap did."""

from __future__ import annotations

import numpy as np
import pytest

from sketch import sealed
from sketch.counter import LocalCounter
from sketch.sealed import BlockCache, SealedError, SealedFile, encode
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


@pytest.mark.parametrize("shards", [1, 4])
def test_sealed_nodes_answer_register_for_register(tmp_path, shards):
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
    # late events on sealed segments become runs there, and maintenance rebuilds from the files
    _ingest(c, ev, *_stream(rng, 4000, b_lo, b_hi))
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    c.maintain()
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    seal_all(c.stores[0], tmp_path, tiny)
    _check_ranges(c, ev, rng, b_lo, b_hi, 15)
    st = c.stores[0].stats()
    assert st["sealed_nodes"] > 0 and st["sealed_bytes"] > 0


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
    # a flipped byte inside a block: the file opens, the block is refused when read, never read wrong
    f = SealedFile(str(good), c.stores[0].rr.R, {"p": SMALL.p})
    t = max(f.tables, key=len)
    raw = bytearray(data)
    batch = f.reader.get_batch(t.batch0)
    body = batch.column("b0").flatten().to_numpy()
    # find the block's zstd frame of b0 by decoding every block after flipping candidates near the file's middle
    for offset in range(len(raw) // 3, len(raw) // 3 + 4000, 97):
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
                except (SealedError, Exception) as e:  # noqa: BLE001 - refused: what must happen
                    assert isinstance(e, (SealedError,)) or "zstd" in str(e).lower() or "decompress" in str(e).lower() \
                        or isinstance(e, (OSError, ValueError)), e
                    continue
                ref = f.tables[bt.index]._decode(i)
                assert np.array_equal(got.coupons, ref.coupons) and np.array_equal(got.regs, ref.regs)
    assert len(body) >= 0
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
    from sketch.rows import RowTable, code_keys, code_nodes, make_code
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
