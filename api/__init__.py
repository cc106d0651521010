"""The REST API (FastAPI on Ray Serve), thin over the coordinator: ``api.app``."""

import impressions.sketch  # noqa: F401  first: fits numpy's kernels to this CPU before numpy loads (sketch.simd)
