"""The REST API (FastAPI on Ray Serve), thin over the coordinator: ``api.app``."""
