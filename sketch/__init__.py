"""Sketch core: hashing, HyperLogLog registers, the estimator and the time index.

Pure numpy (plus mmh3 for the hash and pyarrow for the state format); no Ray,
no web framework, no storage client.  ``hll`` holds the register layout and
the estimator, ``rows`` how many sketches are stored column-wise,
``timeindex`` buckets and the dyadic index; one shard's store is ``store``
(a facade over ``memtable``, ``tiers``, ``rollup`` and ``cover``), its
Arrow state ``arrowio``, re-sharding ``reshard``; ``events`` and ``formats``
validate and parse input; ``counter`` is the whole system in one process.
"""

from . import simd

simd.fit_numpy()  # before anything of ours loads numpy (see ``simd``)
