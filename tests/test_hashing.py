import numpy as np
import pyarrow as pa

from impressions.sketch.hashing import hash_visitor, hash_visitors

# MurmurHash3_x64_128(utf8(id), seed 0), first 8 bytes little-endian: pinned so
# that any other implementation (or a pre-hashing service) can check itself.
REFERENCE = {
    "v1": 0x53FFB647D532EF69,
    "visitor-123": 0xD7E76CB19E422122,
    "é漢": 0x31CEDC102E2109CC,
}


def test_reference_values():
    for s, h in REFERENCE.items():
        assert hash_visitor(s) == h
        assert hash_visitor(s.encode()) == h


def test_batch_equals_single_for_lists_and_arrow():
    ids = [f"user-{i}" for i in range(1000)] + list(REFERENCE)
    want = np.array([hash_visitor(s) for s in ids], np.uint64)
    assert np.array_equal(hash_visitors(ids), want)
    assert np.array_equal(hash_visitors(pa.array(ids)), want)
    assert np.array_equal(hash_visitors(pa.chunked_array([ids[:10], ids[10:]])), want)
    assert hash_visitors([]).dtype == np.uint64
