"""The cluster's layout on the store, and where each shard's objects live.

Layout under the storage root::

    cluster.json                     the layout: cluster id, shard count, sketch parameters, epoch, folder
    rescale.json                     a re-sharding under way (its intent), until it is switched or rolled back
    epoch-<E>/shard-<i>/...          shard i of the layout of epoch E: its log and checkpoints (``journal``)

* The layout is one object, written whole (``ObjectStore.write`` is atomic),
  so a reader sees the old layout or the new one.  Switching it is the one
  step that commits a re-sharding.
* ``epoch`` counts layout changes; every layout has a folder of its own,
  named by its epoch, so a later layout never meets the objects of an
  earlier one, even with the same shard count.  (Layouts written before
  epochs named folders keep their ``shards-<S>`` folder.)
* ``cluster_id`` is drawn when the layout is first written.  A shard checks
  it before it starts: a shard that finds no layout, or another cluster's,
  is looking at the wrong store (a local folder on another machine, say)
  and refuses to start rather than start empty.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass

from impressions.sketch.config import SketchConfig

from .objects import ObjectStore

LAYOUT = "cluster.json"
INTENT = "rescale.json"


def epoch_folder(epoch: int) -> str:
    return f"epoch-{epoch}"


@dataclass(frozen=True)
class Layout:
    shards: int
    sketch: SketchConfig
    epoch: int = 0
    cluster_id: str = ""
    folder: str = ""

    @classmethod
    def new(cls, shards: int, sketch: SketchConfig) -> "Layout":
        return cls(shards, sketch, 0, uuid.uuid4().hex, epoch_folder(0))

    def next(self, shards: int) -> "Layout":
        """The layout a re-sharding to ``shards`` shards switches to."""
        return dataclasses.replace(self, shards=shards, epoch=self.epoch + 1, folder=epoch_folder(self.epoch + 1))

    def to_dict(self) -> dict:
        return {"shards": self.shards, "sketch": dataclasses.asdict(self.sketch), "epoch": self.epoch,
                "cluster_id": self.cluster_id, "folder": self.folder}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        shards = int(d["shards"])
        return cls(shards, SketchConfig(**d["sketch"]), int(d.get("epoch", 0)), str(d.get("cluster_id", "")),
                   str(d.get("folder") or f"shards-{shards}"))


@dataclass(frozen=True)
class ShardStorage:
    """Where one layout's shards keep their objects, whose cluster it is, and
    where on the shard's machine sealed files are kept to be mapped (a remote
    store's objects are copied there; a local store's are mapped in place)."""

    uri: str
    s3_endpoint: str | None
    cluster_id: str
    folder: str
    cache_dir: str | None = None

    def objects(self) -> ObjectStore:
        return ObjectStore(self.uri, self.s3_endpoint)


def read_layout(objects: ObjectStore) -> Layout | None:
    """The layout recorded on the store, or None."""
    path = objects.path(LAYOUT)
    if not objects.exists(path):
        return None
    return Layout.from_dict(json.loads(objects.read(path)))


def write_layout(objects: ObjectStore, layout: Layout) -> None:
    body = dict(layout.to_dict(), written=time.time())
    objects.write(objects.path(LAYOUT), json.dumps(body, sort_keys=True).encode())


def read_intent(objects: ObjectStore) -> dict | None:
    """The re-sharding under way (``{"from": layout, "to": layout}``), or None."""
    path = objects.path(INTENT)
    if not objects.exists(path):
        return None
    d = json.loads(objects.read(path))
    return {"from": Layout.from_dict(d["from"]), "to": Layout.from_dict(d["to"])}


def write_intent(objects: ObjectStore, old: Layout, new: Layout) -> None:
    body = {"from": old.to_dict(), "to": new.to_dict(), "written": time.time()}
    objects.write(objects.path(INTENT), json.dumps(body, sort_keys=True).encode())


def clear_intent(objects: ObjectStore) -> None:
    objects.delete(objects.path(INTENT))


def drop_folder(objects: ObjectStore, folder: str) -> None:
    """Delete every object of a layout's folder (one superseded or abandoned)."""
    if folder:
        objects.delete_tree(objects.path(folder))
