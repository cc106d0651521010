"""Where the cluster is built: Ray connection, actor wrapping and placement.

The actors are plain classes (``actors/``); this module turns them into
named, detached Ray actors in the project namespace, so any driver on the
cluster (the REST app, an ingest job, the CLI, a notebook) finds the same
ones by name.

* shards: ``shard-<i>-of-<S>``, spread across nodes (``SPREAD``), restarted
  by Ray if their process dies; the coordinator and the senders reach them
  through ``RayRuntime``, the Ray form of ``actors.runtime``;
* readers: ``reader-<r>-of-shard-<i>-of-<S>``, spread like the shards; a
  writer tells its readers of its log through ``RayFollowers``;
* the coordinator: ``coordinator``, a threaded actor that creates (or finds)
  the shards and keeps the configuration every other driver reads.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import tempfile
import time
from collections import deque

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from impressions.actors.coordinator import Coordinator, reader_slots
from impressions.actors.memory import PROCESS_ENV
from impressions.actors.reader import ShardReader
from impressions.actors.runtime import READ_METHODS, READ_THREADS, UPKEEP_METHODS, ShardUnavailable
from impressions.actors.shard import ShardActor
from impressions.actors.wire import answer_of, wire_client
from impressions.cluster.config import ClusterConfig
from impressions.cluster.metrics import RayTelemetry
from impressions.cluster.priority import giving_way
from impressions.durable.layout import ShardStorage
from impressions.durable.objects import absolute

COORDINATOR = "coordinator"


class ClusterNotRunning(RuntimeError):
    """No cluster to connect to, or no actors on it."""


HEAD_RESOURCE = "node:__internal_head__"  # a resource Ray gives the head node only
GROUPS = {"reads": READ_THREADS, "upkeep": 1}  # a shard's or reader's thread groups (``actors.runtime``)


def call_actor(handle, method: str, *args):
    """Start ``method`` on a shard or reader actor, on the thread group it belongs to."""
    if method in READ_METHODS:  # questions: on the shard's reading threads, never behind its writes
        return getattr(handle, method).options(concurrency_group="reads").remote(*args)
    if method in UPKEEP_METHODS:  # rollups, sealing, checkpoints, a reader's switches: beside the applies
        return getattr(handle, method).options(concurrency_group="upkeep").remote(*args)
    return getattr(handle, method).remote(*args)


def question_hosts() -> list[str]:
    """Where a writer or reader listens for questions (``actors.wire``): its node's address, for askers on other
    nodes, and 127.0.0.1, for askers on its own.  Run in the copy's process."""
    return [ray.util.get_node_ip_address(), "127.0.0.1"]


def shard_name(i: int, layout) -> str:
    return f"shard-{i}-of-{layout.shards}-{layout.folder}"


def reader_name(i: int, replica: int, layout) -> str:
    return f"reader-{replica}-of-{shard_name(i, layout)}"


class RayFollowers:
    """A writer's readers on Ray (``actors.reader.Followers``): found by name, each told by a call the
    writer never waits for.  At most ``MAX_OUT`` messages are out to a reader: one that falls further
    behind is not sent more (it fills the gap from the store, ``ShardReader.logged``).  Pickled with
    the writer's creation arguments as names only; handles are looked up in the writer's process."""

    MAX_OUT = 32
    LOOKUP_S = 0.5  # how often readers not found yet are looked up again (a lookup costs a GCS round trip)

    def __init__(self, namespace: str, names: list[str]):
        self.namespace, self.names = namespace, list(names)
        self._handles: dict = {}
        self._out: dict = {}
        self._looked = 0.0

    def __getstate__(self):
        return {"namespace": self.namespace, "names": self.names}

    def __setstate__(self, state):
        self.__init__(state["namespace"], state["names"])

    def _readers(self) -> list:
        if len(self._handles) < len(self.names) and time.monotonic() - self._looked >= self.LOOKUP_S:
            self._looked = time.monotonic()
            for name in self.names:
                if name not in self._handles:
                    try:
                        self._handles[name] = ray.get_actor(name, namespace=self.namespace)
                    except ValueError:
                        pass
        return list(self._handles.items())

    def _tell(self, method: str, *args) -> None:
        for name, h in self._readers():
            out = self._out.setdefault(name, deque())
            while out:
                done, _ = ray.wait([out[0]], timeout=0)
                if not done:
                    break
                try:
                    ray.get(out.popleft())
                except ray.exceptions.RayActorError:  # gone for good: looked up again later
                    self._handles.pop(name, None)
                except Exception:  # noqa: BLE001, S110 - a reader's failure is its own; it catches up from the store
                    pass
            if len(out) < self.MAX_OUT:
                out.append(call_actor(h, method, *args))  # a switch to a checkpoint on the upkeep thread

    @property
    def active(self) -> bool:
        return bool(self._readers())

    def logged(self, seq: int, incarnation: int, rb) -> None:
        if self._readers():
            self._tell("logged", seq, incarnation, ray.put(rb))  # the batch: stored once, for every reader

    def flushed(self, after: int, through: int, incarnation: int, runs, key_ids, key_names) -> None:
        if self._readers():  # each stored once, for every reader
            self._tell("flushed", after, through, incarnation, ray.put(runs), ray.put(key_ids), ray.put(key_names))

    def checkpointed(self, number: int) -> None:
        self._tell("checkpointed", number)


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
                raise ClusterNotRunning("no Ray cluster is running here; start one with `impressions up`, "
                                        "or give its address (--address, RAY_ADDRESS); from Python, "
                                        "Client(start=True) starts an embedded one") from None
            # Ray's default for a cluster that ray.init starts: token auth on, a token made if none exists
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


