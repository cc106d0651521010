"""Shared fixtures: one real Ray cluster for the whole test session.

It is started with ``ray start --head`` (so that ``ray job submit`` works
against it and detached actors outlive their drivers) on free loopback
ports, and stopped with ``ray stop`` at the end.  ``ray stop`` stops every
Ray process on the machine, so the fixture refuses to run beside a Ray
that something else started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # never inherit a token from an earlier run
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# the S3 tests talk to a moto server on 127.0.0.1 only; Ray's workers inherit
# these from the raylet, so they are set before the cluster starts
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def _other_ray_running() -> bool:
    """A live GCS server on this machine (a zombie left by a killed parent does not count)."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True)
    return any("gcs_server" in line and not line.lstrip().startswith("Z") for line in out.stdout.splitlines())


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    if _other_ray_running():
        pytest.exit("a Ray cluster is already running on this machine; the tests start (and `ray stop`) their "
                    "own: stop it first", returncode=3)
    port, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    # Ray's own temp folder must have a short path (unix socket names)
    short = Path("/tmp") / f"rt{os.getpid()}"
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={short}", "--include-dashboard=true"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, log_to_driver=False)
    info = {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "temp": temp, "cmd": cmd}
    try:
        yield info
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(short, ignore_errors=True)


@contextlib.contextmanager
def looping(fn):
    """Call ``fn`` over and over on a thread of its own while the block runs; yields a namespace whose
    ``rounds`` counts the calls finished and ``errors`` holds what stopped the loop (checked by the test)."""
    out = types.SimpleNamespace(rounds=0, errors=[])
    stop = threading.Event()

    def loop():
        try:
            while not stop.is_set():
                fn()
                out.rounds += 1
        except Exception as e:  # noqa: BLE001 - reported by the test's assertions
            out.errors.append(e)
    th = threading.Thread(target=loop)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()


def thread_priorities(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of process ``pid``: (its scheduling policy, its nice value), from ``/proc``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (int(fields[38]), int(fields[16]))
    return out


def processes(where: str, holds) -> list[int]:
    """The processes on this machine whose ``/proc/<pid>/<where>`` (``cmdline``, ``environ``) ``holds(bytes)``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/{where}", "rb") as f:
                if holds(f.read()):
                    pids.append(int(pid))
        except OSError:  # not ours to read, or ended meanwhile
            pass
    return pids


def wait_for(cond, timeout=30.0, interval=0.1, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def clients(ray_cluster, tmp_path_factory):
    """Make clients on the session cluster, each with a storage folder of its
    own (apart from the test's tmp_path) unless the config names one;
    their actors are torn down after the test."""
    from impressions.cluster.bootstrap import teardown
    from impressions.cluster.client import Client
    from impressions.cluster.config import ClusterConfig

    made = []

    def make(config=None, **kw):
        config = config or ClusterConfig.from_env()
        if config.storage == ClusterConfig().storage:
            config = config.replace(storage=f"file://{tmp_path_factory.mktemp('store')}")
        kw.setdefault("start", True)
        c = Client(config=config, **kw)
        made.append(c.config.namespace)
        return c

    yield make
    for ns in made:
        teardown(ns)


def restart_ray(info: dict) -> None:
    """Stop the whole session cluster (every actor dies) and start it again."""
    import ray

    ray.shutdown()
    subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, timeout=120)
    subprocess.run(info["cmd"], check=True, capture_output=True, timeout=120)
    ray.init(address=info["address"], log_to_driver=False)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stream_small():
    """A day of events on 20 keys as one validated batch, and the in-process reference holding them."""
    from impressions.cluster.workload import generate
    from impressions.sketch.counter import LocalCounter
    from impressions.sketch.events import prepare
    from tests.test_coordinator import NOW, SK
    t = generate(20_000, days=1, visitors=8_000, keys=20, seed=9, end=NOW)
    batch, _ = prepare(t["ts"].to_numpy(), t["key"], visitors=t["visitor"], now=NOW, bucket_seconds=60,
                       retention_buckets=SK.retention_buckets, future_seconds=SK.future_seconds)
    ref = LocalCounter(SK)
    ref.ingest(t["ts"].to_numpy(), t["key"], visitors=t["visitor"], now=NOW)
    return batch, ref
