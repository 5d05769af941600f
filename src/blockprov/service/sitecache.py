"""The site cache: ``blockprov serve --upstream URL`` in a café, a classroom or a school (issue 26).

A site's machines use it as their repository (``--repo``, ``blockprov.repo=``). It holds a bounded
store of chunks (store/bounded.py, ``--cache-size``), fetches from the central repository what the
site's machines ask for, once however many ask at once, verifies it, and serves it to all of them.
So thirty PCs booting at nine cost the site's uplink one working set, not thirty.

What it answers itself, and what it passes on:

* **Chunks** (``POST /v1/chunks/fetch``, ``GET``/``HEAD /v1/chunks/{id}``): from its store, verified
  on every read (a damaged file is dropped and fetched again); what it lacks it pulls from the
  upstream in one batch per request, joining fetches already under way (single flight), verifies and
  keeps. Reads of chunks it holds never wait for the upstream, and go on while the upstream is down;
  a chunk it does not hold then fails clearly: 503 naming the upstream and why it is unreachable.
  A fetch marked ``x-blockprov-held-only: 1`` (an agent's speculative neighbourhood: cache/peers.py,
  ``PeerSource.get_held``) is answered from the store alone, what it lacks marked absent and never
  pulled: thirty agents that each guess large neighbourhoods over their loopback-fast link made the
  site cache pull the union of their guesses, 1.83× what one lone agent pulls (bench/RESULTS.md,
  "Boot storm"); a guess now crosses the uplink only once some agent actually reads it.
* **Boot scripts, boot files, manifests and boot profiles** (GETs): passed to the upstream, each
  answer kept on disk (``meta/``); a kept answer with an ETag is revalidated (``If-None-Match``), so
  a 23 MiB initramfs crosses the uplink once, and while the upstream is down the kept answer is
  served, marked ``x-blockprov-stale``. A boot script asked of the site cache names the site cache
  as the machine's repository (``base=``), so the PC's kernel, initramfs and chunks all come from it.
* **The UEFI HTTP boot image** (``GET``/``HEAD /v1/boot/{host}/boot.img``): built by the upstream
  for this site cache (``base=``, as for the boot script: its grub.cfg names the site cache as the
  PC's repository) and streamed through as it comes, with its Range, ETag and length; never kept
  (one per host, and its bulk is the kernel and initramfs), so it needs the upstream.
* **Everything else** (catalog writes, host assignments, uploads, agents' registrations and long
  polls, joins of a site): passed through to the upstream as it is, the caller's token included, so
  the upstream decides and records as if it were asked directly.
  Answers are streamed back as they come, never held whole.
* ``/v1/health`` (``role: site-cache``, so agents count its bytes as the site cache's) and
  ``/metrics`` are its own; so is pre-warm (service/prewarm.py).

Its requests are bounded as the repository's are (service/bounds.py ``Guard``: header and body
timeouts, a body limit per route, bytes of bodies in flight for the whole server; ``serve``'s
``--max-body``, ``--max-in-flight`` and ``--request-timeout``). A body passed through is streamed
to the upstream as it comes, never held whole: one 300 MiB PUT used to raise the site cache's
memory by 1.1 GiB (issue 27), and the upstream applies its own, smaller limit of each route.

Who may read what it holds: the upstream's tokens and scopes. The site cache asks the upstream's
``GET /v1/whoami`` with each caller's token (a minute's answer kept), and, while the upstream cannot
be reached, keeps using the last answer for up to ``DECISION_STALE`` (a café whose uplink is down
keeps booting; a token revoked meanwhile cannot be known anyway).

A down upstream is asked once per interval, not once per request (``retry.Backoff``,
``UPSTREAM_RETRY``: 2 s after the failure, doubling to a minute; any answer from it ends the
interval). Meanwhile what the site cache can answer without it is answered at once: held chunks,
kept answers (``x-blockprov-stale``), tokens it has an answer about (refreshed in the background,
one attempt per interval), and the upstream's body limits are taken as unknown (``body_limit``,
gated on its own: an upstream without ``/openapi.json`` is not asked on every body either). What
it cannot answer otherwise (a chunk it does not hold, a kept answer it never had) is still asked
of the upstream each time: the caller's own retry decides.

Crash rules: the chunk store's are in store/bounded.py; kept answers are written with
``durable.atomic_write`` (a torn one is never read); nothing here is the only copy of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, compile_path

from blockprov import __version__, codec
from blockprov.catalog.tokens import allows
from blockprov.durable import atomic_write
from blockprov.errors import (
    AccessDenied,
    BlockprovError,
    ChunkCorrupt,
    ChunkMissing,
    Forbidden,
    RepositoryUnavailable,
    TooLarge,
    Unauthorized,
    UpstreamCutBody,
    UsageError,
    error_to_dict,
)
from blockprov.repo.remote import ABSENT, HELD_ONLY, LEN, RemoteRepository
from blockprov.retry import Backoff, RetryPolicy
from blockprov.service.bounds import IN_FLIGHT, MAX_BODY, MAX_BODY_KEY, REQUEST_TIMEOUT, Guard
from blockprov.service.routes.common import own_url
from blockprov.store.bounded import BoundedStore

log = logging.getLogger("blockprov.sitecache")
T = TypeVar("T")

ID = codec.DIGEST_SIZE
HELD_ONLY_HEADER = next(iter(HELD_ONLY))  # a fetch answered only from what is held (module docstring)
MAX_FETCH_IDS = 16384
DECISION_FRESH = 60.0  # seconds a token's answer from the upstream is used before asking again
DECISION_STALE = 86400.0  # and how long it still serves while the upstream cannot be reached
DECISIONS = "decisions.json"
# a down upstream is asked again 2 s after a failure, the interval doubling to a minute (module docstring)
UPSTREAM_RETRY = RetryPolicy(timeout=None, first_delay=2.0, max_delay=60.0, jitter=False)
MAX_KEPT_BODY = 128 << 20  # the largest GET answer kept (an initramfs is ~25 MiB)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
KEPT_HEADERS = ("content-type", "etag", "cache-control", "x-blockprov-version", "last-modified")


class SiteCache:
    """What the site cache's routes share (one per app)."""

    def __init__(self, data_dir: Path, upstream: str, capacity: int, *, token: str | None = None,
                 timeout: float = 30.0, workers: int = 8) -> None:
        self.upstream_url = upstream.rstrip("/")
        self.store = BoundedStore(data_dir / "chunks", capacity)
        self.meta = data_dir / "meta"
        self.meta.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.upstream = RemoteRepository(self.upstream_url, timeout=timeout, token=token)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None), follow_redirects=False)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="bp-sitecache")
        self._flights: dict[bytes, asyncio.Future[bytes]] = {}
        self._pulls: set[asyncio.Task[None]] = set()
        # kept GETs under way, by target and headers (``keep``)
        self._gets: dict[str, asyncio.Future[tuple[httpx.Response | None, tuple[dict[str, Any], bytes] | None]]] = {}
        # the upstream's answers about callers' tokens, by SHA-256 of the Authorization value (never the
        # token): (when, the /v1/whoami answer or {"refused": why}); kept on disk, so a café whose site
        # cache restarts while its uplink is down still lets its PCs in
        self._decisions: dict[str, tuple[float, dict[str, Any]]] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._decisions = {k: (float(t), dict(a)) for k, (t, a) in
                               json.loads((data_dir / DECISIONS).read_text()).items()}
        self.counters = {"chunks_hit": 0, "bytes_hit": 0, "chunks_upstream": 0, "bytes_upstream": 0,
                         "chunks_failed": 0, "corrupt_dropped": 0, "passed": 0, "stale_answers": 0,
                         "kept_upstream": 0, "kept_joined": 0, "held_only_asked": 0, "held_only_absent": 0}
        self.last_upstream_ok: float | None = None
        self.last_upstream_error: str | None = None
        self.reach = Backoff(UPSTREAM_RETRY)  # the upstream down: one attempt per interval (module docstring)
        self._refreshes: set[asyncio.Task[None]] = set()  # tokens' answers asked again in the background
        self._body_limits: list[tuple[str, re.Pattern[str], str, int]] | None = None  # the upstream's, per route
        self._limits_gate = Backoff(UPSTREAM_RETRY)  # its /openapi.json not had: asked again once per interval

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def close(self) -> None:
        running: list[asyncio.Future[Any]] = [*self._pulls, *self._gets.values(), *self._refreshes]
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self.http.aclose()
        self.upstream.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _upstream_failed(self, e: BaseException) -> None:
        self.last_upstream_error = f"{type(e).__name__}: {e}"
        was_down = self.reach.down
        delay = self.reach.failed()
        log.log(logging.DEBUG if was_down else logging.WARNING,
                "site cache: the upstream %s cannot be reached (%s): what is held here is served; it is asked "
                "again in %.0f s", self.upstream_url, self.last_upstream_error, delay)

    def _upstream_ok(self) -> None:
        self.last_upstream_ok = time.time()
        if self.reach.down:
            log.warning("site cache: the upstream %s answers again", self.upstream_url)
            self.reach.ok()

    # -- chunks -----------------------------------------------------------------------------------
    def _read_verified(self, cids: Sequence[bytes]) -> dict[bytes, bytes]:
        """Blobs held here, each verified (a damaged one is dropped: fetched again)."""
        out: dict[bytes, bytes] = {}
        for c in cids:
            blob = self.store.get(c)
            if blob is None:
                continue
            try:
                codec.decode_view(blob, c)
            except ChunkCorrupt as e:
                log.warning("site cache: chunk %s on disk is damaged (%s): dropped, fetched again", c.hex()[:16], e)
                self.store.drop(c)
                self.counters["corrupt_dropped"] += 1
                continue
            out[c] = blob
        return out

    def _pull(self, cids: list[bytes]) -> dict[bytes, bytes]:
        """Fetch from the upstream, verify, keep (blocking)."""
        blobs = self.upstream.get_blobs(cids)
        out: dict[bytes, bytes] = {}
        for c, b in zip(cids, blobs, strict=True):
            codec.decode_view(b, c)  # ChunkCorrupt: the upstream sent a bad blob; nothing is kept
            self.store.put(c, b)
            out[c] = b
        return out

    async def blobs(self, cids: Sequence[bytes]) -> dict[bytes, bytes]:
        """Verified blobs of ``cids`` (distinct): held ones at once, the others pulled once."""
        got = await self.run(self._read_verified, cids)
        self.counters["chunks_hit"] += len(got)
        self.counters["bytes_hit"] += sum(map(len, got.values()))
        lacking = [c for c in cids if c not in got]
        if not lacking:
            return got
        loop = asyncio.get_running_loop()
        mine = [c for c in lacking if c not in self._flights]
        for c in mine:
            f = self._flights[c] = loop.create_future()
            f.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, waited for or not
        waits = {c: self._flights[c] for c in lacking}
        if mine:  # a task of its own: a caller that goes away does not take the others' fetch with it
            self._pulls.add(task := asyncio.ensure_future(self._pull_into(mine)))
            task.add_done_callback(self._pulls.discard)
        for c, f in waits.items():
            got[c] = await asyncio.shield(f)
        return got

    async def held(self, cids: Sequence[bytes]) -> dict[bytes, bytes]:
        """Verified blobs of those of ``cids`` held here, nothing pulled from the upstream: an
        agent's speculative neighbourhood (``HELD_ONLY_HEADER``). A guess is served when another
        agent's read (or pre-warm) brought it here, and costs the uplink nothing otherwise."""
        got = await self.run(self._read_verified, cids)
        self.counters["chunks_hit"] += len(got)
        self.counters["bytes_hit"] += sum(map(len, got.values()))
        self.counters["held_only_asked"] += len(cids)
        self.counters["held_only_absent"] += len(cids) - len(got)
        return got

    async def _pull_into(self, mine: list[bytes]) -> None:
        try:
            pulled = await self.run(self._pull, mine)
        except BaseException as e:  # every waiter gets the failure (cancelled: the site cache is closing)
            if isinstance(e, RepositoryUnavailable):
                self._upstream_failed(e)
            self.counters["chunks_failed"] += len(mine)
            for c in mine:
                f = self._flights.pop(c)
                if not f.done():
                    if isinstance(e, asyncio.CancelledError):
                        f.cancel()
                    else:
                        f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        self._upstream_ok()
        self.counters["chunks_upstream"] += len(pulled)
        self.counters["bytes_upstream"] += sum(map(len, pulled.values()))
        for c in mine:
            self._flights.pop(c).set_result(pulled[c])

    # -- who may read what it holds ---------------------------------------------------------------
    async def decision(self, auth: str) -> dict[str, Any]:
        """The upstream's ``/v1/whoami`` for this Authorization value (module docstring)."""
        now = time.time()
        key = hashlib.sha256(auth.encode("latin-1", "replace")).hexdigest()
        held = self._decisions.get(key)
        usable = held is not None and now - held[0] < DECISION_STALE
        if held is not None and now - held[0] < DECISION_FRESH:
            answer = held[1]
        elif held is not None and usable and self.reach.down:
            # the upstream is down: the last answer holds now, and is asked again in the background
            # once per interval (a held chunk is served without waiting for a down upstream)
            if self.reach.due():
                self._refreshes.add(task := asyncio.ensure_future(self._refresh(key, auth)))
                task.add_done_callback(self._refreshes.discard)
            answer = held[1]
        elif not self.reach.due():
            raise RepositoryUnavailable(url=self.upstream_url, why=f"the site cache cannot check the token there "
                                        f"({self.last_upstream_error}; asked again in {self.reach.wait():.0f} s)")
        else:
            try:
                answer = await self._whoami(key, auth, held)
            except (httpx.TransportError, RepositoryUnavailable, ValueError) as e:
                self._upstream_failed(e)
                if held is None or not usable:
                    raise RepositoryUnavailable(url=self.upstream_url, why=f"the site cache cannot check the token "
                                                f"there ({type(e).__name__}: {e})") from None
                answer = held[1]
        if "refused" in answer:
            raise Unauthorized(why=str(answer["refused"]))
        return answer

    async def _whoami(self, key: str, auth: str, held: tuple[float, dict[str, Any]] | None) -> dict[str, Any]:
        """Ask the upstream about a token, and keep its answer."""
        r = await self.http.get(f"{self.upstream_url}/v1/whoami", headers={"authorization": auth} if auth else {})
        if r.status_code in (401, 403):
            answer = {"refused": str(r.json().get("message", "the token is not valid"))}
        elif r.status_code == 200:
            answer = dict(r.json())
        else:
            raise RepositoryUnavailable(url=self.upstream_url, why=f"HTTP {r.status_code} from /v1/whoami")
        self._upstream_ok()
        if len(self._decisions) > 10000:
            self._decisions.clear()
        changed = held is None or held[1] != answer
        self._decisions[key] = (time.time(), answer)
        if changed:
            await self.run(atomic_write, self.data_dir / DECISIONS, json.dumps(self._decisions).encode())
        return answer

    async def _refresh(self, key: str, auth: str) -> None:
        try:
            await self._whoami(key, auth, self._decisions.get(key))
        except (httpx.TransportError, RepositoryUnavailable, ValueError) as e:
            self._upstream_failed(e)

    async def check(self, request: Request, need: str = "read", *, boot: bool = False) -> None:
        d = await self.decision(request.headers.get("authorization", ""))
        if not d.get("enforced"):
            return
        tok = d.get("token")
        if tok is None:
            if need == "read" and (d.get("anonymous_read") or (boot and d.get("anonymous_boot"))):
                return
            raise Unauthorized(why="this repository needs a token")
        if not allows(str(tok.get("scope")), need):
            raise Forbidden(scope=tok.get("scope"), action=f"{request.method} {request.url.path}", needed=need)

    # -- kept GET answers -------------------------------------------------------------------------
    def _kept(self, key: str) -> tuple[dict[str, Any], bytes] | None:
        head, body = self.meta / f"{key}.json", self.meta / f"{key}.body"
        try:
            return json.loads(head.read_text()), body.read_bytes()
        except (OSError, ValueError):
            return None

    def _keep(self, key: str, headers: dict[str, str], body: bytes) -> None:
        atomic_write(self.meta / f"{key}.body", body)
        atomic_write(self.meta / f"{key}.json", json.dumps({"headers": headers, "kept": time.time()}).encode())

    async def keep(self, target: str, headers: dict[str, str]
                   ) -> tuple[httpx.Response | None, tuple[dict[str, Any], bytes] | None]:
        """GET ``target`` (path and query) from the upstream, revalidating a kept answer by its ETag
        and keeping a new one: (the upstream's answer or None when it cannot be reached, the kept
        answer or None). Answers are kept by path, query and whether octets were asked for.

        Identical requests at the same moment (the same target and headers, the caller's token
        included, so nobody is answered on another's authority) share one upstream GET: thirty PCs
        moving to a v2 at once ask for its manifest together, and each would otherwise pull it
        through the uplink before the first answer was kept (bench_storm's rollout)."""
        flight = hashlib.sha256(json.dumps([target, sorted(headers.items())]).encode()).hexdigest()
        task = self._gets.get(flight)
        if task is None:
            task = self._gets[flight] = asyncio.ensure_future(self._keep_once(target, headers))
            # gone from the table when done; its failure retrieved even if every caller went away
            task.add_done_callback(lambda t: (self._gets.pop(flight, None), t.cancelled() or t.exception()))
            self.counters["kept_upstream"] += 1
        else:
            self.counters["kept_joined"] += 1
        return await asyncio.shield(task)  # a caller that goes away leaves the others' GET running

    async def _keep_once(self, target: str, headers: dict[str, str]
                         ) -> tuple[httpx.Response | None, tuple[dict[str, Any], bytes] | None]:
        octets = "application/octet-stream" in headers.get("accept", "")
        key = hashlib.sha256(f"{target}\0{'octets' if octets else ''}".encode()).hexdigest()
        kept = await self.run(self._kept, key)
        if kept is not None and not self.reach.due():
            return None, kept  # the upstream is down and not due to be asked: the kept answer, at once
        revalidate = kept is not None and "etag" in kept[0]["headers"] and "if-none-match" not in headers
        if revalidate and kept is not None:
            headers = headers | {"if-none-match": kept[0]["headers"]["etag"]}
        try:
            r = await self.http.get(f"{self.upstream_url}{target}", headers=headers)
        except httpx.TransportError as e:
            self._upstream_failed(e)
            return None, kept
        if r.status_code < 500:
            self._upstream_ok()
        if r.status_code == 200 and len(r.content) <= MAX_KEPT_BODY:
            keep = {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}
            await self.run(self._keep, key, keep, r.content)
            kept = ({"headers": keep}, r.content)
        return r, kept

    async def body_limit(self, method: str, path: str) -> tuple[str, int] | None:
        """The upstream's own limit of a request body for ``method path`` (its route and
        ``x-blockprov-max-body``, from its ``/openapi.json``, read once), or None when it is not
        known (the upstream unreachable, or silent about this route): the upstream then decides.
        Not had yet: asked again once per interval (``_limits_gate``), not on every body."""
        if self._body_limits is None:
            if not self._limits_gate.due():
                return None
            try:
                r = await self.http.get(f"{self.upstream_url}/openapi.json", timeout=30.0)
                paths = r.json().get("paths", {}) if r.status_code == 200 else None
                limits = [(m.upper(), compile_path(p)[0], p, int(op[MAX_BODY_KEY]))
                          for p, ops in paths.items() for m, op in ops.items()
                          if isinstance(op, dict) and MAX_BODY_KEY in op] if isinstance(paths, dict) else None
            except httpx.TransportError as e:
                self._upstream_failed(e)
                limits = None
            except (ValueError, TypeError, AttributeError):
                limits = None
            if limits is None:
                delay = self._limits_gate.failed()
                log.info("site cache: the upstream's body limits are not known (asked again in %.0f s): the "
                         "upstream decides", delay)
                return None
            self._limits_gate.ok()
            self._body_limits = limits
        return next(((route, limit) for m, rx, route, limit in self._body_limits if m == method and rx.match(path)),
                    None)

    def usage(self) -> dict[str, Any]:
        blobs, nbytes = self.store.usage()
        return {"chunks": blobs, "bytes": nbytes, "capacity": self.store.capacity, "evicted": self.store.evicted}


