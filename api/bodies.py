"""``POST /v1/events`` bodies: a JSON array, JSON lines or an Arrow IPC stream, to a table.

The result is a table of ``ts``/``key``/``visitor`` and the numbers of the
rows that could not be read at all; everything else (parsing timestamps,
validating rows) happens in ``sketch.events.prepare``, as for files.

What a body may hold, and what is refused with a 4xx that says why:

* JSON must be UTF-8 and standard JSON (no ``NaN``/``Infinity``), an array
  of objects or one object a line, nested at most ``MAX_DEPTH`` deep, with
  at least one event;
* an Arrow stream is validated in full (offsets, dictionary indices, UTF-8)
  before anything reads it; its ``ts``/``key``/``visitor`` columns must be
  scalars (numbers, strings, timestamps; dictionaries of those), not
  structs, lists or maps;
* at most ``max_rows`` events a request.

A visitor id means the same whatever carried it: a JSON number and the
same number as a string, an Arrow integer and JSON, are one visitor (an
integer is written in decimal; a number with a fraction as Python writes
it, the same in every path).
"""

import json

import pyarrow as pa

from impressions.sketch.formats import canonical, json_lines

from .errors import BadRequest

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON_TYPES = {"application/json", "application/x-ndjson", "application/jsonl", "application/x-jsonlines",
              "text/plain", ""}
COLUMNS = {"ts": "ts", "key": "key", "visitor": "visitor"}
MAX_DEPTH = 32


class TooLarge(BadRequest):
    """A body over a size limit."""

    status = 413


class UnsupportedType(BadRequest):
    """A content type the route does not parse."""

    status = 415


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth_ok(text: bytes) -> bool:
    """Whether no bracket nests deeper than ``MAX_DEPTH`` (strings skipped)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return True


def events_table(body: bytes, content_type: str, max_rows: int) -> tuple[pa.Table, list[int]]:
    """The request body as (table of ts/key/visitor, malformed row numbers)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == ARROW_STREAM:
        table = _arrow(body)
    elif ctype in JSON_TYPES:
        table, malformed = _json(body)
        if table.num_rows > max_rows:
            raise TooLarge(f"{table.num_rows:,} events in one request; at most {max_rows:,}")
        return table, malformed
    else:
        raise UnsupportedType(f"content type {ctype!r} is not one this route reads: send application/json, "
                              f"application/x-ndjson or {ARROW_STREAM}")
    if table.num_rows > max_rows:
        raise TooLarge(f"{table.num_rows:,} events in one request; at most {max_rows:,}")
    if table.num_rows == 0:
        raise BadRequest("the Arrow stream holds no events")
    return table, []


def _arrow(body: bytes) -> pa.Table:
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadRequest(f"malformed Arrow IPC stream: {str(e)[:200]}") from None
    missing = [c for c in COLUMNS if c not in table.schema.names]
    if missing:
        raise BadRequest(f"the Arrow stream has no {', '.join(repr(c) for c in missing)} column "
                         f"(its columns: {', '.join(table.schema.names[:20]) or 'none'})")
    cols = {}
    for c in COLUMNS:
        col = table.column(c)
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.cast(t.value_type), t.value_type
        ok = (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
              or pa.types.is_large_string(t) or pa.types.is_null(t)
              or (c == "ts" and (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t)))
              or (c == "visitor" and (pa.types.is_binary(t) or pa.types.is_large_binary(t))))
        if not ok:
            raise BadRequest(f"the Arrow stream's {c!r} column is {t}: it must hold "
                             f"{'times (numbers, strings, timestamps)' if c == 'ts' else 'strings or numbers'}")
        if c != "ts" and pa.types.is_floating(t):
            col = pa.array([canonical(v) for v in col.to_pylist()], pa.string())  # as JSON writes numbers
        cols[c] = col
    return pa.table(cols)


def _json(body: bytes) -> tuple[pa.Table, list[int]]:
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text:
        raise BadRequest("the request body is empty: send a JSON array, JSON lines or an Arrow IPC stream")
    if not _depth_ok(text.encode()):
        raise BadRequest(f"JSON nested more than {MAX_DEPTH} deep")
    if text[0] == "[":
        try:
            rows = json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            raise BadRequest(f"malformed JSON: {str(e)[:200]}") from None
        if not isinstance(rows, list):
            raise BadRequest("malformed JSON: expected an array of events")
        if not rows:
            raise BadRequest("the JSON array holds no events")
        return _rows_table(rows)
    table, _, malformed = next(json_lines(text.encode() + b"\n", "request body", COLUMNS, 0))
    return table, malformed


def _rows_table(rows: list) -> tuple[pa.Table, list[int]]:
    """Events given as Python objects (parsed JSON); non-objects are malformed rows."""
    values = {c: [] for c in COLUMNS}
    malformed = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            malformed.append(i)
            r = {}
        for c in COLUMNS:
            values[c].append(canonical(r.get(c)))
    return pa.table({c: pa.array(v, pa.string()) for c, v in values.items()}), malformed
