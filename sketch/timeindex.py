"""Time buckets, the dyadic time index, and query ranges.

Time is cut into buckets of ``bucket_seconds`` (default 60): bucket ``b``
covers ``[b * w, (b + 1) * w)`` seconds since the Unix epoch.  A *node* at
level ``l`` covers the ``2**l`` buckets ``[j << l, (j + 1) << l)``: level 0
is the bucket itself, level 6 an hour of minutes (64), level 11 about 34
hours (2048), level 15 about 23 days.

Any range ``[b0, b1)`` is the disjoint union of at most ``2 * log2(b1 - b0)``
nodes (``dyadic``): the largest aligned node that fits at the left edge,
repeatedly.  With a sketch stored for every node that is worth storing
(``rows.level_up``), a 30-day range at 1-minute resolution (43,200 buckets)
merges about 25 sketches instead of 43,200.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LAST_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


class RangeError(ValueError):
    """A query range that cannot be answered (malformed, empty, beyond retention)."""


def dyadic(b0: int, b1: int) -> list[tuple[int, int]]:
    """Decompose ``[b0, b1)`` into aligned nodes ``(level, j)``, left to right."""
    out = []
    while b0 < b1:
        level = (b0 & -b0).bit_length() - 1 if b0 else 62
        span = b1 - b0
        level = min(level, span.bit_length() - 1)
        out.append((level, b0 >> level))
        b0 += 1 << level
    return out


def parse_duration(text: str | int, bucket_seconds: int, what: str = "last") -> int:
    """``"15m"`` -> number of buckets.  A bare integer counts buckets.

    Durations must be a whole number of buckets (``"90s"`` with 60 s buckets
    is refused rather than silently rounded).
    """
    if isinstance(text, bool):
        raise RangeError(f"'{what}' must be a duration like 15m or a number of buckets, not {text!r}")
    if isinstance(text, int):
        n, unit = text, ""
    else:
        m = _LAST_RE.match(str(text))
        if not m:
            raise RangeError(
                f"'{what}' must be <integer><s|m|h|d|w> or a number of buckets, not {text!r}")
        n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise RangeError(f"'{what}' must be positive, got {text!r}")
    if not unit:
        return n
    seconds = n * _UNITS[unit]
    if seconds % bucket_seconds:
        raise RangeError(f"'{what}' of {text} is not a whole number of {bucket_seconds}-second buckets")
    return seconds // bucket_seconds


@dataclass(frozen=True)
class BucketRange:
    """A query range in buckets, ``[b0, b1)``, and in seconds."""

    b0: int
    b1: int
    bucket_seconds: int

    @property
    def start(self) -> int:
        return self.b0 * self.bucket_seconds

    @property
    def end(self) -> int:
        return self.b1 * self.bucket_seconds

    @property
    def buckets(self) -> int:
        return self.b1 - self.b0


def parse_instant(name: str, value) -> float | None:
    """A point in time as seconds since the epoch: a number (or a string of
    one), or ISO-8601 (``2026-11-29T10:00:00Z``, an offset, a space for the
    ``T``, a bare date; a time without an offset is UTC).  None or "" is None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RangeError(f"'{name}' must be epoch seconds or ISO-8601, not {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" else text)
            except ValueError:
                raise RangeError(f"'{name}' must be epoch seconds or ISO-8601, not {value!r}") from None
            return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RangeError(f"'{name}' must be a finite number of seconds since the epoch or ISO-8601, not {value!r}")
    return float(value)


def resolve_range(*, bucket_seconds: int, retention_buckets: int, now: float,
                  last: str | int | None = None, start: float | str | None = None,
                  end: float | str | None = None) -> BucketRange:
    """Turn ``last`` (ending at ``end``, default now) or ``start``/``end``
    (epoch seconds or ISO-8601, see ``parse_instant``) into whole buckets.

    ``last=n`` covers the ``n`` buckets ending with the bucket that holds
    ``end`` (so "last 15m" includes the current, partial minute).  An explicit
    ``[start, end)`` is widened to bucket boundaries.  Ranges reaching before
    the oldest retained bucket, or longer than the retention, are refused.
    """
    w = bucket_seconds
    now_b = math.floor(now / w)
    oldest = now_b - retention_buckets + 1
    start, end = parse_instant("start", start), parse_instant("end", end)
    if isinstance(last, str) and not last.strip():
        last = None
    if last is not None:
        if start is not None:
            raise RangeError("give either 'last' or 'start', not both")
        n = parse_duration(last, w)
        b1 = (math.floor(end / w) + 1) if end is not None else now_b + 1
        b0 = b1 - n
    else:
        if start is None:
            raise RangeError("give 'last' (e.g. 15m) or 'start' (and optionally 'end')")
        b0 = math.floor(start / w)
        b1 = math.ceil(end / w) if end is not None else now_b + 1
        if b1 <= b0:
            raise RangeError(f"start ({start}) must be before end ({end})")
    if b1 - b0 > retention_buckets:
        raise RangeError(f"range of {span((b1 - b0) * w)} exceeds the {span(retention_buckets * w, True)} retention")
    if b0 < oldest:
        raise RangeError(
            f"range starts {span((now_b + 1 - b0) * w)} ago, beyond the {span(retention_buckets * w, True)} retention")
    return BucketRange(b0, b1, w)


def span(seconds: int, adjective: bool = False) -> str:
    """``2592000`` -> "30 days" (or "30-day" as an adjective)."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            if adjective:
                return f"{n}-{unit}"
            return f"{n} {unit}" + ("" if n == 1 else "s")
    return f"{seconds} seconds"
