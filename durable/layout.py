"""The cluster's layout on the store, and where each shard's objects live.

Layout under the storage root::

    cluster.json                     the layout: shard count, sketch parameters, epoch
    shards-<S>/shard-<i>/...         shard i of S: its log and checkpoints (``journal``)

The layout is one object, written whole (``ObjectStore.write`` is atomic),
so a reader sees the old layout or the new one.  ``epoch`` counts layout
changes (re-shardings); whoever starts a cluster on this store adopts the
layout it finds rather than the one it was configured with.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from sketch.config import SketchConfig

from .objects import ObjectStore

LAYOUT = "cluster.json"


@dataclass(frozen=True)
class Layout:
    shards: int
    sketch: SketchConfig
    epoch: int = 0


def layout_folder(shards: int) -> str:
    """The folder of every shard of an S-shard layout."""
    return f"shards-{shards}"


def shard_folder(shards: int, shard: int) -> str:
    return f"{layout_folder(shards)}/shard-{shard}"


def read_layout(objects: ObjectStore) -> Layout | None:
    """The layout recorded on the store, or None."""
    path = objects.path(LAYOUT)
    if not objects.exists(path):
        return None
    d = json.loads(objects.read(path))
    return Layout(int(d["shards"]), SketchConfig(**d["sketch"]), int(d.get("epoch", 0)))


def write_layout(objects: ObjectStore, layout: Layout) -> None:
    body = {"shards": layout.shards, "sketch": dataclasses.asdict(layout.sketch), "epoch": layout.epoch,
            "written": time.time()}
    objects.write(objects.path(LAYOUT), json.dumps(body, sort_keys=True).encode())


def drop_layout_folder(objects: ObjectStore, shards: int) -> None:
    """Delete every object of an S-shard layout (one superseded or abandoned)."""
    objects.delete_tree(objects.path(layout_folder(shards)))
