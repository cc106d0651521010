"""Which batches a shard has applied: exactly-once across retries, restarts and re-sharding.

A batch id names *what was sent*, not where: an ingest job names a slice of
a source file (its identity, row group and offset), the REST API a request
(from its ``Idempotency-Key``, or a random id when there is none).  Every
part of a batch, whichever shard it goes to and however often it is
re-routed or retried, carries the batch's id.

A shard records, for every id it applied, the register range that was
applied (its own: ``[lo, hi)``) and until when to remember it.  A batch
arriving again is cut to the registers not yet applied under its id: all of
them (a new batch), none (a retry: acknowledged, not applied), or some (a
re-sharding merged the ranges of an old shard that had applied it and one
that had not).  Re-sharding hands each new shard the records of the old
shards it takes over, cut to its own range (``restrict``, ``merged``), so a
retry that crosses a re-sharding is recognised too.

Records are kept for ``keep_s`` seconds from when they were applied (set by
the sender: days for job slices and idempotency keys, minutes for calls that
only need protecting from the runtime's own retries) and then forgotten:
the table is bounded by time, not by a count of ids.  They are grouped by
the hour they were applied in, so a checkpoint rewrites only the current
hour's group.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([("id", pa.string()), ("lo", pa.int32()), ("hi", pa.int32()), ("expires", pa.float64())])
HOUR = 3600.0

Ranges = list[tuple[int, int]]


def _subtract(lo: int, hi: int, done: Ranges) -> Ranges:
    """``[lo, hi)`` less the ranges in ``done``."""
    out, at = [], lo
    for a, b in sorted(done):
        if b <= at or a >= hi:
            continue
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def _union(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class AppliedBatches:
    """Batch id -> (register ranges applied, expiry time), grouped by hour applied."""

    def __init__(self):
        self._groups: dict[int, dict[str, tuple[Ranges, float]]] = {}
        self._where: dict[str, int] = {}  # id -> its group
        self.changed: set[int] = set()  # groups changed since the caller last cleared this

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, bid: str) -> bool:
        return bid in self._where

    def unapplied(self, bid: str, lo: int, hi: int, now: float) -> Ranges:
        """The parts of ``[lo, hi)`` not yet applied under ``bid``."""
        g = self._where.get(bid)
        if g is None:
            return [(lo, hi)]
        ranges, expires = self._groups[g][bid]
        if expires < now:
            return [(lo, hi)]
        return _subtract(lo, hi, ranges)

    def record(self, bid: str, lo: int, hi: int, now: float, expires: float) -> None:
        """``bid`` is applied on ``[lo, hi)`` at ``now``, to be remembered until ``expires``."""
        old = self._pop(bid)
        ranges = _union((old[0] if old else []) + [(lo, hi)])
        self._put(bid, ranges, max(expires, old[1] if old else 0.0), int(now // HOUR))

    def _put(self, bid: str, ranges: Ranges, expires: float, group: int) -> None:
        self._groups.setdefault(group, {})[bid] = (ranges, expires)
        self._where[bid] = group
        self.changed.add(group)

    def _pop(self, bid: str):
        g = self._where.pop(bid, None)
        if g is None:
            return None
        out = self._groups[g].pop(bid)
        self.changed.add(g)
        if not self._groups[g]:
            del self._groups[g]
        return out

    def expire(self, now: float) -> int:
        """Forget records past their time; returns how many."""
        gone = [bid for group in self._groups.values() for bid, (_, exp) in group.items() if exp < now]
        for bid in gone:
            self._pop(bid)
        return len(gone)

    # ------------------------------------------------------------ re-sharding
    def restrict(self, lo: int, hi: int) -> "AppliedBatches":
        """The records cut to registers ``[lo, hi)`` (for a new shard of that range)."""
        out = AppliedBatches()
        for g, group in self._groups.items():
            for bid, (ranges, exp) in group.items():
                cut = [(max(a, lo), min(b, hi)) for a, b in ranges if a < hi and b > lo]
                if cut:
                    out._put(bid, cut, exp, g)
        return out

    @classmethod
    def merged(cls, parts: list["AppliedBatches"]) -> "AppliedBatches":
        """The records of shards whose ranges are joined."""
        out = cls()
        for p in parts:
            for g, group in p._groups.items():
                for bid, (ranges, exp) in group.items():
                    old = out._pop(bid)
                    out._put(bid, _union((old[0] if old else []) + ranges), max(exp, old[1] if old else 0.0),
                             max(g, out._where.get(bid, g)))
        return out

    # ------------------------------------------------------------ persistence
    def groups(self) -> list[int]:
        return sorted(self._groups)

    def group_table(self, g: int) -> pa.Table:
        """One hour's records as an Arrow table (a range per row)."""
        ids, lo, hi, exp = [], [], [], []
        for bid, (ranges, e) in sorted(self._groups.get(g, {}).items()):
            for a, b in ranges:
                ids.append(bid)
                lo.append(a)
                hi.append(b)
                exp.append(e)
        return pa.table([pa.array(ids, pa.string()), pa.array(lo, pa.int32()), pa.array(hi, pa.int32()),
                         pa.array(exp, pa.float64())], schema=SCHEMA.with_metadata({b"group": str(g).encode()}))

    def load_group(self, table: pa.Table) -> None:
        """Add one hour's records (``group_table``), refusing anything malformed."""
        if table.schema.remove_metadata() != SCHEMA:
            raise ValueError(f"applied-batches table has schema {table.schema}, expected {SCHEMA}")
        g = int((table.schema.metadata or {}).get(b"group", b"-1"))
        ids = table.column("id").to_pylist()
        lo = table.column("lo").to_numpy(zero_copy_only=False)
        hi = table.column("hi").to_numpy(zero_copy_only=False)
        exp = table.column("expires").to_numpy(zero_copy_only=False)
        if any(i is None for i in ids) or (lo >= hi).any() or (lo < 0).any() or not np.isfinite(exp).all() \
                or g < 0 or not math.isfinite(g):
            raise ValueError("applied-batches table holds a malformed record")
        for bid, a, b, e in zip(ids, lo.tolist(), hi.tolist(), exp.tolist()):
            old = self._pop(bid)
            self._put(bid, _union((old[0] if old else []) + [(a, b)]), max(e, old[1] if old else 0.0), g)
