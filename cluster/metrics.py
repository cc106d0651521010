"""Ray's metrics for shards, the coordinator and ingest (``actors.telemetry``).

Every metric is created in the process that reports it, on first use, so a
``RayTelemetry`` travels to a new actor as a plain object.  Ray exports them
from each node's metrics agent in Prometheus format, with a ``ray_`` prefix
(``ray_impressions_shard_heap_bytes``); ``deploy/grafana-dashboard.json``
charts them.  Tags: ``cluster`` (the Ray namespace of the actors), ``shard``,
and ``reason`` for rejected events.
"""

from __future__ import annotations

import logging
import threading

from impressions.actors.telemetry import Telemetry

log = logging.getLogger("impressions.metrics")

MS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]

# name -> (kind, description, tag keys, histogram boundaries); the single list the dashboard test reads
METRICS: dict[str, tuple] = {
    "impressions_shard_events_applied": ("counter", "events applied by a shard (after its log write)", ("shard",)),
    "impressions_events_rejected": ("counter", "events rejected at ingest, by reason", ("reason",)),
    "impressions_shard_log_write_ms": ("histogram", "a batch's log write, fsync included", ("shard",), MS),
    "impressions_shard_checkpoint_ms": ("histogram", "a checkpoint's duration", ("shard",), MS),
    "impressions_shard_checkpoint_bytes": ("counter", "bytes written by checkpoints", ("shard",)),
    "impressions_shard_query_ms": ("histogram", "a query's work on a shard", ("shard",), MS),
    "impressions_shard_query_wait_ms": ("histogram", "time a query waited behind a shard's other calls",
                                        ("shard",), MS),
    "impressions_shard_recovering": ("gauge", "1 while a shard starts, recovers or cannot serve", ("shard",)),
    "impressions_shard_checkpoint_age_seconds": ("gauge", "seconds since a shard's last checkpoint", ("shard",)),
    "impressions_shard_heap_bytes": ("gauge", "a shard process's anonymous resident memory", ("shard",)),
    "impressions_shard_mapped_bytes": ("gauge", "a shard process's resident file pages (mapped sealed files)",
                                       ("shard",)),
    "impressions_shard_rows": ("gauge", "sketch rows a shard holds (base and rollups)", ("shard",)),
    "impressions_shard_keys": ("gauge", "keys a shard holds", ("shard",)),
    "impressions_shard_run_rows": ("gauge", "rows in runs a shard's upkeep has yet to fold (questions read them raw)",
                                   ("shard",)),
    "impressions_shard_events": ("gauge", "events a shard has counted", ("shard",)),
    "impressions_queries_in_flight": ("gauge", "questions out now, per asker (coordinator, REST replica, client)", ()),
    "impressions_answer_ms": ("histogram", "a question's fan-out and merge in the coordinator", ("partial",), MS),
    "impressions_partial_answers": ("counter", "answers missing at least one shard", ()),
    "impressions_shard_missed_answers": ("counter", "questions a shard did not answer in time", ("shard",)),
}
_STATE = {"recovering": "impressions_shard_recovering", "checkpoint_age_s": "impressions_shard_checkpoint_age_seconds",
          "heap_bytes": "impressions_shard_heap_bytes", "mapped_bytes": "impressions_shard_mapped_bytes",
          "rows": "impressions_shard_rows", "keys": "impressions_shard_keys", "events": "impressions_shard_events",
          "run_rows": "impressions_shard_run_rows"}


_MAKING = threading.Lock()


class RayTelemetry(Telemetry):
    def __init__(self, cluster: str):
        self.cluster = cluster
        self._made: dict = {}

    def __getstate__(self):  # metrics are per process: made again where this object lands
        return {"cluster": self.cluster, "_made": {}}

    def _metric(self, name: str):
        m = self._made.get(name)
        if m is None:
            with _MAKING:  # a shard's reading threads report too: each metric made once a process
                return self._make(name)
        return m

    def _make(self, name: str):
        m = self._made.get(name)
        if m is None:
            from ray.util import metrics
            kind, desc, tags, *bounds = METRICS[name]
            keys = ("cluster", *tags)
            if kind == "counter":
                m = metrics.Counter(name, description=desc, tag_keys=keys)
            elif kind == "gauge":
                m = metrics.Gauge(name, description=desc, tag_keys=keys)
            else:
                m = metrics.Histogram(name, description=desc, boundaries=bounds[0], tag_keys=keys)
            m.set_default_tags({"cluster": self.cluster})
            self._made[name] = m
        return m

    def _do(self, name: str, how: str, value: float, **tags) -> None:
        try:
            getattr(self._metric(name), how)(value, tags={k: str(v) for k, v in tags.items()})
        except Exception as e:  # noqa: BLE001 - watching never stops the work
            log.debug("metric %s: %s", name, e)

    def node(self) -> str | None:
        try:
            import ray
            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not in a Ray worker
            return None

    def applied(self, shard, events):
        if events > 0:
            self._do("impressions_shard_events_applied", "inc", events, shard=shard)

    def log_write(self, shard, seconds):
        self._do("impressions_shard_log_write_ms", "observe", seconds * 1e3, shard=shard)

    def checkpoint(self, shard, seconds, bytes_written):
        self._do("impressions_shard_checkpoint_ms", "observe", seconds * 1e3, shard=shard)
        if bytes_written > 0:
            self._do("impressions_shard_checkpoint_bytes", "inc", bytes_written, shard=shard)

    def shard_query(self, shard, seconds):
        self._do("impressions_shard_query_ms", "observe", seconds * 1e3, shard=shard)

    def shard_wait(self, shard, seconds):
        self._do("impressions_shard_query_wait_ms", "observe", seconds * 1e3, shard=shard)

    def shard_state(self, shard, state):
        for k, v in state.items():
            if k in _STATE and v is not None:
                self._do(_STATE[k], "set", float(v), shard=shard)

    def rejected(self, reason, events):
        if events > 0:
            self._do("impressions_events_rejected", "inc", events, reason=reason)

    def in_flight(self, queries):
        self._do("impressions_queries_in_flight", "set", queries)

    def answer(self, seconds, partial, missing):
        self._do("impressions_answer_ms", "observe", seconds * 1e3, partial=str(bool(partial)).lower())
        if partial:
            self._do("impressions_partial_answers", "inc", 1)
        for shard in missing:
            self._do("impressions_shard_missed_answers", "inc", 1, shard=shard)
