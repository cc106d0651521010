"""``POST /v1/events`` bodies: a JSON array, JSON lines or an Arrow IPC stream, to a table.

The result is a table of ``ts``/``key``/``visitor`` and the numbers of the
rows that could not be read at all; everything else (parsing timestamps,
validating rows) happens in ``sketch.events.prepare``, as for files.
"""

import json

import pyarrow as pa

from sketch.formats import json_lines

from .errors import BadRequest

ARROW_STREAM = "application/vnd.apache.arrow.stream"
COLUMNS = {"ts": "ts", "key": "key", "visitor": "visitor"}


def events_table(body: bytes, content_type: str) -> tuple[pa.Table, list[int]]:
    """The request body as (table of ts/key/visitor, malformed row numbers)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == ARROW_STREAM:
        try:
            table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise BadRequest(f"malformed Arrow IPC stream: {e}") from None
        missing = [c for c in COLUMNS if c not in table.schema.names]
        if missing:
            raise BadRequest(f"the Arrow stream has no {', '.join(repr(c) for c in missing)} column "
                             f"(its columns: {', '.join(table.schema.names) or 'none'})")
        return table.select(list(COLUMNS)), []
    text = body.strip()
    if not text:
        raise BadRequest("the request body is empty: send a JSON array, JSON lines or an Arrow IPC stream")
    if text[:1] == b"[":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        text = b"\n".join(json.dumps(r).encode() for r in rows)  # one event per line, checked per row below
    table, _, malformed = next(json_lines(text + b"\n", "request body", COLUMNS, 0))
    return table, malformed
