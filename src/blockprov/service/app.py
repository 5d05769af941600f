"""The repository's HTTP API (``blockprov serve``): one embedded repository, exposed to agents and tools.

Why it looks the way it does:

* **Chunks are immutable and named by content**, so ``GET /v1/chunks/{id}`` carries a strong ETag
  and ``Cache-Control: immutable``: any HTTP cache or CDN in front of the server may keep them.
* **The agent's cold read is one round trip**: ``POST /v1/chunks/fetch`` takes many ids and
  answers ``[4-byte LE length][blob]…`` in request order. Files are read on a thread pool in a few
  slices and sent as they are, with no per-chunk JSON. Blobs are *not* verified here: every
  consumer must verify with ``codec.decode`` anyway (invariant 6), and doing it twice would halve
  the server's throughput. The single-chunk GET and the raw view, which serve clients that do not
  verify, do verify.
* **Uploads are verified on arrival** (the store decodes every blob against its id before
  keeping it), and a commit is refused while any referenced chunk is missing: the ``201`` of a
  commit is the acknowledgement snapshots rely on.
* **Errors are mapped once, here**: a ``BlockprovError`` becomes its ``http_status`` with
  ``{"error": ClassName, "message": …, "details": {…}}`` so ``repo/remote.py`` can raise the very
  same class on the other side. Anything unexpected is logged and answered 500; the server keeps
  serving everyone else (invariant 7).
* **Bodies are bounded**: a declared ``Content-Length`` over ``max_body`` is refused before a byte
  is read, and a streamed body is cut off as soon as it passes the limit (413 either way).
* Blocking work (SQLite, file reads, hashing, zstd) runs on one thread pool, never on the loop.
* **Access control and metrics are middlewares** (access.py, metrics.py), outside the routes:
  outermost ``Measure`` counts every answer (a 401, a 413 and a 500 too), then ``Guard``, then
  ``Access`` refuses a request before its body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blockprov import __version__, codec
from blockprov import manifest as mf
from blockprov.catalog.tokens import TokenStore
from blockprov.errors import BlockprovError, ChunkMissing, MissingChunks, TooLarge, UsageError
from blockprov.manifest import Manifest
from blockprov.names import Ref, image_name, parse_ref, tag_name, version_id
from blockprov.repo.local import LocalRepository
from blockprov.service.access import Access, AccessPolicy, annotate_openapi
from blockprov.service.machines import add_routes
from blockprov.service.metrics import Measure, ServiceMetrics
from blockprov.service.rawview import IMMUTABLE, ManifestCache, RawView, etag_matches
from blockprov.store.cached import CachedChunkStore

log = logging.getLogger("blockprov.service")

MAX_BODY = 256 << 20
MAX_FETCH_IDS = 16384  # per POST /v1/chunks/fetch; the client sends far fewer (≈16 MiB of blobs)
POOL_WORKERS = 16
LEN = struct.Struct("<I")
ID = codec.DIGEST_SIZE
OCTETS = "application/octet-stream"
T = TypeVar("T")


# -- the edge: errors -----------------------------------------------------------------------------
def error_body(exc: BlockprovError) -> dict[str, Any]:
    """The JSON an error becomes; ``details`` carries the template fields so the client can rebuild it."""
    details = {k: v for k, v in exc.kwargs.items() if isinstance(v, str | int | float | bool) or v is None}
    body: dict[str, Any] = {"error": type(exc).__name__, "message": exc.message, "details": details}
    if isinstance(exc, MissingChunks):
        body["missing"] = exc.missing
    return body


def error_response(exc: BlockprovError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.http_status)


class Guard:
    """Outermost layer: bounds request bodies and turns unexpected exceptions into a logged 500.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit():
                    scope["blockprov.error"] = "UsageError"
                    await error_response(UsageError("Content-Length is not a number"))(scope, receive, send)
                    return
                if int(v) > limit:
                    exc = TooLarge(f"request body of {int(v)} bytes exceeds the limit of {limit} bytes")
                    scope["blockprov.error"] = "TooLarge"
                    await error_response(exc)(scope, receive, send)
                    return
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"request body exceeds the limit of {limit} bytes")
            return msg

        started = False

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except Exception as e:
            if started:
                raise  # mid-body: the server must cut the connection; nothing else is honest
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            scope["blockprov.error"] = "InternalError"
            body = {"error": "InternalError", "message": f"internal error: {type(e).__name__}: {e}", "details": {}}
            await JSONResponse(body, status_code=500)(scope, receive, send)


