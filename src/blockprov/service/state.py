"""What the routes share: one ``Service`` per app, kept in ``app.state.service``.

Why one object and not closures: each router module (routes/) defines its handlers at import time,
so they reach the repository, the thread pool and the counters through the request
(``Service.of(request)``: a few attribute reads and no dependency to resolve, which matters on the
chunk path). Tests build many apps in one process; each has its own ``Service``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from starlette.applications import Starlette
from starlette.requests import Request

from blockprov.catalog.sites import traffic
from blockprov.catalog.tokens import TokenStore
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.longpoll import ReadySet, Wakeup
from blockprov.service.metrics import ServiceMetrics
from blockprov.service.rawview import ManifestCache, RawView
from blockprov.store.base import ChunkStore
from blockprov.store.cached import CachedChunkStore

T = TypeVar("T")


class Service:
    """The repository being served and the machinery around it, built once by ``create_app``."""

    def __init__(self, repo: LocalRepository, workers: int) -> None:
        self.repo = repo
        self.store: ChunkStore = repo.store
        self.workers = workers
        # Blocking work (SQLite, file reads, hashing, zstd) runs here, never on the event loop.
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="bp-http")
        self.manifests = ManifestCache(repo)
        self.raw = RawView(repo, self.manifests, self.pool)
        self.wakeup = Wakeup()
        self.ready = ReadySet(repo.registry, self.run)
        self.metrics = ServiceMetrics()
        manifests = self.manifests
        self.metrics.manifest_cache = lambda: (manifests.hits, manifests.misses)
        self.metrics.site_traffic = lambda: traffic(repo.agents())
        if isinstance(self.store, CachedChunkStore):
            cache = self.store
            self.metrics.chunk_cache = lambda: (cache.hits, cache.misses, cache.joined, cache.cached_bytes())
        self.registry = self.metrics.registry()
        self.tokens: TokenStore | None = None  # set by create_app: what the access middleware checks
        # starts the preparation of a version's boot profile (vm/prepare.py, given by cli/serve.py); None: off
        self.prepare: Callable[[str, str], None] | None = None
        # sees the ids of every chunk fetch (a profile preparation records the order a boot read them)
        self.on_fetch: Callable[[list[bytes]], None] | None = None
        self.access = AccessPolicy()

    @staticmethod
    def of(request: Request) -> Service:
        return cast(Service, request.app.state.service)

    @staticmethod
    def of_app(app: Starlette) -> Service:
        return cast(Service, app.state.service)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool, awaited."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
