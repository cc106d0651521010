"""Event records to columns: timestamps in any common form, JSON lines.

What ``events.prepare`` takes is three columns: ``ts`` as float seconds
since the epoch (NaN when missing) with a mask of values that could not be
parsed, ``key`` and ``visitor`` as strings.  The readers of files and of
request bodies use these to get there:

* ``parse_ts``: epoch seconds, milliseconds, microseconds or nanoseconds
  (told apart by magnitude, or fixed with ``unit``), ISO-8601 strings (``Z``
  or an offset; a naive time is taken as UTC; ``T`` or a space between date
  and time; a bare date is midnight UTC) or an Arrow timestamp or date;
* ``json_lines``: a block of JSON lines, Arrow's reader when the block is
  well formed and consistently typed, else line by line (bad lines are
  reported by row).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_ISO = r"^\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?$"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def _numbers_to_seconds(v: np.ndarray, unit: str) -> np.ndarray:
    if unit != "auto":
        return v * UNITS[unit]
    a = np.abs(v)
    # 1e11 s is the year 5138 and 1e11 ms is 1973: magnitude tells the unit apart
    scale = np.where(a < 1e11, 1.0, np.where(a < 1e14, 1e-3, np.where(a < 1e17, 1e-6, 1e-9)))
    return v * scale


def _iso_to_seconds(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """ISO-8601 strings -> (seconds, bad mask)."""
    n = len(s)
    out = np.full(n, np.nan)
    ok = np.asarray(pc.match_substring_regex(s, _ISO).fill_null(False).to_numpy(zero_copy_only=False), bool)
    bad = ~ok & np.asarray(s.is_valid().to_numpy(zero_copy_only=False), bool)
    if not ok.any():
        return out, bad
    idx = np.flatnonzero(ok)
    t = s.take(pa.array(idx))
    t = pc.replace_substring_regex(t, r"^(\d{4}-\d{2}-\d{2})[t ]", r"\1T")
    t = pc.replace_substring_regex(t, r"^(\d{4}-\d{2}-\d{2})$", r"\1T00:00:00")
    t = pc.replace_substring_regex(t, r"z$", "Z")
    t = pc.replace_substring_regex(t, r"([+-]\d{2})$", r"\1:00")
    t = pc.replace_substring_regex(t, r"(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?)$", r"\1Z")  # naive: UTC
    vals = np.full(len(t), np.nan)
    failed = np.zeros(len(t), bool)
    _cast_chunks(t, 0, len(t), vals, failed)
    out[idx] = vals
    bad[idx[failed]] = True
    return out, bad


def _cast_chunks(t: pa.Array, lo: int, hi: int, vals: np.ndarray, failed: np.ndarray) -> None:
    """Cast strings to timestamps; a chunk that fails (say, month 13) is split
    until the bad values are isolated, so one bad value costs O(log n) casts."""
    try:
        ts = pc.cast(t.slice(lo, hi - lo), pa.timestamp("ns", tz="UTC"))
        vals[lo:hi] = ts.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) * 1e-9
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if hi - lo == 1:
            failed[lo] = True
            return
        mid = (lo + hi) // 2
        _cast_chunks(t, lo, mid, vals, failed)
        _cast_chunks(t, mid, hi, vals, failed)


def parse_ts(arr: pa.Array | pa.ChunkedArray, unit: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """A timestamp column -> (float seconds, NaN where missing or bad; mask of bad values)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    t = arr.type
    if pa.types.is_null(t):
        return np.full(n, np.nan), np.zeros(n, bool)
    if pa.types.is_timestamp(t):  # in its own unit: no cast that could overflow a far-off date
        v = arr.view(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
        return v * UNITS[t.unit], np.zeros(n, bool)
    if pa.types.is_date(t):
        days = arr.cast(pa.int32()) if pa.types.is_date32(t) else arr.cast(pa.int64())
        v = days.to_numpy(zero_copy_only=False).astype(np.float64)
        return v * (86400.0 if pa.types.is_date32(t) else 1e-3), np.zeros(n, bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        v = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(v) & np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
        return np.where(bad, np.nan, _numbers_to_seconds(v, unit)), bad
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        arr = arr.cast(pa.string())
    s = pc.utf8_trim_whitespace(arr)
    s = pc.if_else(pc.equal(s, ""), pa.scalar(None, s.type), s)
    numeric = np.asarray(pc.match_substring_regex(s, _NUMBER).fill_null(False).to_numpy(zero_copy_only=False), bool)
    out, bad = _iso_to_seconds(s)
    if numeric.any():
        idx = np.flatnonzero(numeric)
        v = s.take(pa.array(idx)).cast(pa.float64()).to_numpy(zero_copy_only=False)
        out[idx] = _numbers_to_seconds(v, unit)
        bad[idx] = False
    return out, bad


class MissingColumn(ValueError):
    """A file or request body without one of the columns events are read from."""


def check_columns(names: list[str], cols: dict[str, str], where: str) -> None:
    """Raise ``MissingColumn`` (naming ``where``) unless every column of ``cols`` is in ``names``."""
    missing = [f"'{c}'" for c in cols.values() if c not in names]
    if missing:
        raise MissingColumn(f"{where} has no {' or '.join(missing)} column (its columns: {', '.join(names) or 'none'})")


def normalise(rb: pa.RecordBatch | pa.Table, cols: dict[str, str], where: str) -> pa.Table:
    """Rename the configured columns to ts/key/visitor; complain if one is absent."""
    check_columns(rb.schema.names, cols, where)
    return pa.table({std: rb.column(c) for std, c in cols.items()})


def canonical(value):
    """A JSON scalar as the string every path makes of it (an integer in
    decimal, whether it came as ``7`` or ``7.0``; another number as Python
    writes it; a string as it is); None for what cannot name a visitor, key
    or time (objects, arrays, booleans, non-finite numbers)."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) < 2 ** 63 else repr(value)
    return str(value)


def _read_the_same(t: pa.Table, cols: dict[str, str]) -> bool:
    """Whether Arrow's reader typed the columns so that every path reads them
    alike: keys and visitors as strings or 64-bit integers (a double may
    have rounded a large integer, a struct or list is not an id), times also
    as doubles."""
    for std, c in cols.items():
        typ = t.column(c).type
        ok = pa.types.is_string(typ) or pa.types.is_int64(typ) or pa.types.is_null(typ) or \
            (std == "ts" and pa.types.is_float64(typ))
        if not ok:
            return False
    return True


def json_lines(chunk: bytes, uri: str, cols: dict[str, str], row: int):
    """One block of JSON lines: Arrow's reader when the block is well formed
    and its columns come out as plain scalars, else line by line (bad lines
    are reported, values made ``canonical``)."""
    lines = chunk.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        if any(not ln.strip() for ln in lines):
            raise pa.ArrowInvalid("blank line")
        t = _fill_absent(pajson.read_json(io.BytesIO(chunk), parse_options=pajson.ParseOptions(
            unexpected_field_behavior="infer")), cols)
        if _read_the_same(t, cols):
            yield normalise(t, cols, uri), row, []
            return
    except pa.ArrowInvalid:
        pass
    values = {c: [] for c in cols.values()}
    malformed = []
    for i, ln in enumerate(lines):
        try:
            obj = json.loads(ln)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            malformed.append(i)
            obj = {}
        for c in cols.values():
            values[c].append(canonical(obj.get(c)))
    t = pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})
    yield normalise(t, cols, uri), row, malformed


def _fill_absent(t: pa.Table, cols: dict[str, str]) -> pa.Table:
    """JSON lines may omit a field in every line of a block: that is missing
    values, not a missing column."""
    for c in cols.values():
        if c not in t.schema.names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t
