"""Questions first: the threads that ingest and keep up give way to the threads that answer.

Linux schedules threads, not processes, and a thread may lower its own
priority (never raise it again: an unprivileged thread cannot).  With
``ClusterConfig.questions_first`` (the default) every thread whose work is
bulk lowers itself before it works, so a question's thread, when it wakes,
gets the core ahead of it:

* in a process that also answers questions (a writer, a reader, a REST
  replica), a bulk thread goes to nice ``BULK_NICE`` (``give_way``): a
  writer's and a reader's calls but their questions (``READ_METHODS``:
  applies, log writes, rollups, sealing, checkpoints, following the writer's
  log, switching to a checkpoint; ``giving_way``) and a replica's threads
  for ingest bodies.  Such a thread keeps a fair share of the core, smaller
  than a question's, because it may hold what a question of its process
  waits for: Python's interpreter lock, which only a running thread lets go
  of, or a reader's lock.  In the idle class (``SCHED_IDLE``) it would get
  next to nothing of a core busy with questions elsewhere, and the question
  waiting in its process would wait with it: 1.4 s measured, where at nice
  19 against Ray's 15 the wait stays within milliseconds
  (``tests/test_priority.py``);
* a process that does bulk work only, an ingest task's worker, goes whole to
  ``SCHED_IDLE`` (``give_way_for_good``): no question waits on anything it
  holds.  Those workers are a pool of their own (a runtime environment of
  their own, ``BULK_ENV``), so no other task lands on a process that gave
  way.

The threads that answer (a writer's and a reader's reading threads, a REST
replica's event loop), Ray's own threads, the coordinator and the drivers
keep their priority.  Writers and readers also hand the interpreter lock to a
waiting thread after ``SWITCH_INTERVAL_S`` rather than Python's 5 ms (one
thread alone is never interrupted: the interval matters only while two want
the lock); a REST replica keeps 5 ms (at 0.5 ms its p99 under ingest was no
lower).  Threads a bulk thread starts inherit its priority (Arrow's pool
threads, started by a checkpoint or a load): a question hands no work to such
a pool (blocks are decoded on its own thread, and the log it reads for its
asker's writes with ``use_threads=False``).

Measured side by side with the setting off: ``benchmarks/bench_cluster.py``
and ``benchmarks/bench_api.py``, docs/benchmarks.md and docs/design.md
(section 7).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading

BULK_NICE = 19  # the lowest; Ray starts its workers at 15: a bulk thread weighs 15 against a question's 36
SWITCH_INTERVAL_S = 0.0005  # 0.2 ms measured no better (docs/benchmarks.md)
BULK_ENV = {"IMPRESSIONS_BULK_WORKER": "1"}  # the ingest tasks' runtime environment: workers of their own

_state = threading.local()


def _lower(how: str, lower) -> bool:
    """Lower the calling thread with ``lower(tid)``, once per thread and ``how`` (it cannot come back): True if
    it is there; False where the system does not allow it, and then the thread runs as before."""
    done = getattr(_state, how, None)
    if done is None:
        try:
            lower(threading.get_native_id())
            done = True
        except (AttributeError, OSError):
            done = False
        setattr(_state, how, done)
    return done


def give_way() -> bool:
    """Lower the calling thread to nice ``BULK_NICE`` (on Linux, this thread only)."""
    return _lower("nice", lambda tid: os.setpriority(os.PRIO_PROCESS, tid, BULK_NICE))


def give_way_for_good() -> bool:
    """Move the calling thread to ``SCHED_IDLE``: for a process whose every thread does bulk work (an ingest
    task's), where nothing a question waits for is ever held."""
    return _lower("idle", lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0)))


def gave_way() -> bool:
    """Whether the calling thread runs below the questions: at ``BULK_NICE`` or in the idle class."""
    tid = threading.get_native_id()
    try:
        return os.getpriority(os.PRIO_PROCESS, tid) >= BULK_NICE or os.sched_getscheduler(tid) == os.SCHED_IDLE
    except (AttributeError, OSError):
        return False


def answer_quickly() -> None:
    """This process holds threads that answer beside threads that give way: the interpreter lock goes to a
    waiting thread after ``SWITCH_INTERVAL_S`` (``sys.setswitchinterval``)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def giving_way(cls, keep: frozenset):
    """Actor class ``cls`` as the cluster runs it with questions first: a subclass whose public methods, but
    those named in ``keep`` (its questions), lower their thread (``give_way``) before they run; its
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
