"""Reading event files in bounded batches.

Formats: Parquet (read per row group), CSV and JSON lines (read in blocks).
Every batch is normalised to the columns ``ts``/``key``/``visitor``
(``sketch.formats`` parses timestamps and JSON lines).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from impressions.cluster.sources import SourceFile
from impressions.durable.objects import filesystem
from impressions.sketch.formats import MissingColumn, check_columns, json_lines, normalise, parse_ts  # noqa: F401 (re-exported)

# ------------------------------------------------------------------ readers

@dataclass(frozen=True)
class Fragment:
    """A unit of work for one ingest task: a file, or one Parquet row group."""

    source: SourceFile
    row_group: int | None = None
    first_row: int = 0  # the row number (in the file) of the fragment's first row
    rows: int | None = None  # known for Parquet


def fragments(sources: list[SourceFile], s3_endpoint: str | None = None,
              failed: list | None = None) -> list[Fragment]:
    """Split sources into fragments: Parquet per row group, others per file.
    A Parquet file whose footer cannot be read is left out, and said why in
    ``failed`` (or raised, without it)."""
    out = []
    for src in sources:
        if src.format == "parquet":
            fs, path = filesystem(src.uri, s3_endpoint)
            try:
                with fs.open_input_file(path) as f:
                    md = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as e:
                if failed is None:
                    raise
                failed.append(f"{src.uri}: {type(e).__name__}: {str(e)[:300]}")
                continue
            first = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                out.append(Fragment(src, rg, first, n))
                first += n
        else:
            out.append(Fragment(src))
    return out


def read_fragment(frag: Fragment, cols: dict[str, str], batch_rows: int, s3_endpoint: str | None = None):
    """Yield (table with columns ts/key/visitor, first row number, malformed rows) per batch."""
    src = frag.source
    fs, path = filesystem(src.uri, s3_endpoint)
    if src.format == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            check_columns(pf.schema_arrow.names, cols, src.uri)
            row = frag.first_row
            for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[frag.row_group],
                                      columns=list(dict.fromkeys(cols.values()))):
                yield normalise(rb, cols, src.uri), row, []
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
                yield normalise(rb, cols, src.uri), row, []
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
                    yield from json_lines(data, uri, cols, row)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                continue
            chunk, pending = data[:cut], data[cut:]
            yield from json_lines(chunk, uri, cols, row)
            row += chunk.count(b"\n")


