"""Questions first: the threads that ingest and keep up give way to the threads that answer.

Linux schedules threads, not processes.  A thread moved to ``SCHED_IDLE``
gets a core when no ordinary thread wants it, and an ordinary thread that
wakes takes the core from it at once; it is never starved outright (it keeps
a small share of a busy core), so a question flood slows ingest, never stops
it.  With ``ClusterConfig.questions_first`` (the default) the cluster moves
there every thread whose work is bulk:

* a writer's calls but its questions (``READ_METHODS``): applies, log writes,
  rollups, sealing, checkpoints (``giving_way``);
* a reader's: following its writer's log, switching to a checkpoint;
* the ingest tasks (reading, hashing and sending Parquet: a pool of worker
  processes of their own, ``BULK_ENV``, since a thread that gave way cannot
  come back) and a REST replica's threads for ingest bodies.

The threads that answer (a shard's and a reader's reading threads, a REST
replica's event loop), Ray's own threads and the drivers keep their priority.

Where one process holds both, they share Python's interpreter lock: a
question waiting for it waits for the bulk thread to let go, by default after
5 ms.  Writers and readers hand the lock over after ``SWITCH_INTERVAL_S``
instead (one thread alone is never interrupted: the interval matters only
while two want the lock); a REST replica keeps 5 ms (at 0.5 ms its p99
under ingest was no lower).  Threads a bulk thread starts inherit its priority (Arrow's
pool threads, started by a checkpoint or a load): a question never hands work
to such a pool (it decodes blocks on its own thread), so none waits on them.

Measured side by side with the setting off (``benchmarks/bench_cluster.py``,
docs/benchmarks.md): one key over 30 days while an ingest job runs, p99 16-27
ms against 40-60 ms.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading

SWITCH_INTERVAL_S = 0.0005  # 0.2 ms measured no better (docs/benchmarks.md)
BULK_ENV = {"IMPRESSIONS_BULK_WORKER": "1"}  # the ingest tasks' runtime environment: workers of their own

_state = threading.local()


def give_way() -> bool:
    """Move the calling thread to ``SCHED_IDLE``, once (it cannot come back: an unprivileged thread may lower
    its priority, never raise it).  True if it is there; False where the system does not allow it (not
    Linux, or a sandbox that refuses), and then the thread runs as before."""
    if getattr(_state, "idle", None) is None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
            _state.idle = True
        except (AttributeError, OSError):
            _state.idle = False
    return _state.idle


def gave_way() -> bool:
    """Whether the calling thread runs at idle priority."""
    try:
        return os.sched_getscheduler(threading.get_native_id()) == os.SCHED_IDLE
    except (AttributeError, OSError):
        return False


def answer_quickly() -> None:
    """This process holds threads that answer beside threads that give way: the interpreter lock goes to a
    waiting thread after ``SWITCH_INTERVAL_S`` (``sys.setswitchinterval``)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def giving_way(cls, keep: frozenset):
    """Actor class ``cls`` as the cluster runs it with questions first: a subclass whose public methods, but
    those named in ``keep`` (its questions), move their thread to idle priority before they run; its
    constructor sets the process's switch interval (``answer_quickly``)."""
    def wrap(f):
        @functools.wraps(f)
        def method(self, *args, **kwargs):
            give_way()
            return f(self, *args, **kwargs)
        return method

    @functools.wraps(cls.__init__)
    def init(self, *args, **kwargs):
        answer_quickly()
        cls.__init__(self, *args, **kwargs)

    body = {"__init__": init, "__qualname__": cls.__qualname__, "__module__": cls.__module__,
            "__doc__": cls.__doc__}
    for klass in reversed(cls.__mro__[:-1]):  # plain functions only: not static or class methods, not properties
        for name, f in vars(klass).items():
            if inspect.isfunction(f) and not name.startswith("_") and name not in keep:
                body[name] = wrap(f)
    return type(cls.__name__, (cls,), body)
