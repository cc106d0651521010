import numpy as np
import pyarrow as pa
import pytest

from impressions.sketch.counter import LocalCounter
from impressions.sketch.events import MAX_KEY_BYTES
from impressions.sketch.store import SketchConfig

NOW = 1_800_000_000.0


def test_bad_rows_are_counted_by_reason_and_good_rows_kept():
    c = LocalCounter(SketchConfig(), shards=2)
    ts = [NOW, None, NOW - 31 * 86400, NOW + 3600, NOW, NOW, NOW, NOW, float("nan"), NOW - 10]
    keys = ["a", "a", "a", "a", None, "", "x" * (MAX_KEY_BYTES + 1), "a", "a", "b"]
    vis = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", None, "u9", ""]
    rep = c.ingest(ts, keys, visitors=vis, now=NOW)
    assert rep.received == 10 and rep.accepted == 1
    assert rep.rejected == {"missing_ts": 2, "expired": 1, "future": 1, "missing_key": 1, "bad_key": 2,
                            "missing_visitor": 2}
    reasons = {s["row"]: s["reason"] for s in rep.samples}
    assert reasons[2] == "older than the 30-day retention"
    assert reasons[3] == "more than 300 s in the future"
    assert "empty or longer than 256 bytes" in reasons[5]
    assert [s["value"] for s in rep.samples if s["row"] == 2] == [NOW - 31 * 86400]
    r = c.unique("a", last="5m", now=NOW)
    assert r.unique_visitors == 1 and r.impressions == 1 and r.estimate.exact
    assert c.unique(None, last="5m", now=NOW).impressions == 1


def test_rejections_never_touch_accepted_data():
    c = LocalCounter(SketchConfig())
    c.ingest([NOW] * 3, ["a", "a", "b"], visitors=["u1", "u2", "u3"], now=NOW)
    before = c.query(["a", "b", None], last="1h", now=NOW)
    rep = c.ingest([None, NOW + 10**6], ["a", "a"], visitors=["u9", "u10"], now=NOW)
    assert rep.accepted == 0
    after = c.query(["a", "b", None], last="1h", now=NOW)
    assert [r.to_dict() for r in before] == [r.to_dict() for r in after]


def test_hashes_and_arrow_inputs_equal_strings():
    from impressions.sketch.hashing import hash_visitors
    vis = [f"u{i}" for i in range(500)]
    keys = [f"k{i % 7}" for i in range(500)]
    ts = np.full(500, NOW)
    a, b, d = LocalCounter(), LocalCounter(), LocalCounter()
    a.ingest(ts, keys, visitors=vis, now=NOW)
    b.ingest(pa.array(ts), pa.array(keys), hashes=hash_visitors(vis), now=NOW)
    d.ingest(ts, pa.array(keys).dictionary_encode(), visitors=pa.chunked_array([vis[:100], vis[100:]]), now=NOW)
    for k in ["k0", "k3", None]:
        b0 = int(NOW // 60)
        ra = a.registers(k, b0, b0 + 1)
        assert np.array_equal(ra, b.registers(k, b0, b0 + 1))
        assert np.array_equal(ra, d.registers(k, b0, b0 + 1))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="keys for"):
        LocalCounter().ingest([NOW, NOW], ["a"], visitors=["u", "v"], now=NOW)


def test_site_only_key_counts_toward_the_site_wide_total_alone():
    c = LocalCounter(SketchConfig(), shards=2)
    c.ingest([NOW] * 4, ["*", "*", "a", "*"], visitors=["u1", "u2", "u1", "u3"], now=NOW)
    site = c.unique(None, last="5m", now=NOW)
    assert (site.unique_visitors, site.impressions) == (3, 4)
    assert c.unique("*", last="5m", now=NOW).to_dict()["unique_visitors"] == 3
    assert c.unique("a", last="5m", now=NOW).impressions == 1
    assert sum(len(s.keys) for s in c.stores) == 2 * 2  # the site-wide key and "a", on each shard
