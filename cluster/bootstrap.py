"""Where the cluster is built: Ray connection, actor wrapping and placement.

The actors are plain classes (``actors/``); this module turns them into
named, detached Ray actors in the project namespace, so any driver on the
cluster (the REST app, an ingest job, the CLI, a notebook) finds the same
ones by name.

* shards: ``shard-<i>-of-<S>``, spread across nodes (``SPREAD``), restarted
  by Ray if their process dies;
* the coordinator: ``coordinator``, a threaded actor that creates (or finds)
  the shards and keeps the configuration every other driver reads.
"""

from __future__ import annotations

import os

import ray

from actors.coordinator import Coordinator
from actors.shard import ShardActor
from cluster.config import ClusterConfig

COORDINATOR = "coordinator"


class ClusterNotRunning(RuntimeError):
    """No cluster to connect to, or no actors on it."""


def shard_name(i: int, shards: int) -> str:
    return f"shard-{i}-of-{shards}"


_dashboard: str | None = None


def connect(address: str | None = None, *, start_local: bool = True, num_cpus: int | None = None,
            namespace: str | None = None, include_dashboard: bool = False) -> str:
    """Connect this process to Ray: ``address`` (or ``RAY_ADDRESS``, or a
    cluster started with ``ray start`` on this machine), else, if allowed,
    start a private local one.  Returns how it connected."""
    global _dashboard
    if ray.is_initialized():
        return "already connected"
    kw = dict(namespace=namespace, log_to_driver=False, configure_logging=False)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ctx, how = ray.init(address=address, **kw), f"connected to {address}"
    else:
        try:
            ctx, how = ray.init(address="auto", **kw), "connected to the local cluster"
        except (ConnectionError, RuntimeError):
            if not start_local:
                raise ClusterNotRunning("no Ray cluster is running here; start one with `impressions up` "
                                        "or pass --address") from None
            ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=include_dashboard, **kw)
            how = "started a local Ray"
    _dashboard = ctx.dashboard_url or None
    return how


def dashboard_url() -> str:
    """The cluster's dashboard (job submission) address, as http://host:port."""
    global _dashboard
    if not _dashboard and ray.is_initialized():  # connected by someone else's ray.init
        try:
            _dashboard = ray._private.worker.get_dashboard_url() or None  # ray==2.60 is pinned
        except Exception:
            _dashboard = None
    if not _dashboard:
        raise ClusterNotRunning("this Ray cluster runs no dashboard, which job submission needs "
                                "(start it with `ray start --head`, which runs one)")
    return _dashboard if "://" in _dashboard else f"http://{_dashboard}"


def _shard_factory(config: ClusterConfig):
    remote = ray.remote(ShardActor)
    sketch, ns, cpus = config.sketch, config.namespace, config.shard_cpus
    storage = _absolute_storage(config.storage)
    endpoint = config.s3_endpoint

    def make(i: int, shards: int, seed=None):
        # calls are retried across restarts (max_task_retries): batch ids make a retried apply count once
        return remote.options(name=shard_name(i, shards), namespace=ns, lifetime="detached", get_if_exists=True,
                              num_cpus=cpus, scheduling_strategy="SPREAD", max_restarts=-1, max_task_retries=-1,
                              max_concurrency=1).remote(sketch, i, shards, storage, endpoint, seed)
    return make


def _absolute_storage(uri: str | None) -> str | None:
    """A local storage path made absolute here, so actors on this machine agree on it."""
    if not uri:
        return uri
    if uri.startswith("file://") and not uri.startswith("file:///"):
        return "file://" + os.path.abspath(uri[len("file://"):])
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    return uri


def ensure_actors(config: ClusterConfig | None = None):
    """Create the coordinator and shards if they do not exist yet, and
    return the coordinator.  An existing coordinator keeps its configuration."""
    config = config or ClusterConfig.from_env()
    config = config.replace(storage=_absolute_storage(config.storage))
    coord = ray.remote(Coordinator).options(
        name=COORDINATOR, namespace=config.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=32).remote(config.to_json(),
                                                                                   _shard_factory(config))
    ray.get(coord.start.remote(), timeout=120)
    return coord


def get_coordinator(namespace: str | None = None):
    """The running coordinator, or ``ClusterNotRunning``."""
    ns = namespace or ClusterConfig.from_env().namespace
    try:
        return ray.get_actor(COORDINATOR, namespace=ns)
    except ValueError:
        raise ClusterNotRunning(f"no impressions cluster in Ray namespace {ns!r}; start one with "
                                f"`impressions up` (or Client(start=True))") from None


def teardown(namespace: str | None = None) -> int:
    """Kill the coordinator and every shard of the namespace; returns how many actors died."""
    ns = namespace or ClusterConfig.from_env().namespace
    killed = 0
    for info in ray.util.list_named_actors(all_namespaces=True):
        if info["namespace"] == ns and (info["name"] == COORDINATOR or info["name"].startswith("shard-")):
            ray.kill(ray.get_actor(info["name"], namespace=ns), no_restart=True)
            killed += 1
    return killed
