"""A cache's status dict, built in one place.

``blockprov status`` shows a cache whether an agent serves it or not: the agent answers with
``CacheDevice.status`` (this plus its run's figures), a stopped cache is read from meta and
journal (``offline_status`` in agent/agent.py). Both start from ``cache_status`` so their keys and meanings
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blockprov.cache.journal import CacheMeta
from blockprov.cache.maps import MODIFIED, ChunkMap
from blockprov.cache.opening import DATA_NAME

TOTALS = ("bytes_fetched", "wire_bytes", "chunks_fetched")  # fetch counters kept over every agent run


def instance_status(meta: CacheMeta, cmap: ChunkMap) -> dict[str, Any]:
    """The lifecycle part of ``status``: per-target unsynced chunks (modified ones only: a chunk
    reset or updated away has nothing left to send), last snapshots, hydration."""
    modified = list(cmap.runs_where(MODIFIED))
    targets = {}
    for t, name in enumerate(cmap.targets):
        n = sum(1 for a, b in modified for i in range(a, b) if cmap.is_unsynced(t, i))
        targets[name] = {"unsynced_chunks": n, "last_snapshot": meta.snapshots.get(name)}
    return {"targets": targets, "hydrated": meta.hydrated, "repository": meta.repository}


def cache_status(cache_dir: Path, meta: CacheMeta, cmap: ChunkMap, seq: int,
                 totals: Mapping[str, int]) -> dict[str, Any]:
    """What the cache in ``cache_dir`` holds: version, chunk counts by state, journal position,
    fetch totals over every agent run, lifecycle state."""
    counts = cmap.counts()
    return {
        "image": meta.image,
        "version": meta.version,
        "size": meta.size,
        "chunk_size": meta.chunk_size,
        "cache_dir": str(cache_dir),
        "data_path": meta.data_path or str(cache_dir / DATA_NAME),
        "chunks_total": counts["total"],
        "chunks_present": counts["present"],
        "chunks_modified": counts["modified"],
        "chunks_zero": counts["zero"],
        "chunks_missing": counts["missing"],
        "journal_seq": seq,
        "base_cache": meta.base_cache,
        "totals": {k: int(totals.get(k, 0)) for k in TOTALS},
        **instance_status(meta, cmap),
    }
