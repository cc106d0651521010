import numpy as np
import pyarrow as pa
import pytest

from impressions.sketch.arrowio import StateError, store_from_batches, store_to_batches
from impressions.sketch.counter import LocalCounter
from impressions.sketch.store import SketchConfig
from tests.reference import Events
from tests.test_store import KEYS, NOW, SMALL, _ingest, _stream


@pytest.fixture(scope="module")
def filled():
    rng = np.random.default_rng(4)
    c = LocalCounter(SMALL, shards=2)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    _ingest(c, ev, *_stream(rng, 30_000, now_b - 2500, now_b - 5))
    c.maintain()
    _ingest(c, ev, *_stream(rng, 3_000, now_b - 2500, now_b))  # runs and memtable too
    return c, ev


def _roundtrip_ipc(batches):
    sink = pa.BufferOutputStream()
    out = []
    for rb in batches:  # each batch as its own compressed IPC stream, as the checkpointer writes them
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rb.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_batch(rb)
        out.extend(pa.ipc.open_stream(sink.getvalue()).read_all().to_batches() or
                   [pa.RecordBatch.from_pylist([], schema=rb.schema)])
    return out


def test_round_trip_keeps_every_register_and_count(filled):
    c, ev = filled
    now_b = int(NOW // 60)
    for s, store in enumerate(c.stores):
        back = store_from_batches(_roundtrip_ipc(store_to_batches(store)), SMALL, s, 2)
        for b0, b1 in [(now_b - 2500, now_b + 1), (now_b - 1000, now_b - 400), (now_b - 9, now_b + 1)]:
            for key in [None, KEYS[0], KEYS[4]]:
                assert np.array_equal(back.registers(key, b0, b1), store.registers(key, b0, b1))
                assert np.array_equal(back.query([key], b0, b1)[2], store.query([key], b0, b1)[2])
        assert back.max_bucket == store.max_bucket and back.events == store.events
        # the loaded store keeps working: maintenance and new events
        back.maintain()
        assert np.array_equal(back.registers(None, now_b - 2500, now_b + 1),
                              store.registers(None, now_b - 2500, now_b + 1))


def test_empty_store_round_trips():
    c = LocalCounter(SMALL)
    back = store_from_batches(store_to_batches(c.stores[0]), SMALL)
    assert back.query([None], 0, 10)[2][0] == 0


def test_other_parameters_are_refused(filled):
    c, _ = filled
    batches = store_to_batches(c.stores[0])
    with pytest.raises(StateError, match="p=11, this store has p=14"):
        store_from_batches(batches, SketchConfig(leaf_level=3, segment_level=6), 0, 2)
    with pytest.raises(StateError, match="bucket_seconds"):
        store_from_batches(batches, SketchConfig(p=11, leaf_level=3, segment_level=6, bucket_seconds=30), 0, 2)
    with pytest.raises(StateError, match="shard=0, this store has shard=1"):
        store_from_batches(batches, SMALL, 1, 2)
    with pytest.raises(StateError, match="shards=2, this store has shards=4"):
        store_from_batches(batches, SMALL, 0, 4)


def _replace(rb, name, arr):
    i = rb.schema.get_field_index(name)
    return pa.RecordBatch.from_arrays([arr if j == i else rb.column(j) for j in range(rb.num_columns)],
                                      schema=rb.schema)


def _component(rb):
    return rb.schema.metadata[b"component"].decode()


def test_corrupted_state_is_refused(filled):
    c, _ = filled
    batches = store_to_batches(c.stores[0])
    # a stored node with both coupons and dense registers
    i = next(i for i in range(0, len(batches), 3) if batches[i + 1].num_rows and batches[i + 2].num_rows)
    rows, cps, regs = batches[i:i + 3]

    def load(**bad):
        new = list(batches)
        for j, name in enumerate(("rows", "coupons", "registers")):
            if name in bad:
                new[i + j] = bad[name]
        return store_from_batches(new, SMALL, 0, 2)

    def set_first_coupon(f):
        b = [cps.column(f"b{k}").to_numpy().copy() for k in range(4)]
        v = int(b[0][0]) | int(b[1][0]) << 8 | int(b[2][0]) << 16 | int(b[3][0]) << 24
        v = f(v)
        for k in range(4):
            b[k][0] = (v >> (8 * k)) & 255
        return pa.RecordBatch.from_arrays([pa.array(x) for x in b], schema=cps.schema)

    # the first coupon of the first row is stored as itself
    with pytest.raises(StateError, match="impossible rank"):
        load(coupons=set_first_coupon(lambda v: v & ~63))  # rank 0: no hash produces it
    with pytest.raises(StateError, match="outside shard 0|strictly increasing"):
        load(coupons=set_first_coupon(lambda v: v ^ (1 << 31)))  # the other shard's register
    with pytest.raises(StateError, match="disagree"):
        load(coupons=cps.slice(1))  # a coupon lost
    nodes = rows.column("node").to_numpy().copy()
    nodes[0] += 1 << 20
    with pytest.raises(StateError, match="outside their node"):
        load(rows=_replace(rows, "node", pa.array(nodes)))
    counts = rows.column("coupons").to_numpy().copy()
    counts[np.flatnonzero(counts)[0]] += 1
    with pytest.raises(StateError, match="need"):
        load(rows=_replace(rows, "coupons", pa.array(counts)))
    raw = regs.column("registers").to_pylist()
    raw[0] = b"\x3f" + raw[0][1:]
    with pytest.raises(StateError, match="register value above"):
        load(registers=_replace(regs, "registers", pa.array(raw, regs.schema.field("registers").type)))
    meta = dict(rows.schema.metadata)
    meta[b"version"] = b"99"
    with pytest.raises(StateError, match="version 99"):
        load(rows=rows.replace_schema_metadata(meta))
    with pytest.raises(StateError, match="schema"):
        load(rows=rows.drop_columns(["part"]).replace_schema_metadata(rows.schema.metadata))
    with pytest.raises(StateError, match="lacks its registers"):
        store_from_batches(batches[:i + 2] + batches[i + 3:], SMALL, 0, 2)
