"""The cluster's actors, as plain classes (Ray wraps them in ``cluster.bootstrap``).

``ShardActor`` owns one register range of every key's sketches; the
``Coordinator`` owns the shard map, fans queries out and combines answers.
"""
