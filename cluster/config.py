"""Cluster configuration: one dataclass, read from the environment.

Every setting has an environment variable (``IMPRESSIONS_<NAME>``, e.g.
``IMPRESSIONS_SHARDS=4``).  The first driver that creates the actors fixes
the configuration: the coordinator keeps it, and every later driver (the
REST app, ingest jobs, the CLI, a notebook) reads it from there, so they
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from sketch.store import SketchConfig

NAMESPACE = "impressions"


def _default_shards() -> int:
    n = os.cpu_count() or 1
    return 1 << (n.bit_length() - 1)  # a power of two, at most the CPU count


@dataclass(frozen=True)
class ClusterConfig:
    """How the cluster is laid out and where it keeps its data."""

    sketch: SketchConfig = field(default_factory=SketchConfig)
    shards: int = field(default_factory=_default_shards)
    namespace: str = NAMESPACE
    storage: str = "file://./data"  # a pyarrow.fs URI: file:// (default), s3://bucket/prefix, gs://...
    s3_endpoint: str | None = None  # for S3-compatible stores (MinIO, moto, ...)
    shard_cpus: float = 0.25  # logical CPUs each shard actor reserves (they are busy only when called)
    query_timeout_s: float = 2.0  # a shard slower than this leaves the answer partial
    batch_rows: int = 262_144  # rows per batch read by an ingest task
    max_inflight: int = 4  # apply calls in flight per ingest task (backpressure)
    maintain_interval_s: float = 1.0  # how often the coordinator asks shards to fold and build rollups
    checkpoint_interval_s: float = 30.0  # how often shards checkpoint (also on demand)

    def __post_init__(self):
        s = self.shards
        if s < 1 or s & (s - 1) or s > (1 << self.sketch.p):
            raise ValueError(f"shards={s} must be a power of two between 1 and {1 << self.sketch.p}")
        if self.max_inflight < 1 or self.batch_rows < 1:
            raise ValueError("max_inflight and batch_rows must be at least 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ClusterConfig":
        d = json.loads(text)
        d["sketch"] = SketchConfig(**d["sketch"])
        return cls(**d)

    def replace(self, **kw) -> "ClusterConfig":
        sk = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(SketchConfig)}}
        return dataclasses.replace(self, sketch=dataclasses.replace(self.sketch, **sk) if sk else self.sketch, **kw)

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
                kw[name] = int(v) if typ.startswith("int") else float(v) if typ.startswith("float") else v
            except ValueError:
                raise ValueError(f"IMPRESSIONS_{name.upper()}={v!r} is not a valid {typ}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls().replace(**kw)
