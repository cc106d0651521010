"""A shard's durable state on object storage: an ingest log and checkpoints.

Layout of one shard's folder (``layout``: ``<layout folder>/shard-<i>``)::

    incarnation-<k>             one marker per start of the shard (fencing, below)
    log/<seq>-<k>-<sha>.arrow   one ingest batch per object, in apply order, written by incarnation k
    nodes/<sha>.arrow           one stored node (slot, upper node, summary)
    nodes/<sha>.arrow           or a sealed node's file (``sketch.sealed``), which shards map
    applied/<sha>.arrow         one hour's records of applied batch ids (exactly-once)
    keys/<sha>.arrow            one chunk of the key table (ids stable for the shard's life)
    manifest-<n>.json           a checkpoint: which objects, up to which log entry
    SEALED                      the layout was left behind by a re-sharding

* **Acknowledged means durable.** A shard appends a batch to its log before
  applying it, and answers only after the write returned
  (``ObjectStore.write``: atomic and durable when it returns).
* **Checksums everywhere.** Objects are named by the SHA-256 of their bytes
  (the first 16 hex digits); a manifest carries the SHA-256 of its own body.
  A torn or corrupted object fails the check on read; a node object is read
  back and checked once after it is written.
* **Checkpoints are incremental and atomic.** A checkpoint writes only the
  objects that changed since the previous one (objects are immutable,
  shared by manifests), then the manifest, last, numbered after the highest
  manifest on the store: until the manifest exists the checkpoint does not.
  Recovery takes the newest manifest whose own checksum and every object's
  checksum verify, else the one before; when none does, the shard does not
  start (it never starts empty over a past it cannot read).
* **Replay.** After loading a checkpoint a shard replays the log entries after
  the checkpoint's position.  Register merges are idempotent, so replaying
  more than needed could never change a sketch; impressions are counts, so
  the log position and the ids of applied batches make the replay exact.
* **Fencing.** Every start of a shard takes the next incarnation number (a
  marker created only if absent, exclusively where the store allows it) and
  names its log entries with it.  An instance checks that it is still the
  newest incarnation before it writes a manifest or collects garbage, and
  stops when it is not; a log entry of an older incarnation at or after the
  first entry of a newer one was written by a superseded instance and is not
  replayed.
* **Garbage collection** keeps the two newest manifests, the objects they
  name and the log entries after the older one (the fallback must be able to
  replay to the present).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import threading

import pyarrow as pa

from .objects import ObjectStore

KEEP_MANIFESTS = 2
_LOG_RE = re.compile(r"^(\d{12})-(\d{6})-([0-9a-f]{16})\.arrow$")
_LEGACY_LOG_RE = re.compile(r"^(\d{12})-([0-9a-f]{16})\.arrow$")
_NODE_RE = re.compile(r"^([0-9a-f]{16})\.arrow$")
_MANIFEST_RE = re.compile(r"^manifest-(\d{12})\.json$")
_INCARNATION_RE = re.compile(r"^incarnation-(\d{6})$")
_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


class CorruptObject(IOError):
    """An object whose bytes do not match its checksum."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def batches_to_bytes(batches: list[pa.RecordBatch]) -> bytes:
    """Record batches of different schemas as one object: for each, its
    length (8 bytes, little-endian) and a compressed Arrow IPC stream."""
    out = io.BytesIO()
    for rb in batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rb.schema, options=_IPC) as w:
            w.write_batch(rb)
        data = sink.getvalue().to_pybytes()
        out.write(struct.pack("<Q", len(data)))
        out.write(data)
    return out.getvalue()


_ONE_THREAD = pa.ipc.IpcReadOptions(use_threads=False)


def batches_from_bytes(data: bytes) -> list[pa.RecordBatch]:
    out, pos = [], 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise CorruptObject("object ends inside a length field")
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if pos + n > len(data):
            raise CorruptObject(f"object is truncated ({len(data) - pos} of {n} bytes)")
        # on the calling thread: a question that reads the log for its asker's writes hands no work to Arrow's
        # pool, whose threads may have been started by a bulk thread and share its priority (cluster.priority)
        reader = pa.ipc.open_stream(pa.py_buffer(data[pos:pos + n]), options=_ONE_THREAD)
        batches = list(reader)
        out.extend(batches if batches else [pa.RecordBatch.from_pylist([], schema=reader.schema)])
        pos += n
    return out


class Fenced(RuntimeError):
    """A newer instance of this shard has started: this one must stop writing."""


