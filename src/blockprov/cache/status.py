"""A cache's status, built in one place.

``blockprov status`` shows a cache whether an agent serves it or not: the agent answers with
``CacheDevice.status`` (``DeviceStatus``: this plus its run's figures), a stopped cache is read
from meta and journal (``StoppedCache.status``, cache/view.py). Both start from ``cache_status``
so their fields and meanings cannot drift apart. Typed (results.py): a dict only at the edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blockprov.cache.fetcher import FetchFigures
from blockprov.cache.journal import CacheMeta, load
from blockprov.cache.maps import MODIFIED, ChunkMap
from blockprov.cache.opening import DATA_NAME
from blockprov.errors import CacheError
from blockprov.results import inline, omit_none

TOTALS = ("bytes_fetched", "wire_bytes", "chunks_fetched")  # fetch counters kept over every agent run


@dataclass(frozen=True)
class Totals:
    """Fetch counters over every agent run on a cache (figures, never used for correctness)."""

    bytes_fetched: int = 0
    wire_bytes: int = 0
    chunks_fetched: int = 0


@dataclass(frozen=True)
class TargetState:
    unsynced_chunks: int = 0  # modified chunks the target has not received
    last_snapshot: str | None = None  # the version its last acknowledged snapshot made


@dataclass(frozen=True)
class CacheStatus:
    """What a cache holds, served or not."""

    image: str
    version: str
    size: int
    chunk_size: int
    cache_dir: str
    data_path: str
    chunks_total: int
    chunks_present: int
    chunks_modified: int
    chunks_zero: int
    chunks_missing: int
    journal_seq: int
    base_cache: str | None = None  # an overlay's base
    totals: Totals = field(default_factory=Totals)
    targets: dict[str, TargetState] = field(default_factory=dict)
    hydrated: float | None = None  # when every chunk last became local
    repository: str | None = None  # where it was last attached
    # chunks neither it nor a base below holds (agents of older versions do not say)
    chunks_from_repository: int | None = omit_none()


@dataclass(frozen=True)
class DeviceStatus:
    """A cache's status: what it holds, and, served, this run's figures and its layers' (``None``
    and left out for a stopped cache, which has ``clean_shutdown`` instead)."""

    cache: CacheStatus = inline()
    verified_chunks: int | None = omit_none()  # re-hashed after an unclean stop, when this run opened it
    dropped_chunks: int | None = omit_none()  # of which did not match
    fetch: FetchFigures | None = inline(default=None)  # this run's repository counters
    clean_shutdown: bool | None = omit_none()  # a stopped cache: its last agent stopped cleanly
    # the golden reserve's (a PC's disk: cache/reserve.py)
    reserve_slots: int | None = omit_none()
    reserve_used: int | None = omit_none()
    reserve_kept: int | None = omit_none()
    reserve_full: int | None = omit_none()


def targets_of(meta: CacheMeta, cmap: ChunkMap) -> dict[str, TargetState]:
    """Per snapshot target: its unsynced chunks (modified ones only: a chunk reset or updated away
    has nothing left to send) and its last snapshot."""
    modified = list(cmap.runs_where(MODIFIED))
    out = {}
    for t, name in enumerate(cmap.targets):
        n = sum(1 for a, b in modified for i in range(a, b) if cmap.is_unsynced(t, i))
        out[name] = TargetState(unsynced_chunks=n, last_snapshot=meta.snapshots.get(name))
    return out


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
                 totals: Mapping[str, int], below: Sequence[ChunkMap] | None = None) -> CacheStatus:
    """What the cache in ``cache_dir`` holds: version, chunk counts by state, journal position,
    fetch totals over every agent run, lifecycle state, and how many chunks still need the
    repository (``below``: the maps of the base caches under an overlay; None reads them from disk)."""
    counts = cmap.counts()
    layers = maps_of(meta.base_cache) if below is None else below
    return CacheStatus(
        image=meta.image, version=meta.version, size=meta.size, chunk_size=meta.chunk_size,
        cache_dir=str(cache_dir), data_path=meta.data_path or str(cache_dir / DATA_NAME),
        chunks_total=counts["total"], chunks_present=counts["present"], chunks_modified=counts["modified"],
        chunks_zero=counts["zero"], chunks_missing=counts["missing"],
        chunks_from_repository=needs_repository(cmap, layers), journal_seq=seq, base_cache=meta.base_cache,
        totals=Totals(**{k: int(totals.get(k, 0)) for k in TOTALS}), targets=targets_of(meta, cmap),
        hydrated=meta.hydrated, repository=meta.repository)
