"""The REST app on Ray Serve: ``api.app`` answered by the cluster's actors.

    serve run deploy/serve.yaml                   # the Serve config: this app, its autoscaling and resources
    serve deploy deploy/serve.yaml                # the same, to a running cluster's dashboard address
    serve run impressions.cluster.serve:build     # the app alone, with Serve's defaults
    impressions up                                # starts Ray, the actors and this app

Built from a config or an import path, the app creates the coordinator and
shards when they are missing (settings from ``IMPRESSIONS_*`` variables), so
it works on a fresh cluster; ``impressions up`` creates them itself.

``RayBackend`` answers the app's questions by asking the shards directly
(one hop, on a copy of the coordinator's shard map: ``actors.questions``)
and ingests through the same ``Sender`` the ingest job uses; ``RayMetrics``
exports the app's figures through Ray's metrics (Prometheus).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from impressions.actors.questions import DirectQuestions
from impressions.actors.runtime import ShardUnavailable
from impressions.api.app import MAX_BODY, Metrics, configure, create_app, on_threads
from impressions.api.auth import parse_api_keys
from impressions.api.errors import Conflict
from impressions.cluster.bootstrap import RayRuntime, ensure_actors, get_coordinator
from impressions.cluster.config import ClusterConfig, placeholder_secrets
from impressions.cluster.ingest import ingest_table
from impressions.cluster.metrics import RayTelemetry
from impressions.cluster.priority import give_way
from impressions.durable.ledger import IdempotencyLedger, digest
from impressions.durable.objects import ObjectStore

INGEST_DEADLINE_S = 20.0  # a POST waits this long for its shards, then answers 503 (retry with the same key)
BULK_THREADS = 8  # a replica's threads for ingest bodies: parsing them, sending them and waiting for the shards

class RayBackend:
    """The app's questions, asked of the coordinator actor of ``namespace``.

    Every wait is bounded: a question by the cluster's query timeout (the
    coordinator answers partial sooner), a POST by ``INGEST_DEADLINE_S``
    (then 503, and the client retries with its ``Idempotency-Key``)."""

    def __init__(self, namespace: str, create_actors: bool = False):
        if create_actors:  # from a Serve config on a fresh cluster: the actors, if missing (race-free: named)
            self.coordinator = ensure_actors(ClusterConfig.from_env(namespace=namespace))
        else:
            self.coordinator = get_coordinator(namespace)
        self.config: ClusterConfig = ray.get(self.coordinator.cluster_config.remote(), timeout=60)
        self.sketch = self.config.sketch
        self.ask_s = self.config.query_timeout_s * 5 + 5
        self.ledger = IdempotencyLedger(ObjectStore(self.config.storage, self.config.s3_endpoint),
                                        self.config.dedup_window_s) if self.config.storage else None
        self._answers: dict[str, dict] = {}  # the ledger when there is no storage (this replica only)
        # questions go straight to the shards (one hop) on this replica's copy of the shard map
        self.questions = DirectQuestions(lambda: ray.get(self.coordinator.read_route.remote(), timeout=self.ask_s),
                                         RayRuntime(), self.config, self.sketch.p, RayTelemetry(namespace))
        # ingest bodies on threads of their own, below the questions with ``questions_first`` (``cluster.priority``):
        # a question awaited on the event loop gets the core ahead of a body being parsed
        self.bulk = ThreadPoolExecutor(BULK_THREADS, thread_name_prefix="bulk",
                                       initializer=give_way if self.config.questions_first else None)

    async def _ask(self, ref, timeout: float | None = None):
        try:
            return await asyncio.wait_for(ref, timeout or self.ask_s)
        except TimeoutError:
            ray.cancel(ref)
            raise ShardUnavailable(f"the coordinator did not answer within {timeout or self.ask_s:g} s") from None
        except ray.exceptions.RayActorError:
            raise ShardUnavailable("the coordinator is restarting") from None
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, Exception) else e) from None

    async def _on_loop(self, question):
        """A question asked of the shards directly, on this replica's event loop (``DirectQuestions.aquery``
        and its kin: no thread is handed the question; its waits are Ray's, bounded)."""
        try:
            return await asyncio.wait_for(question, self.ask_s)
        except TimeoutError:
            raise ShardUnavailable(f"no answer within {self.ask_s:g} s") from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            raise ShardUnavailable("the coordinator, which keeps the shard map, is restarting") from None

    async def query(self, keys, rng):
        return await self._on_loop(self.questions.aquery(keys, rng))

    async def series(self, key, rng, step):
        return await self._ask(self.coordinator.series.remote(key, rng, step))

    async def keys(self, rng, prefix, limit):
        return await self._ask(self.coordinator.keys.remote(rng, prefix, limit))

    async def reach(self, keys, prefix, rng):
        return await self._on_loop(self.questions.areach(keys, prefix, rng))

    async def overlap(self, a, b, rng):
        return await self._on_loop(self.questions.aoverlap(a, b, rng))

    async def rolling(self, keys, prefix, rng, step, window):
        return await self._on_loop(self.questions.arolling(keys, prefix, rng, step, window))

    async def health(self):
        return await self._ask(self.coordinator.health.remote())

    def _remembered(self, key: str) -> dict | None:
        return self.ledger.get(key) if self.ledger is not None else self._answers.get(key)

    def _remember(self, key: str, body_sha: str, answer: dict | None) -> None:
        if self.ledger is not None:
            self.ledger.put(key, body_sha, answer)
        else:
            self._answers[key] = {"body": body_sha, "answer": answer}

    def _ingest(self, table, malformed, key, body_sha) -> dict:
        if key is not None:
            prior = self._remembered(key)
            if prior is not None and prior["body"] != body_sha:
                raise Conflict("this Idempotency-Key was used with another body; use a new key for new events")
            if prior is not None and prior.get("answer") is not None:
                return prior["answer"]
            self._remember(key, body_sha, None)
        report = ingest_table(table, self.coordinator, malformed=malformed,
                              batch_id=None if key is None else f"idem-{digest(key)}",
                              deadline_s=INGEST_DEADLINE_S, wrote=self.questions.wrote)
        answer = {"accepted": report.accepted, "rejected": report.rejected_total,
                  "rejected_by_reason": dict(report.rejected), "errors": report.samples}
        if key is not None:
            self._remember(key, body_sha, answer)
        return answer

    async def ingest(self, table, malformed, idempotency_key, body_sha):
        # the shard calls block until the batches are durable: on a thread, not the event loop
        return await on_threads(self.bulk, self._ingest, table, malformed, idempotency_key, body_sha)


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

    def __init__(self, namespace: str, api_keys: str | None = None, max_body: int = MAX_BODY,
                 failed_auth_per_minute: int = 20, create_actors: bool = False):
        backend = RayBackend(namespace, create_actors=create_actors)
        self._rest_app = configure(create_app(), backend, api_keys=api_keys, max_body=max_body,
                                   failed_auth_per_minute=failed_auth_per_minute, metrics=RayMetrics(),
                                   bulk=backend.bulk)

    def __serve_build_asgi_app__(self):
        return self._rest_app


