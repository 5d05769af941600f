"""The read-only raw view of a version: the virtual disk as one plain HTTP resource.

Why it exists: tools that know nothing of blockprov can read an image straight from the
repository — ``curl -r``, qemu's curl/http block driver (``qemu-img convert http://…``,
``-drive file=http://…``) and iPXE (``sanboot``). They all need the same three things: a HEAD that
answers ``Content-Length`` and ``Accept-Ranges: bytes``, single byte ranges (``206`` with
``Content-Range``, ``416`` past the end), and a full body that streams.

How it stays cheap:

* The body is produced chunk by chunk in batches of ~4 MiB on a thread pool, a few batches ahead
  of the socket (zstd and BLAKE3 release the GIL, so batches decode in parallel while the event
  loop only sends).
* All-zero chunks are the manifest's zero marker: they are generated, never read.
* Every stored chunk is verified (``codec.decode``) before one byte of it is sent
  (docs/architecture.md, invariant 6). The first batch is rendered *before* the status line goes
  out, so a small range request — what qemu and iPXE send — on a corrupt or missing chunk gets a
  clean 422/404. A later batch that fails can only abort the connection; the client then sees a
  short body, never wrong bytes.
* Manifests are immutable per version id, so parsed manifests are kept in a small LRU: a tag is
  resolved to an id on every request (one indexed SQLite lookup, tags move), the manifest is not
  re-parsed (qemu issues thousands of range requests for one conversion).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from starlette.responses import Response, StreamingResponse

from blockprov import codec
from blockprov.errors import BlockprovError
from blockprov.manifest import Manifest
from blockprov.names import Ref
from blockprov.repo.local import LocalRepository

log = logging.getLogger("blockprov.service")

BATCH_BYTES = 4 << 20  # output bytes rendered per thread-pool job
AHEAD = 3  # batches in flight ahead of the socket
IMMUTABLE = "public, max-age=31536000, immutable"

_ZEROS: dict[int, bytes] = {}
_ZEROS_LOCK = threading.Lock()


def zeros(n: int) -> bytes:
    """A shared all-zero buffer of ``n`` bytes (sizes repeat: chunk size, batch size, tails)."""
    z = _ZEROS.get(n)
    if z is None:
        z = bytes(n)
        with _ZEROS_LOCK:
            if len(_ZEROS) < 64:
                _ZEROS[n] = z
    return z


class RangeNotSatisfiable(Exception):
    """The requested range starts at or past the end of the disk (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single ``bytes=`` range, or None for "send it all".

    Follows RFC 9110 §14.2: a header we cannot parse, another unit or several ranges are ignored
    (the full body is a correct answer to any of them); a syntactically valid range that starts
    past the end is unsatisfiable.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:  # suffix range: the last N bytes
        n = _position(last)
        if n is None:
            return None
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size
    start, end = _position(first), _position(last) if last else size
    if start is None or end is None:
        return None
    if last and end < start:
        return None  # "bytes=5-3" is invalid, not unsatisfiable: ignore it
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end + 1 if last else size, size)


_HUGE = 1 << 80  # stands for any position longer than this many digits: past the end of every disk
_MAX_DIGITS = 24


