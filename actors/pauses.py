"""How long the interpreter's cycle collector stops a copy's process.

A collection holds the GIL for as long as it scans: every question thread of
the process waits behind it.  ``watch`` times each one (``gc.callbacks``)
and ``stats`` gives, per generation, how many ran, their total and their
longest pause, for a copy's stats.
"""

from __future__ import annotations

import gc
import time

_runs = [0, 0, 0]
_total_s = [0.0, 0.0, 0.0]
_longest_s = [0.0, 0.0, 0.0]
_began: list[float] = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _began[0] = time.perf_counter()
        return
    took = time.perf_counter() - _began[0]
    g = info.get("generation", 2)
    _runs[g] += 1
    _total_s[g] += took
    _longest_s[g] = max(_longest_s[g], took)


def watch() -> None:
    """Time every collection of this process from now on (once per process)."""
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)


def stats() -> dict:
    return {"gc_runs": list(_runs), "gc_pause_s": [round(x, 4) for x in _total_s],
            "gc_longest_ms": [round(x * 1e3, 2) for x in _longest_s]}
