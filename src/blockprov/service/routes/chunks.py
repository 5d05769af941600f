"""Routes for chunks: the agents' cold reads and every upload.

* **Chunks are immutable and named by content**, so ``GET /v1/chunks/{id}`` carries a strong ETag
  and ``Cache-Control: immutable``: any HTTP cache or CDN in front of the server may keep them.
* **The agent's cold read is one round trip**: ``POST /v1/chunks/fetch`` takes many ids and
  answers ``[4-byte LE length][blob]…`` in request order. Files are read on the pool in a few
  slices and sent as they are, with no per-chunk JSON. Blobs are *not* verified here: every
  consumer must verify with ``codec.decode`` anyway (docs/architecture.md, invariant 6), and doing
  it twice would halve the server's throughput. The single-chunk GET and the raw view, which serve
  clients that do not verify, do verify.
* **Uploads are verified on arrival** (the store decodes every blob against its id before keeping
  it); a truncated frame rejects the whole batch before anything is stored.
* These handlers are the hot path: they take what they need from ``Service`` once and add no
  dependency or validation layer of their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from blockprov import codec, jsonvalue
from blockprov.errors import BlockprovError, ChunkMissing, TooLarge, UsageError
from blockprov.manifest import MAX_CHUNK
from blockprov.service.edge import error_body, internal_error_response
from blockprov.service.rawview import IMMUTABLE, etag_matches
from blockprov.service.routes.common import OCTETS, body_of, fields_of, octets_body
from blockprov.service.state import Service

MAX_FETCH_IDS = 16384  # per POST /v1/chunks/fetch; the client sends far fewer (≈16 MiB of blobs)
MAX_MISSING_IDS = 65536  # per POST /v1/chunks/missing (repo/remote.py asks 65,536 at a time)
MAX_BLOB = MAX_CHUNK + 4096  # a stored blob: a chunk (stored raw when zstd saves too little) and its header
MAX_UPLOAD = 64 << 20  # one batch upload (repo/remote.py sends ≈16 MiB)
MAX_UPLOAD_FRAMES = 16384  # blobs in one batch upload (≈16 MiB of 1 KiB blobs): no million empty frames
LEN = struct.Struct("<I")
ID = codec.DIGEST_SIZE
T = TypeVar("T")
log = logging.getLogger("blockprov.service")

router = APIRouter()


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
        if len(out) == MAX_UPLOAD_FRAMES:
            raise TooLarge(f"more than {MAX_UPLOAD_FRAMES} blobs in one upload")
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


async def fetch_parts(svc: Service, body: bytes) -> list[bytes]:
    """The answer to ``POST /v1/chunks/fetch`` as parts to send in order (``ChunkMissing`` with every
    missing id if any is missing). A small ask (an agent's miss: a few ids) is one pool call; a large
    one is read in two slices at once."""
    store = svc.store
    ids = split_ids(body)
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

    slices = _slices(ids, 2, least=256)
    if len(slices) == 1:
        done = [await svc.run(read_slice, ids)]
    else:
        done = list(await asyncio.gather(*(svc.run(read_slice, s) for s in slices)))
    missing = [c.hex() for _, ms in done for c in ms]
    if missing:
        raise ChunkMissing(digest=missing[0], missing=missing)
    svc.metrics.chunk_fetches += 1
    svc.metrics.chunks_served += len(ids)
    if svc.on_fetch is not None:
        svc.on_fetch(ids)
    return [p for p, _ in done]


async def chunk_blob(svc: Service, cid: str, head: bool,
                     if_none_match: str | None) -> tuple[int, bytes, dict[str, str]]:
    """``GET``/``HEAD /v1/chunks/{cid}``: status, body, headers. The blob is verified before it is sent."""
    store = svc.store
    digest = codec.parse_hexid(cid)
    etag = f'"{digest.hex()}"'
    headers = {"etag": etag, "cache-control": IMMUTABLE}
    if if_none_match is not None and etag_matches(if_none_match, etag) and await svc.run(store.has, digest):
        svc.metrics.chunks_not_modified += 1
        return 304, b"", headers

    def read_verified() -> bytes:
        blob = store.get_blob(digest)
        codec.decode(blob, digest)
        return blob

    blob = await svc.run(read_verified)
    if head:
        return 200, b"", headers | {"content-length": str(len(blob))}
    svc.metrics.chunks_served += 1
    return 200, blob, headers


@router.post("/v1/chunks/fetch", tags=["chunks"], response_class=Response,
             openapi_extra=octets_body(MAX_FETCH_IDS * ID))
async def fetch_chunks(request: Request) -> Response:
    """Body: concatenated 32-byte ids. Answer: for each, ``[4-byte LE length][blob]``.
    Blobs are not verified here (the caller must verify); 404 lists every missing id.
    (Served by ``LeanChunkPath``; this route documents it and answers when the app runs without it.)"""
    svc = Service.of(request)
    try:
        parts = await fetch_parts(svc, await body_of(request))
    except ChunkMissing as exc:
        request.scope["blockprov.error"] = "ChunkMissing"
        return JSONResponse(missing_body(exc), status_code=404)
    return PartsResponse(parts)


def missing_body(exc: ChunkMissing) -> dict[str, object]:
    """A fetch's 404 lists every missing id (``details.missing`` holds them as one string too)."""
    return error_body(exc) | {"missing": list(exc.kwargs.get("missing") or [exc.kwargs.get("digest")])}


@router.post("/v1/chunks/missing", tags=["chunks"], response_class=Response,
             openapi_extra=octets_body(MAX_MISSING_IDS * 72))  # as JSON: 64 hex digits, quotes, comma
async def missing_chunks(request: Request) -> Response:
    """Which of these ids the repository lacks. Binary in → binary out (32-byte ids);
    ``application/json`` ``{"ids": [hex…]}`` in → ``{"missing": [hex…]}`` out."""
    svc = Service.of(request)
    body = await body_of(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        d = fields_of(jsonvalue.loads(body), ("ids",), 'expected {"ids": [hex, …]}')
        hexes = d.get("ids")
        if not isinstance(hexes, list) or not all(isinstance(h, str) for h in hexes):
            raise UsageError('expected {"ids": [hex, …]}')
        if len(hexes) > MAX_MISSING_IDS:
            raise TooLarge(f"{len(hexes)} ids in one question; at most {MAX_MISSING_IDS}")
        ids = [codec.parse_hexid(h) for h in hexes]
        svc.metrics.missing_asked += len(ids)
        return JSONResponse({"missing": [c.hex() for c in await svc.run(svc.repo.missing, ids)]})
    ids = split_ids(body)
    if len(ids) > MAX_MISSING_IDS:
        raise TooLarge(f"{len(ids)} ids in one question; at most {MAX_MISSING_IDS}")
    svc.metrics.missing_asked += len(ids)
    return Response(b"".join(await svc.run(svc.repo.missing, ids)), media_type=OCTETS)


@router.get("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
@router.head("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
async def get_chunk(cid: str, request: Request) -> Response:
    """One stored blob, verified before it is sent; immutable, so cacheable forever.
    (Served by ``LeanChunkPath``; this route documents it and answers when the app runs without it.)"""
    status, body, headers = await chunk_blob(Service.of(request), cid, request.method == "HEAD",
                                             request.headers.get("if-none-match"))
    return Response(body, status_code=status, headers=headers, media_type=None if status == 304 else OCTETS)


@router.put("/v1/chunks/{cid}", tags=["chunks"], openapi_extra=octets_body(MAX_BLOB))
async def put_chunk(cid: str, request: Request) -> JSONResponse:
    """Upload one blob; 422 if it does not decode to its id (nothing is stored then)."""
    svc = Service.of(request)
    digest = codec.parse_hexid(cid)
    new = await svc.run(svc.repo.put_blobs, [(digest, await body_of(request))])
    svc.metrics.chunks_received += 1
    svc.metrics.chunks_new += new
    return JSONResponse({"new": bool(new)}, status_code=201 if new else 200)


@router.post("/v1/chunks", tags=["chunks"], openapi_extra=octets_body(MAX_UPLOAD))
async def put_chunks(request: Request) -> dict[str, int]:
    """Batch upload, framed ``[32-byte id][4-byte LE length][blob]…``; every blob is verified."""
    svc = Service.of(request)
    items = parse_frames(await body_of(request))
    counts = await asyncio.gather(*(svc.run(svc.repo.put_blobs, s) for s in _slices(items, svc.workers, least=4)))
    svc.metrics.chunks_received += len(items)
    svc.metrics.chunks_new += sum(counts)
    return {"received": len(items), "new": sum(counts)}


class LeanChunkPath:
    """The agents' hot path without the framework: ``POST /v1/chunks/fetch`` and ``GET``/``HEAD
    /v1/chunks/{id}`` answered by a plain ASGI callable.

    Why: a cold miss near the repository is one small fetch, and FastAPI's per-request work (its
    exception and exit-stack middlewares, routing, the request object, dependency solving, the
    response object and the four wrapped ``send`` layers it runs through) cost as much server time
    as reading and sending the blob (bench/RESULTS.md, "where a miss goes"). This runs *inside*
    ``Measure``, ``Guard`` and ``Access`` (app.py adds it as the innermost middleware), so a request
    is counted, its body bounded and its token checked exactly as before; only the routing and the
    answer are done here, with the same functions the FastAPI routes above use (which stay, for the
    OpenAPI document). Errors become the same answers as ``edge.on_blockprov_error`` gives."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.svc = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        rest = path[len(PREFIX):]
        if method == "POST" and rest == "fetch":
            handler = self._fetch
        elif method in ("GET", "HEAD") and len(rest) == 2 * ID:
            handler = self._get
        else:
            await self.app(scope, receive, send)
            return
        scope.setdefault("blockprov.route", "/v1/chunks/fetch" if method == "POST" else "/v1/chunks/{cid}")
        try:
            await handler(scope, receive, send, rest)
        except BlockprovError as exc:
            scope["blockprov.error"] = type(exc).__name__
            if exc.http_status == 500:
                await internal_error_response(method, path, exc)(scope, receive, send)
                return
            if exc.http_status > 500:
                log.error("%s %s: %s", method, path, exc)
            elif exc.http_status == 422:
                log.warning("%s %s: %s", method, path, exc)
            body = missing_body(exc) if isinstance(exc, ChunkMissing) and method == "POST" else error_body(exc)
            await JSONResponse(body, status_code=exc.http_status)(scope, receive, send)

    async def _fetch(self, scope: Scope, receive: Receive, send: Send, cid: str) -> None:
        parts = await fetch_parts(self.svc, await _body(receive))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(sum(map(len, parts))).encode()), _OCTETS_HEADER]})
        last = len(parts) - 1
        for i, p in enumerate(parts):
            await send({"type": "http.response.body", "body": p, "more_body": i < last})
        if not parts:
            await send({"type": "http.response.body", "body": b""})

    async def _get(self, scope: Scope, receive: Receive, send: Send, cid: str) -> None:
        inm = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"if-none-match"), None)
        status, body, headers = await chunk_blob(self.svc, cid, scope["method"] == "HEAD", inm)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        if status == 200:
            raw.append(_OCTETS_HEADER)
            if scope["method"] == "GET":
                raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


PREFIX = "/v1/chunks/"
_OCTETS_HEADER = (b"content-type", OCTETS.encode())


async def _body(receive: Receive) -> bytes:
    """The whole request body from ASGI messages; one message (the usual case) without a copy."""
    parts: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise UsageError("the client went away before its request body ended")
        parts.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)