def _position(text: str) -> int | None:
    """A byte position of a Range header (RFC 9110 ``1*DIGIT``), or None if it is not one.

    Why not ``text.isdigit()`` + ``int()``: ``isdigit`` also says yes to "²" and other non-ASCII
    digits that ``int`` refuses or reads, and ``int`` refuses more than 4,300 digits; either way a
    header became a 500 (issue 17). Only ASCII digits count, and a longer number than any disk
    is read as "past the end", which is what it means: a start there is unsatisfiable, an end there
    is the end of the disk."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits or "0")


class ManifestCache:
    """Parsed manifests and their canonical JSON by (image, version id); safe from any thread."""

    def __init__(self, repo: LocalRepository, capacity: int = 16) -> None:
        self.repo = repo
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[Manifest, bytes]] = OrderedDict()
        self.hits = self.misses = 0  # for /metrics

    def get(self, ref: Ref) -> tuple[str, Manifest, bytes]:
        """(version id, manifest, canonical JSON) of a reference; blocking, run it in a thread."""
        vid = self.repo.catalog.resolve_id(ref)
        key = (ref.name, vid)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return vid, hit[0], hit[1]
            self.misses += 1
        m = self.repo.catalog.manifest(ref.name, vid)
        raw = m.to_json()
        with self._lock:
            self._items[key] = (m, raw)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return vid, m, raw


@dataclass(frozen=True)
class _Batch:
    first: int  # first chunk index
    stop: int  # one past the last chunk index
    lo: int  # output byte range [lo, hi)
    hi: int


def _batches(m: Manifest, start: int, end: int) -> Iterator[_Batch]:
    cs = m.chunk_size
    per = max(1, BATCH_BYTES // cs)
    i = start // cs
    last = (end - 1) // cs
    while i <= last:
        stop = min(i + per, last + 1)
        yield _Batch(i, stop, max(start, i * cs), min(end, stop * cs))
        i = stop


def render(repo: LocalRepository, m: Manifest, b: _Batch) -> bytes:
    """The bytes [b.lo, b.hi) of the disk; stored chunks are verified first. Blocking."""
    cs = m.chunk_size
    pieces: list[bytes] = []
    stored = False
    for i in range(b.first, b.stop):
        c0 = i * cs
        lo, hi = max(b.lo, c0) - c0, min(b.hi, c0 + m.chunk_length(i)) - c0
        cid = m.digest_at(i)
        if cid == codec.ZERO_DIGEST:
            pieces.append(zeros(hi - lo))
            continue
        stored = True
        data = codec.decode(repo.store.get_blob(cid), cid)
        pieces.append(data if (lo, hi) == (0, len(data)) else data[lo:hi])
    if not stored:
        return zeros(b.hi - b.lo)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class RawView:
    """Answers GET and HEAD for ``/v1/images/{name}/raw/{ref}``."""

    def __init__(self, repo: LocalRepository, manifests: ManifestCache, pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.manifests = manifests
        self.pool = pool

    async def respond(self, ref: Ref, method: str, range_header: str | None, if_range: str | None,
                      if_none_match: str | None) -> Response:
        vid, m, _raw = await asyncio.wrap_future(self.pool.submit(self.manifests.get, ref))
        etag = f'"{vid}"'
        headers = {
            "accept-ranges": "bytes",
            "etag": etag,
            # A tag moves, a version id never does: only the latter may be cached blindly.
            "cache-control": IMMUTABLE if ref.version else "no-cache",
            "x-blockprov-version": vid,
        }
        if if_none_match is not None and etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        size = m.size
        try:
            # If-Range: resume only when the client's copy is this very version (RFC 9110 §13.1.5).
            rng = parse_range(range_header, size) if if_range is None or if_range.strip() == etag else None
        except RangeNotSatisfiable:
            headers["content-range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        start, end = rng if rng is not None else (0, size)
        status = 206 if rng is not None else 200
        if rng is not None:
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        headers["content-length"] = str(end - start)
        if method == "HEAD" or end == start:
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        batches = _batches(m, start, end)
        first = await asyncio.wrap_future(self.pool.submit(render, self.repo, m, next(batches)))
        return StreamingResponse(self._stream(ref, m, first, batches), status_code=status, headers=headers,
                                 media_type="application/octet-stream")

    async def _stream(self, ref: Ref, m: Manifest, first: bytes, rest: Iterator[_Batch]) -> AsyncIterator[bytes]:
        pending: deque[Future[bytes]] = deque()
        try:
            yield first
            for b in rest:
                pending.append(self.pool.submit(render, self.repo, m, b))
                if len(pending) >= AHEAD:
                    yield await asyncio.wrap_future(pending.popleft())
            while pending:
                yield await asyncio.wrap_future(pending.popleft())
        except BlockprovError as e:
            # Headers are gone already: the only honest move left is to cut the connection short.
            log.error("raw view of %s aborted mid-body: %s", ref, e)
            raise
        finally:
            for f in pending:
                f.cancel()


def etag_matches(header: str, etag: str) -> bool:
    """Whether an If-None-Match / If-Match list names ``etag`` (weak comparison, RFC 9110 §8.8.3)."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags
