"""The agent's side of peer sharing: it serves the chunks its cache holds to the agents of its site.

``POST /peer/v1/chunks[?fetch=1]`` with the chunk ids (32 bytes each) as the body and
``Authorization: Ticket …`` (tickets.py); the answer is one frame per id (cache/peers.py,
``encode_frames``): the chunk as a blob, or ``ABSENT``. A present, unmodified chunk is lent from
the data file after its bytes were hashed against its id (cache/lending.py), as an uncompressed
blob (no CPU spent compressing for the LAN), unless the agent still keeps the compressed blob the
repository sent for it (it fetched the chunk as its owner): that blob goes, verified, at a third of
the bytes on the test image (``PeerSource.kept_for_peers``). With ``fetch=1`` a chunk it does not hold is fetched
from the repository first, once however many peers ask, verified, and kept in memory for a while
(``PeerSource.fetch_for_peers``): the caller computed that this agent owns it (a chunk of another
version of the image too: the site moving to a v2). ``POST /peer/v1/manifest[?fetch=1]`` with
``IMAGE@ID`` as the body answers that version's manifest (JSON) in the same way, or 404: the site's
agents moving to a v2 at once take it from its owner, not each from the repository
(``PeerSource.manifest``). ``GET /peer/v1/health`` (open) says who serves here.

Who may ask: the holder of a ticket of this site that has not expired, checked with the site's
keys from this agent's last join (no repository round trip, so peers keep serving each other
while the repository is out of reach). Another site's ticket is 403, none or a bad one 401, and
before this agent has joined its site every request is 503.

``have=1`` on a chunk request asks for this agent's *have-vector* with the answer (header
``x-blockprov-have``: the version's id and, per chunk index, whether it can be lent or is kept in
memory, zlib and base64; about 1 KiB for a 1 GiB image): the caller's speculation then asks only
peers that hold a guess (cache/peers.py). Built at most every ``HAVE_EVERY`` seconds.

Bounded so that the PC's own user does not wait behind its peers: ``slots`` requests are served at
once and ``queue`` more wait; beyond that a caller gets 503 (``PeerBusy``) and asks the repository.
``rate`` bytes per second are sent at most (a fluid bucket over every connection, paced in
``PACE`` pieces). Requests are small (at most ``MAX_IDS`` ids and ``MAX_ANSWER`` bytes of chunks,
8 KiB of head) and a connection idle for ``IDLE`` seconds is closed.

A tiny HTTP/1.1 server on the agent's event loop (as agent/metrics.py): the agent needs no web
framework (docs/architecture.md, import rules), and the work per request is a few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from blockprov import tickets
from blockprov.cache import (
    HAVE_HEADER,
    MAX_IDS,
    PEER_MANIFEST_PATH,
    PEER_PATH,
    Blob,
    Lender,
    PeerSource,
    encode_frames,
    encode_have,
)
from blockprov.codec import DIGEST_SIZE, plain_header
from blockprov.errors import (
    BlockprovError,
    PeerBusy,
    RepositoryUnavailable,
    TooLarge,
    Unauthorized,
    UsageError,
    error_to_dict,
)
from blockprov.names import parse_ref

log = logging.getLogger("blockprov.peers")

HEAD_LIMIT = 8192
IDLE = 60.0  # seconds a keep-alive connection may wait for its next request
SEND_TIMEOUT = 30.0
PACE = 64 << 10  # bytes written between two waits of the rate limit
MAX_ANSWER = 32 << 20  # bytes of chunks one request may ask for (the fetcher's batches are 8 MiB)
DEFAULT_SLOTS = 8
DEFAULT_QUEUE = 64
TICKETS_KEPT = 1024  # good tickets remembered (a site's agents each send one)
HAVE_EVERY = 0.5  # seconds a have-vector is reused for every peer asking (``_have``)
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


@dataclass
class ServeStats:
    requests: int = 0
    chunks_lent: int = 0
    chunks_fetched: int = 0  # fetched from the repository for a peer (this agent owned them)
    chunks_absent: int = 0
    bytes_sent: int = 0
    refused: int = 0  # bad, missing or foreign tickets
    busy: int = 0
    manifests_sent: int = 0


class RateLimit:
    """At most ``rate`` bytes per second over all connections (a fluid bucket, no burst)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate if rate and rate > 0 else None
        self._free_at = 0.0

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._free_at = max(now, self._free_at) + n / self.rate
        if self._free_at - now > 0.001:
            await asyncio.sleep(self._free_at - now)