class RayRuntime:
    """Shards as named, detached Ray actors (see ``actors.runtime``).

    Calls are retried across a shard's restarts (``max_task_retries``): batch
    ids make a retried apply count once.  Creating shards needs the cluster's
    configuration; calling them does not (``RayRuntime()`` in senders)."""

    readers = True

    def __init__(self, config: ClusterConfig | None = None):
        self.config = None if config is None else config.without_secrets()

    def _storage(self, layout) -> ShardStorage | None:
        cfg = self.config
        if cfg is None:
            raise RuntimeError("this RayRuntime has no cluster configuration: it cannot create shards")
        return ShardStorage(cfg.storage, cfg.s3_endpoint, layout.cluster_id, layout.folder,
                            cfg.cache_dir or os.path.join(tempfile.gettempdir(), "impressions-cache",
                                                          layout.cluster_id)) if cfg.storage else None

    def create_shard(self, index: int, layout, seeds: list = ()):
        cfg = self.config
        storage = self._storage(layout)
        slots = reader_slots(cfg)
        followers = RayFollowers(cfg.namespace, [reader_name(index, r, layout) for r in range(slots)]) \
            if storage is not None and slots > 0 else None
        # questions on a group of threads of their own (``READ_METHODS``), upkeep on a thread of its own
        # (``UPKEEP_METHODS``), every other call on one thread, in order
        handle = ray.remote(concurrency_groups=GROUPS)(self._class(ShardActor)).options(
            name=shard_name(index, layout), namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
            num_cpus=cfg.shard_cpus, resources={cfg.shard_resource: 1} if cfg.shard_resource else None,
            scheduling_strategy="SPREAD", max_restarts=-1, max_task_retries=-1,
            max_concurrency=1, runtime_env={"env_vars": PROCESS_ENV}).remote(
                layout.sketch, index, layout.shards, storage, cfg.block_cache_mb,
                telemetry=RayTelemetry(cfg.namespace), await_seed=bool(seeds), followers=followers,
                question_hosts=question_hosts if cfg.question_ports else None)
        if seeds:
            # by a call, not as creation arguments, which Ray would keep (pinned) as long as the actor lives;
            # top-level arguments, so the shard gets their values; the calls after it wait behind it
            handle.seed.remote([(i, n) for i, n, _ in seeds], *[p for _, _, p in seeds])
        return handle

    def _class(self, cls):
        """The actor class as the cluster runs it: with ``questions_first``, every call but a question on a thread
        below the questions' (``cluster.priority``)."""
        return giving_way(cls, READ_METHODS) if self.config.questions_first else cls

    def cpus(self) -> float:
        return float(ray.cluster_resources().get("CPU", 0.0))

    def create_reader(self, index: int, replica: int, layout, near: str | None = None):
        cfg = self.config
        # on node ``near`` while it has room (soft), else anywhere the spread puts it
        where = NodeAffinitySchedulingStrategy(near, soft=True) if near else "SPREAD"
        # its calls are not retried across its restarts: a question to a reader that is gone moves on to the
        # next copy of the range at once (``actors.questions``); the reader catches up from the store
        return ray.remote(concurrency_groups=GROUPS)(self._class(ShardReader)).options(
            name=reader_name(index, replica, layout), namespace=cfg.namespace, lifetime="detached",
            # no resource of the shards' (``shard_resource``): a fraction of it on a full node would keep a
            # restarted writer from coming back there; spread over every node instead
            get_if_exists=True, num_cpus=cfg.reader_cpus,
            scheduling_strategy=where, max_restarts=-1, max_task_retries=0, max_concurrency=1,
            runtime_env={"env_vars": PROCESS_ENV}).remote(
                layout.sketch, index, layout.shards, self._storage(layout), cfg.block_cache_mb, replica,
                telemetry=RayTelemetry(cfg.namespace), question_hosts=question_hosts if cfg.question_ports else None)

    def find_shard(self, index: int, layout):
        try:
            return ray.get_actor(shard_name(index, layout), namespace=self.config.namespace)
        except ValueError:
            return None

    def find_reader(self, index: int, replica: int, layout):
        try:
            return ray.get_actor(reader_name(index, replica, layout), namespace=self.config.namespace)
        except ValueError:
            return None

    def cancel(self, pending) -> None:
        if isinstance(pending, cf.Future):
            pending.cancel()  # the port answers anyway; the answer is dropped and the connection kept
            return
        try:
            ray.cancel(pending)
        except Exception:  # noqa: BLE001 - done already, or not cancellable: it ends on its own
            pass

    def call(self, handle, method: str, *args):
        return call_actor(handle, method, *args)

    _node_ip: str | None = None

    def ask_at(self, address, body: bytes) -> cf.Future:
        """A question (``actors.wire.encode_question``) to a copy's own port: on 127.0.0.1 when the copy is on
        this node, else at its node's address."""
        if self._node_ip is None:
            self._node_ip = ray.util.get_node_ip_address()
        return wire_client().ask(address.route(self._node_ip), address.token, body)

    def wait(self, pending: list, timeout: float | None = None, num_returns: int | None = None):
        if not pending:
            return [], []
        n = len(pending) if num_returns is None else min(num_returns, len(pending))
        if not any(isinstance(p, cf.Future) for p in pending):
            return ray.wait(pending, num_returns=n, timeout=timeout)
        # questions to ports, maybe beside Ray calls (a range's writer): all waited for as futures
        futures = {p: p if isinstance(p, cf.Future) else p.future() for p in pending}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [p for p, f in futures.items() if f.done()]
            left = None if deadline is None else deadline - time.monotonic()
            if len(done) >= n or (left is not None and left <= 0):
                break
            cf.wait([f for f in futures.values() if not f.done()], left,
                    cf.ALL_COMPLETED if n >= len(pending) else cf.FIRST_COMPLETED)
        ready = done[:n]
        return ready, [p for p in pending if p not in ready]

    def future(self, pending):
        return pending if isinstance(pending, cf.Future) else pending.future()

    def result(self, pending, timeout: float | None = None):
        if isinstance(pending, cf.Future):  # a question to a port: its own exception as the copy raised it
            if pending.cancelled() or not pending.done() and not cf.wait([pending], timeout).done:
                raise ShardUnavailable(f"no answer within {timeout} s")
            return answer_of(pending.result())  # PortFailed when the port failed: ask the copy through Ray
        try:
            return ray.get(pending, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ShardUnavailable(f"no answer within {timeout} s") from None
        except ray.exceptions.RayActorError as e:  # dead, or restarting
            raise ShardUnavailable(f"the shard is unavailable: {type(e).__name__}") from None
        except ray.exceptions.RayTaskError as e:  # the shard's own exception, as it raised it
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise

    def kill(self, handle, timeout: float = 30.0) -> None:
        try:  # its port first: Ray's kill ends the process a moment later, and it must not answer meanwhile
            ray.get(handle.close_port.options(concurrency_group="reads").remote(), timeout=min(2.0, timeout))
        except Exception:  # noqa: BLE001 - gone, hung or without a port: the kill below is what counts
            pass
        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ray.kill returns at once: wait until the process is gone
            try:
                ray.get(handle.ping.remote(), timeout=1.0)
            except ray.exceptions.RayActorError as e:
                # Ray keeps this error with the call's result: without its traceback, so that it does not keep
                # the callers' frames (and what they hold, such as a re-sharding's exports) alive
                e.__traceback__ = None
                return
            except ray.exceptions.GetTimeoutError:
                pass


def check_storage_reach(config: ClusterConfig) -> None:
    """Refuse a local-folder store on a cluster of several nodes: a shard
    restarted on another node would find no past there."""
    if not config.storage or "://" in config.storage and not config.storage.startswith("file://"):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ClusterNotRunning(
            f"this Ray cluster has {len(nodes)} nodes but the storage {config.storage} is a local folder, which "
            f"the other nodes cannot see: set IMPRESSIONS_STORAGE to an object store (s3://bucket/prefix)")


def ensure_actors(config: ClusterConfig | None = None):
    """Create the coordinator and shards if they do not exist yet, and
    return the coordinator.  An existing coordinator keeps its configuration."""
    config = (config or ClusterConfig.from_env()).without_secrets()
    config = config.replace(storage=absolute(config.storage))
    check_storage_reach(config)
    # on the head node (Ray marks it with this resource), which lives as long as the cluster: never on a
    # worker that the autoscaler would remove, or that a node failure takes, once its shards are elsewhere
    coord = ray.remote(Coordinator).options(
        name=COORDINATOR, namespace=config.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_restarts=-1, max_task_retries=-1,
        max_concurrency=32).remote(
            config, RayRuntime(config), RayTelemetry(config.namespace))
    ray.get(coord.start.remote(), timeout=300)
    return coord


def coordinator_route(coordinator):
    """``route()`` for a ``Sender``: the coordinator's current (epoch, shard handles)."""
    return lambda: ray.get(coordinator.route.remote(), timeout=60)


def get_coordinator(namespace: str | None = None):
    """The running coordinator, or ``ClusterNotRunning``."""
    ns = namespace or ClusterConfig.from_env().namespace
    try:
        return ray.get_actor(COORDINATOR, namespace=ns)
    except ValueError:
        raise ClusterNotRunning(f"no impressions cluster in Ray namespace {ns!r}; start one with "
                                f"`impressions up` (or Client(start=True))") from None


def teardown(namespace: str | None = None) -> int:
    """Kill the coordinator and every shard and reader of the namespace; returns how many actors died."""
    ns = namespace or ClusterConfig.from_env().namespace
    killed = 0
    for info in ray.util.list_named_actors(all_namespaces=True):
        if info["namespace"] == ns and (info["name"] == COORDINATOR or info["name"].startswith(("shard-", "reader-"))):
            ray.kill(ray.get_actor(info["name"], namespace=ns), no_restart=True)
            killed += 1
    return killed
