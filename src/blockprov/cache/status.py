"""A cache's status dict, built in one place.

``blockprov status`` shows a cache whether an agent serves it or not: the agent answers with
``CacheDevice.status`` (this plus its run's figures), a stopped cache is read from meta and
journal (``offline_status`` in agent/agent.py). Both start from ``cache_status`` so their keys and meanings
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blockprov.cache.journal import CacheMeta, load
from blockprov.cache.maps import MODIFIED, ChunkMap
from blockprov.cache.opening import DATA_NAME
from blockprov.errors import CacheError

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


def maps_of(base_cache: str | None) -> list[ChunkMap]:
    """The chunk maps of the base cache ``base_cache`` and the ones under it as their files hold
    them (nothing written), for an overlay opened without them. A base that is gone or unreadable
    ends the list: what it held is then counted as needing the repository."""
    out: list[ChunkMap] = []
    seen: set[str] = set()
    below = base_cache
    while below is not None and below not in seen:
        seen.add(below)
        try:
            loaded = load(below)
        except CacheError:
            break
        out.append(loaded.map)
        below = loaded.meta.base_cache
    return out


def needs_repository(cmap: ChunkMap, below: Sequence[ChunkMap] = (), a: int = 0, b: int | None = None) -> int:
    """How many chunks in a..b-1 neither this cache nor any base below it holds: reading one needs
    the repository, so it fails with EIO while the repository is unreachable."""
    bits = cmap.missing_bits(a, b)
    for m in below:
        if not bits:
            break
        bits &= m.missing_bits(a, b)
    return bits.bit_count()


def cache_status(cache_dir: Path, meta: CacheMeta, cmap: ChunkMap, seq: int,
                 totals: Mapping[str, int], below: Sequence[ChunkMap] | None = None) -> dict[str, Any]:
    """What the cache in ``cache_dir`` holds: version, chunk counts by state, journal position,
    fetch totals over every agent run, lifecycle state, and how many chunks still need the
    repository (``below``: the maps of the base caches under an overlay; None reads them from disk)."""
    counts = cmap.counts()
    layers = maps_of(meta.base_cache) if below is None else below
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
        "chunks_from_repository": needs_repository(cmap, layers),
        "journal_seq": seq,
        "base_cache": meta.base_cache,
        "totals": {k: int(totals.get(k, 0)) for k in TOTALS},
        **instance_status(meta, cmap),
    }