class PartsResponse(Response):
    """A body sent as the parts it was built in (no join, no copy), with an exact Content-Length."""

    def __init__(self, parts: list[bytes], status_code: int = 200, media_type: str = OCTETS) -> None:
        self.parts = parts
        super().__init__(None, status_code, {"content-length": str(sum(map(len, parts)))}, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for i, p in enumerate(self.parts):
            await send({"type": "http.response.body", "body": p, "more_body": i + 1 < len(self.parts)})
        if not self.parts:
            await send({"type": "http.response.body", "body": b""})


class TagBody(BaseModel):
    version: str


# -- helpers ---------------------------------------------------------------------------------------
def ref_in(name: str, s: str, *, allow_other: bool = False) -> Ref:
    """A reference given relative to image ``name``: ``TAG`` or ``@ID`` (or, where another image
    may be named, a full ``NAME:TAG`` / ``NAME@ID``). Tags never contain ':' or '@', so this is
    unambiguous."""
    if s.startswith("@"):
        return Ref(image_name(name), version=version_id(s[1:]))
    if allow_other and (":" in s or "@" in s):
        return parse_ref(s)
    return Ref(image_name(name), tag=tag_name(s))


def split_ids(body: bytes) -> list[bytes]:
    if len(body) % ID:
        raise UsageError(f"body of {len(body)} bytes is not a whole number of {ID}-byte chunk ids")
    return [body[i:i + ID] for i in range(0, len(body), ID)]


def parse_frames(body: bytes) -> list[tuple[bytes, bytes]]:
    """``[32-byte id][4-byte LE length][blob]…`` → pairs; a truncated frame rejects the whole batch
    before anything is stored, so a broken upload never leaves a partial blob behind."""
    out: list[tuple[bytes, bytes]] = []
    pos, n = 0, len(body)
    while pos < n:
        if n - pos < ID + LEN.size:
            raise UsageError(f"truncated frame header at byte {pos} (frame {len(out)})")
        cid = body[pos:pos + ID]
        (length,) = LEN.unpack_from(body, pos + ID)
        pos += ID + LEN.size
        if length > n - pos:
            raise UsageError(f"frame {len(out)} ({cid.hex()}) declares {length} bytes but only {n - pos} follow")
        out.append((cid, body[pos:pos + length]))
        pos += length
    return out


def _slices(items: list[T], workers: int, least: int = 16) -> list[list[T]]:
    step = max(least, math.ceil(len(items) / workers))
    return [items[i:i + step] for i in range(0, len(items), step)]


# -- the app ---------------------------------------------------------------------------------------
def create_app(repo: LocalRepository, *, max_body: int = MAX_BODY, workers: int = POOL_WORKERS,
               access: AccessPolicy | None = None) -> FastAPI:
    """The ASGI app serving ``repo``; run it with ``service.run.run_server`` or any ASGI server.
    ``access``: who may call what (access.py); default ``auto``, enforced once a token exists."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bp-http")
    manifests = ManifestCache(repo)
    raw = RawView(repo, manifests, pool)
    store = repo.store

    async def run(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(pool.submit(fn, *args))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="blockprov repository", version=__version__, lifespan=lifespan,
                  description="Images, versions, tags and content-addressed chunks of a blockprov repository.")
    metrics = ServiceMetrics()
    metrics.manifest_cache = lambda: (manifests.hits, manifests.misses)
    if isinstance(store, CachedChunkStore):
        cache = store
        metrics.chunk_cache = lambda: (cache.hits, cache.misses, cache.joined, cache.cached_bytes())
    registry = metrics.registry()
    app.state.metrics = metrics
    app.add_middleware(Access, routes=app.router.routes, tokens=TokenStore(repo.catalog.db),
                       policy=access or AccessPolicy())
    app.add_middleware(Guard, max_body=max_body)
    app.add_middleware(Measure, metrics=metrics)

    @app.exception_handler(BlockprovError)
    async def on_blockprov_error(request: Request, exc: BlockprovError) -> Response:
        request.scope["blockprov.error"] = type(exc).__name__
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        elif exc.http_status == 422:  # integrity problems are worth an operator's attention
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        why = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        request.scope["blockprov.error"] = "UsageError"
        return error_response(UsageError(f"bad request: {why}"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        name = "NotFound" if exc.status_code == 404 else "HTTPError"
        request.scope["blockprov.error"] = name
        return JSONResponse({"error": name, "message": str(exc.detail), "details": {}},
                            status_code=exc.status_code, headers=exc.headers)

    async def body_of(request: Request) -> bytes:
        parts = [p async for p in request.stream()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    octets_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}
    json_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}}}}}

    # -- service ----------------------------------------------------------------------------------
    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, str]:
        """Liveness for load balancers and for ``blockprov serve`` readiness checks."""
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests by route and status, bytes in and out, chunk traffic,
        errors by class, the process's CPU and memory."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/gc", tags=["service"])
    async def gc(grace: float | None = None) -> dict[str, Any]:
        """Delete chunks no version references and older than ``grace`` seconds (default 1 hour,
        which protects uploads still in progress)."""
        stats = await run(repo.gc) if grace is None else await run(repo.gc, grace)
        return stats.to_dict()

    # -- catalog ----------------------------------------------------------------------------------
    @app.get("/v1/images", tags=["catalog"])
    async def list_images() -> dict[str, Any]:
        return {"images": [i.to_dict() for i in await run(repo.images)]}

    @app.get("/v1/images/{name}/versions", tags=["catalog"])
    async def list_versions(name: str) -> dict[str, Any]:
        return {"versions": [v.to_dict() for v in await run(repo.versions, image_name(name))]}

    @app.get("/v1/images/{name}/manifest", tags=["catalog"], response_class=Response)
    async def get_manifest(name: str, request: Request, ref: str = "latest") -> Response:
        """The manifest exactly as ``Manifest.to_json()``: a client that asked by id re-hashes it."""
        r = ref_in(name, ref)
        vid, _m, raw_json = await run(manifests.get, r)
        etag = f'"{vid}"'
        headers = {"etag": etag, "x-blockprov-version": vid,
                   "cache-control": IMMUTABLE if r.version else "no-cache"}
        inm = request.headers.get("if-none-match")
        if inm is not None and etag_matches(inm, etag):
            return Response(status_code=304, headers=headers)
        return Response(raw_json, headers=headers, media_type="application/json")

    @app.post("/v1/images/{name}/versions", tags=["catalog"], status_code=201, openapi_extra=json_body)
    async def commit(name: str, request: Request, tag: str | None = None) -> JSONResponse:
        """Record a version whose chunks are all present; the ``201`` is the acknowledgement.
        409 with ``missing`` lists the chunks still to upload."""
        image_name(name)
        if tag is not None:
            tag_name(tag)
        m = await run(Manifest.from_json, await body_of(request))
        if m.image != name:
            raise UsageError(f"manifest is for image {m.image!r}, posted to {name!r}")
        vid = await run(repo.commit, m, tag)
        return JSONResponse({"id": vid, "image": name, "tag": tag}, status_code=201)

    @app.put("/v1/images/{name}/tags/{tag}", tags=["catalog"])
    async def set_tag(name: str, tag: str, body: TagBody) -> dict[str, Any]:
        await run(repo.set_tag, image_name(name), tag_name(tag), version_id(body.version))
        return {"image": name, "tag": tag, "version": body.version}

    @app.delete("/v1/images/{name}/tags/{tag}", tags=["catalog"])
    async def delete_tag(name: str, tag: str) -> dict[str, Any]:
        return {"removed": await run(repo.remove, Ref(image_name(name), tag=tag_name(tag)))}

    @app.delete("/v1/images/{name}/versions/{vid}", tags=["catalog"])
    async def delete_version(name: str, vid: str) -> dict[str, Any]:
        return {"removed": await run(repo.remove, Ref(image_name(name), version=version_id(vid)))}

    @app.get("/v1/images/{name}/diff", tags=["catalog"])
    async def diff(name: str, a: str, b: str) -> dict[str, Any]:
        """Chunk indices of ``b`` whose content differs from ``a`` (like EBS ListChangedBlocks).
        ``a``/``b``: ``TAG``, ``@ID``, or a full ``NAME:TAG``/``NAME@ID``."""
        ra, rb = ref_in(name, a, allow_other=True), ref_in(name, b, allow_other=True)
        (ida, ma, _), (idb, mb, _) = await run(manifests.get, ra), await run(manifests.get, rb)
        changed = await run(mf.diff, ma, mb)
        return {"a": ida, "b": idb, "chunk_size": mb.chunk_size, "changed": changed}

    # -- raw view ---------------------------------------------------------------------------------
    @app.get("/v1/images/{name}/raw/{ref}", tags=["raw"], response_class=Response)
    @app.head("/v1/images/{name}/raw/{ref}", tags=["raw"], response_class=Response)
    async def raw_view(name: str, ref: str, request: Request) -> Response:
        """The version as a plain disk image with single-range support (curl, qemu http, iPXE)."""
        h = request.headers
        return await raw.respond(ref_in(name, ref), request.method, h.get("range"), h.get("if-range"),
                                 h.get("if-none-match"))

    # -- chunks -----------------------------------------------------------------------------------
    @app.post("/v1/chunks/fetch", tags=["chunks"], response_class=Response, openapi_extra=octets_body)
    async def fetch_chunks(request: Request) -> Response:
        """Body: concatenated 32-byte ids. Answer: for each, ``[4-byte LE length][blob]``.
        Blobs are not verified here (the caller must verify); 404 lists every missing id."""
        ids = split_ids(await body_of(request))
        if len(ids) > MAX_FETCH_IDS:
            raise TooLarge(f"{len(ids)} ids in one fetch; at most {MAX_FETCH_IDS}")

        def read_slice(part: list[bytes]) -> tuple[bytes, list[bytes]]:
            try:  # one batched read: a store may coalesce adjacent chunks into one pread
                blobs = store.get_blobs(part)
            except ChunkMissing:
                return b"", store.missing(part)
            out: list[bytes] = []
            for blob in blobs:
                out.append(LEN.pack(len(blob)))
                out.append(blob)
            return b"".join(out), []

        done = await asyncio.gather(*(run(read_slice, s) for s in _slices(ids, 2, least=256)))
        missing = [c.hex() for _, ms in done for c in ms]
        if missing:
            exc = ChunkMissing(digest=missing[0])
            request.scope["blockprov.error"] = "ChunkMissing"
            return JSONResponse(error_body(exc) | {"missing": missing}, status_code=404)
        metrics.chunk_fetches += 1
        metrics.chunks_served += len(ids)
        return PartsResponse([p for p, _ in done])

    @app.post("/v1/chunks/missing", tags=["chunks"], response_class=Response, openapi_extra=octets_body)
    async def missing_chunks(request: Request) -> Response:
        """Which of these ids the repository lacks. Binary in → binary out (32-byte ids);
        ``application/json`` ``{"ids": [hex…]}`` in → ``{"missing": [hex…]}`` out."""
        body = await body_of(request)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                hexes = json.loads(body)["ids"]
                if not isinstance(hexes, list):
                    raise TypeError("ids must be a list")
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"expected {{\"ids\": [hex, …]}}: {e}") from None
            ids = [codec.parse_hexid(str(h)) for h in hexes]
            metrics.missing_asked += len(ids)
            return JSONResponse({"missing": [c.hex() for c in await run(repo.missing, ids)]})
        ids = split_ids(body)
        metrics.missing_asked += len(ids)
        return Response(b"".join(await run(repo.missing, ids)), media_type=OCTETS)

    @app.get("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
    @app.head("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
    async def get_chunk(cid: str, request: Request) -> Response:
        """One stored blob, verified before it is sent; immutable, so cacheable forever."""
        digest = codec.parse_hexid(cid)
        etag = f'"{digest.hex()}"'
        headers = {"etag": etag, "cache-control": IMMUTABLE}
        inm = request.headers.get("if-none-match")
        if inm is not None and etag_matches(inm, etag) and await run(store.has, digest):
            metrics.chunks_not_modified += 1
            return Response(status_code=304, headers=headers)

        def read_verified() -> bytes:
            blob = store.get_blob(digest)
            codec.decode(blob, digest)
            return blob

        blob = await run(read_verified)
        metrics.chunks_served += request.method == "GET"
        if request.method == "HEAD":
            return Response(headers=headers | {"content-length": str(len(blob))}, media_type=OCTETS)
        return Response(blob, headers=headers, media_type=OCTETS)

    @app.put("/v1/chunks/{cid}", tags=["chunks"], openapi_extra=octets_body)
    async def put_chunk(cid: str, request: Request) -> JSONResponse:
        """Upload one blob; 422 if it does not decode to its id (nothing is stored then)."""
        digest = codec.parse_hexid(cid)
        new = await run(repo.put_blobs, [(digest, await body_of(request))])
        metrics.chunks_received += 1
        metrics.chunks_new += new
        return JSONResponse({"new": bool(new)}, status_code=201 if new else 200)

    @app.post("/v1/chunks", tags=["chunks"], openapi_extra=octets_body)
    async def put_chunks(request: Request) -> dict[str, int]:
        """Batch upload, framed ``[32-byte id][4-byte LE length][blob]…``; every blob is verified."""
        items = parse_frames(await body_of(request))
        counts = await asyncio.gather(*(run(repo.put_blobs, s) for s in _slices(items, workers, least=4)))
        metrics.chunks_received += len(items)
        metrics.chunks_new += sum(counts)
        return {"received": len(items), "new": sum(counts)}

    add_routes(app, repo, run)  # boot files, host boot scripts, profiles, agents (machines.py)
    annotate_openapi(app)  # each operation's scope as x-blockprov-scope
    return app
