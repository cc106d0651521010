"""The README's commands and snippets are the ones that work."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands():
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert "impressions demo" in blocks[0] and blocks[1] == "bash scripts/test.sh"
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()
    script = (ROOT / "scripts" / "test.sh").read_text()
    # it brings what the tests need, sets Ray's auth mode, installs the project and runs pytest
    assert "redis-server" in script and "chromium-driver" in script and "RAY_AUTH_MODE=disabled" in script
    assert "pip install -q -e '.[test]'" in script and "python -m pytest" in script


def _snippet(marker: str) -> str:
    return next(c for c in re.findall(r"```python\n(.*?)\n```", README, flags=re.S) if marker in c)


def test_core_snippet_runs():
    env: dict = {}
    exec(compile(_snippet("from impressions.sketch.counter"), "README.md", "exec"), env)
    r = env["c"].unique("ad-1", last="15m", now=1_800_000_000).to_dict()
    assert (r["unique_visitors"], r["impressions"], r["exact"]) == (2, 2, True)
    assert env["c"].unique(None, last="1h", now=1_800_000_000).unique_visitors == 2


def test_client_snippet_runs_on_the_cluster(ray_cluster, monkeypatch, tmp_path):
    from impressions.cluster.bootstrap import ClusterNotRunning, ensure_actors, teardown
    from impressions.cluster.client import Client
    from impressions.cluster.config import ClusterConfig

    monkeypatch.setenv("IMPRESSIONS_NAMESPACE", "readme")
    monkeypatch.setenv("IMPRESSIONS_SHARDS", "2")
    monkeypatch.setenv("IMPRESSIONS_STORAGE", f"file://{tmp_path}/store")
    with pytest.raises(ClusterNotRunning, match="no impressions cluster in Ray namespace 'readme'"):
        Client()  # no actors: refused, not an empty cluster started behind the user's back
    ensure_actors(ClusterConfig.from_env())  # what `impressions up` does
    env: dict = {}
    try:
        exec(compile(_snippet("from impressions.cluster.client"), "README.md", "exec"), env)
        c = env["c"]
        assert c.unique("ad-0", last="15m")["unique_visitors"] == 2
        assert [r["unique_visitors"] for r in c.query(["ad-0", "ad-1", None], last="1d")] == [2, 1, 2]
    finally:
        teardown("readme")


def test_demo_runs_small(clients, monkeypatch, capsys):
    """The main job on the session cluster: actors, a Parquet sample, a real ingest job, answers."""
    from impressions.cluster.config import ClusterConfig
    from impressions.cluster.demo import run

    c = clients(ClusterConfig(shards=2, namespace="demo"))  # torn down after the test
    lines = []
    run(events=30_000, ads=20, days=1, config=c.config, out=lines.append)
    text = "\n".join(lines)
    assert "30,000 events from" in text and "0 rejected" in text
    rows = [ln.split() for ln in lines if ln.strip().startswith(("site-wide", "ad-"))]
    assert len(rows) == 16
    for r in rows:
        est, true, imp, true_imp = (int(x.replace(",", "")) for x in (r[2], r[5], r[6], r[7]))
        assert imp == true_imp  # impressions are exact
        assert abs(est - true) <= max(2, 0.05 * true)  # estimates within their error bars


def test_docstring_examples_run():
    import doctest

    import impressions.sketch.counter as counter
    failures, tried = doctest.testmod(counter, raise_on_error=False)
    assert tried >= 3 and failures == 0
