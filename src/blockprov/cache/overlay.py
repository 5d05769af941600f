"""Where an overlay's missing chunks come from: its shared base cache, not the repository.

An *overlay* is a ``CacheDevice`` (cache/device.py) whose metadata names a *base*: a read-only
cache of the same version on the same host, shared by any number of overlays (shareable data
is shared, non-shareable data is copied on write per instance). It is the same
device class as any cache, with the same journal, crash rules and lifecycle; what differs is the
layer below it, passed in as its ``ChunkSource`` (cache/source.py): this ``BaseSource`` instead
of a ``Fetcher``. So a clones agent's stack is repository → base cache → overlay → NBD server,
and the base fetches each chunk from the repository once per host however many instances read it.

The overlay holds only chunks an instance wrote (and the chunks a partial write had to copy
first); everything else is read from the base. Reads of the base are not copied into the overlay
(the device reads them through, see ``CacheDevice._read_through``): its data file stays as small
as what the instance changed, and a reset (dropping the modified chunks) is instant.

``get_many`` reads chunks through the base device (verified there when it fetched them,
docs/architecture.md, invariant 6); ``materialize`` copies them into the overlay for a partial
write (copy on write). An overlay opened without its base (a ``reset`` or ``snapshot`` of a
stopped instance, which never read the base) fails such reads with EIO.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from blockprov.cache.source import Data, NeededFn, SourceFactory, StoreFn
from blockprov.device.base import ReadResult, result_bytes
from blockprov.errors import DeviceIOError
from blockprov.manifest import Manifest

if TYPE_CHECKING:
    from blockprov.cache.fetcher import FetchStats


class BaseDevice(Protocol):
    async def read(self, offset: int, length: int) -> ReadResult: ...


class BaseSource:
    """The ``ChunkSource`` of an overlay: its base cache."""

    def __init__(self, manifest: Manifest, base: BaseDevice | None, store: StoreFn, where: str) -> None:
        self.manifest = manifest
        self.base = base
        self._store = store
        self._where = where
        self._busy: set[asyncio.Future[None]] = set()

    @property
    def stats(self) -> FetchStats | None:
        """None: an overlay fetches nothing from the repository (its base does)."""
        return None

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        if self.base is None:
            raise DeviceIOError(msg=f"overlay {self._where} is open without its base cache")
        m = self.manifest
        cs = m.chunk_size
        out: dict[int, Data] = {}
        for i in indices:
            out[i] = result_bytes(await self.base.read(i * cs, m.chunk_length(i)))
        return out

    async def get(self, index: int) -> Data:
        return (await self.get_many([index]))[index]

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        """Copy these chunks from the base into the overlay (before a partial write of them)."""
        got = await self.get_many(indices)
        task = asyncio.ensure_future(self._store(sorted(got.items())))
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)
        await task

    async def idle(self) -> None:
        while self._busy:
            await asyncio.gather(*self._busy, return_exceptions=True)

    async def close(self) -> None:
        await self.idle()


def base_source(base: BaseDevice | None, where: str) -> SourceFactory:
    """The layer below an overlay: its opened base cache (None: opened without it, see above)."""

    def make(manifest: Manifest, store: StoreFn, needed: NeededFn) -> BaseSource:
        return BaseSource(manifest, base, store, where)

    return make
