"""Where an overlay's missing chunks come from: its shared base cache, not the repository.

An *overlay* is a cache (device/cache.py) whose metadata names a *base*: a read-only cache of the
same version on the same host, shared by any number of overlays (seed 004: shareable data is
shared, non-shareable data is copied on write per instance). The overlay holds only chunks an
instance wrote (and the chunks a partial write had to copy first); everything else is read from
the base, which fetches each chunk from the repository once per host however many instances
read it. Reads of the base are not copied into the overlay: its data file stays as small as
what the instance changed, and a reset (dropping the modified chunks) is instant.

``BaseSource`` stands in for the cache's ``Fetcher``: ``get_many`` reads chunks through the base
device (verified there when it fetched them, invariant 6), ``materialize`` copies them into the
overlay for a partial write (copy on write). An overlay opened without its base (a ``reset`` or
``snapshot`` of a stopped instance, which never read the base) fails such reads with EIO.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from blockprov.device.base import ReadResult, result_bytes
from blockprov.errors import DeviceIOError
from blockprov.manifest import Manifest

Data = bytes | memoryview
StoreFn = Callable[[list[tuple[int, Data]]], Awaitable[None]]


class BaseDevice(Protocol):
    async def read(self, offset: int, length: int) -> ReadResult: ...


class SourceStats:
    """An overlay fetches nothing from the repository: its counters stay at zero."""

    bytes_fetched = 0
    wire_bytes = 0
    chunks_fetched = 0

    def to_dict(self) -> dict[str, object]:
        return {"bytes_fetched": 0, "wire_bytes": 0, "chunks_fetched": 0, "batches": 0, "failed_batches": 0,
                "corrupt_chunks": 0, "readahead_chunks": 0,
                "fetch_latency_ms": {"p50": None, "p90": None, "p99": None}}


class BaseSource:
    def __init__(self, manifest: Manifest, base: BaseDevice | None, store: StoreFn, where: str) -> None:
        self.manifest = manifest
        self.base = base
        self._store = store
        self._where = where
        self._busy: set[asyncio.Future[None]] = set()
        self.stats = SourceStats()

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

    async def materialize(self, indices: Sequence[int]) -> None:
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
