"""What a shard process does with the memory its questions free (glibc's malloc).

A 100-key question over 30 days allocates and frees tens of MB of numpy
temporaries.  By default glibc gives freed memory at the top of its heap back
to the kernel, and serves blocks above a threshold it moves at run time from
fresh mappings, so the next question touches new pages: on this machine
2,000-4,000 page faults a question, 4-11 ms of kernel time of its 26-30 ms,
and at times 30-40 us a fault (60-90 ms questions).  ``keep_freed_memory``
asks malloc to keep what it frees, up to a bound, and to serve blocks up to
its largest threshold from the heap: the same question then faults no page,
22-23 ms.  The price is the bound: a process keeps up to that much freed
memory for its next question rather than return it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks above it are fresh mappings whatever is asked
KEEP_BYTES = 256 << 20  # freed memory a process keeps at most
# the same from the start of a shard process (``cluster.bootstrap`` gives it to every shard and reader), and one
# arena for all its threads: a question's thread allocated from an arena of its own, whose heaps glibc unmaps
# whenever they empty, whatever it keeps elsewhere (a reader still took 1,600 page faults a 100-key question,
# 60 ms of kernel time at worst; with one arena, none)
PROCESS_ENV = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.trim_threshold={KEEP_BYTES}"
                                 f":glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Keep up to ``keep_bytes`` of freed heap, and serve blocks up to ``MMAP_THRESHOLD`` from the heap;
    whether malloc took both (False on a C library without glibc's ``mallopt``)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, int(keep_bytes))) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def free_heap_bytes() -> int | None:
    """Bytes of freed memory malloc holds (``mallinfo2``), or None where it cannot say."""
    libc = _libc()
    info = getattr(libc, "mallinfo2", None)
    if info is None:
        return None
    info.argtypes, info.restype = [], _MallInfo2
    return int(info().fordblks)
