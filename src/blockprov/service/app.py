"""The repository's HTTP API (``blockprov serve``): one embedded repository, exposed to agents and tools.

Where things are, and why they are there:

* **Routes** live in routes/, one ``APIRouter`` per area (images and tags, chunks, boot and hosts,
  profiles, agents, operations). They raise ``blockprov.errors`` classes and never build an error
  answer themselves.
* **What they share** (the repository, the thread pool, caches, counters, long-poll wake-ups) is one
  ``Service`` object (state.py) kept in ``app.state``, so a handler is a plain module-level function.
* **Errors are mapped once** (edge.py): a ``BlockprovError`` becomes its ``http_status`` with
  ``{"error": ClassName, "message": …, "details": {…}}`` so ``repo/remote.py`` can raise the very
  same class on the other side.
* **Requests are bounded** (bounds.py: ``Guard`` and the headers' protocol): each route's body by
  what the route declares (413 before a byte over it is read), every body in time (408) and all of
  them together in bytes held (503).
* Blocking work (SQLite, file reads, hashing, zstd) runs on one thread pool, never on the loop.
* **Access control and metrics are middlewares** (access.py, metrics.py), outside the routes:
  outermost ``Measure`` counts every answer (a 401, a 413 and a 500 too), then ``Guard``, then
  ``Access`` refuses a request before its body is read. Innermost, ``LeanChunkPath``
  (routes/chunks.py) answers the agents' chunk reads without FastAPI's per-request work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from blockprov import __version__
from blockprov.catalog.tokens import TokenStore
from blockprov.repo.local import LocalRepository
from blockprov.service.access import Access, AccessPolicy, annotate_openapi
from blockprov.service.bounds import IN_FLIGHT, MAX_BODY, REQUEST_TIMEOUT, Guard
from blockprov.service.edge import add_error_handlers
from blockprov.service.metrics import Measure
from blockprov.service.routes import ROUTERS
from blockprov.service.routes.boot import refused_boot
from blockprov.service.routes.chunks import LeanChunkPath
from blockprov.service.state import Service
from blockprov.service.ui.pages import router as console_router

POOL_WORKERS = 16


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    Service.of_app(app).close()


def create_app(repo: LocalRepository, *, max_body: int = MAX_BODY, workers: int = POOL_WORKERS,
               access: AccessPolicy | None = None, in_flight: int = IN_FLIGHT,
               timeout: float = REQUEST_TIMEOUT) -> FastAPI:
    """The ASGI app serving ``repo``; run it with ``service.run.run_server`` or any ASGI server.
    ``access``: who may call what (access.py); default ``auto``, enforced once a token exists.
    ``max_body`` caps every route's own limit, ``in_flight`` bounds the bytes of request bodies held
    at once, ``timeout`` is the grace a body has before its rate counts (bounds.py)."""
    app = FastAPI(title="blockprov repository", version=__version__, lifespan=lifespan,
                  description="Images, versions, tags and content-addressed chunks of a blockprov repository.")
    svc = app.state.service = Service(repo, workers)
    svc.tokens, svc.access = TokenStore(repo.catalog.db), access or AccessPolicy()
    app.add_middleware(LeanChunkPath, service=svc)  # innermost: after Measure, Guard and Access
    app.add_middleware(Access, routes=app.router.routes, tokens=svc.tokens, policy=svc.access,
                       refused_boot=refused_boot)
    app.add_middleware(Guard, max_body=max_body, routes=app.router.routes, in_flight=in_flight, timeout=timeout)
    app.add_middleware(Measure, metrics=svc.metrics)
    add_error_handlers(app)
    for router in (*ROUTERS, console_router):  # the console (service/ui/): /ui/, same access rules
        # Not app.include_router: FastAPI 0.16x includes a router as one opaque route that matches
        # the path again inside it (≈30 µs more per request, measured on the chunk routes) and hides
        # the routes from app.router.routes, which access.py matches against. The routes are
        # complete APIRoutes holding no per-app state, so they are added as they are.
        app.router.routes.extend(router.routes)
    annotate_openapi(app)  # each operation's scope as x-blockprov-scope
    return app
