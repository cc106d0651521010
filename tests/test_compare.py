"""The side-by-side harness at a tiny size: every peer runs, our answers lie
within their error bars (speed is not judged here)."""

import shutil

import pytest

from benchmarks import compare


def test_side_by_side_smoke(ray_cluster):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run the tests with `bash scripts/test.sh`, which installs "
                    "Debian's redis-server")
    out = compare.main(["--events", "2e4", "--smoke", "--reps", "2", "--no-write"])
    for shape in ("site-wide", "per-ad"):
        d = out[shape]
        assert {r[0] for r in d["ingest"]} == {"DuckDB exact", "DuckDB approx", "ours (Ray cluster)", "DataSketches",
                                               "Redis HLL"}
        assert all(r[3] > 0 for r in d["ingest"])
        peers = {p for p, _, _ in d["lat"]}
        assert "ours over REST" in peers and len(peers) == 5
        for (p, k, n), e in d["err"].items():
            if p.startswith("ours"):
                assert e < 3.0, (p, k, n, e)  # tiny streams: counted exactly or within a few standard errors
    text = compare.render(out, None, None)
    assert "Targets (site-wide key)" in text and "Redis HLL" in text
