"""The Python client, for applications and notebooks.

    from impressions.cluster.client import Client
    c = Client()                       # the running cluster (`impressions up`); Client(start=True): embedded
    c.ingest(table)                    # an Arrow table (or pandas DataFrame) with ts, key, visitor
    c.unique("ad-1", last="15m")       # {"key", "start", "end", "unique_visitors", "impressions", ...}
    c.query(["ad-1", "ad-2"], last="1d")   # many keys, one call
    c.impressions(None, start=t0, end=t1)  # site-wide impressions
    c.reach(["ad-1", "ad-2"], prefix="campaign-12/", last="30d")   # a key set's visitors, each once
    c.overlap(["ad-1"], ["ad-2", "ad-3"], last="7d")               # visitors of both, Jaccard, shares
    c.rolling("ad-1", window="24h", step="1h", last="30d")         # trailing 24 h at every hour

Questions go straight to the shards (one hop) on a copy of the coordinator's
shard map (``actors.questions.DirectQuestions``).

``last`` is ``<int><s|m|h|d|w>`` or a number of buckets; every answer
reports the exact ``[start, end)`` (epoch seconds) it covered, aligned to
buckets.
"""

from __future__ import annotations

import time

import ray

from impressions.actors.questions import DirectQuestions
from impressions.cluster.bootstrap import RayRuntime, connect, ensure_actors, get_coordinator
from impressions.cluster.config import ClusterConfig
from impressions.cluster.ingest import ingest_table, run_ingest
from impressions.cluster.metrics import RayTelemetry
from impressions.sketch.events import IngestReport
from impressions.sketch.timeindex import BucketRange