# -- the routes -----------------------------------------------------------------------------------------------
def _sc(request: Request) -> SiteCache:
    sc: SiteCache = request.app.state.sitecache
    return sc


def _error(e: BlockprovError) -> JSONResponse:
    return JSONResponse(error_to_dict(e), status_code=e.http_status,
                        headers={"www-authenticate": 'Bearer realm="blockprov"'} if e.http_status == 401 else None)


def answers_errors(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except ClientDisconnect:  # the caller went away (a timeout of its own) before its body came
            return Response(status_code=400)
        except BlockprovError as e:
            if e.http_status >= 500 and not isinstance(e, RepositoryUnavailable):
                log.error("%s %s: %s", request.method, request.url.path, e)
            return _error(e)
    return wrapper


@answers_errors
async def health(request: Request) -> Response:
    sc = _sc(request)
    return JSONResponse({"status": "ok", "version": __version__, "role": "site-cache", "upstream": sc.upstream_url,
                         "upstream_ok": sc.last_upstream_ok, "upstream_error": sc.last_upstream_error,
                         **sc.usage()})


@answers_errors
async def fetch(request: Request) -> Response:
    sc = _sc(request)
    await sc.check(request)
    body = await request.body()
    if len(body) % ID:
        raise UsageError(f"body of {len(body)} bytes is not a whole number of {ID}-byte chunk ids")
    ids = [body[i:i + ID] for i in range(0, len(body), ID)]
    if len(ids) > MAX_FETCH_IDS:
        raise TooLarge(f"{len(ids)} ids in one fetch; at most {MAX_FETCH_IDS}")
    uniq = list(dict.fromkeys(ids))
    if request.headers.get(HELD_ONLY_HEADER) == "1":
        # an agent's speculation (repo/remote.py, ``get_held_views``): what is held, the rest marked
        # absent, nothing pulled from the upstream (module docstring)
        got = await sc.held(uniq)
        return Response(b"".join(_frames(uniq, got)), media_type="application/octet-stream")
    try:
        got = await sc.blobs(uniq)
    except ChunkMissing as e:
        return JSONResponse(error_to_dict(e), status_code=404)
    except RepositoryUnavailable as e:
        # What it holds it still gives, to a client that takes a partial answer (repo/remote.py,
        # PARTIAL): a read of a held chunk must not fail because a read-ahead asked for more.
        held = await sc.run(sc._read_verified, uniq) if request.headers.get("x-blockprov-partial") == "1" else {}
        if not held:
            raise RepositoryUnavailable(url=sc.upstream_url, why=f"{len(uniq)} chunk(s) asked, not held by this "
                                                                 f"site cache, and the upstream is unreachable: {e}"
                                        ) from None
        got = held
    return Response(b"".join(_frames(uniq, got)), media_type="application/octet-stream")


def _frames(uniq: Sequence[bytes], got: dict[bytes, bytes]) -> list[bytes]:
    """A fetch's answer: per id, its length and blob, or ``ABSENT`` for one not given."""
    parts: list[bytes] = []
    for c in uniq:
        b = got.get(c)
        parts += (LEN.pack(len(b)), b) if b is not None else (LEN.pack(ABSENT),)
    return parts


@answers_errors
async def one_chunk(request: Request) -> Response:
    sc = _sc(request)
    await sc.check(request)
    cid = codec.parse_hexid(request.path_params["cid"])
    try:
        blob = (await sc.blobs([cid]))[cid]
    except RepositoryUnavailable as e:
        raise RepositoryUnavailable(url=sc.upstream_url, why=f"chunk {cid.hex()} is not held by this site cache and "
                                                             f"the upstream is unreachable: {e}") from None
    headers = {"etag": f'"{cid.hex()}"', "cache-control": "public, max-age=31536000, immutable"}
    if request.method == "HEAD":
        return Response(None, headers=headers | {"content-length": str(len(blob))})
    return Response(blob, headers=headers, media_type="application/octet-stream")


def _forward_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def _answer(r: httpx.Response) -> Response:
    headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
    return Response(r.content, status_code=r.status_code, headers=headers)


def _streamed(sc: SiteCache, r: httpx.Response, what: str) -> Response:
    """The upstream's answer ``r`` (opened with ``stream=True``) sent on as it comes: its bytes as
    they are (content-encoding and length kept), never the whole body in memory (a 30 MiB UEFI
    boot image used to be read whole before a byte went out)."""
    headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
    if "content-length" in r.headers:
        headers["content-length"] = r.headers["content-length"]

    async def body() -> AsyncIterator[bytes]:
        try:
            async for part in r.aiter_raw():
                yield part
        except httpx.TransportError as e:  # the client sees a short body (its length was said)
            sc._upstream_failed(e)
            log.warning("site cache: the upstream's answer to %s was cut: %s", what, sc.last_upstream_error)
        finally:
            await r.aclose()

    return StreamingResponse(body(), status_code=r.status_code, headers=headers)


def _unreachable(sc: SiteCache, e: httpx.TransportError, request: Request) -> RepositoryUnavailable:
    sc._upstream_failed(e)
    return RepositoryUnavailable(url=sc.upstream_url, why=f"{type(e).__name__}: {e} (the site cache passes "
                                                          f"{request.method} {request.url.path} on)")


@answers_errors
async def passthrough(request: Request) -> Response:
    """Anything the site cache does not answer itself: to the upstream, as it came."""
    return await pass_on(request, request.url.query)


async def pass_on(request: Request, query: str) -> Response:
    """``request`` to the upstream with ``query``. The body is streamed (bounded by ``Guard``), with
    its declared length when it had one; so is the answer (``_streamed``)."""
    sc = _sc(request)
    url = f"{sc.upstream_url}{request.url.path}" + (f"?{query}" if query else "")
    headers = _forward_headers(request)
    size = request.headers.get("content-length")
    if size is not None:
        headers["content-length"] = size
        # over the upstream's limit for the route: its 413, said here (the upstream would answer it
        # and close before taking the body, and its answer would be lost with the connection)
        known = await sc.body_limit(request.method, request.url.path) if size.isdigit() else None
        if known is not None and int(size) > known[1]:
            raise TooLarge(f"request body of {size} bytes exceeds the limit of {known[1]} bytes for "
                           f"{request.method} {known[0]} (the upstream's)")
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    try:
        r = await sc.http.send(sc.http.build_request(request.method, url, headers=headers,
                                                     content=request.stream() if has_body else None), stream=True)
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
        if not has_body:
            raise _unreachable(sc, e, request) from None
        size = request.headers.get("content-length")
        raise UpstreamCutBody(url=sc.upstream_url, what=f"{request.method} {request.url.path}"
                              + (f" ({size} bytes)" if size else ""),
                              why=f"it does so for a body over its limit for the route (a 413; each route's "
                                  f"limit is x-blockprov-max-body in {sc.upstream_url}/openapi.json), or it "
                                  f"failed mid-request ({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise _unreachable(sc, e, request) from None
    sc.counters["passed"] += 1
    if r.status_code < 500:
        sc._upstream_ok()
    return _streamed(sc, r, f"{request.method} {request.url.path}")


async def kept_get(request: Request, *, boot: bool = False, query: str | None = None) -> Response:
    """A GET passed to the upstream whose answer is kept (module docstring)."""
    sc = _sc(request)
    q = query if query is not None else request.url.query
    target = f"{request.url.path}?{q}" if q else request.url.path
    r, kept = await sc.keep(target, _forward_headers(request))
    if r is not None and r.status_code < 500:
        if r.status_code == 304 and kept is not None and "if-none-match" not in request.headers:
            return Response(kept[1], headers=kept[0]["headers"])
        return _answer(r)
    if kept is None:
        why = sc.last_upstream_error if r is None else f"HTTP {r.status_code}"
        return _error(RepositoryUnavailable(url=sc.upstream_url, why=f"{why}; this site cache holds no copy of "
                                                                     f"{request.url.path}"))
    try:
        await sc.check(request, boot=boot)
    except (AccessDenied, RepositoryUnavailable) as e:
        return _error(e)
    sc.counters["stale_answers"] += 1
    return Response(kept[1], headers=kept[0]["headers"] | {"x-blockprov-stale": "upstream unreachable"})


def _naming_me(request: Request, *, firmware: bool = False) -> str:
    """The request's query with ``base=`` this site cache's URL as the client reached it (unless
    it names one): the answer built upstream names the site cache as the PC's repository."""
    q = request.url.query
    if "base" not in request.query_params:
        base = urlencode({"base": own_url(request, firmware=firmware)})
        q = f"{q}&{base}" if q else base
    return q


@answers_errors
async def boot_script(request: Request) -> Response:
    """The host's iPXE script, naming this site cache as where its files and chunks come from."""
    return await kept_get(request, boot=True, query=_naming_me(request))


@answers_errors
async def boot_image(request: Request) -> Response:
    """The host's UEFI HTTP boot image, built by the upstream naming this site cache (its grub.cfg's
    ``blockprov.repo=``), streamed through (module docstring). As the repository does for this
    image, the URL keeps this server's port when the firmware's Host header drops it (edk2)."""
    return await pass_on(request, _naming_me(request, firmware=True))


async def boot_file(request: Request) -> Response:
    return await kept_get(request, boot=True)


@answers_errors
async def metrics(request: Request) -> Response:
    sc = _sc(request)
    await sc.check(request)
    lines = []
    for name, value in sc.counters.items():
        lines += [f"# TYPE blockprov_sitecache_{name}_total counter", f"blockprov_sitecache_{name}_total {value}"]
    for name, value in sc.usage().items():
        lines += [f"# TYPE blockprov_sitecache_{name} gauge", f"blockprov_sitecache_{name} {value}"]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _body_limit(route: Route, limit: int) -> Route:
    """The most ``Guard`` lets a route read (it reads a route's declaration from ``openapi_extra``,
    as FastAPI's routes carry it)."""
    route.openapi_extra = {MAX_BODY_KEY: limit}  # type: ignore[attr-defined]
    return route


def create_site_cache_app(sc: SiteCache, extra_routes: Sequence[Route] = (),
                          background: Callable[[], Awaitable[None]] | None = None, *, max_body: int = MAX_BODY,
                          in_flight: int = IN_FLIGHT, timeout: float = REQUEST_TIMEOUT) -> Starlette:
    """The site cache's app; ``background``: a task run while it serves (pre-warm's scheduler).
    ``max_body``: the most a body passed through may be (the upstream's own limit per route
    applies as well); ``in_flight``, ``timeout``: service/bounds.py."""
    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        _body_limit(Route("/v1/chunks/fetch", fetch, methods=["POST"]), MAX_FETCH_IDS * ID),
        Route("/v1/chunks/{cid}", one_chunk, methods=["GET", "HEAD"]),
        Route("/v1/boot/{host}", boot_script, methods=["GET"]),
        Route("/v1/boot/{host}/boot.img", boot_image, methods=["GET", "HEAD"]),
        Route("/v1/images/{name}/versions/{vid}/boot/{which}", boot_file, methods=["GET"]),
        Route("/v1/images/{name}/manifest", kept_get, methods=["GET"]),
        Route("/v1/images/{name}/versions/{vid}/profile", kept_get, methods=["GET"]),
        *extra_routes,
        _body_limit(Route("/{path:path}", passthrough, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
                    max_body),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.ensure_future(background()) if background is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await sc.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(Guard, max_body=max_body, routes=routes, in_flight=in_flight, timeout=timeout)
    app.state.sitecache = sc
    return app
