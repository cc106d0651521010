"""The shard store against brute force: every range, every key, every path."""

import math

import numpy as np
import pytest

from impressions.sketch import cover
from impressions.sketch.counter import LocalCounter
from impressions.sketch.hll import Precision, RegisterRange
from impressions.sketch.store import ShardStore, SketchConfig
from tests.reference import Events

NOW = 1_800_000_000.0
KEYS = [f"ad-{i}" for i in range(12)]
# small tiers and a small precision so a few thousand buckets exercise every
# place data can live: memtable, runs, leaves, segments, upper levels, deltas,
# sparse and dense rows
SMALL = SketchConfig(p=11, leaf_level=3, segment_level=6, memtable_rows=3000, lateness_buckets=2)


def _stream(rng, n, b_lo, b_hi, hot=0.3):
    """Events: key popularity skewed, a hot key dense per bucket, repeat visitors."""
    k = np.minimum(rng.zipf(1.6, n) - 1, len(KEYS) - 1)
    k[rng.random(n) < hot] = 0
    b = rng.integers(b_lo, b_hi, n)
    h = rng.integers(0, 2**64, 4000, dtype=np.uint64)[rng.integers(0, 4000, n)]
    fresh = rng.random(n) < 0.5
    h[fresh] = rng.integers(0, 2**64, int(fresh.sum()), dtype=np.uint64)
    return k, b, h


def _ingest(counter, events, k, b, h):
    w = counter.config.bucket_seconds
    rep = counter.ingest(b * w + 0.5, [KEYS[i] for i in k], hashes=h, now=NOW)
    assert rep.accepted == len(k)
    events.add(k, b, h)


def _check_ranges(counter, events, rng, b_lo, b_hi, n_ranges=60):
    p = counter.config.p
    for _ in range(n_ranges):
        b0 = int(rng.integers(b_lo - 5, b_hi))
        b1 = int(rng.integers(b0 + 1, b_hi + 10))
        for key in [None, KEYS[0], KEYS[int(rng.integers(1, len(KEYS)))], "never-seen"]:
            want = events.registers(key if key in KEYS or key is None else None, b0, b1, p) \
                if key != "never-seen" else np.zeros(1 << p, np.uint8)
            got = counter.registers(key, b0, b1)
            assert np.array_equal(got, want), (key, b0, b1)
            res = counter.query([key], start=b0 * counter.config.bucket_seconds,
                                end=b1 * counter.config.bucket_seconds, now=NOW)[0]
            want_imp = events.impressions(key, b0, b1) if key != "never-seen" else 0
            assert res.impressions == want_imp, (key, b0, b1)


@pytest.mark.parametrize("shards", [1, 4])
def test_random_ranges_equal_brute_force_through_every_stage(shards):
    rng = np.random.default_rng(shards)
    c = LocalCounter(SMALL, shards=shards)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 3000, now_b - 10
    # in time order, in chunks, maintaining now and then
    for i, (lo, hi) in enumerate(zip(range(b_lo, b_hi, 300), range(b_lo + 300, b_hi + 300, 300))):
        _ingest(c, ev, *_stream(rng, 6000, lo, min(hi, b_hi)))
        if i % 3 == 1:
            c.maintain()
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)  # before the last maintenance: memtable and runs
    c.maintain()
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)
    # late events everywhere: runs on built segments, folded into upper nodes
    _ingest(c, ev, *_stream(rng, 4000, b_lo, b_hi))
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)
    c.maintain()
    st = c.stores[0].stats()
    assert st["upper_nodes"] > 0 and st["rollup_rows"] > 0
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)