def build(args: dict | None = None):
    """The Serve application (``import_path`` of ``deploy/serve.yaml``, or
    ``serve run impressions.cluster.serve:build``); settings from ``args``
    (``namespace``, ``max_body``, ``failed_auth_per_minute``), else the
    environment.  API keys come from ``IMPRESSIONS_API_KEYS`` only, never from
    a config file.  The replicas create the actors if they are missing."""
    args = dict(args or {})
    unknown = set(args) - {"namespace", "max_body", "failed_auth_per_minute"}
    if unknown:
        raise ValueError(f"unknown args {sorted(unknown)} for the impressions app: it takes namespace, max_body "
                         f"and failed_auth_per_minute (API keys from IMPRESSIONS_API_KEYS)")
    stale = placeholder_secrets()
    if stale:
        raise ValueError(f"{' and '.join(stale)} still hold the example file's placeholders; set real secrets")
    cfg = ClusterConfig.from_env()
    parse_api_keys(cfg.api_keys)  # a malformed key list is refused here, not in every replica
    return ImpressionsApi.bind(args.get("namespace", cfg.namespace), cfg.api_keys,
                               int(args.get("max_body", MAX_BODY)), int(args.get("failed_auth_per_minute", 20)),
                               True)


def start(namespace: str, *, host: str = "127.0.0.1", port: int = 8000, api_keys: str | None = None,
          name: str = "impressions", route_prefix: str = "/", max_body: int = MAX_BODY,
          failed_auth_per_minute: int = 20) -> str:
    """Start (or update) the REST app on the connected Ray cluster; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(ImpressionsApi.bind(namespace, api_keys, max_body, failed_auth_per_minute), name=name,
              route_prefix=route_prefix, blocking=False)
    try:  # Serve keeps the host and port it first started with: report those (ray==2.60 is pinned)
        from ray.serve.context import _get_global_client
        cfg = _get_global_client().http_config
        host, port = cfg.host, cfg.port
    except Exception:  # noqa: BLE001 - then the ones asked for
        pass
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