class ShardJournal:
    """The durable state of one shard of one layout (``folder``)."""

    def __init__(self, objects: ObjectStore, folder: str, shard: int):
        self.objects = objects
        self.shard = shard
        self.base = objects.path(folder, f"shard-{shard}")
        self.incarnation = 0

    # ------------------------------------------------------------ incarnations
    def incarnations(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(_INCARNATION_RE.match, self.objects.list(self.base)) if m)

    def begin(self) -> int:
        """Take the next incarnation number for this start."""
        while True:
            k = max(self.incarnations(), default=0) + 1
            if self.objects.create(f"{self.base}/incarnation-{k:06d}", b"%d\n" % k):
                self.incarnation = k
                return k

    def check_current(self) -> None:
        """Raise ``Fenced`` if a newer incarnation of this shard has started."""
        newest = max(self.incarnations(), default=0)
        if newest > self.incarnation:
            raise Fenced(f"shard {self.shard} incarnation {self.incarnation} was superseded by {newest}")

    # ------------------------------------------------------------ log
    def append(self, seq: int, rb: pa.RecordBatch) -> str:
        data = batches_to_bytes([rb])
        name = f"{seq:012d}-{self.incarnation:06d}-{sha(data)}.arrow"
        self.objects.write(f"{self.base}/log/{name}", data)
        return name

    def log_entries(self, after: int) -> list[tuple[int, str]]:
        """(seq, name) of the log entries after ``after``, in order, without
        those of superseded incarnations (see fencing)."""
        found = []
        for name in self.objects.list(f"{self.base}/log"):
            m = _LOG_RE.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), name))
            elif _LEGACY_LOG_RE.match(name):
                found.append((int(name[:12]), 0, name))
        first = {}  # incarnation -> first seq it wrote
        for seq, inc, _ in found:
            first[inc] = min(seq, first.get(inc, seq))
        out = {}
        for seq, inc, name in found:
            if seq <= after or any(j > inc and f <= seq for j, f in first.items()):
                continue  # before the checkpoint, or written by an instance a newer one superseded
            out[seq] = name
        return sorted(out.items())

    def read_log(self, name: str) -> pa.RecordBatch:
        data = self.objects.read(f"{self.base}/log/{name}")
        m = _LOG_RE.match(name) or _LEGACY_LOG_RE.match(name)
        if sha(data) != m.group(m.lastindex):
            raise CorruptObject(f"log entry {name} does not match its checksum")
        return batches_from_bytes(data)[0]

    def seal(self) -> None:
        """Mark this shard's layout as left behind (a re-sharding happened)."""
        self.objects.write(f"{self.base}/SEALED", b"sealed\n")

    def unseal(self) -> None:
        self.objects.delete(f"{self.base}/SEALED")

    def is_sealed(self) -> bool:
        return self.objects.exists(f"{self.base}/SEALED")

    def has_past(self) -> bool:
        """Whether this shard ever wrote a manifest or a log entry."""
        return bool(self.manifests() or self.objects.list(f"{self.base}/log"))

    # ------------------------------------------------------------ checkpoints
    def _write_object(self, folder: str, data: bytes) -> str:
        name = f"{sha(data)}.arrow"
        path = f"{self.base}/{folder}/{name}"
        if not self.objects.exists(path):  # content-addressed: an unchanged object is already there
            self.objects.write(path, data)
            if sha(self.objects.read(path)) != sha(data):  # a torn write is caught now, not at recovery
                raise CorruptObject(f"{folder}/{name} did not read back as written")
        return name

    def _read_object(self, folder: str, name: str) -> bytes:
        data = self.objects.read(f"{self.base}/{folder}/{name}")
        m = _NODE_RE.match(name)
        if m is None or sha(data) != m.group(1):
            raise CorruptObject(f"checkpoint object {folder}/{name} does not match its checksum")
        return data

    def write_node(self, batches: list[pa.RecordBatch]) -> tuple[str, int]:
        data = batches_to_bytes(batches)
        return self._write_object("nodes", data), len(data)

    def read_node(self, name: str) -> list[pa.RecordBatch]:
        return batches_from_bytes(self._read_object("nodes", name))

    def write_sealed(self, data: bytes) -> tuple[str, int]:
        """A sealed node's file (``sketch.sealed``): a node object like any other."""
        return self._write_object("nodes", data), len(data)

    def keep_local(self, name: str, data: bytes, cache_dir: str | None) -> None:
        """Keep a copy of node object ``name`` (just written as ``data``) in
        ``cache_dir``, so that mapping it does not fetch it back."""
        if self.objects.local or not cache_dir or sha(data) != _NODE_RE.match(name).group(1):
            return
        self._put_local(os.path.join(cache_dir, *self.base.strip("/").split("/")[-2:]), name, data)

    @staticmethod
    def _put_local(folder: str, name: str, data: bytes) -> str:
        path = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a new file: a copy some process maps is never written over
        return path

    def local_path(self, name: str, cache_dir: str | None) -> str:
        """A path on this machine holding node object ``name``, to map: the
        object itself on a local store; else a copy in ``cache_dir``, fetched
        when missing and checked against its name before it is used."""
        src = f"{self.base}/nodes/{name}"
        if self.objects.local:
            return src
        if not cache_dir:
            raise ValueError("a remote store needs a local cache folder for sealed files")
        folder = os.path.join(cache_dir, *self.base.strip("/").split("/")[-2:])
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
        data = self.objects.read(src)
        if sha(data) != _NODE_RE.match(name).group(1):
            raise CorruptObject(f"checkpoint object {name} does not match its checksum")
        return self._put_local(folder, name, data)

    def evict(self, name: str, cache_dir: str | None) -> None:
        """Drop the local copy of a node object (damaged, or no longer needed)."""
        if self.objects.local or not cache_dir:
            return
        path = os.path.join(cache_dir, *self.base.strip("/").split("/")[-2:], name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def write_keys(self, table: pa.Table) -> str:
        """One chunk of the shard's key table."""
        return self._write_object("keys", batches_to_bytes(table.to_batches() or [
            pa.RecordBatch.from_pylist([], schema=table.schema)]))

    def read_keys(self, name: str) -> pa.Table:
        batches = batches_from_bytes(self._read_object("keys", name))
        return pa.Table.from_batches(batches).replace_schema_metadata(batches[0].schema.metadata)

    def write_applied(self, table: pa.Table) -> str:
        return self._write_object("applied", batches_to_bytes(table.to_batches() or [
            pa.RecordBatch.from_pylist([], schema=table.schema)]))

    def read_applied(self, name: str) -> pa.Table:
        return pa.Table.from_batches(batches_from_bytes(self._read_object("applied", name)))

    def manifests(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(_MANIFEST_RE.match, self.objects.list(self.base)) if m)

    def write_manifest(self, body: dict) -> int:
        """Write a manifest numbered after every one on the store; returns its number."""
        self.check_current()
        number = max(self.manifests(), default=0) + 1
        body = dict(body, number=number, incarnation=self.incarnation)
        text = json.dumps(body, sort_keys=True)
        doc = json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": body}, sort_keys=True)
        self.objects.write(f"{self.base}/manifest-{number:012d}.json", doc.encode())
        return number

    def read_manifest(self, number: int) -> dict:
        raw = self.objects.read(f"{self.base}/manifest-{number:012d}.json")
        try:
            doc = json.loads(raw)
            body = doc["body"]
            ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() == doc["sha256"]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptObject(f"manifest {number} does not match its checksum")
        return body

    def collect_garbage(self, cache_dir: str | None = None) -> int:
        """Delete what the two newest manifests do not need (and local copies of
        it in ``cache_dir``); returns objects deleted."""
        self.check_current()
        numbers = self.manifests()
        if len(numbers) <= KEEP_MANIFESTS:
            return 0
        keep = numbers[-KEEP_MANIFESTS:]
        bodies = []
        for n in keep:
            try:
                bodies.append(self.read_manifest(n))
            except (CorruptObject, OSError):
                return 0  # never delete on the word of a manifest we cannot read
        live = {entry[k] for b in bodies for entry in b["nodes"] for k in ("object", "sealed") if entry.get(k)} | \
            {entry["object"] for b in bodies for entry in b.get("applied", []) + b.get("keys", [])}
        oldest_seq = min(b["log_seq"] for b in bodies)
        deleted = 0
        for n in numbers[:-KEEP_MANIFESTS]:
            self.objects.delete(f"{self.base}/manifest-{n:012d}.json")
            deleted += 1
        for folder in ("nodes", "applied", "keys"):
            for name in self.objects.list(f"{self.base}/{folder}"):
                if _NODE_RE.match(name) and name not in live:
                    self.objects.delete(f"{self.base}/{folder}/{name}")
                    if folder == "nodes":
                        self.evict(name, cache_dir)
                    deleted += 1
        for name in self.objects.list(f"{self.base}/log"):
            if (_LOG_RE.match(name) or _LEGACY_LOG_RE.match(name)) and int(name[:12]) <= oldest_seq:
                self.objects.delete(f"{self.base}/log/{name}")
                deleted += 1
        return deleted
