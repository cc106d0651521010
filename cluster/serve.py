"""The REST app on Ray Serve: ``api.app`` answered by the cluster's actors.

    serve run cluster.serve:build                 # on a running cluster (the actors must exist)
    impressions up                                # starts Ray, the actors and this app

``RayBackend`` answers the app's questions through the coordinator actor
and ingests through the same ``Sender`` the ingest job uses; ``RayMetrics``
exports the app's figures through Ray's metrics (Prometheus).
"""

from __future__ import annotations

import asyncio

import ray
from ray import serve

from api.app import MAX_BODY, Metrics, configure, create_app
from cluster.bootstrap import get_coordinator
from cluster.config import ClusterConfig
from cluster.ingest import ingest_table

class RayBackend:
    """The app's questions, asked of the coordinator actor of ``namespace``."""

    def __init__(self, namespace: str):
        self.coordinator = get_coordinator(namespace)
        self.config: ClusterConfig = ray.get(self.coordinator.cluster_config.remote(), timeout=60)
        self.sketch = self.config.sketch

    async def query(self, keys, rng):
        return await self.coordinator.query.remote(keys, rng)

    async def series(self, key, rng, step):
        return await self.coordinator.series.remote(key, rng, step)

    async def keys(self, rng, prefix, limit):
        return await self.coordinator.keys.remote(rng, prefix, limit)

    async def ingest(self, table, malformed):
        # the shard calls block until the batches are durable: on a thread, not the event loop
        return await asyncio.to_thread(ingest_table, table, self.coordinator, malformed=malformed)

    async def stats(self):
        return await self.coordinator.stats.remote()


class RayMetrics(Metrics):
    def __init__(self):
        from ray.util import metrics
        self._events = metrics.Counter("impressions_events_total", description="events received over REST",
                                       tag_keys=("result",))
        self._latency = metrics.Histogram("impressions_query_latency_ms", description="query latency over REST",
                                          boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("route",))
        self._age = metrics.Gauge("impressions_checkpoint_age_seconds",
                                  description="age of the oldest shard checkpoint (readyz)")

    def events(self, result: str, n: int) -> None:
        if n > 0:  # Ray's counters refuse an increment of 0
            self._events.inc(n, tags={"result": result})

    def latency(self, route: str, ms: float) -> None:
        self._latency.observe(ms, tags={"route": route})

    def checkpoint_age(self, seconds: float) -> None:
        self._age.set(seconds)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60})
@serve.ingress()
class ImpressionsApi:
    """One replica: the app built here, in the replica, around the Ray backend."""

    def __init__(self, namespace: str, api_keys: str | None = None, max_body: int = MAX_BODY):
        self._rest_app = configure(create_app(), RayBackend(namespace), api_keys=api_keys, max_body=max_body,
                             metrics=RayMetrics())

    def __serve_build_asgi_app__(self):
        return self._rest_app


def build(args: dict | None = None):
    """The Serve application (``serve run cluster.serve:build``); settings from
    ``args`` (``namespace``, ``api_keys``, ``max_body``), else the environment."""
    args = args or {}
    cfg = ClusterConfig.from_env()
    return ImpressionsApi.bind(args.get("namespace", cfg.namespace), args.get("api_keys", cfg.api_keys),
                               int(args.get("max_body", MAX_BODY)))


def start(namespace: str, *, host: str = "127.0.0.1", port: int = 8000, api_keys: str | None = None,
          name: str = "impressions", route_prefix: str = "/", max_body: int = MAX_BODY) -> str:
    """Start (or update) the REST app on the connected Ray cluster; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(ImpressionsApi.bind(namespace, api_keys, max_body), name=name, route_prefix=route_prefix,
              blocking=False)
    try:  # Serve keeps the host and port it first started with: report those (ray==2.60 is pinned)
        from ray.serve.context import _get_global_client
        cfg = _get_global_client().http_config
        host, port = cfg.host, cfg.port
    except Exception:  # noqa: BLE001 - then the ones asked for
        pass
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