def test_sharded_slices_concatenate_to_the_unsharded_sketch():
    rng = np.random.default_rng(11)
    one, four = LocalCounter(SMALL, 1), LocalCounter(SMALL, 4)
    ev1, ev4 = Events(KEYS), Events(KEYS)
    now_b = int(NOW // 60)
    k, b, h = _stream(rng, 30_000, now_b - 2000, now_b)
    _ingest(one, ev1, k, b, h)
    _ingest(four, ev4, k, b, h)
    one.maintain()
    four.maintain()
    for b0, b1 in [(now_b - 2000, now_b), (now_b - 1500, now_b - 700), (now_b - 77, now_b - 5)]:
        for key in [None, KEYS[0], KEYS[3]]:
            full = one.registers(key, b0, b1)
            slices = [s.registers(key, b0, b1) for s in four.stores]
            assert b"".join(x.tobytes() for x in slices) == full.tobytes()
            assert [len(x) for x in slices] == [len(full) // 4] * 4


def test_shuffled_and_duplicated_input_changes_nothing():
    rng = np.random.default_rng(5)
    now_b = int(NOW // 60)
    k, b, h = _stream(rng, 20_000, now_b - 1500, now_b)
    a, s, d = LocalCounter(SMALL, 2), LocalCounter(SMALL, 2), LocalCounter(SMALL, 2)
    sink = Events(KEYS)
    _ingest(a, sink, k, b, h)
    a.maintain()
    perm = rng.permutation(len(k))
    for part in np.array_split(perm, 7):  # shuffled, in pieces, maintained in between
        _ingest(s, sink, k[part], b[part], h[part])
        s.maintain()
    dup = np.concatenate([perm, perm[: len(perm) // 3]])
    _ingest(d, sink, k[dup], b[dup], h[dup])
    d.maintain()
    for b0, b1 in [(now_b - 1500, now_b), (now_b - 900, now_b - 100), (now_b - 3, now_b)]:
        for key in [None, KEYS[0], KEYS[5]]:
            ra = a.registers(key, b0, b1)
            assert np.array_equal(ra, s.registers(key, b0, b1))
            assert np.array_equal(ra, d.registers(key, b0, b1))
            w = SMALL.bucket_seconds
            qa, qs = (c.unique(key, start=b0 * w, end=b1 * w, now=NOW) for c in (a, s))
            assert qa.impressions == qs.impressions  # impressions count events: shuffling keeps them
            assert qa.unique_visitors == qs.unique_visitors


def test_a_long_range_merges_logarithmically_many_sketches():
    """30 days at 1-minute buckets: a busy key's query touches O(log n) sketches."""
    cfg = SketchConfig(p=12)
    st = ShardStore(cfg)
    rng = np.random.default_rng(3)
    now_b = int(NOW // 60)
    n_b = 43_200
    per = 40  # 40 distinct-ish visitors a minute, repeating over the month
    b = np.repeat(np.arange(now_b - n_b + 1, now_b + 1), per)
    pool = rng.integers(0, 2**64, 20_000, dtype=np.uint64)
    h = pool[rng.integers(0, len(pool), len(b))]
    from impressions.sketch.hll import coupons_from_hashes
    for chunk in np.array_split(np.arange(len(b)), 20):
        st.apply(["busy"], np.zeros(len(chunk), np.int32), b[chunk], coupons_from_hashes(h[chunk]))
        st.maintain()
    kid = st.keys.get("busy")
    leaf = 1 << cfg.leaf_level
    R = st.rr.R
    for end in (now_b + 1, now_b + 1 - 3 * leaf):  # ending now (the open leaf is raw runs), and in built time
        reads, size = {}, {}
        for n in (60, 1440, 10_080, 43_200 - 3 * leaf):
            pc = cover.gather(st.tiers, st.memtable, st.rr, np.array([kid]), end - n, end)
            reads[n], size[n] = pc.reads, pc.bytes
        # about 2 log2(n) reads (one per node of the cover), each of at most a few sketches' bytes
        for n in reads:
            assert reads[n] <= 2 * math.log2(n) + 8 + (leaf if end == now_b + 1 else 0), reads
            assert size[n] <= (2 * math.log2(n) + 8) * 4 * R, size
        assert reads[43_200 - 3 * leaf] <= 3 * reads[60] + 10, reads
    s = st.stats()
    assert s["rollup_bytes"] <= 2 * s["base_bytes"], s


def test_rollup_index_is_at_most_twice_the_base():
    rng = np.random.default_rng(9)
    c = LocalCounter(SMALL, 1)
    now_b = int(NOW // 60)
    ev = Events(KEYS)
    _ingest(c, ev, *_stream(rng, 60_000, now_b - 4000, now_b))
    c.maintain()
    s = c.stores[0].stats()
    assert s["rollup_bytes"] <= 2 * s["base_bytes"], s


def test_expire_drops_old_nodes_and_keeps_the_window_intact():
    cfg = SketchConfig(p=11, leaf_level=3, segment_level=6, retention_seconds=3000 * 60)
    c = LocalCounter(cfg)
    ev = Events(KEYS)
    rng = np.random.default_rng(2)
    now_b = int(NOW // 60)
    _ingest(c, ev, *_stream(rng, 20_000, now_b - 2990, now_b))
    c.maintain(now=NOW)
    later = NOW + 1000 * 60  # 1000 buckets later: the oldest third has expired
    before = c.stores[0].stats()["base_rows"]
    c.maintain(now=later)
    assert c.stores[0].stats()["base_rows"] < before
    lb = int(later // 60)
    b0 = lb - 3000 + 1
    assert np.array_equal(c.registers(None, b0, now_b), ev.registers(None, b0, now_b, cfg.p))
    with pytest.raises(ValueError, match="retention"):
        c.unique(None, start=(b0 - 1) * 60, now=later)


def test_precision_and_shard_layout_are_checked():
    with pytest.raises(ValueError, match="precision"):
        Precision(30)
    with pytest.raises(ValueError, match="power of two"):
        RegisterRange(14, 3)
    with pytest.raises(ValueError, match="retention"):
        SketchConfig(retention_seconds=90, bucket_seconds=60)


def test_many_keys_in_one_query_equal_one_key_at_a_time():
    rng = np.random.default_rng(21)
    c = LocalCounter(SMALL, 2)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    _ingest(c, ev, *_stream(rng, 40_000, now_b - 3000, now_b))
    c.maintain()
    _ingest(c, ev, *_stream(rng, 3_000, now_b - 3000, now_b))  # runs and memtable too
    keys = [None, "never-seen"] + KEYS + [KEYS[3], None]  # repeats and unknown keys too
    for b0, b1 in [(now_b - 3000, now_b + 1), (now_b - 777, now_b - 5), (now_b - 2, now_b + 1)]:
        for store in c.stores:
            h, s, i = store.query(keys, b0, b1)
            for n, key in enumerate(keys):
                h1, s1, i1 = store.query([key], b0, b1)
                assert np.array_equal(h[n], h1[0]) and s[n] == s1[0] and i[n] == i1[0], (key, b0, b1)


def test_answers_come_back_in_the_order_asked_whatever_the_key_ids():
    """Key ids are per store and follow arrival order; answers follow the question's order."""
    st = ShardStore(SMALL)
    now_b = int(NOW // 60)
    from impressions.sketch.hll import coupons_from_hashes
    rng = np.random.default_rng(8)
    for name, n in (("late", 5), ("early", 50), ("mid", 20)):
        h = rng.integers(0, 2**64, n, dtype=np.uint64)
        st.apply([name], np.zeros(n, np.int32), np.full(n, now_b), coupons_from_hashes(h))
    for order in (["early", "mid", "late"], ["late", "early", "mid"], ["mid", "never", "late"]):
        _, sparse, imp = st.query(order, now_b, now_b + 1)
        want = {"late": 5, "early": 50, "mid": 20, "never": 0}
        assert imp.tolist() == [want[k] for k in order] and sparse.tolist() == [want[k] for k in order], order


def test_maintenance_beside_applies_loses_nothing():
    """Rollups built on one thread while another applies (in time order and late): every event counts once."""
    from tests.conftest import looping

    rng = np.random.default_rng(7)
    c = LocalCounter(SMALL, shards=1)
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 3000, now_b - 10
    with looping(c.maintain) as upkeep:
        for lo in range(b_lo, b_hi, 150):
            _ingest(c, ev, *_stream(rng, 3000, lo, min(lo + 150, b_hi)))
            _ingest(c, ev, *_stream(rng, 300, b_lo, lo + 1))  # late events on time being built or built
    assert not upkeep.errors and upkeep.rounds > 5
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)
    c.maintain()
    st = c.stores[0].stats()
    assert st["upper_nodes"] > 0 and st["rollup_rows"] > 0 and not c.stores[0].tiers.busy
    _check_ranges(c, ev, rng, b_lo, b_hi, 30)


def test_a_build_takes_in_the_runs_that_came_meanwhile(monkeypatch):
    """Events applied while a segment is built join it as runs; a build whose input slot changed otherwise
    is dropped (done again on the next pass), never put in place over what it does not hold."""
    from impressions.sketch import rollup

    rng = np.random.default_rng(3)
    c = LocalCounter(SMALL, shards=1)
    store = c.stores[0]
    ev = Events(KEYS)
    now_b = int(NOW // 60)
    seg = 1 << SMALL.segment_level
    b_lo = (now_b - 3000) // seg * seg
    _ingest(c, ev, *_stream(rng, 4000, b_lo, b_lo + 3 * seg))
    store.flush()
    _ingest(c, ev, *_stream(rng, 2000, b_lo + seg, b_lo + 2 * seg))  # the second segment's leaves: two runs
    _ingest(c, ev, *_stream(rng, 100, now_b - 20, now_b - 10))  # the first segments' time is sealed
    real, calls = rollup.build_levels, []

    def build_levels(base, top, rr, summary=True):
        calls.append(top)
        if len(calls) == 1:  # another thread's apply, while the first segment is built
            _ingest(c, ev, *_stream(rng, 500, b_lo, b_lo + seg))
            store.flush()
        if len(calls) == 2:  # the second segment's leaves changed otherwise: a leaf's runs folded
            slot = next(s for k, s in sorted(store.tiers.slots.items()) if k[0] == SMALL.leaf_level
                        and k[1] >> 3 == b_lo // seg + 1 and len(s.runs) > 1)
            store.tiers.put_slot(slot.level, slot.node, slot.main, [rollup.merge(list(slot.runs), rr)])
        return real(base, top, rr, summary)
    monkeypatch.setattr(rollup, "build_levels", build_levels)
    store.maintain()
    monkeypatch.setattr(rollup, "build_levels", real)
    first = store.tiers.slots[(SMALL.segment_level, b_lo // seg)]
    assert first.main is not None and first.runs  # built, with the meanwhile events as runs
    assert store._rollups.dropped == 1 and (SMALL.segment_level, b_lo // seg + 1) not in store.tiers.slots
    _check_ranges(c, ev, rng, b_lo - 10, now_b - 10, 30)
    store.maintain()  # the dropped build is done again
    assert (SMALL.segment_level, b_lo // seg + 1) in store.tiers.slots
    _check_ranges(c, ev, rng, b_lo - 10, now_b - 10, 30)


def _tagged_batches(rng, n_batches, b_lo, b_hi):
    from impressions.sketch.events import prepare
    out = []
    for _ in range(n_batches):
        k, b, h = _stream(rng, 1500, b_lo, b_hi)
        batch, _ = prepare(b * 60 + 0.5, [KEYS[i] for i in k], hashes=h, now=NOW, bucket_seconds=60,
                           retention_buckets=SMALL.retention_buckets, future_seconds=SMALL.future_seconds)
        out.append(batch)
    return out


def _same_registers(a: ShardStore, b: ShardStore, b_lo: int, b_hi: int) -> None:
    for key in [None, KEYS[0], KEYS[5]]:
        for b0, b1 in [(b_lo, b_hi), (b_lo + 100, b_lo + 700), (b_hi - 50, b_hi)]:
            assert np.array_equal(a.registers(key, b0, b1), b.registers(key, b0, b1)), (key, b0, b1)
        assert a.query([key], b_lo, b_hi)[2].tolist() == b.query([key], b_lo, b_hi)[2].tolist()


def test_a_copy_takes_the_sorted_runs_of_another_in_place_of_sorting():
    """A reader's store given its writer's flushes (``on_flush``) takes them instead of sorting the same log
    positions itself, and ends register for register as the writer; runs it cannot take change nothing."""
    rng = np.random.default_rng(11)
    now_b = int(NOW // 60)
    b_lo, b_hi = now_b - 2000, now_b - 10
    writer, reader = ShardStore(SMALL), ShardStore(SMALL)
    reader.flush_rows = 1 << 30  # sorts only when told to
    sent = []
    writer.on_flush = lambda after, through, runs: sent.append((after, through, runs))
    batches = _tagged_batches(rng, 12, b_lo, b_hi)
    for seq, b in enumerate(batches[:6], 1):
        for store in (writer, reader):
            store.apply(b.key_names, b.key_index, b.bucket, b.coupon, tag=seq)
    assert sent and all(reader.take_runs(*m) for m in sent)  # memtable_rows 3000: the writer flushed twice
    assert reader.flushed == sent[-1][1] and len(reader.memtable) == len(writer.memtable)
    _same_registers(writer, reader, b_lo, b_hi)
    # runs whose positions the reader does not hold yet, or has sorted itself already: refused, nothing changes
    sent.clear()
    for seq, b in enumerate(batches[6:9], 7):
        writer.apply(b.key_names, b.key_index, b.bucket, b.coupon, tag=seq)
    before = reader.view()
    assert sent and not reader.take_runs(*sent[-1]) and reader.view() is before
    for seq, b in enumerate(batches[6:9], 7):
        reader.apply(b.key_names, b.key_index, b.bucket, b.coupon, tag=seq)
    reader.flush()  # the reader sorted 7..9 itself
    assert not reader.take_runs(*sent[-1])
    _same_registers(writer, reader, b_lo, b_hi)
    # runs of (after, through] where the reader holds more before ``after``: it sorts those, takes the rest
    sent.clear()
    for seq, b in enumerate(batches[9:], 10):
        for store in (writer, reader):
            store.apply(b.key_names, b.key_index, b.bucket, b.coupon, tag=seq)
    writer.flush()
    assert sent[-1][0] > 9 and reader.take_runs(*sent[-1]) and len(reader.memtable) == 0
    _same_registers(writer, reader, b_lo, b_hi)
    writer.maintain(), reader.maintain()
    _same_registers(writer, reader, b_lo, b_hi)


def test_stats_count_the_rows_upkeep_has_yet_to_fold():
    """``run_rows`` (what questions read raw until upkeep folds it) grows with flushed events and drops
    to what lies in open time once upkeep has run."""
    rng = np.random.default_rng(4)
    c = LocalCounter(SMALL, 1)
    now_b = int(NOW // 60)
    _ingest(c, Events(KEYS), *_stream(rng, 20_000, now_b - 2000, now_b))
    st = c.stores[0]
    st.flush()
    before = st.stats()
    assert before["run_rows"] > 0 and before["loose_slots"] > 0 and before["memtable_rows"] == 0
    c.maintain()
    after = st.stats()
    # folded: only the leaves of time not yet sealed (the lateness window) may keep runs
    assert after["run_rows"] < before["run_rows"] / 20, (before, after)


@pytest.mark.parametrize("shards,flushes", [(1, 5), (8, 1)])
def test_a_busy_keys_unfolded_runs_are_read_as_registers_with_the_same_answers(shards, flushes):
    """Runs upkeep has not folded yet: a key's slice of a run holding more coupons than the count limit
    is read as its registers (kept on the run for the next question) when it alone holds more distinct
    coupons than the limit, and every answer (registers, histogram, count) is the one its coupons give; a
    slice of many repeats of few visitors stays coupons, and is counted.  On 8 shards a range holds no more
    registers than the limit, so the distinct coupons decide."""
    from impressions.sketch.hll import coupons_from_hashes
    cfg = SketchConfig(p=11, leaf_level=6, segment_level=9, memtable_rows=1 << 20, lateness_buckets=2)
    st = ShardStore(cfg, 0, shards)
    rr = st.rr
    rng = np.random.default_rng(12)
    now_b = int(NOW // 60)
    n = 60_000
    h = np.r_[rng.integers(0, 2**64, n, dtype=np.uint64),  # "busy": every event a new visitor
              rng.integers(0, 2**64, 150, dtype=np.uint64)[rng.integers(0, 150, n)]]  # "few": 150, repeating
    k = np.r_[np.zeros(n, np.int64), np.ones(n, np.int64)]
    b = rng.integers(now_b - 1000, now_b - 10, 2 * n)
    mine = (h >> np.uint64(64 - cfg.p)).astype(np.int64) // rr.R == 0  # this range's events
    h, k, b = h[mine], k[mine], b[mine]
    for part in np.array_split(rng.permutation(len(h)), flushes):  # runs on every leaf, none folded
        st.apply(["busy", "few"], k[part].astype(np.int32), b[part], coupons_from_hashes(h[part]))
        st.flush()
    ev = Events(["busy", "few"])
    ev.add(k, b, h)
    for b0, b1 in [(now_b - 1000, now_b), (now_b - 700, now_b - 100), (now_b - 300, now_b - 250)]:
        for name in ("busy", "few"):
            ids = np.array([st.keys.get(name)])
            for _ in range(2):  # the second question finds the registers the first one folded
                pc = cover.gather(st.tiers, st.memtable, rr, ids, b0, b1)
                regs = pc.registers(rr)
                hist, sparse = pc.finish(rr, -1, regs)
                want = ev.registers(name, b0, b1, cfg.p)[rr.lo:rr.hi]
                assert np.array_equal(regs[0], want), (name, b0, b1)
                assert np.array_equal(hist[0], np.bincount(want, minlength=rr.prec.hist_len))
                if name == "few":
                    assert not pc.dv and sparse[0] == ev.distinct(name, b0, b1)
                elif b1 - b0 > 100:
                    assert pc.dv and sparse[0] == -1  # read as registers, not counted, as its coupons are not
    assert any(t._folded for s in st.tiers.slots.values() for t in s.runs)


@pytest.mark.parametrize("shards", [1, 4])
def test_many_keys_at_once_count_as_each_alone(shards):
    """100 keys asked together (their coupons counted in one sort, a 64-bit word a coupon on one shard,
    a 32-bit one on four) answer exactly as each asked alone, counted or not, fresh and after upkeep."""
    keys = [f"k{i}" for i in range(100)]
    rng = np.random.default_rng(21)
    c = LocalCounter(SMALL, shards=shards)
    now_b = int(NOW // 60)
    n = 60_000
    k = np.minimum(rng.zipf(1.3, n) - 1, len(keys) - 1)
    visitors = rng.integers(0, 2**64, 5000, dtype=np.uint64)
    h = visitors[rng.integers(0, len(visitors), n)]
    b = rng.integers(now_b - 1500, now_b - 5, n)
    c.ingest(b * 60 + 0.5, [keys[i] for i in k], hashes=h, now=NOW)
    for stage in ("fresh", "built"):
        if stage == "built":
            c.maintain(NOW)
        for last in (90, 1500):
            together = [r.to_dict() for r in c.query(keys, last=last, now=NOW)]
            alone = [c.query([key], last=last, now=NOW)[0].to_dict() for key in keys]
            assert together == alone, (stage, last)
            assert any(r["relative_error"] < 0.001 for r in together)  # some counted
            if last == 1500:
                assert any(r["relative_error"] > 0.001 for r in together)  # some from registers


def test_memtable_copies_keep_their_events_while_the_table_grows_and_is_cut():
    """Questions read frozen copies of the memtable while applies append and flushes cut it: every copy keeps
    exactly the events it was made with, its columns are slices of the table's buffers (no concatenation per
    copy), and cuts by log position take what they say."""
    from impressions.sketch.memtable import Memtable

    rng = np.random.default_rng(5)
    m, ref, copies = Memtable(), [], []

    def chunk(n):
        return tuple(rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for _ in range(3))

    def check():
        for copy, want in copies:
            got = copy.columns()
            assert all(np.array_equal(g, w) for g, w in zip(got, want))

    tag = 0
    for n in (1, 5000, 3, 9000, 0, 12_000, 700):  # past the first capacity, then doubling
        tag += 1
        c = chunk(n)
        m.add(*c, tag=tag)
        ref.append((tag, c))
        cols = m.columns()
        assert len(m) == sum(len(x[0]) for _, x in ref) == len(cols[0])
        assert all(np.array_equal(col, np.concatenate([x[i] for _, x in ref])) for i, col in enumerate(cols))
        copy = m.frozen()
        assert all(a.base is not None and b.base is a.base for a, b in zip(copy.columns(), m.columns()))
        copies.append((copy, tuple(col.copy() for col in cols)))
        check()
    # take the chunks through tag 3: exactly their events, in order; the rest stay, the copies untouched
    taken = m.take_through(3)
    assert all(np.array_equal(t, np.concatenate([x[i] for tg, x in ref if tg <= 3])) for i, t in enumerate(taken))
    ref = [(tg, x) for tg, x in ref if tg > 3]
    assert len(m) == sum(len(x[0]) for _, x in ref)
    m.add(*chunk(50), tag=8)  # appends after a cut go to buffers no copy reads
    check()
    assert m.drop_through(5) == sum(len(x[0]) for tg, x in ref if tg <= 5)
    check()
    assert m.drop_through(5) == 0 and m.take_through(0)[0].size == 0
    rest = m.take()
    assert len(m) == 0 and len(rest[0]) == sum(len(x[0]) for tg, x in ref if tg > 5) + 50
    m.add(*chunk(10), tag=9)
    check()
    assert len(m.columns()[0]) == 10
