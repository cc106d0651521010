"""What a shard process does with the memory its questions free (glibc's malloc).

A 100-key question over 30 days allocates and frees tens of MB of numpy
temporaries.  By default glibc gives freed memory back to the kernel (the top
of its heap past a threshold it moves at run time, blocks above another
threshold mapped afresh each time, and a thread's own arena unmapped
whenever it empties), so the next question touches new pages: on this
machine 1,600-4,000 page faults a question, 4-11 ms of kernel time of its
26-30 ms, and at times 30-40 us a fault (60-90 ms questions).
``keep_freed_memory`` asks malloc for one arena for every thread, to keep up
to ``KEEP_BYTES`` it frees, and to serve blocks up to its largest threshold
from the heap: the same question then faults no page, 22-23 ms.  The price
is the bound: a process keeps up to that much freed memory for its next
question rather than return it.

A shard or reader on Ray starts with the same settings in its environment
(``PROCESS_ENV``, glibc's tunables, which ``cluster.bootstrap`` gives each
through Ray's ``runtime_env``), so they hold from its first allocation; set
only once the process runs (``mallopt``), a 100-key question over 30 days
still faulted 600-1,300 pages now and then (p99 59-97 ms against 41-46 in
probes and runs side by side).  In process (``LocalRuntime``, tests) the
shard calls ``keep_freed_memory`` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks above it are fresh mappings whatever is asked
KEEP_BYTES = 256 << 20  # freed memory a process keeps at most
PROCESS_ENV = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.trim_threshold={KEEP_BYTES}"
                                 f":glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"}  # the same, from the start


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """One arena for every thread, up to ``keep_bytes`` of freed heap kept, blocks up to
    ``MMAP_THRESHOLD`` from the heap; whether malloc took all three (False on a C library without
    glibc's ``mallopt``).  A shard or reader calls it as it starts (its question threads take an arena
    when they first allocate)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([bool(mallopt(M_ARENA_MAX, 1)), bool(mallopt(M_TRIM_THRESHOLD, int(keep_bytes))),
                bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))])


def free_heap_bytes() -> int | None:
    """Bytes of freed memory malloc holds (``mallinfo2``), or None where it cannot say."""
    libc = _libc()
    info = getattr(libc, "mallinfo2", None)
    if info is None:
        return None
    info.argtypes, info.restype = [], _MallInfo2
    return int(info().fordblks)
