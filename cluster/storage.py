"""Files and object storage through ``pyarrow.fs``: one URI names anything.

``file:///abs/path`` or a plain path (local), ``s3://bucket/prefix`` (with
``s3_endpoint`` for S3-compatible stores), ``gs://bucket/prefix``, or any
other scheme ``pyarrow.fs.FileSystem.from_uri`` knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json",
           ".ndjson": "json"}


def filesystem(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a URI or a local path."""
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        return pafs.LocalFileSystem(), os.path.abspath(path) if not path.startswith("/") else path
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("s3://") and s3_endpoint:
        rest = uri[len("s3://"):]
        scheme = "http" if s3_endpoint.startswith("http://") else "https"
        fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.split("://", 1)[-1], scheme=scheme,
                               region=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
                               allow_bucket_creation=True)
        return fs, rest.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as given (scheme kept), for messages and for tasks to reopen
    path: str  # within the filesystem
    format: str
    size: int


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
            out.append(SourceFile(uri, path, fmt, info.size or 0))
            continue
        found = []
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if f.type != pafs.FileType.File or os.path.basename(f.path).startswith(("_", ".")):
                continue
            fmt = _format_of(f.path)
            if fmt:
                found.append(SourceFile(prefix + f.path if prefix else f.path, f.path, fmt, f.size or 0))
        if not found:
            raise ValueError(f"{uri}: no .parquet, .csv or .json(l) files in this folder")
        out.extend(sorted(found, key=lambda s: s.path))
    return out
