"""The agent: what runs where a disk is used.

``maps`` (per-chunk state, pure), ``journal`` (that state on disk: checkpointed metadata plus an
append-only journal), ``fetcher`` (missing chunks from a repository) and, in device/cache.py,
the ``CacheDevice`` that combines them into the lazy, crash-safe cache an NBD export serves.
"""
