"""Where a cache's missing chunks come from: the layer below the cache, passed in (nbdkit style).

A ``CacheDevice`` knows chunk states, its data file and its journal; it does not know whether a
chunk it lacks comes from the repository or from another cache. It is handed a ``SourceFactory``
and builds its ``ChunkSource`` with its own two callbacks (``store``: write verified chunks into
the data file and mark them present; ``needed``: is this chunk still missing). Two sources exist:

- ``cache/fetcher.py`` ``Fetcher``: a cache of a version fetches from the repository (coalesced,
  batched, read ahead, verified: docs/architecture.md, invariant 6). Chunks read are kept.
- ``cache/overlay.py`` ``BaseSource``: an overlay (a clone) reads from its shared base cache,
  which fetched and verified them. Chunks read are not kept (the device reads them through).

``stats`` is the source's repository counters, ``None`` for a source that never talks to the
repository (an overlay's traffic is its base's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from blockprov.manifest import Manifest

if TYPE_CHECKING:
    from blockprov.cache.fetcher import FetchStats

Data = bytes | memoryview  # verified chunk content (read-only)
StoreFn = Callable[[list[tuple[int, Data]]], Awaitable[None]]
NeededFn = Callable[[int], bool]


class ChunkSource(Protocol):
    manifest: Manifest  # replaced by the device when its base version changes (update, rebase)

    @property
    def stats(self) -> FetchStats | None: ...

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        """Verified content of these chunks."""
        ...

    async def get(self, index: int) -> Data: ...

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        """Return when these chunks were handed to ``store`` (which may have skipped some that
        changed meanwhile: the caller re-checks their state). ``background``: work no client
        waits for (hydration), which must not make a client's fetch wait."""
        ...

    async def idle(self) -> None:
        """Wait until nothing is in flight (quiesce, settle)."""
        ...

    async def close(self) -> None: ...


SourceFactory = Callable[[Manifest, StoreFn, NeededFn], ChunkSource]
