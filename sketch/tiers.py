"""Where a shard's rows live once sorted: slots, the upper index, summaries.

A shard's sorted rows are held in *nodes*, each covering one aligned span
of time (``timeindex``: node ``j`` of level ``l`` covers buckets
``[j << l, (j + 1) << l)``):

``Slot`` (kind ``"slot"``)
    a leaf (level ``leaf_level``, 64 buckets) or a segment (level
    ``segment_level``, 2,048 buckets).  ``main`` holds its built tables,
    one per level ``0..level`` (level 0 the base rows, the others rollups
    kept by the rule of ``rows.level_up``), or None before it is built;
    ``runs`` holds level-0 tables not yet folded in (new or late events).
``TableNode`` of kind ``"upper"``
    one level above the segments: the rollup rows kept for that node.
``TableNode`` of kind ``"summary"``
    the full merge of a built node, kept until its parent is built from it.

Nodes are immutable.  A change replaces a node by a new one with a higher
``version`` (a counter of this ``Tiers``), so "has this node changed since
I wrote it?" is a comparison of two integers.  ``nodes`` lists every node,
``install`` puts nodes made elsewhere (a loaded state, a re-sharding) in
place.  Two facts queries need are derived here whenever nodes change, so
no caller has to remember them: which slots the upper index may not cover
yet (``loose``: every leaf, and every slot with runs), and which keys the
upper index holds at all (``keys_above``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .config import SketchConfig
from .rows import RowTable, table_keys


@dataclass(frozen=True, eq=False)
class Slot:
    """A leaf or segment: its built tables (levels 0..level) and its runs."""

    level: int
    node: int
    main: tuple[RowTable, ...] | None = None
    runs: tuple[RowTable, ...] = ()
    version: int = 0
    sealed: object = None  # the ``sealed.SealedFile`` its tables are read from, when sealed
    kind = "slot"

    @property
    def start(self) -> int:
        return self.node << self.level

    @property
    def end(self) -> int:
        return (self.node + 1) << self.level

    def base_tables(self) -> list[RowTable]:
        """The tables holding its level-0 rows: every event in it is in exactly one."""
        return ([self.main[0]] if self.main else []) + list(self.runs)

    def parts(self) -> list[tuple[int, RowTable]]:
        """(part, table): part 0 the built tables, part i > 0 the i-th run."""
        return [(0, t) for t in (self.main or ())] + [(i + 1, t) for i, t in enumerate(self.runs)]


@dataclass(frozen=True, eq=False)
class TableNode:
    """An upper-index node or a summary: one table."""

    kind: str  # "upper" or "summary"
    level: int
    node: int
    table: RowTable
    version: int = 0
    sealed: object = None  # the ``sealed.SealedFile`` its table is read from, when sealed

    def parts(self) -> list[tuple[int, RowTable]]:
        return [(0, self.table)]


Node = Slot | TableNode


class Tiers:
    """Every node of one shard store, by kind and (level, node)."""

    def __init__(self, config: SketchConfig):
        self.config = config
        self.slots: dict[tuple[int, int], Slot] = {}
        self.upper: dict[tuple[int, int], TableNode] = {}
        self.summaries: dict[tuple[int, int], TableNode] = {}
        self.loose: set[tuple[int, int]] = set()  # slots whose rows the upper index may lack
        self.busy: set[tuple[int, int]] = set()  # slots a build has taken as its input (``rollup``): runs only added
        self._version = 0
        self._keys_above: dict[int, tuple[frozenset, np.ndarray]] | None = {}

    def frozen(self) -> "Tiers":
        """A copy that later changes to this one do not touch (nodes are immutable:
        only the maps are copied), for readers on other threads."""
        t = Tiers.__new__(Tiers)
        t.config, t._version = self.config, self._version
        t.slots, t.upper, t.summaries = dict(self.slots), dict(self.upper), dict(self.summaries)
        t.loose, t.busy = set(self.loose), set()
        t._keys_above = self._keys_above  # computed whole and never changed, only replaced
        return t

    def _next(self) -> int:
        self._version += 1
        return self._version

    # ------------------------------------------------------------ slots
    def put_slot(self, level: int, node: int, main=None, runs=(), sealed=None) -> Slot:
        slot = Slot(level, node, None if main is None else tuple(main), tuple(runs), self._next(), sealed)
        self.slots[(level, node)] = slot
        if level == self.config.leaf_level or slot.runs:
            self.loose.add((level, node))
        else:
            self.loose.discard((level, node))
        return slot

    def drop_slot(self, key: tuple[int, int]) -> None:
        del self.slots[key]
        self.loose.discard(key)

    def slot_of_leaf(self, jf: int) -> Slot | None:
        """The slot holding leaf ``jf``'s time: its segment if built, else the leaf."""
        d = self.config.segment_level - self.config.leaf_level
        return self.slots.get((self.config.segment_level, jf >> d)) or self.slots.get((self.config.leaf_level, jf))

    def slot_covering(self, level: int, j: int) -> Slot | None:
        """The slot whose span holds node (level, j), for ``level <= segment_level``."""
        LF, LS = self.config.leaf_level, self.config.segment_level
        slot = self.slots.get((LS, j >> (LS - level)))
        if slot is None and level <= LF:
            slot = self.slots.get((LF, j >> (LF - level)))
        return slot

    def slots_overlapping(self, b0: int, b1: int):
        """Every slot with time in ``[b0, b1)``, in time order."""
        LF, LS = self.config.leaf_level, self.config.segment_level
        for js in range(b0 >> LS, ((b1 - 1) >> LS) + 1):
            slot = self.slots.get((LS, js))
            if slot is not None:
                yield slot
                continue
            for jf in range(max(b0 >> LF, js << (LS - LF)), min(((b1 - 1) >> LF) + 1, (js + 1) << (LS - LF))):
                slot = self.slots.get((LF, jf))
                if slot is not None:
                    yield slot

    # ------------------------------------------------------------ upper index and summaries
    def put_upper(self, level: int, node: int, table: RowTable, sealed=None) -> None:
        self.upper[(level, node)] = TableNode("upper", level, node, table, self._next(), sealed)
        self._keys_above = None

    def upper_table(self, level: int, node: int) -> RowTable | None:
        n = self.upper.get((level, node))
        return None if n is None else n.table

    def put_summary(self, level: int, node: int, table: RowTable, sealed=None) -> None:
        self.summaries[(level, node)] = TableNode("summary", level, node, table, self._next(), sealed)

    def pop_summary(self, key: tuple[int, int]) -> RowTable:
        return self.summaries.pop(key).table

    def keys_above(self, level: int) -> tuple[frozenset, np.ndarray]:
        """The key ids held by any upper node of levels ``segment_level + 1 ..
        level``, as a set and a sorted array: a key outside it goes straight
        to the segments beneath."""
        if self._keys_above is None:
            by_level: dict[int, set] = {}
            for (lvl, _), n in self.upper.items():
                if len(n.table):
                    by_level.setdefault(lvl, set()).update(table_keys(n.table).tolist())
            out, acc = {}, set()
            for lvl in range(self.config.segment_level + 1, self.config.top_level + 1):
                acc |= by_level.get(lvl, set())
                out[lvl] = (frozenset(acc), np.array(sorted(acc), np.int64))
            self._keys_above = out
        return self._keys_above.get(level, (frozenset(), np.zeros(0, np.int64)))

    # ------------------------------------------------------------ all nodes
    def nodes(self) -> list[Node]:
        """Every node, slots first, each kind in (level, node) order."""
        return [self.slots[k] for k in sorted(self.slots)] + [self.upper[k] for k in sorted(self.upper)] \
            + [self.summaries[k] for k in sorted(self.summaries)]

    def install(self, node: Node) -> Node:
        """Put a node made elsewhere in place (replacing any node of the same
        kind and place), with a version of this ``Tiers``."""
        if isinstance(node, Slot):
            return self.put_slot(node.level, node.node, node.main, node.runs, node.sealed)
        if node.kind not in ("upper", "summary"):
            raise ValueError(f"unknown node kind {node.kind!r}")
        node = replace(node, version=self._next())
        (self.upper if node.kind == "upper" else self.summaries)[(node.level, node.node)] = node
        if node.kind == "upper":
            self._keys_above = None
        return node

    def expire(self, oldest: int) -> int:
        """Drop every node entirely older than bucket ``oldest``; returns how many."""
        dropped, files = 0, []
        for k in [k for k in self.slots if (k[1] + 1) << k[0] <= oldest]:
            files.append(self.slots[k].sealed)
            self.drop_slot(k)
            dropped += 1
        for d in (self.upper, self.summaries):
            for k in [k for k in d if (k[1] + 1) << k[0] <= oldest]:
                files.append(d[k].sealed)
                del d[k]
                dropped += 1
        for f in files:
            if f is not None:
                f.close()  # its decoded blocks leave the cache now (its file goes with the next collection)
        if dropped:
            self._keys_above = None
        return dropped
