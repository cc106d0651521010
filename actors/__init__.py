"""The cluster's actors, as plain classes (Ray wraps them in ``cluster.bootstrap``).

``ShardActor`` owns one register range of every key's sketches; the
``Coordinator`` owns the shard map, fans queries out and merges answers; a
``Sender`` cuts batches by shard and sends them.  They reach one another
through a runtime (``runtime``): Ray's on a cluster, ``LocalRuntime`` in
one process.
"""

import impressions.sketch  # noqa: F401  first: fits numpy's kernels to this CPU before numpy loads (sketch.simd)
