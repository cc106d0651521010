"""Questions first (``cluster.priority``): bulk threads give way, question threads keep their priority; no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from impressions.actors.runtime import READ_METHODS
from impressions.actors.shard import ShardActor
from impressions.cluster.config import ClusterConfig
from impressions.cluster.priority import SWITCH_INTERVAL_S, gave_way, give_way, giving_way

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="thread scheduling classes are Linux's")


def _on_a_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(v=fn()))
    t.start()
    t.join()
    return out["v"]


def test_a_thread_that_gives_way_does_so_alone_and_for_good():
    def bulk():
        first = give_way()
        return first, gave_way(), give_way()  # the second call: nothing more to do, still there

    assert _on_a_thread(bulk) == (True, True, True)
    assert not gave_way()  # this thread, and the process's others, untouched
    assert _on_a_thread(gave_way) is False


class Actor:
    """A stand-in actor class with a question, bulk calls and what must not be wrapped."""

    LIMIT = 3

    def __init__(self, x):
        self.x = x

    def ask(self):  # a question: in ``keep``
        return gave_way()

    def apply(self, y):
        return gave_way(), self.x + y

    @staticmethod
    def helper():
        return "static"

    @property
    def size(self):
        return self.x

    def _private(self):
        return gave_way()


def test_giving_way_wraps_every_public_call_but_the_questions():
    before = sys.getswitchinterval()
    try:
        cls = giving_way(Actor, frozenset({"ask"}))
        a = cls(1)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        assert cls.__name__ == "Actor" and isinstance(a, Actor) and a.size == 1 and cls.helper() == "static"
        assert _on_a_thread(a.ask) is False
        assert _on_a_thread(lambda: a.apply(2)) == (True, 3)
        assert _on_a_thread(a._private) is False  # called by the object itself: the caller's thread decides
        # the real actor classes: their questions kept, their writes wrapped
        shard = giving_way(ShardActor, READ_METHODS)
        assert all(getattr(shard, m) is getattr(ShardActor, m) for m in READ_METHODS if hasattr(ShardActor, m))
        assert shard.apply is not ShardActor.apply and shard.apply.__wrapped__ is ShardActor.apply
    finally:
        sys.setswitchinterval(before)


SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
if sys.argv[2] == "idle":
    from impressions.cluster.priority import give_way
    assert give_way()
print("ready", flush=True)
start = float(sys.stdin.readline())
while time.time() < start:
    pass
cpu = time.process_time()
while time.time() < start + 1.0:  # the same second of the clock for both
    pass
print(time.process_time() - cpu, flush=True)
"""


def test_on_a_shared_core_the_thread_that_gave_way_gets_little_of_it():
    """The premise, on this machine's kernel: two spinning processes pinned to one core, one of them given
    way: the other has nearly all of the core."""
    cpu = max(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu), kind], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for kind in ("normal", "idle")]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        start = time.time() + 0.3
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        normal, idle = (float(p.stdout.readline()) for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert normal > 0.5 and idle < 0.2 * normal, (normal, idle)


def test_the_setting_reads_from_the_environment_and_refuses_nonsense():
    assert ClusterConfig().questions_first is True
    assert ClusterConfig.from_env({"IMPRESSIONS_QUESTIONS_FIRST": "0"}).questions_first is False
    assert ClusterConfig.from_env({"IMPRESSIONS_QUESTIONS_FIRST": "true"}).questions_first is True
    with pytest.raises(ValueError, match="IMPRESSIONS_QUESTIONS_FIRST"):
        ClusterConfig.from_env({"IMPRESSIONS_QUESTIONS_FIRST": "maybe"})
