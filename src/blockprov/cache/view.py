"""What the packages outside the cache may know of its chunk states, read-only.

The bits themselves (cache/maps.py) and the journal records that change them stay inside the
cache: hydration, lifecycle, the in-machine agent and clones ask a ``Chunks`` view (of an open
device: ``CacheDevice.chunks``; of a stopped cache: ``load_state``) and change states only
through the device's steps. Names say what a state means to them, not which bits encode it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blockprov.cache.journal import META_NAME, Loaded, load
from blockprov.cache.maps import HELD, MODIFIED, PRESENT, ZERO, ChunkMap
from blockprov.cache.status import DeviceStatus, cache_status


class Chunks:
    """A read-only view of one cache's chunk states (live: it follows the open device)."""

    __slots__ = ("_map",)

    def __init__(self, cmap: ChunkMap) -> None:
        self._map = cmap

    @property
    def count(self) -> int:
        return self._map.count

    def present(self, i: int) -> bool:
        """The data file holds chunk i's current content."""
        return bool(self._map.flags[i] & PRESENT)

    def modified(self, i: int) -> bool:
        """Chunk i may differ from the base version (written, zeroed, or about to be)."""
        return bool(self._map.flags[i] & MODIFIED)

    def zero(self, i: int) -> bool:
        """Chunk i reads as zeros without the data file (trimmed, or all-zero in the base)."""
        return bool(self._map.flags[i] & ZERO)

    def held(self, i: int) -> bool:
        """A snapshot target may hold chunk i's current content (its next write journals first)."""
        return bool(self._map.flags[i] & HELD)

    def local(self, i: int) -> bool:
        """Chunk i needs nothing from below (present or zero)."""
        return bool(self._map.flags[i] & (PRESENT | ZERO))

    def missing(self, indices: Iterable[int]) -> list[int]:
        """Those of ``indices`` that are not local, in their order."""
        fl = self._map.flags
        return [i for i in indices if not fl[i] & (PRESENT | ZERO)]

    def first_missing(self, start: int = 0) -> int:
        """The first chunk >= start that is not local, or -1."""
        return self._map.first_missing(start)

    def missing_runs(self, a: int = 0, b: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal runs ``[x, y)`` within a..b-1 of chunks that are not local."""
        return self._map.runs_where(PRESENT | ZERO, 0, a, b)

    def modified_chunks(self) -> list[int]:
        return [i for a, b in self._map.runs_where(MODIFIED) for i in range(a, b)]

    def unsynced_chunks(self, target: str) -> list[int]:
        """The chunks snapshot target ``target`` has not received (none for an unknown target)."""
        cmap = self._map
        if target not in cmap.targets:
            return []
        t = cmap.targets.index(target)
        return [i for i in range(cmap.count) if cmap.is_unsynced(t, i)]

    def counts(self) -> dict[str, int]:
        """Chunks in all and by state: total, present, modified, zero, missing."""
        return self._map.counts()


def is_cache(cache_dir: str | os.PathLike[str]) -> bool:
    """``cache_dir`` holds a cache (its metadata file exists; it may still be unreadable)."""
    return (Path(cache_dir) / META_NAME).exists()


@dataclass(frozen=True)
class StoppedCache:
    """A cache directory as its files hold it, replayed in memory: nothing written, no lock taken
    (an agent may be serving it: then this is its last durable state)."""

    path: Path
    loaded: Loaded

    @property
    def image(self) -> str:
        return self.loaded.meta.image

    @property
    def version(self) -> str:
        return self.loaded.meta.version

    @property
    def chunk_size(self) -> int:
        return self.loaded.meta.chunk_size

    @property
    def base_cache(self) -> str | None:
        """The base cache an overlay reads through (None: not an overlay)."""
        return self.loaded.meta.base_cache

    @property
    def repository(self) -> str | None:
        """Where the cache was last attached (a URL, or file://DIR for an embedded repository)."""
        return self.loaded.meta.repository

    @property
    def hydrated(self) -> float | None:
        """When every chunk last became local (hydration's record), if ever."""
        return self.loaded.meta.hydrated

    @property
    def clean(self) -> bool:
        """Its last agent stopped cleanly."""
        return self.loaded.meta.clean

    @property
    def chunks(self) -> Chunks:
        return Chunks(self.loaded.map)

    def status(self) -> DeviceStatus:
        """``status`` of a cache no agent serves (cache/status.py)."""
        m = self.loaded.meta
        return DeviceStatus(cache=cache_status(self.path, m, self.loaded.map, self.loaded.seq, m.totals),
                            clean_shutdown=m.clean)


def load_state(cache_dir: str | os.PathLike[str]) -> StoppedCache:
    """The cache in ``cache_dir`` as its files hold it (CacheError when there is none)."""
    return StoppedCache(Path(cache_dir), load(cache_dir))
