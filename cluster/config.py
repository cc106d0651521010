"""Cluster configuration: one dataclass, the only reader of the environment.

Every setting has an environment variable (``IMPRESSIONS_<NAME>``, e.g.
``IMPRESSIONS_SHARDS=4``).  The first driver that creates the actors fixes
the configuration: the coordinator keeps it, and every later driver (the
REST app, ingest jobs, the CLI, a notebook) reads it from there, so they
cannot disagree.  API keys are the exception: they are read here by the
process that starts the REST app and handed to it alone (never to the
coordinator, a job or a status page).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from impressions.sketch.config import SketchConfig
from impressions.sketch.hll import check_shards

NAMESPACE = "impressions"


def _default_shards() -> int:
    n = os.cpu_count() or 1
    return 1 << (n.bit_length() - 1)  # a power of two, at most the CPU count


PLACEHOLDER = "change-me"


def placeholder_secrets(env=None) -> list[str]:
    """The secrets still holding the example file's placeholders (which must not work)."""
    env = os.environ if env is None else env
    return [name for name in ("IMPRESSIONS_API_KEYS", "RAY_AUTH_TOKEN") if PLACEHOLDER in env.get(name, "").lower()]


@dataclass(frozen=True)
class ClusterConfig:
    """How the cluster is laid out and where it keeps its data."""

    sketch: SketchConfig = field(default_factory=SketchConfig)
    shards: int = field(default_factory=_default_shards)
    namespace: str = NAMESPACE
    storage: str = "file://./data"  # a pyarrow.fs URI: file:// (default), s3://bucket/prefix, gs://...
    s3_endpoint: str | None = None  # for S3-compatible stores (MinIO, moto, ...)
    shard_cpus: float = 0.25  # logical CPUs each shard actor reserves (they are busy only when called)
    # a custom resource each shard takes one of (unset: none): only nodes that declare it, the ones set up with
    # the store's access and a local cache disk, receive shards, and the autoscaler adds such nodes for them
    shard_resource: str | None = None
    query_timeout_s: float = 2.0  # a shard slower than this leaves the answer partial
    # readers per register range (actors/reader.py), with storage; 0: the writers answer.  None: as many as the
    # cluster has room for, at most 2: one for each CPU a range has beyond its writer's (each reader applies every
    # log entry again: 2 a range on 2 cores halved ingest, docs/benchmarks.md)
    readers: int | None = None
    reader_cpus: float = 0.001  # logical CPUs each reader reserves: next to none, so readers never take the CPUs
    # ingest tasks need (they work only when asked); not zero, because Ray places an actor that needs no resource
    # anywhere, ignoring the node asked for (measured: 3 of 12 on the node asked at 0 CPU, 12 of 12 at 0.001)
    # bulk work (a writer's applies and upkeep, a reader's following, REST ingest bodies) on threads below the
    # questions', the ingest tasks in the idle class, so a question gets the core ahead of it
    # (cluster/priority.py); off: all threads alike
    questions_first: bool = True
    # writers and readers also answer on TCP ports of their own (actors/wire.py): one round trip of about 0.06 ms
    # for a question where a Ray call costs 0.6; off: every question is a Ray call
    question_ports: bool = True
    hedge_s: float = 0.25  # a copy of a range that has not answered by then is joined by the next one
    batch_rows: int = 262_144  # rows per batch read by an ingest task
    max_inflight: int = 4  # apply calls in flight per ingest task to each register range (backpressure)
    maintain_interval_s: float = 1.0  # how often the coordinator asks shards to fold and build rollups
    checkpoint_interval_s: float = 30.0  # how often shards checkpoint (also on demand)
    dedup_window_s: float = 7 * 86400.0  # how long a job slice or idempotency key is remembered (exactly once)
    cache_dir: str | None = None  # where shards keep copies of a remote store's sealed files (default: a temp folder)
    block_cache_mb: float = 256.0  # decoded blocks of sealed files a shard keeps (100 keys over 30 days: 130-250 MB)
    clock_offset_s: float = 0.0  # added to this machine's clock by the maintenance loop (drills and tests)
    api_keys: str | None = field(default=None, repr=False)  # REST keys and scopes: "k1:read,k2:write"; unset = open

    def __post_init__(self):
        check_shards(self.shards, self.sketch.p)
        if self.max_inflight < 1 or self.batch_rows < 1:
            raise ValueError("max_inflight and batch_rows must be at least 1")

    def to_json(self) -> str:
        """Every setting but the secrets, as JSON."""
        return json.dumps(dataclasses.asdict(self.without_secrets()))

    def without_secrets(self) -> "ClusterConfig":
        """What may be shipped to actors and jobs and shown: no API keys."""
        return dataclasses.replace(self, api_keys=None)

    def job_env(self) -> dict[str, str]:
        """The environment an ingest job needs: the namespace (the job reads
        everything else from the coordinator) and Ray's auth mode."""
        env = {"IMPRESSIONS_NAMESPACE": self.namespace}
        if os.environ.get("RAY_AUTH_MODE"):
            env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        return env

    @classmethod
    def from_json(cls, text: str) -> "ClusterConfig":
        d = json.loads(text)
        d["sketch"] = SketchConfig(**d["sketch"])
        return cls(**d)

    def replace(self, **kw) -> "ClusterConfig":
        """A copy with some settings changed; sketch settings may be given one
        by one (``p=12``) or as a whole (``sketch=SketchConfig(...)``)."""
        sk = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(SketchConfig)}}
        sketch = kw.pop("sketch", self.sketch)
        return dataclasses.replace(self, sketch=dataclasses.replace(sketch, **sk) if sk else sketch, **kw)

    @classmethod
    def from_env(cls, env=None, **overrides) -> "ClusterConfig":
        """Defaults, then ``IMPRESSIONS_*`` variables, then ``overrides``."""
        env = os.environ if env is None else env
        kw = {}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sketch"}
        fields.update({f.name: f for f in dataclasses.fields(SketchConfig)})
        for name, f in fields.items():
            v = env.get(f"IMPRESSIONS_{name.upper()}")
            if v is None:
                continue
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            try:
                if typ.startswith("bool"):
                    if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    kw[name] = v.lower() in ("1", "true", "yes", "on")
                    continue
                kw[name] = int(v) if typ.startswith("int") else float(v) if typ.startswith("float") else (v or None)
            except ValueError:
                raise ValueError(f"IMPRESSIONS_{name.upper()}={v!r} is not a valid {typ}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls().replace(**kw)
