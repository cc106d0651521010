"""Sketch core: hashing, HyperLogLog registers, the estimator and the time index.

Pure numpy (plus mmh3 for the hash and pyarrow for the state format); no Ray,
no web framework, no storage client.  See ``hll`` for the register layout and
the estimator, ``rows`` for how many sketches are stored column-wise,
``timeindex`` for buckets and the dyadic index, ``store`` for one shard's
state and ``counter`` for the in-process, sharded counter.
"""
