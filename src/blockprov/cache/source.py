"""Where a cache's missing chunks come from: a stack of layers below the cache, built by its caller.

nbdkit is the model: a filter sees only the layer below it (``next``), and whoever builds the
server builds the chain. Here the caller of ``CacheDevice.open`` composes a ``SourceFactory``
from layers, and the device instantiates it once with what it offers the layers (``CacheSide``:
store verified chunks into the data file, is this chunk still missing, read a chunk as the data
file holds it, is a chunk's base content in the data file now). The device knows chunk states,
its data file and its journal; it never knows which layers stand below it.

The layers today, each in its own module:

- ``cache/fetcher.py`` ``repository_source``: the repository (coalesced, batched, read ahead,
  verified: invariant 6). A bottom layer; what it reads is kept (handed to ``store``).
- ``cache/overlay.py`` ``base_source``: an overlay's base cache, which fetched and verified its
  chunks. A bottom layer; what it reads is not kept: ``read`` answers with pieces of the base's
  data file (sent with sendfile, never copied through Python).
- ``cache/reserve.py`` ``Reserve.source``: the golden reserve of a PC's disk, a filter over
  another layer: verified copies kept before a chunk's first overwrite, served back after a reset.

A new layer (chunks from peers on the LAN, a site cache: issue 26) is a ``Filter`` over the
layer below: it overrides what it changes (typically ``get_many``/``materialize``: try its own
chunks, verify them by digest, ``store`` them, ask ``below`` for the rest) and passes everything
else down. Stacks for the three kinds of cache in use::

    PC's disk:   reserve ─► [peers ─► site cache ─►] repository
    host agent:  [peers ─► site cache ─►] repository
    overlay:     base cache (its own stack below it)

``Data`` is verified chunk content, read-only. ``stats`` is the repository's counters (``None``
for a stack that never talks to the repository: an overlay's traffic is its base's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from blockprov.align import split
from blockprov.device.base import ReadResult
from blockprov.manifest import Manifest

if TYPE_CHECKING:
    from blockprov.cache.fetcher import FetchStats
    from blockprov.cache.maps import ChunkMap

Data = bytes | memoryview  # verified chunk content (read-only)
StoreFn = Callable[[list[tuple[int, Data]]], Awaitable[None]]
NeededFn = Callable[[int], bool]
Release = Callable[[], None]
Ranges = Sequence[tuple[int, int]]  # (offset, length) byte ranges, in order


@dataclass(frozen=True)
class CacheSide:
    """What the cache offers the layers below it (all on the event loop but ``read_local``)."""

    where: str  # the cache directory, for messages
    base_cache: str | None  # the base cache an overlay's metadata names (None: not an overlay)
    store: StoreFn  # write verified chunks into the data file and mark them present (skips changed ones)
    needed: NeededFn  # chunk i is still missing (read-ahead asks before fetching it)
    read_local: Callable[[int], bytes]  # chunk i as the data file holds it (blocking: a worker thread)
    at_home: Callable[[int], bool]  # the data file holds chunk i's base content now (present, unmodified)


class ChunkSource(Protocol):
    manifest: Manifest  # replaced by the device when its base version changes (update, rebase)

    @property
    def stats(self) -> FetchStats | None: ...

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        """Verified content of these chunks."""
        ...

    async def read(self, ranges: Ranges) -> list[ReadResult]:
        """These byte ranges, none of which the cache holds, one result per range. One call per
        request, so a layer that fetches sees the request's chunks together (one batch, one
        read-ahead decision). A layer that reads through (an overlay's base) may answer with
        pieces of its own data file."""
        ...

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        """Return when these chunks were handed to ``store`` (which may have skipped some that
        changed meanwhile: the caller re-checks their state). ``background``: work no client
        waits for (hydration), which must not make a client's fetch wait."""
        ...

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        """The data file's base content of these chunks is about to change (their first write or
        zeroing). A layer that keeps base content (the golden reserve) copies it durably before it
        returns; the device calls the release it returns once their records are journaled."""
        ...

    def maps_below(self) -> list[ChunkMap]:
        """The chunk maps of the local caches below (an overlay's bases, top down): what they hold
        needs no repository (``status``'s ``chunks_from_repository``)."""
        ...

    def status(self) -> dict[str, Any]:
        """The stack's figures for ``status`` beyond the repository's counters (``stats``, which
        the device shows for every stack): each layer's own and the ones below."""
        ...

    async def idle(self) -> None:
        """Wait until nothing is in flight (quiesce, settle)."""
        ...

    async def close(self) -> None: ...


SourceFactory = Callable[[Manifest, CacheSide], ChunkSource]


async def read_chunks(source: ChunkSource, ranges: Ranges) -> list[ReadResult]:
    """``ChunkSource.read`` for a layer that reads whole chunks: one ``get_many`` of every chunk
    the ranges touch, then views of the verified data (no copy)."""
    cs = source.manifest.chunk_size
    need = sorted({p.chunk for off, n in ranges for p in split(off, n, cs)})
    got = await source.get_many(need)
    out: list[ReadResult] = []
    for off, n in ranges:
        out.append([memoryview(got[p.chunk])[p.start:p.start + p.length] for p in split(off, n, cs)])
    return out


class Filter:
    """A layer over another (nbdkit's filter): everything it does not override goes to ``below``."""

    def __init__(self, below: ChunkSource) -> None:
        self.below = below

    @property
    def manifest(self) -> Manifest:
        return self.below.manifest

    @manifest.setter
    def manifest(self, m: Manifest) -> None:
        self.below.manifest = m

    @property
    def stats(self) -> FetchStats | None:
        return self.below.stats

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        return await self.below.get_many(indices)

    async def read(self, ranges: Ranges) -> list[ReadResult]:
        return await self.below.read(ranges)

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        await self.below.materialize(indices, background=background)

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        return await self.below.before_overwrite(chunks)

    def maps_below(self) -> list[ChunkMap]:
        return self.below.maps_below()

    def status(self) -> dict[str, Any]:
        return self.below.status()

    async def idle(self) -> None:
        await self.below.idle()

    async def close(self) -> None:
        await self.below.close()
