"""A shard's durable state on object storage: an ingest log and checkpoints.

Layout of one shard's folder (``layout.shard_folder``) on the store::

    log/<seq>-<sha>.arrow   one ingest batch per object, in apply order
    nodes/<sha>.arrow       one stored node (slot, upper node, summary)
    manifest-<n>.json       a checkpoint: which node objects, up to which log entry

* **Acknowledged means durable.** A shard appends a batch to its log before
  applying it, and answers only after the write returned
  (``ObjectStore.write``: atomic and durable when it returns).
* **Checksums everywhere.** Objects are named by the SHA-256 of their bytes
  (the first 16 hex digits); a manifest carries the SHA-256 of its own body.
  A torn or corrupted object fails the check on read.
* **Checkpoints are incremental and atomic.** A checkpoint writes only the
  nodes that changed since the previous one (nodes are immutable objects,
  shared by manifests), then the manifest, last: until the manifest exists
  the checkpoint does not.  Recovery takes the newest manifest whose own
  checksum and every object's checksum verify, else the one before.
* **Replay.** After loading a checkpoint a shard replays the log entries after
  the checkpoint's position.  Register merges are idempotent, so replaying
  more than needed could never change a sketch; impressions are counts, so
  the log position and the ids of applied batches make the replay exact.
* **Garbage collection** keeps the two newest manifests, the objects they
  name and the log entries after the older one (the fallback must be able to
  replay to the present).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct

import pyarrow as pa

from .layout import shard_folder
from .objects import ObjectStore

KEEP_MANIFESTS = 2
_LOG_RE = re.compile(r"^(\d{12})-([0-9a-f]{16})\.arrow$")
_NODE_RE = re.compile(r"^([0-9a-f]{16})\.arrow$")
_MANIFEST_RE = re.compile(r"^manifest-(\d{12})\.json$")
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


def batches_from_bytes(data: bytes) -> list[pa.RecordBatch]:
    out, pos = [], 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise CorruptObject("object ends inside a length field")
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if pos + n > len(data):
            raise CorruptObject(f"object is truncated ({len(data) - pos} of {n} bytes)")
        reader = pa.ipc.open_stream(pa.py_buffer(data[pos:pos + n]))
        batches = list(reader)
        out.extend(batches if batches else [pa.RecordBatch.from_pylist([], schema=reader.schema)])
        pos += n
    return out


class ShardJournal:
    """The durable state of one shard of one layout."""

    def __init__(self, objects: ObjectStore, shard: int, shards: int):
        self.objects = objects
        self.shard, self.shards = shard, shards
        self.base = objects.path(shard_folder(shards, shard))

    # ------------------------------------------------------------ log
    def append(self, seq: int, rb: pa.RecordBatch) -> str:
        data = batches_to_bytes([rb])
        name = f"{seq:012d}-{sha(data)}.arrow"
        self.objects.write(f"{self.base}/log/{name}", data)
        return name

    def log_entries(self, after: int) -> list[tuple[int, str]]:
        """(seq, name) of the log entries after ``after``, in order."""
        out = []
        for name in self.objects.list(f"{self.base}/log"):
            m = _LOG_RE.match(name)
            if m and int(m.group(1)) > after:
                out.append((int(m.group(1)), name))
        return out

    def read_log(self, name: str) -> pa.RecordBatch:
        data = self.objects.read(f"{self.base}/log/{name}")
        if sha(data) != _LOG_RE.match(name).group(2):
            raise CorruptObject(f"log entry {name} does not match its checksum")
        return batches_from_bytes(data)[0]

    def seal(self) -> None:
        """Mark this shard's layout as left behind (a re-sharding happened)."""
        self.objects.write(f"{self.base}/SEALED", b"sealed\n")

    def unseal(self) -> None:
        self.objects.delete(f"{self.base}/SEALED")

    def is_sealed(self) -> bool:
        return self.objects.exists(f"{self.base}/SEALED")

    # ------------------------------------------------------------ checkpoints
    def write_node(self, batches: list[pa.RecordBatch]) -> tuple[str, int]:
        data = batches_to_bytes(batches)
        name = f"{sha(data)}.arrow"
        path = f"{self.base}/nodes/{name}"
        if not self.objects.exists(path):  # content-addressed: an unchanged node is already there
            self.objects.write(path, data)
        return name, len(data)

    def read_node(self, name: str) -> list[pa.RecordBatch]:
        data = self.objects.read(f"{self.base}/nodes/{name}")
        if sha(data) != _NODE_RE.match(name).group(1):
            raise CorruptObject(f"checkpoint object {name} does not match its checksum")
        return batches_from_bytes(data)

    def manifests(self) -> list[int]:
        out = []
        for name in self.objects.list(self.base):
            m = _MANIFEST_RE.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def write_manifest(self, number: int, body: dict) -> None:
        text = json.dumps(body, sort_keys=True)
        doc = json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": body}, sort_keys=True)
        self.objects.write(f"{self.base}/manifest-{number:012d}.json", doc.encode())

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

    def collect_garbage(self) -> int:
        """Delete what the two newest manifests do not need; returns objects deleted."""
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
        live = {node["object"] for b in bodies for node in b["nodes"]}
        oldest_seq = min(b["log_seq"] for b in bodies)
        deleted = 0
        for n in numbers[:-KEEP_MANIFESTS]:
            self.objects.delete(f"{self.base}/manifest-{n:012d}.json")
            deleted += 1
        for name in self.objects.list(f"{self.base}/nodes"):
            if _NODE_RE.match(name) and name not in live:
                self.objects.delete(f"{self.base}/nodes/{name}")
                deleted += 1
        for name in self.objects.list(f"{self.base}/log"):
            m = _LOG_RE.match(name)
            if m and int(m.group(1)) <= oldest_seq:
                self.objects.delete(f"{self.base}/log/{name}")
                deleted += 1
        return deleted
