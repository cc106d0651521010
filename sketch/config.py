"""The sketch store's parameters: precision, bucket width, retention, tiers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .hll import check_precision
from .timeindex import BucketRange, resolve_range


@dataclass(frozen=True)
class SketchConfig:
    """Parameters of the sketch store.  ``p`` and ``bucket_seconds`` (and the
    tier levels) are part of a stored state's identity: a state written with
    other values is refused on load."""

    p: int = 14
    bucket_seconds: int = 60
    retention_seconds: int = 30 * 86400
    future_seconds: int = 300
    leaf_level: int = 6
    segment_level: int = 11
    lateness_buckets: int = 2
    memtable_rows: int = 1 << 16
    max_runs: int = 4

    def __post_init__(self):
        if self.bucket_seconds < 1:
            raise ValueError(f"bucket_seconds must be at least 1, got {self.bucket_seconds}")
        if self.retention_seconds < self.bucket_seconds or self.retention_seconds % self.bucket_seconds:
            raise ValueError(f"retention of {self.retention_seconds} s must be a whole number of "
                             f"{self.bucket_seconds}-second buckets")
        if not (1 <= self.leaf_level < self.segment_level <= 20):
            raise ValueError(f"need 1 <= leaf_level ({self.leaf_level}) < segment_level "
                             f"({self.segment_level}) <= 20")
        if self.future_seconds < 0 or self.lateness_buckets < 0 or self.memtable_rows < 1 or self.max_runs < 1:
            raise ValueError("future_seconds, lateness_buckets, memtable_rows and max_runs must be positive")
        check_precision(self.p)

    @property
    def retention_buckets(self) -> int:
        return self.retention_seconds // self.bucket_seconds

    @property
    def top_level(self) -> int:
        """Highest useful node level: a larger node never fits in a query."""
        return max(self.segment_level, int(math.floor(math.log2(self.retention_buckets))))

    def oldest_bucket(self, now: float) -> int:
        """The oldest bucket still inside the retention at time ``now``."""
        return math.floor(now / self.bucket_seconds) - self.retention_buckets + 1

    def resolve(self, *, now: float, last=None, start=None, end=None) -> BucketRange:
        """A question's range in whole buckets (see ``timeindex.resolve_range``):
        the one place a range is resolved, by whoever received the question."""
        return resolve_range(bucket_seconds=self.bucket_seconds, retention_buckets=self.retention_buckets,
                             now=now, last=last, start=start, end=end)

    def identity(self) -> dict[str, int]:
        """The parameters a stored state must match to be loaded."""
        return {"p": self.p, "bucket_seconds": self.bucket_seconds,
                "leaf_level": self.leaf_level, "segment_level": self.segment_level}

    def to_dict(self) -> dict:
        return asdict(self)
