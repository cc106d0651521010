"""Reading event files in bounded batches, and parsing their timestamps.

Formats: Parquet (read per row group), CSV and JSON lines (read in blocks).
Every column is normalised to what ``sketch.events.prepare`` takes: ``ts``
as float seconds since the epoch (NaN when missing) plus a mask of values
that could not be parsed, ``key`` and ``visitor`` as strings.

Timestamps may be epoch seconds, milliseconds, microseconds or nanoseconds
(told apart by magnitude, or fixed with ``unit``), ISO-8601 strings (``Z``
or an offset; a naive time is taken as UTC; ``T`` or a space between date
and time; a bare date is midnight UTC) or an Arrow timestamp or date.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from cluster.storage import SourceFile, filesystem

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
    if pa.types.is_timestamp(t):
        ns = arr.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64())
        return ns.to_numpy(zero_copy_only=False).astype(np.float64) * 1e-9, np.zeros(n, bool)
    if pa.types.is_date(t):
        s = arr.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
        return s, np.zeros(n, bool)
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


# ------------------------------------------------------------------ readers

@dataclass(frozen=True)
class Fragment:
    """A unit of work for one ingest task: a file, or one Parquet row group."""

    source: SourceFile
    row_group: int | None = None
    first_row: int = 0  # the row number (in the file) of the fragment's first row
    rows: int | None = None  # known for Parquet


class MissingColumn(ValueError):
    pass


def fragments(sources: list[SourceFile], s3_endpoint: str | None = None) -> list[Fragment]:
    """Split sources into fragments: Parquet per row group, others per file."""
    out = []
    for src in sources:
        if src.format == "parquet":
            fs, path = filesystem(src.uri, s3_endpoint)
            with fs.open_input_file(path) as f:
                md = pq.ParquetFile(f).metadata
            first = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                out.append(Fragment(src, rg, first, n))
                first += n
        else:
            out.append(Fragment(src))
    return out


def _normalise(rb: pa.RecordBatch | pa.Table, cols: dict[str, str], where: str) -> pa.Table:
    """Rename the configured columns to ts/key/visitor; complain once if one is absent."""
    names = rb.schema.names
    missing = [f"'{c}'" for c in cols.values() if c not in names]
    if missing:
        raise MissingColumn(f"{where} has no {' or '.join(missing)} column (its columns: {', '.join(names) or 'none'})")
    return pa.table({std: rb.column(c) for std, c in cols.items()})


def read_fragment(frag: Fragment, cols: dict[str, str], batch_rows: int, s3_endpoint: str | None = None):
    """Yield (table with columns ts/key/visitor, first row number, malformed rows) per batch."""
    src = frag.source
    fs, path = filesystem(src.uri, s3_endpoint)
    if src.format == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in cols.values() if c in pf.schema_arrow.names]
            if len(present) < len(set(cols.values())):
                _normalise(pa.table({c: pa.array([]) for c in pf.schema_arrow.names}), cols, src.uri)
            row = frag.first_row
            for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[frag.row_group], columns=present):
                yield _normalise(rb, cols, src.uri), row, []
                row += rb.num_rows
        return
    if src.format == "csv":
        stream = fs.open_input_stream(path, compression="detect")
        reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=max(1 << 20, batch_rows * 64)),
                                convert_options=pacsv.ConvertOptions(
                                    column_types={c: pa.string() for c in cols.values()},
                                    strings_can_be_null=True, quoted_strings_can_be_null=False))
        row = 0
        with stream:
            for rb in reader:
                yield _normalise(rb, cols, src.uri), row, []
                row += rb.num_rows
        return
    yield from _read_json_lines(fs, path, src.uri, cols, batch_rows)


def _read_json_lines(fs, path: str, uri: str, cols: dict[str, str], batch_rows: int):
    row = 0
    with fs.open_input_stream(path, compression="detect") as stream:
        pending = b""
        while True:
            block = stream.read(max(1 << 20, batch_rows * 64))
            data = pending + block
            if not block:
                if data.strip():
                    yield from _json_block(data, uri, cols, row)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                continue
            chunk, pending = data[:cut], data[cut:]
            yield from _json_block(chunk, uri, cols, row)
            row += chunk.count(b"\n")


def _json_block(chunk: bytes, uri: str, cols: dict[str, str], row: int):
    """One block of JSON lines: Arrow's reader when the block is well formed
    and consistently typed, else line by line (bad lines are reported)."""
    lines = chunk.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        if any(not ln.strip() for ln in lines):
            raise pa.ArrowInvalid("blank line")
        t = pajson.read_json(io.BytesIO(chunk), parse_options=pajson.ParseOptions(unexpected_field_behavior="infer"))
        yield _normalise(_fill_absent(t, cols), cols, uri), row, []
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
        except ValueError:
            malformed.append(i)
            obj = {}
        for c in cols.values():
            v = obj.get(c)
            values[c].append(None if v is None or isinstance(v, (dict, list, bool)) else str(v))
    t = pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})
    yield _normalise(t, cols, uri), row, malformed


def _fill_absent(t: pa.Table, cols: dict[str, str]) -> pa.Table:
    """JSON lines may omit a field in every line of a block: that is missing
    values, not a missing column."""
    for c in cols.values():
        if c not in t.schema.names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t
