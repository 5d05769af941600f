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
import json
import math
import struct
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from blockprov import codec
from blockprov.errors import ChunkMissing, TooLarge, UsageError
from blockprov.service.edge import error_body
from blockprov.service.rawview import IMMUTABLE, etag_matches
from blockprov.service.routes.common import OCTETS, OCTETS_BODY, body_of, decoded
from blockprov.service.state import Service

MAX_FETCH_IDS = 16384  # per POST /v1/chunks/fetch; the client sends far fewer (≈16 MiB of blobs)
LEN = struct.Struct("<I")
ID = codec.DIGEST_SIZE
T = TypeVar("T")

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


@router.post("/v1/chunks/fetch", tags=["chunks"], response_class=Response, openapi_extra=OCTETS_BODY)
async def fetch_chunks(request: Request) -> Response:
    """Body: concatenated 32-byte ids. Answer: for each, ``[4-byte LE length][blob]``.
    Blobs are not verified here (the caller must verify); 404 lists every missing id."""
    svc = Service.of(request)
    store = svc.store
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

    done = await asyncio.gather(*(svc.run(read_slice, s) for s in _slices(ids, 2, least=256)))
    missing = [c.hex() for _, ms in done for c in ms]
    if missing:
        exc = ChunkMissing(digest=missing[0])
        request.scope["blockprov.error"] = "ChunkMissing"
        return JSONResponse(error_body(exc) | {"missing": missing}, status_code=404)
    svc.metrics.chunk_fetches += 1
    svc.metrics.chunks_served += len(ids)
    return PartsResponse([p for p, _ in done])


@router.post("/v1/chunks/missing", tags=["chunks"], response_class=Response, openapi_extra=OCTETS_BODY)
async def missing_chunks(request: Request) -> Response:
    """Which of these ids the repository lacks. Binary in → binary out (32-byte ids);
    ``application/json`` ``{"ids": [hex…]}`` in → ``{"missing": [hex…]}`` out."""
    svc = Service.of(request)
    body = await body_of(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            hexes = decoded(body, json.loads)["ids"]
            if not isinstance(hexes, list):
                raise TypeError("ids must be a list")
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"expected {{\"ids\": [hex, …]}}: {e}") from None
        ids = [codec.parse_hexid(str(h)) for h in hexes]
        svc.metrics.missing_asked += len(ids)
        return JSONResponse({"missing": [c.hex() for c in await svc.run(svc.repo.missing, ids)]})
    ids = split_ids(body)
    svc.metrics.missing_asked += len(ids)
    return Response(b"".join(await svc.run(svc.repo.missing, ids)), media_type=OCTETS)


@router.get("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
@router.head("/v1/chunks/{cid}", tags=["chunks"], response_class=Response)
async def get_chunk(cid: str, request: Request) -> Response:
    """One stored blob, verified before it is sent; immutable, so cacheable forever."""
    svc = Service.of(request)
    store = svc.store
    digest = codec.parse_hexid(cid)
    etag = f'"{digest.hex()}"'
    headers = {"etag": etag, "cache-control": IMMUTABLE}
    inm = request.headers.get("if-none-match")
    if inm is not None and etag_matches(inm, etag) and await svc.run(store.has, digest):
        svc.metrics.chunks_not_modified += 1
        return Response(status_code=304, headers=headers)

    def read_verified() -> bytes:
        blob = store.get_blob(digest)
        codec.decode(blob, digest)
        return blob

    blob = await svc.run(read_verified)
    svc.metrics.chunks_served += request.method == "GET"
    if request.method == "HEAD":
        return Response(headers=headers | {"content-length": str(len(blob))}, media_type=OCTETS)
    return Response(blob, headers=headers, media_type=OCTETS)


@router.put("/v1/chunks/{cid}", tags=["chunks"], openapi_extra=OCTETS_BODY)
async def put_chunk(cid: str, request: Request) -> JSONResponse:
    """Upload one blob; 422 if it does not decode to its id (nothing is stored then)."""
    svc = Service.of(request)
    digest = codec.parse_hexid(cid)
    new = await svc.run(svc.repo.put_blobs, [(digest, await body_of(request))])
    svc.metrics.chunks_received += 1
    svc.metrics.chunks_new += new
    return JSONResponse({"new": bool(new)}, status_code=201 if new else 200)


@router.post("/v1/chunks", tags=["chunks"], openapi_extra=OCTETS_BODY)
async def put_chunks(request: Request) -> dict[str, int]:
    """Batch upload, framed ``[32-byte id][4-byte LE length][blob]…``; every blob is verified."""
    svc = Service.of(request)
    items = parse_frames(await body_of(request))
    counts = await asyncio.gather(*(svc.run(svc.repo.put_blobs, s) for s in _slices(items, svc.workers, least=4)))
    svc.metrics.chunks_received += len(items)
    svc.metrics.chunks_new += sum(counts)
    return {"received": len(items), "new": sum(counts)}
