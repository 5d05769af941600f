"""Where an overlay's missing chunks come from: its shared base cache, not the repository.

An *overlay* is a ``CacheDevice`` (cache/device.py) whose metadata names a *base*: a read-only
cache of the same version on the same host, shared by any number of overlays (shareable data
is shared, non-shareable data is copied on write per instance). It is the same device class as
any cache, with the same journal, crash rules and lifecycle; what differs is the layer below it,
built by its caller (cache/source.py): ``base_source`` instead of the repository. So a clones
agent's stack is repository → base cache → overlay → NBD server, and the base fetches each chunk
from the repository once per host however many instances read it.

The overlay holds only chunks an instance wrote (and the chunks a partial write had to copy
first); everything else is read from the base. ``read`` answers with the base's own reply: the
pieces of the base's data file it holds (sent with sendfile by the NBD server, never copied
through Python), or what the base fetched. Nothing read is kept in the overlay: its data file
stays as small as what the instance changed, and a reset (dropping the modified chunks) is
instant.

``get_many`` reads chunks through the base device (verified there when it fetched them,
invariant 6); ``materialize`` copies them into the overlay for a partial write (copy on write).
An overlay opened without its base (a ``reset`` or ``snapshot`` of a stopped instance, which never
read the base) fails such reads with EIO.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockprov.cache.fetcher import FetchStats
from blockprov.cache.source import CacheSide, Data, Ranges, Release, SourceFactory, StoreFn
from blockprov.cache.status import maps_of
from blockprov.device.base import ReadResult, result_bytes
from blockprov.errors import CacheError, CacheMismatch, DeviceIOError
from blockprov.manifest import Manifest

if TYPE_CHECKING:
    from blockprov.cache.device import CacheDevice
    from blockprov.cache.maps import ChunkMap


class BaseSource:
    """The bottom layer of an overlay: its base cache (``base`` None: opened without it)."""

    def __init__(self, manifest: Manifest, base: CacheDevice | None, side: CacheSide) -> None:
        self.manifest = manifest
        self.base = base
        self._store: StoreFn = side.store
        self._where = side.where
        self._base_cache = side.base_cache
        self._busy: set[asyncio.Future[None]] = set()

    @property
    def stats(self) -> FetchStats | None:
        """None: an overlay fetches nothing from the repository (its base does)."""
        return None

    def _open_base(self) -> CacheDevice:
        if self.base is None:
            raise DeviceIOError(msg=f"overlay {self._where} is open without its base cache")
        return self.base

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        base = self._open_base()
        m = self.manifest
        cs = m.chunk_size
        out: dict[int, Data] = {}
        for i in indices:
            out[i] = result_bytes(await base.read(i * cs, m.chunk_length(i)))
        return out

    async def read(self, ranges: Ranges) -> list[ReadResult]:
        """The base's replies as they are (zero copy: pieces of its data file)."""
        base = self.base
        if base is None:
            raise DeviceIOError(msg=f"overlay {self._where} is open without its base cache")
        if len(ranges) == 1:  # an overlay's every read of what it did not write: no loop
            off, n = ranges[0]
            return [await base.read(off, n)]
        out = []
        for off, n in ranges:
            out.append(await base.read(off, n))
        return out

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        """Copy these chunks from the base into the overlay (before a partial write of them)."""
        got = await self.get_many(indices)
        task = asyncio.ensure_future(self._store(sorted(got.items())))
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)
        await task

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        return None  # the base keeps its content

    def maps_below(self) -> list[ChunkMap]:
        """The base's map and those under it; read from their files when opened without it."""
        if self.base is None:
            return maps_of(self._base_cache)
        return [self.base.chunk_map, *self.base.layers_below()]

    def status(self) -> dict[str, Any]:
        return {}  # no figures of its own: the base's traffic is the base's

    async def idle(self) -> None:
        while self._busy:
            await asyncio.gather(*self._busy, return_exceptions=True)

    async def close(self) -> None:
        await self.idle()


def base_source(base: CacheDevice | None) -> SourceFactory:
    """The layer below an overlay: its opened base cache (None: opened without it, see above).
    Refuses a cache that is no overlay, and a base that is not the one the overlay names."""

    def make(manifest: Manifest, side: CacheSide) -> BaseSource:
        if side.base_cache is None:
            raise CacheError(f"{side.where} is not an overlay: it has no base cache to read through")
        if base is not None and (base.manifest.id != manifest.id
                                 or str(base.cache_dir.resolve()) != side.base_cache):
            raise CacheMismatch(path=side.where, held=f"an overlay of {side.base_cache}",
                                wanted=f"an overlay of {base.cache_dir} ({base.manifest.id})")
        return BaseSource(manifest, base, side)

    return make


def overlay_path(base_cache: str | Path) -> str:
    """How an overlay's metadata names its base cache (resolved)."""
    return str(Path(base_cache).resolve())
