"""The event files an ingest job reads: local paths or any ``pyarrow.fs`` URI
(see ``durable.objects.filesystem``), files or folders searched recursively."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from impressions.durable.objects import filesystem

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json",
           ".ndjson": "json"}


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as given (scheme kept), for messages and for tasks to reopen
    path: str  # within the filesystem
    format: str
    size: int
    mtime_ns: int = 0  # last modification, as the filesystem reports it (0 if it does not)

    @property
    def identity(self) -> str:
        """The same bytes under the same name: what the finished-source ledger and batch ids are keyed by."""
        return f"{self.uri}|{self.size}|{self.mtime_ns}"


def _mtime_ns(info: pafs.FileInfo) -> int:
    return int(info.mtime_ns or 0) if info.mtime is not None else 0


def _format_of(path: str) -> str | None:
    name = path.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return FORMATS.get(os.path.splitext(name)[1])


def list_sources(uris: list[str], s3_endpoint: str | None = None) -> list[SourceFile]:
    """Every data file named by ``uris`` (files, or folders searched
    recursively), in a stable order.  Raises FileNotFoundError/ValueError
    with the offending URI."""
    out = []
    for uri in uris:
        fs, path = filesystem(uri, s3_endpoint)
        info = fs.get_file_info(path)
        prefix = uri[: uri.index("://") + 3] if "://" in uri and not uri.startswith("file://") else ""
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: no such file or folder")
        if info.type == pafs.FileType.File:
            fmt = _format_of(path)
            if fmt is None:
                raise ValueError(f"{uri}: unknown format (expected {', '.join(sorted(FORMATS))})")
            out.append(SourceFile(uri, path, fmt, info.size or 0, _mtime_ns(info)))
            continue
        found = []
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if f.type != pafs.FileType.File or os.path.basename(f.path).startswith(("_", ".")):
                continue
            fmt = _format_of(f.path)
            if fmt:
                found.append(SourceFile(prefix + f.path if prefix else f.path, f.path, fmt, f.size or 0,
                                        _mtime_ns(f)))
        if not found:
            raise ValueError(f"{uri}: no .parquet, .csv or .json(l) files in this folder")
        out.extend(sorted(found, key=lambda s: s.path))
    return out
