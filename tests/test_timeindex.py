import random

import pytest

from impressions.sketch.timeindex import RangeError, dyadic, parse_duration, resolve_range


def test_dyadic_covers_exactly_with_few_aligned_nodes():
    rnd = random.Random(1)
    for _ in range(2000):
        b0 = rnd.randrange(0, 10**7)
        b1 = b0 + rnd.randrange(1, 50_000)
        nodes = dyadic(b0, b1)
        pos = b0
        for lvl, j in nodes:
            assert j << lvl == pos  # contiguous and aligned
            pos = (j + 1) << lvl
        assert pos == b1
        assert len(nodes) <= 2 * (b1 - b0).bit_length()


def test_parse_duration():
    assert parse_duration("15m", 60) == 15
    assert parse_duration("2h", 60) == 120
    assert parse_duration("30d", 60) == 43_200
    assert parse_duration(7, 60) == 7
    assert parse_duration("90s", 30) == 3
    for bad in ["0m", "-5m", "15x", "m", "", "1.5h", True]:
        with pytest.raises(RangeError):
            parse_duration(bad, 60)
    with pytest.raises(RangeError, match="whole number"):
        parse_duration("90s", 60)


def test_resolve_range_last_and_explicit():
    now = 1_800_000_030.0  # 30 s into a minute
    r = resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, last="15m")
    assert (r.start, r.end, r.buckets) == (1_800_000_000 - 14 * 60, 1_800_000_060, 15)
    r = resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, start=1_799_999_990, end=1_800_000_001)
    assert (r.start, r.end) == (1_799_999_940, 1_800_000_060)
    with pytest.raises(RangeError, match="range of 31 days exceeds the 30-day retention"):
        resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, last="31d")
    with pytest.raises(RangeError, match="beyond the 30-day retention"):
        resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, start=now - 40 * 86400,
                      end=now - 39 * 86400)
    with pytest.raises(RangeError, match="before end"):
        resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, start=now, end=now - 60)
    with pytest.raises(RangeError, match="either"):
        resolve_range(bucket_seconds=60, retention_buckets=43_200, now=now, last="1h", start=now)


def test_instants_in_every_accepted_form_and_refusals_that_say_why():
    from impressions.sketch.timeindex import parse_instant
    t = 1_795_910_400.0  # 2026-11-29T00:00:00Z
    for v in (t, int(t), str(int(t)), "1.7959104e9", "2026-11-29T00:00:00Z", "2026-11-29 00:00:00",
              "2026-11-29", "2026-11-29T01:00:00+01:00", "2026-11-29T00:00:00.000z"):
        assert parse_instant("start", v) == t, v
    assert parse_instant("end", None) is None and parse_instant("end", " ") is None
    for bad in ("yesterday", "2026-13-01", float("nan"), "inf", True, [1]):
        with pytest.raises(RangeError, match="'start' must be"):
            parse_instant("start", bad)
    # resolve_range takes them as they come, from a query string or a client
    r = resolve_range(bucket_seconds=60, retention_buckets=43_200, now=t + 3600, start="2026-11-29T00:00:00Z",
                      end=str(t + 600))
    assert (r.start, r.end) == (t, t + 600)
