"""Configuration, storage, bootstrap, ingest jobs, the Python client and the CLI."""

import impressions.sketch  # noqa: F401  first: fits numpy's kernels to this CPU before numpy loads (sketch.simd)