class _Reply(Exception):
    def __init__(self, status: int, body: bytes, ctype: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.ctype, self.headers = status, body, ctype, headers or {}


def _error(e: BlockprovError) -> _Reply:
    return _Reply(e.http_status, json.dumps(error_to_dict(e)).encode())


class PeerServer:
    def __init__(self, lender: Lender, source: PeerSource, who: Callable[[], dict[str, Any]], *,
                 slots: int = DEFAULT_SLOTS, queue: int = DEFAULT_QUEUE, rate: float | None = None) -> None:
        self.lender = lender
        self.source = source
        self.who = who  # site, instance, version: for /peer/v1/health and messages
        self.stats = ServeStats()
        self.rate = RateLimit(rate)
        self._slots = asyncio.Semaphore(max(1, slots))
        self._queue = max(0, queue)
        self._waiting = 0
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="bp-peer-serve")
        self._have_value: tuple[float, str] | None = None  # (when built, the header's value)
        # tickets found good: ticket → (expires, site, epoch, the key that checked it) (``_check_ticket``)
        self._tickets: dict[str, tuple[float, str, int, bytes]] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        h, p = self._server.sockets[0].getsockname()[:2]
        self.address = (str(h), int(p))
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.lender.close()

    def status(self) -> dict[str, Any]:
        return asdict(self.stats) | {"address": f"{self.address[0]}:{self.address[1]}",
                                     "rate": self.rate.rate, "waiting": self._waiting}

    # -- HTTP -------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                async with asyncio.timeout(IDLE):  # not wait_for: it makes a task per call
                    head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = [*lines[0].split(" "), "", ""][:3]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                length = int(headers.get("content-length") or 0)
                if not 0 <= length <= MAX_IDS * DIGEST_SIZE:
                    await self._send(writer, _error(UsageError(f"at most {MAX_IDS} chunk ids per request")),
                                     close=True)
                    return
                body = b""
                if length:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        body = await reader.readexactly(length)
                try:
                    reply = await self._handle(method, target, headers, body)
                except _Reply as r:
                    reply = r
                await self._send(writer, reply, close=headers.get("connection", "").lower() == "close")
                if headers.get("connection", "").lower() == "close":
                    return
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # a client that goes away, stalls or sends nonsense loses its connection, nobody else
        except Exception:
            log.exception("peer request failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, r: _Reply, *, close: bool) -> None:
        """The reply; a body of chunks goes out in ``PACE`` pieces, each paced by the rate limit
        (a slow rate must not leave the caller waiting silently for the whole answer)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items())
        head = (f"HTTP/1.1 {r.status} {REASONS.get(r.status, 'Error')}\r\nContent-Type: {r.ctype}\r\n{extra}"
                f"Content-Length: {len(r.body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}"
                "\r\n\r\n").encode()
        writer.write(head)
        body = memoryview(r.body)
        if r.status != 200 or self.rate.rate is None:
            writer.write(body)
            async with asyncio.timeout(SEND_TIMEOUT):
                await writer.drain()
            return
        for k in range(0, len(body), PACE):
            await self.rate.take(len(body[k:k + PACE]))
            writer.write(body[k:k + PACE])
            async with asyncio.timeout(SEND_TIMEOUT):
                await writer.drain()

    async def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Reply:
        path, _, query = target.partition("?")
        if path == "/peer/v1/health":
            return _Reply(200, json.dumps(self.who() | {"status": "ok"}).encode())
        if path not in (PEER_PATH, PEER_MANIFEST_PATH):
            raise _Reply(404, b'{"error": "NotFound", "message": "not a peer route"}')
        if method != "POST":
            raise _Reply(405, b'{"error": "UsageError", "message": "POST the chunk ids (or IMAGE@ID for a manifest)"}')
        self.stats.requests += 1
        self._check_ticket(headers.get("authorization", ""))
        asked = urllib.parse.parse_qs(query)
        fetch = asked.get("fetch") == ["1"]
        if path == PEER_MANIFEST_PATH:
            return await self._manifest(body, fetch)
        if len(body) % DIGEST_SIZE:
            raise _error(UsageError("the body is a whole number of 32-byte chunk ids"))
        ids = [body[k:k + DIGEST_SIZE] for k in range(0, len(body), DIGEST_SIZE)]
        if len(ids) * self.lender.dev.manifest.chunk_size > MAX_ANSWER:
            raise _error(TooLarge(f"at most {MAX_ANSWER >> 20} MiB of chunks per request"))
        await self._take_slot()
        try:
            frames = await self._answer(ids, fetch)
        finally:
            self._slots.release()
        data = b"".join(frames)
        self.stats.bytes_sent += len(data)
        extra = {HAVE_HEADER: await self._have()} if asked.get("have") == ["1"] else None
        return _Reply(200, data, "application/octet-stream", extra)

    async def _have(self) -> str:
        """This agent's have-vector (cache/peers.py, ``HAVE_HEADER``), built at most every
        ``HAVE_EVERY`` seconds however many peers ask (a peer asks each agent about once a second)."""
        now = time.monotonic()
        if self._have_value is None or now - self._have_value[0] >= HAVE_EVERY:
            vid, vector = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.lender.have_vector, self.source.held_ids() if self.source.shared else [])
            self._have_value = (now, encode_have(vid, vector))
        return self._have_value[1]

    async def _take_slot(self) -> None:
        if self._waiting >= self._queue and self._slots.locked():
            self.stats.busy += 1
            raise _error(PeerBusy(instance=self.who().get("instance"), why=f"{self._waiting} requests waiting"))
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def _manifest(self, body: bytes, fetch: bool) -> _Reply:
        """A version's manifest by ``IMAGE@ID``: the cache's own, one kept, or (``fetch``) fetched
        from the repository once for the site (``PeerSource.manifest_for_peers``); 404 if none. The
        caller checks that it hashes to the id."""
        try:
            ref = parse_ref(body.decode("ascii").strip())
        except (UnicodeDecodeError, BlockprovError):
            raise _error(UsageError("the body is IMAGE@ID")) from None
        if ref.version is None:
            raise _error(UsageError("a manifest is asked for by IMAGE@ID, not by tag"))
        await self._take_slot()
        try:
            raw = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.source.manifest_for_peers, ref.name, ref.version, fetch)
        except BlockprovError as e:
            log.info("could not fetch manifest %s for a peer: %s", ref, e)
            raw = None
        finally:
            self._slots.release()
        if raw is None:
            raise _Reply(404, b'{"error": "NotFound", "message": "this peer does not hold that manifest"}')
        self.stats.manifests_sent += 1
        self.stats.bytes_sent += len(raw)
        return _Reply(200, raw)

    def _check_ticket(self, auth: str) -> None:
        """A good ticket of this site, or the reply that refuses the caller. A ticket found good is
        remembered until it expires, with the site and the key that checked it: a peer sends the
        same ticket with every request (ten minutes of them), and parsing and MACing it each time
        was a visible part of serving thirty peers on two cores. A join that changes the site's
        keys (``site rotate-secret``) or the site makes it checked in full again."""
        m = self.source.membership
        if m is None:
            raise _error(PeerBusy(instance=self.who().get("instance"), why="it has not joined its site yet"))
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        now = time.time()
        hit = self._tickets.get(value) if scheme == tickets.SCHEME else None
        if hit is not None and hit[0] > now and hit[1] == m.site and m.keys.get(hit[2]) == hit[3]:
            return
        try:
            if scheme != tickets.SCHEME:
                raise Unauthorized(why="a peer of the site needs a ticket (Authorization: Ticket …)")
            claims = tickets.check(value, m.site, m.keys, now)
        except BlockprovError as e:
            self.stats.refused += 1
            raise _error(e) from None
        if len(self._tickets) >= TICKETS_KEPT:
            self._tickets.clear()
        self._tickets[value] = (claims.expires, m.site, claims.epoch, m.keys[claims.epoch])

    async def _answer(self, ids: list[bytes], fetch: bool) -> list[Blob]:
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self._pool, self._local, ids)
        self.stats.chunks_lent += sum(x is not None for x in items)
        want = [c for c, x in zip(ids, items, strict=True) if x is None] if fetch else []
        if want:
            try:
                got = await loop.run_in_executor(self._pool, self.source.fetch_for_peers, want)
            except (RepositoryUnavailable, BlockprovError) as e:
                log.info("could not fetch %d chunk(s) for a peer: %s", len(want), e)
                got = {}
            self.stats.chunks_fetched += len(got)
            items = [got.get(c, x) if x is None else x for c, x in zip(ids, items, strict=True)]
        self.stats.chunks_absent += sum(x is None for x in items)
        return encode_frames(items)

    def _local(self, ids: list[bytes]) -> list[Blob | None]:
        """What this agent holds of ``ids`` (a worker thread: it hashes and decompresses): the
        compressed blob it keeps from the repository, else the data file's plain chunk, else None."""
        kept = self.source.kept_for_peers(ids) if self.source.shared else {}
        rest = [c for c in ids if c not in kept]
        plain = dict(zip(rest, self.lender.lend(rest), strict=True)) if rest else {}
        out: list[Blob | None] = []
        for c in ids:
            if c in kept:
                out.append(kept[c])
            else:
                d = plain[c]
                out.append(None if d is None else plain_header(len(d)) + d)
        return out
