"""Validating events and cutting them into per-shard batches.

An event is ``(ts, key, visitor)``: ``ts`` seconds since the epoch (float;
NaN when missing), ``key`` a non-empty string of at most ``MAX_KEY_BYTES``
UTF-8 bytes, ``visitor`` an opaque id (hashed by ``sketch.hashing``) or its
64-bit hash.  Bad rows are counted per reason, a few are kept as samples,
and every good row is still accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .hashing import hash_visitors
from .hll import coupon_register, coupons_from_hashes
from .timeindex import span

MAX_KEY_BYTES = 256
MAX_SAMPLES = 10

REASONS = {
    "malformed": "row could not be parsed",
    "missing_ts": "timestamp is missing",
    "bad_ts": "timestamp could not be parsed",
    "missing_key": "key is missing",
    "bad_key": f"key is empty or longer than {MAX_KEY_BYTES} bytes",
    "missing_visitor": "visitor is missing or empty",
    "expired": "older than the retention",
    "future": "too far in the future",
}


@dataclass
class IngestReport:
    """What happened to a set of rows: accepted, rejected per reason, samples."""

    received: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, rows: np.ndarray, value_of=None, message: str | None = None,
               row_offset: int = 0) -> None:
        """Count ``rows`` as rejected for ``reason``; sample the first few
        (``value_of(row)`` gives the offending value to show)."""
        rows = np.asarray(rows)
        if not len(rows):
            return
        self.rejected[reason] = self.rejected.get(reason, 0) + len(rows)
        room = MAX_SAMPLES - len(self.samples)
        for i in rows[:max(room, 0)]:
            sample = {"row": int(i) + row_offset, "reason": message or REASONS[reason]}
            if value_of is not None:
                v = value_of(int(i))
                if isinstance(v, (float, np.floating)):
                    v = float(v) if math.isfinite(v) else str(float(v))  # JSON has no inf or nan
                elif isinstance(v, str):
                    v = v[:200]
                sample["value"] = v if v is None or isinstance(v, (int, float, str)) else str(v)[:200]
            self.samples.append(sample)

    def add(self, other: "IngestReport") -> "IngestReport":
        self.received += other.received
        self.accepted += other.accepted
        for k, v in other.rejected.items():
            self.rejected[k] = self.rejected.get(k, 0) + v
        self.samples.extend(other.samples[:max(MAX_SAMPLES - len(self.samples), 0)])
        return self

    def to_dict(self) -> dict:
        return {"received": self.received, "accepted": self.accepted, "rejected": self.rejected_total,
                "rejected_by_reason": dict(self.rejected), "errors": list(self.samples)}


@dataclass
class Batch:
    """Validated events, ready for the shards: ``key_names[key_index[i]]``
    saw ``coupon[i]`` in ``bucket[i]``; ``shard[i]`` owns its register."""

    key_names: list
    key_index: np.ndarray
    bucket: np.ndarray
    coupon: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket)

    def shards(self, p: int, shards: int) -> np.ndarray:
        return coupon_register(self.coupon, p) // ((1 << p) // shards)

    def split(self, p: int, shards: int) -> list["Batch"]:
        """One batch per shard (some may be empty), order kept within each."""
        if shards == 1:
            return [self]
        s = self.shards(p, shards)
        order = np.argsort(s, kind="stable")
        cuts = np.searchsorted(s[order], np.arange(1, shards))
        parts = np.split(order, cuts)
        return [Batch(self.key_names, self.key_index[ix], self.bucket[ix], self.coupon[ix]) for ix in parts]

    def within(self, p: int, ranges: list[tuple[int, int]]) -> "Batch":
        """The events whose register (at precision ``p``) lies in one of ``ranges``."""
        reg = coupon_register(self.coupon, p)
        keep = np.zeros(len(reg), bool)
        for lo, hi in ranges:
            keep |= (reg >= lo) & (reg < hi)
        return Batch(self.key_names, self.key_index[keep], self.bucket[keep], self.coupon[keep])

    def compact(self) -> "Batch":
        """The same batch with only the key names it uses (per-shard parts of a
        batch share the whole dictionary until compacted)."""
        if not len(self.key_index):
            return Batch([], self.key_index, self.bucket, self.coupon)
        used = np.bincount(self.key_index, minlength=len(self.key_names)) > 0
        if used.all():
            return self
        lut = np.cumsum(used) - 1
        names = [n for n, u in zip(self.key_names, used) if u]
        return Batch(names, lut[self.key_index].astype(np.int32), self.bucket, self.coupon)

    def to_arrow(self) -> pa.RecordBatch:
        keys = pa.DictionaryArray.from_arrays(pa.array(self.key_index, pa.int32()), pa.array(self.key_names, pa.string()))
        return pa.record_batch({"key": keys, "bucket": pa.array(self.bucket, pa.int64()),
                                "coupon": pa.array(self.coupon, pa.uint32())})

    @classmethod
    def from_arrow(cls, rb: pa.RecordBatch) -> "Batch":
        keys = rb.column("key")
        return cls(keys.dictionary.to_pylist(), keys.indices.to_numpy(zero_copy_only=False).astype(np.int32),
                   rb.column("bucket").to_numpy(zero_copy_only=False), rb.column("coupon").to_numpy(zero_copy_only=False))


def _as_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(values)


def prepare(ts, keys, *, visitors=None, hashes=None, now: float, bucket_seconds: int,
            retention_buckets: int, future_seconds: int, row_offset: int = 0, ts_bad: np.ndarray | None = None,
            ts_raw=None, malformed=None) -> tuple[Batch, IngestReport]:
    """Validate events and turn them into a ``Batch``.

    ``ts``: seconds since the epoch (NaN or None = missing); ``keys``: strings
    (None = missing); either ``visitors`` (strings; None or "" = missing) or
    ``hashes`` (uint64, already hashed as ``sketch.hashing`` states).
    ``row_offset`` numbers the rows in the report's samples.  Readers that
    parse timestamps themselves pass ``ts_bad`` (values that could not be
    parsed; ``ts_raw`` shows them in samples) and ``malformed`` (rows that
    could not be read at all).
    """
    ts = np.asarray(pa.array(ts, pa.float64()).to_numpy(zero_copy_only=False) if not isinstance(ts, np.ndarray)
                    else ts, dtype=np.float64)
    n = len(ts)
    report = IngestReport(received=n)
    ok = np.ones(n, bool)

    def reject(reason, mask, value_of=None, message=None):
        rows = np.flatnonzero(mask & ok)
        report.reject(reason, rows, value_of, message, row_offset)
        ok[rows] = False

    if malformed is not None and len(malformed):
        bad_rows = np.zeros(n, bool)
        bad_rows[np.asarray(malformed, np.int64)] = True
        reject("malformed", bad_rows)
    if ts_bad is not None:
        raw = ts_raw.to_pylist() if ts_raw is not None and ts_bad.any() else None
        reject("bad_ts", ts_bad, (lambda r: raw[r]) if raw is not None else None)
    reject("missing_ts", np.isnan(ts))

    karr = _as_array(keys)
    if len(karr) != n:
        raise ValueError(f"{len(karr)} keys for {n} timestamps")
    if not pa.types.is_dictionary(karr.type):
        if not (pa.types.is_string(karr.type) or pa.types.is_large_string(karr.type) or pa.types.is_null(karr.type)):
            karr = karr.cast(pa.string())
        karr = karr.dictionary_encode()
    kidx = karr.indices.to_numpy(zero_copy_only=False)
    knull = np.asarray(karr.is_null().to_numpy(zero_copy_only=False), bool)
    reject("missing_key", knull)
    names = karr.dictionary.to_pylist()
    bad_names = np.array([not name or len(name.encode()) > MAX_KEY_BYTES for name in names], bool)
    kidx_safe = np.where(knull, 0, kidx).astype(np.int64)
    if bad_names.any():
        reject("bad_key", ~knull & bad_names[kidx_safe], lambda r: names[kidx_safe[r]])

    if hashes is None:
        if visitors is None:
            raise ValueError("give visitors or hashes")
        varr = _as_array(visitors)
        if len(varr) != n:
            raise ValueError(f"{len(varr)} visitors for {n} timestamps")
        if not (pa.types.is_string(varr.type) or pa.types.is_large_string(varr.type) or pa.types.is_binary(varr.type)):
            varr = varr.cast(pa.string())
        vmissing = np.asarray(pc.or_kleene(varr.is_null(), pc.equal(pc.binary_length(varr), 0))
                              .fill_null(True).to_numpy(zero_copy_only=False), bool)
        reject("missing_visitor", vmissing)
    else:
        h_all = np.asarray(hashes, dtype=np.uint64)
        if len(h_all) != n:
            raise ValueError(f"{len(h_all)} hashes for {n} timestamps")

    w = bucket_seconds
    now_b = math.floor(now / w)
    # clipped first: a time far outside any retention (even infinite) is a rejected row, never an overflow
    bucket = np.floor(np.clip(np.where(np.isnan(ts), 0, ts), -1.0, 2.0 ** 40) / w).astype(np.int64)
    oldest = now_b - retention_buckets + 1
    reject("future", ts > now + future_seconds, lambda r: ts[r], f"more than {future_seconds} s in the future")
    reject("expired", bucket < oldest, lambda r: ts[r], f"older than the {span(retention_buckets * w, True)} retention")

    rows = np.flatnonzero(ok)
    if hashes is None:
        h = hash_visitors(varr.take(pa.array(rows)) if len(rows) < n else varr)
    else:
        h = h_all[rows]
    report.accepted = len(rows)
    return Batch(names, kidx_safe[rows].astype(np.int32), bucket[rows], coupons_from_hashes(h)), report