class Client:
    def __init__(self, address: str | None = None, config: ClusterConfig | None = None, start: bool = False,
                 namespace: str | None = None, timeout: float = 60.0):
        """Connect to Ray (``address``, ``RAY_ADDRESS``, or a cluster started
        on this machine by ``impressions up`` or ``ray start``) and to the
        actors there.  Without a cluster this refuses (``ClusterNotRunning``)
        rather than answer from an empty one; ``start=True`` asks for an
        embedded one: a local Ray started for this process if none runs, and
        the actors created with ``config`` if missing (``self.how`` says which)."""
        self.how = connect(address, start_local=start)
        self.timeout = timeout
        cfg = config or ClusterConfig.from_env(namespace=namespace)
        if start:
            self.coordinator = ensure_actors(cfg)
        else:
            self.coordinator = get_coordinator(cfg.namespace)
        self.config: ClusterConfig = ray.get(self.coordinator.cluster_config.remote(), timeout=timeout)
        # questions go straight to the shards (one hop), on a copy of the coordinator's shard map
        self.questions = DirectQuestions(lambda: ray.get(self.coordinator.read_route.remote(), timeout=self.timeout),
                                         RayRuntime(), self.config, self.config.sketch.p,
                                         RayTelemetry(self.config.namespace))

    # ------------------------------------------------------------ ingest
    def ingest(self, data, *, ts: str = "ts", key: str = "key", visitor: str = "visitor",
               now: float | None = None, ts_unit: str = "auto") -> IngestReport:
        """Ingest an Arrow table, record batches or a pandas DataFrame."""
        import pyarrow as pa
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif isinstance(data, list):
            data = pa.Table.from_batches(data)
        elif not isinstance(data, pa.Table):
            data = pa.Table.from_pandas(data, preserve_index=False)
        return ingest_table(data, self.coordinator, ts=ts, key=key, visitor=visitor, now=now, ts_unit=ts_unit,
                            wrote=self.questions.wrote)

    def ingest_files(self, sources: list[str], **kw):
        """Ingest files or folders through parallel tasks (as the ingest job does)."""
        summary = run_ingest(list(sources), coordinator=self.coordinator, **kw)
        for epoch, positions in sorted(summary.positions.items()):  # this client reads back what it wrote
            self.questions.wrote(epoch, positions)
        return summary

    # ------------------------------------------------------------ queries
    def resolve(self, *, last=None, start=None, end=None, now=None) -> BucketRange:
        """The range a question covers, in whole buckets (see ``sketch.timeindex.resolve_range``)."""
        return self.config.sketch.resolve(now=time.time() if now is None else now, last=last, start=start, end=end)

    def query(self, keys, *, last=None, start=None, end=None, now=None) -> list[dict]:
        """One answer per key (None = site-wide)."""
        rng = self.resolve(last=last, start=start, end=end, now=now)
        return self.questions.query(list(keys), rng)

    def unique(self, key=None, *, last=None, start=None, end=None, now=None) -> dict:
        return self.query([key], last=last, start=start, end=end, now=now)[0]

    def impressions(self, key=None, **kw) -> int:
        return self.unique(key, **kw)["impressions"]

    def series(self, key=None, *, step, last=None, start=None, end=None, now=None) -> list[dict]:
        """One answer per ``step`` (a duration like ``1h``, or buckets) over the range."""
        from impressions.sketch.timeindex import parse_duration
        rng = self.resolve(last=last, start=start, end=end, now=now)
        n = parse_duration(step, self.config.sketch.bucket_seconds)
        return ray.get(self.coordinator.series.remote(key, rng, n), timeout=self.timeout)

    def reach(self, keys=(), *, prefix: str | None = None, last=None, start=None, end=None, now=None) -> dict:
        """Unique visitors of a set of keys together (each visitor once), impressions summed and
        the average frequency: ``keys`` listed (up to 1,000), every key starting with ``prefix``, or both."""
        a = _key_set(keys, prefix)
        rng = self.resolve(last=last, start=start, end=end, now=now)
        return self.questions.reach(a[0], a[1], rng)

    def overlap(self, a, b, *, a_prefix: str | None = None, b_prefix: str | None = None, last=None, start=None,
                end=None, now=None) -> dict:
        """Visitors who saw both ``a`` and ``b`` (a key or a list of keys each, and/or a prefix):
        the joint estimate with its 95 % interval, Jaccard, each side's share (``sketch.sets``)."""
        sa, sb = _key_set(a, a_prefix), _key_set(b, b_prefix)
        rng = self.resolve(last=last, start=start, end=end, now=now)
        return self.questions.overlap(sa, sb, rng)

    def rolling(self, keys=None, *, step, window=None, cumulative: bool = False, prefix: str | None = None,
                last=None, start=None, end=None, now=None) -> dict:
        """Trailing ``window`` (e.g. ``24h``) every ``step`` (e.g. ``1h``) over the range, or with
        ``cumulative=True`` the unique visitors since its start at every step; ``keys`` a key, a
        list (their union) or None for site-wide.  Each point is a range answer."""
        from impressions.sketch.timeindex import parse_duration
        from impressions.sketch.windows import plan_series
        if cumulative == (window is not None):
            raise ValueError("give a window, or cumulative=True")
        if keys is None and prefix is None:
            names = [None]
        else:
            names, prefix = _key_set([] if keys is None else keys, prefix)
        rng = self.resolve(last=last, start=start, end=end, now=now)
        w = self.config.sketch.bucket_seconds
        n = parse_duration(step, w, "step")
        win = None if cumulative else parse_duration(window, w, "window")
        plan_series(rng.b0, rng.b1, n, win)  # a series that cannot be answered is refused here, saying why
        return self.questions.rolling(names, prefix, rng, n, win)

    def registers(self, key, b0: int, b1: int):
        """The whole dense sketch of ``key`` over buckets ``[b0, b1)``."""
        rng = BucketRange(b0, b1, self.config.sketch.bucket_seconds)
        return ray.get(self.coordinator.registers.remote(key, rng), timeout=self.timeout)

    # ------------------------------------------------------------ operations
    def maintain(self, now: float | None = None) -> None:
        """Flush every shard and build all pending rollups now."""
        ray.get(self.coordinator.maintain.remote(now), timeout=max(self.timeout, 600))

    def checkpoint(self) -> list[dict]:
        """Checkpoint every shard now (they also do so every ``checkpoint_interval_s``)."""
        return ray.get(self.coordinator.checkpoint.remote(), timeout=max(self.timeout, 600))

    def rescale(self, shards: int) -> dict:
        """Change the number of shards of the live cluster."""
        return ray.get(self.coordinator.rescale.remote(shards), timeout=max(self.timeout, 600))

    def stats(self) -> dict:
        return ray.get(self.coordinator.stats.remote(), timeout=self.timeout)


def _key_set(keys, prefix: str | None) -> tuple[list, str | None]:
    """``(keys, prefix)`` of a key set: a key or a list of keys, and/or a prefix."""
    keys = [keys] if isinstance(keys, str) else list(keys or [])
    if any(not isinstance(k, str) or not k for k in keys):
        raise ValueError("a key set holds keys (non-empty strings); the site-wide key is not one")
    if prefix is not None and not prefix:
        raise ValueError("an empty prefix would be every key: give keys or a prefix")
    if not keys and not prefix:
        raise ValueError("a key set needs keys, a prefix, or both")
    return keys, prefix
