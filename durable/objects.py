"""Objects on any ``pyarrow.fs`` filesystem: one URI names the place.

``file:///abs/path`` or a plain path (local), ``s3://bucket/prefix`` (with
``s3_endpoint`` for S3-compatible stores), ``gs://bucket/prefix``, or any
other scheme ``pyarrow.fs.FileSystem.from_uri`` knows.

An ``ObjectStore`` writes whole objects atomically (readers see the old
object, or none, or the new one: a local file is written to a temporary
name, fsynced and renamed, then its folder fsynced; an S3 PUT is atomic and
durable when it returns) and reads them whole.
"""

from __future__ import annotations

import os
import tempfile
import time

import pyarrow.fs as pafs


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


def absolute(uri: str | None) -> str | None:
    """A local path or ``file://`` URI made absolute here (so that processes
    started elsewhere on this machine agree on it); other URIs as they are."""
    if not uri:
        return uri
    if uri.startswith("file://") and not uri.startswith("file:///"):
        return "file://" + os.path.abspath(uri[len("file://"):])
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    return uri


class ObjectStore:
    """Whole-object reads and atomic writes under one root."""

    def __init__(self, uri: str, s3_endpoint: str | None = None):
        self.uri = uri
        self.fs, self.root = filesystem(uri, s3_endpoint)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def write(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` all at once: readers see the old object
        (or none) or the new one, never part of it."""
        if self.local:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return
        with self.fs.open_output_stream(path) as f:  # one PUT
            f.write(data)

    def create(self, path: str, data: bytes) -> bool:
        """Write ``data`` at ``path`` only if nothing is there; True if this
        call created it.  Exclusive on a local disk (``O_EXCL``); on object
        stores ``pyarrow.fs`` offers no conditional PUT, so there it is a check
        then a write, and two racing creators can both believe they won."""
        if self.local:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.exists(path):
            return False
        self.write(path, data)
        return True

    def read(self, path: str, attempts: int = 3) -> bytes:
        """The whole object; transient errors are retried (a missing object is not)."""
        for i in range(attempts):
            try:
                with self.fs.open_input_stream(path) as f:
                    return f.read()
            except FileNotFoundError:
                raise
            except OSError:
                if i == attempts - 1:
                    raise
                time.sleep(0.2 * 4 ** i)
        raise AssertionError("unreachable")

    def list(self, folder: str) -> list[str]:
        """Names (not paths) of the files directly in ``folder``; [] if none."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def delete_tree(self, path: str) -> None:
        """Delete a folder and everything in it (nothing if it is not there)."""
        try:
            self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound
