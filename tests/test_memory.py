"""A shard process keeps the memory its questions free, so the next question touches no new page."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from impressions.actors import memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory.free_heap_bytes() is None,
                    reason="glibc's malloc only")
def test_freed_blocks_stay_in_the_heap_for_the_next_question():
    assert memory.keep_freed_memory()
    arrays = [np.ones(1 << 21, np.uint8) for _ in range(40)]  # 80 MB of 2 MB temporaries, then freed
    before = memory.free_heap_bytes()
    del arrays
    kept = memory.free_heap_bytes() - before
    assert kept >= 60 << 20, kept  # by default glibc maps each such block anew and unmaps it when freed
    again = [np.ones(1 << 21, np.uint8) for _ in range(40)]  # the next question's: from the kept memory
    assert memory.free_heap_bytes() <= before + (20 << 20)
    del again


def test_the_collectors_pauses_are_timed_per_generation():
    import gc

    from impressions.actors import pauses

    pauses.watch()
    pauses.watch()  # once a process, however often asked
    assert gc.callbacks.count(pauses._timed) == 1
    before = pauses.stats()
    junk = [[i] for i in range(50_000)]  # objects for a full collection to scan
    gc.collect()
    after = pauses.stats()
    del junk
    assert after["gc_runs"][2] >= before["gc_runs"][2] + 1  # gc.collect() at least (allocating may run one)
    assert after["gc_pause_s"][2] > before["gc_pause_s"][2] and after["gc_longest_ms"][2] > 0
