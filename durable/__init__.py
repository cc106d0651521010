"""Durable state on object storage: objects, a shard's log and checkpoints, the cluster's layout.

Below the actors and above the sketch core: ``objects`` reads and writes
whole objects on any ``pyarrow.fs`` URI, ``journal`` is one shard's ingest
log and checkpoints, ``layout`` the record of how the cluster is laid out
and where each shard's objects live.
"""

import impressions.sketch  # noqa: F401  first: fits numpy's kernels to this CPU before numpy loads (sketch.simd)
