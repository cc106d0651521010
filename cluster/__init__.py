"""Configuration, storage, bootstrap, ingest jobs, the Python client and the CLI."""
