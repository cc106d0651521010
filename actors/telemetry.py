"""What shards and the coordinator report about their work, for whoever watches.

Both are plain classes; they report through a ``Telemetry`` object, which
records nothing here.  ``cluster.metrics.RayTelemetry`` exports the same calls
through Ray's metrics (Prometheus), and ``deploy/grafana-dashboard.json``
charts them.  Every call is cheap (a counter or a gauge in this process) and
never raises: watching must not stop the work.
"""

from __future__ import annotations

import os


class Telemetry:
    """The calls; this base records nothing."""

    def node(self) -> str | None:
        """The node this process runs on, as the runtime names it (None: unknown)."""
        return None

    # a shard
    def applied(self, shard: int, events: int) -> None: ...

    def log_write(self, shard: int, seconds: float) -> None: ...

    def checkpoint(self, shard: int, seconds: float, bytes_written: int) -> None: ...

    def shard_query(self, shard: int, seconds: float) -> None: ...

    def shard_wait(self, shard: int, seconds: float) -> None:
        """How long a query waited behind the shard's other calls (its queue)."""

    def shard_state(self, shard: int, state: dict) -> None:
        """Gauges, reported after each upkeep slice: ``recovering`` (0 or 1),
        ``checkpoint_age_s``, ``heap_bytes``, ``mapped_bytes``, ``rows``,
        ``keys``, ``events``."""

    # ingest (jobs and the REST app)
    def rejected(self, reason: str, events: int) -> None: ...

    # the coordinator
    def in_flight(self, queries: int) -> None:
        """Questions out now from this asker (the coordinator, a REST replica, a client)."""

    def answer(self, seconds: float, partial: bool, missing: list[int]) -> None:
        """A question answered; ``missing``: the shards left out of it."""


def process_memory() -> dict:
    """This process's resident memory, split into anonymous (the heap) and
    file-backed (mapped files) pages, from ``/proc/self/status``; zeros where
    the system does not say."""
    out = {"heap_bytes": 0, "mapped_bytes": 0}
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    out["heap_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    out["mapped_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
