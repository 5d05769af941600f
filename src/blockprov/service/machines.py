"""HTTP routes for machines: boot files, host boot scripts, boot profiles, agents and their requests.

Added to the app by ``create_app`` (app.py), whose handlers map errors to statuses; everything here
raises ``blockprov.errors`` classes like the rest of the API. Why the shapes:

* ``GET /v1/boot/{host}`` is what iPXE fetches (``chain http://repo/v1/boot/${net0/mac}``): a
  ``text/plain`` ``#!ipxe`` script. URLs in it are built from the address the host used to reach
  us (the request's Host), unless ``?base=`` says otherwise, so NAT or a proxy in between is
  handled by the client's own view. Errors there are one ``text/plain`` line (curl and iPXE
  consoles show it) unless the client asks for JSON (``RemoteRepository`` does).
* Boot files are served with ``Content-Length``, a strong ETag (the content id), single ranges
  and HEAD: iPXE, curl and resumable downloads all work. Every piece is verified before a byte of
  it is sent; the first is rendered before the status line, so a bad piece is a clean 422.
* Long polls (``…/requests/next?wait=``, ``…/requests/{id}?wait=``) wait on the event loop, never
  on a pool thread, and wake at once for a change made through this process. Changes made by other
  servers are seen through the catalog: every ``POLL`` s one query (``ReadySet``) tells all of this
  process's waiting agents whether a request is ready for them; only those agents then take it.
  A thousand agents waiting therefore cost one query per ``POLL``, not a thousand. A waiting agent
  re-checks by itself every ``SEEN_EVERY`` s, and that check refreshes its ``last_seen``. Long polls
  end early when the server is shutting down, so a stop never waits out an agent's poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from blockprov import boot, names
from blockprov.catalog.machines import SEEN_EVERY, Registry
from blockprov.errors import BlockprovError, ProfileNotFound, UsageError
from blockprov.names import Ref, host_id, image_name, instance_id, parse_ref, request_id, version_id
from blockprov.repo.local import LocalRepository
from blockprov.service.rawview import RangeNotSatisfiable, etag_matches, parse_range

T = TypeVar("T")
Run = Callable[..., Awaitable[Any]]
POLL = 0.15  # seconds between re-reads of the catalog during a long poll
MAX_WAIT = 30.0  # longest long poll; agents poll again
PIECES_PER_JOB = 4  # boot file pieces decoded per thread-pool job (4 MiB)
U32 = struct.Struct("<I")
OCTETS = "application/octet-stream"


class Wakeup:
    """Wakes this process's long polls when this process changed the request queue."""

    def __init__(self) -> None:
        # One event per event loop: uvicorn has one, but an app may be driven from several
        # (Starlette's TestClient starts a loop per request), and an asyncio.Event is bound to one.
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            events, self._events = self._events, {}
        here = _running_loop()
        for loop, ev in events.items():
            if loop is here:
                ev.set()
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody is waiting there
                    loop.call_soon_threadsafe(ev.set)

    async def wait(self, timeout: float) -> bool:
        """True when woken by ``notify``, False when the timeout ran out."""
        loop = asyncio.get_running_loop()
        with self._lock:
            ev = self._events.get(loop)
            if ev is None:
                ev = self._events[loop] = asyncio.Event()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except TimeoutError:
            return False


class ReadySet:
    """Which instances have a request ready, read from the catalog at most once per ``POLL`` for all
    of this process's long polls (the first waiter to find it stale refreshes it; the others use it)."""

    def __init__(self, registry: Registry, run: Run) -> None:
        self.registry = registry
        self.run = run
        self._ready: set[str] = set()
        self._at = -float("inf")
        self._refreshing = False
        self._lock = threading.Lock()

    async def has(self, instance: str) -> bool:
        with self._lock:
            refresh = time.monotonic() - self._at >= POLL and not self._refreshing
            self._refreshing |= refresh
        if refresh:
            try:
                ready = await self.run(self.registry.ready_instances)
            finally:
                with self._lock:
                    self._refreshing = False
            with self._lock:
                self._ready, self._at = ready, time.monotonic()
        return instance in self._ready


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def wait_param(wait: float) -> float:
    if not 0 <= wait <= MAX_WAIT:  # also refuses NaN
        raise UsageError(f"wait must be 0 to {MAX_WAIT:g} seconds, not {wait}")
    return wait


async def json_of(request: Request) -> Any:
    body = b"".join([p async for p in request.stream()])
    try:
        return json.loads(body)
    except ValueError as e:
        raise UsageError(f"the body is not JSON: {e}") from None


def add_routes(app: FastAPI, repo: LocalRepository, run: Run) -> None:
    wakeup = Wakeup()
    ready = ReadySet(repo.registry, run)
    json_body: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}}}}}

    def draining(request: Request) -> bool:
        return bool(getattr(request.app.state, "draining", False))

    def version_ref(name: str, vid: str) -> Ref:
        return Ref(image_name(name), version=version_id(vid))

    # -- boot files -------------------------------------------------------------------------------
    @app.get("/v1/images/{name}/versions/{vid}/boot", tags=["boot"])
    async def get_boot_files(name: str, vid: str) -> dict[str, Any]:
        """The version's boot file descriptors and command line; ``{"boot": null}`` when it has none."""
        info = await run(repo.get_boot_files, version_ref(name, vid))
        return {"boot": None if info is None else info.to_dict()}

    @app.put("/v1/images/{name}/versions/{vid}/boot", tags=["boot"], openapi_extra=json_body)
    async def put_boot_files(name: str, vid: str, request: Request) -> dict[str, Any]:
        """Record ``{"kernel": {size, pieces}, "initrd": {…}, "cmdline": "…"}`` whose pieces were
        uploaded as chunks first (409 ``MissingChunks`` lists those still absent)."""
        r = version_ref(name, vid)
        d = await json_of(request)
        if not isinstance(d, dict):
            raise UsageError('expected {"kernel": …, "initrd": …, "cmdline": "…"}')
        kernel, initrd = boot.BootFile.from_dict(d.get("kernel")), boot.BootFile.from_dict(d.get("initrd"))
        cmdline = d.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise UsageError("cmdline must be a string")
        info = await run(repo.record_boot_files, r.name, str(r.version), kernel, initrd, cmdline)
        return dict(info.to_dict())

    @app.get("/v1/images/{name}/versions/{vid}/boot/{which}", tags=["boot"], response_class=Response)
    @app.head("/v1/images/{name}/versions/{vid}/boot/{which}", tags=["boot"], response_class=Response)
    async def get_boot_file(name: str, vid: str, which: str, request: Request) -> Response:
        """The kernel or initrd: Content-Length, ETag, single ``Range``, HEAD; verified as it is sent."""
        f: boot.BootFile = await run(repo.boot_file_info, version_ref(name, vid), which)
        etag = f'"{f.id}"'
        headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": "no-cache"}
        h = request.headers
        inm = h.get("if-none-match")
        if inm is not None and etag_matches(inm, etag):
            return Response(status_code=304, headers=headers)
        try:
            if_range = h.get("if-range")
            rng = parse_range(h.get("range"), f.size) if if_range is None or if_range.strip() == etag else None
        except RangeNotSatisfiable:
            return Response(status_code=416, headers=headers | {"content-range": f"bytes */{f.size}"})
        lo, hi = rng if rng is not None else (0, f.size)
        if rng is not None:
            headers["content-range"] = f"bytes {lo}-{hi - 1}/{f.size}"
        headers["content-length"] = str(hi - lo)
        status = 206 if rng is not None else 200
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type=OCTETS)

        def render(first: int, stop: int) -> bytes:
            blobs = repo.store.get_blobs([f.piece_id(i) for i in range(first, stop)])
            data = b"".join(boot.assemble(f, blobs, first))
            base = first * boot.PIECE
            return data[max(lo, base) - base:min(hi, stop * boot.PIECE) - base]

        jobs = []
        p = lo // boot.PIECE
        last = (hi - 1) // boot.PIECE
        while p <= last:
            jobs.append((p, min(p + PIECES_PER_JOB, last + 1)))
            p = jobs[-1][1]
        head = await run(render, *jobs[0])

        async def body() -> AsyncIterator[bytes]:
            yield head
            for job in jobs[1:]:
                yield await run(render, *job)

        return StreamingResponse(body(), status_code=status, headers=headers, media_type=OCTETS)

    # -- hosts ------------------------------------------------------------------------------------
    @app.get("/v1/boot/{host}", tags=["boot"], response_class=PlainTextResponse)
    async def boot_script(host: str, request: Request, base: str | None = None) -> Response:
        """The iPXE script of a host (MAC with ':' or '-', or host id). 404: unknown host;
        409: its version has no boot files or its tag is gone; 400: a malformed host."""
        try:
            url = names.base_url(base if base is not None else str(request.base_url))
            text = await run(repo.boot_script, host, url)
        except BlockprovError as e:
            if "application/json" in request.headers.get("accept", ""):
                raise
            return PlainTextResponse(f"blockprov: {e}\n", status_code=e.http_status)
        return PlainTextResponse(text, headers={"cache-control": "no-store"})

    @app.get("/v1/hosts", tags=["hosts"])
    async def list_hosts() -> dict[str, Any]:
        return {"hosts": [h.to_dict() for h in await run(repo.hosts)]}

    @app.get("/v1/hosts/{host}", tags=["hosts"])
    async def get_host(host: str) -> dict[str, Any]:
        return dict((await run(repo.registry.host, host)).to_dict())

    @app.put("/v1/hosts/{host}", tags=["hosts"], openapi_extra=json_body)
    async def assign_host(host: str, request: Request) -> dict[str, Any]:
        """Body ``{"ref": "NAME:TAG" | "NAME@ID", "args": "extra kernel arguments"}``."""
        d = await json_of(request)
        if not isinstance(d, dict) or not isinstance(d.get("ref"), str) or not isinstance(d.get("args", ""), str):
            raise UsageError('expected {"ref": "NAME:TAG", "args": "…"}')
        return dict((await run(repo.assign_host, host_id(host), parse_ref(d["ref"]), d.get("args", ""))).to_dict())

    @app.delete("/v1/hosts/{host}", tags=["hosts"])
    async def remove_host(host: str) -> dict[str, Any]:
        await run(repo.remove_host, host_id(host))
        return {"removed": host_id(host)}

    # -- profiles ---------------------------------------------------------------------------------
    @app.put("/v1/images/{name}/versions/{vid}/profile", tags=["profiles"], openapi_extra=json_body)
    async def put_profile(name: str, vid: str, request: Request) -> dict[str, Any]:
        """Body ``{"chunks": [i, …]}`` or, as ``application/octet-stream``, u32 LE indices."""
        r = version_ref(name, vid)
        if request.headers.get("content-type", "").startswith(OCTETS):
            raw = b"".join([p async for p in request.stream()])
            if len(raw) % U32.size:
                raise UsageError("a binary profile is a whole number of 4-byte indices")
            order = [v for (v,) in U32.iter_unpack(raw)]
        else:
            d = await json_of(request)
            if not isinstance(d, dict) or not isinstance(d.get("chunks"), list):
                raise UsageError('expected {"chunks": [index, …]}')
            order = d["chunks"]
        await run(repo.put_profile, r.name, str(r.version), order)
        return {"image": r.name, "version": r.version, "chunks": len(order)}

    @app.get("/v1/images/{name}/versions/{vid}/profile", tags=["profiles"], response_class=Response)
    async def get_profile(name: str, vid: str, request: Request) -> Response:
        """``{"chunks": […]}``, or u32 LE indices when the client accepts ``application/octet-stream``;
        404 ``ProfileNotFound`` when none is recorded."""
        r = version_ref(name, vid)
        order = await run(repo.get_profile, r.name, str(r.version))
        if order is None:
            raise ProfileNotFound(ref=str(r))
        if OCTETS in request.headers.get("accept", ""):
            return Response(b"".join(U32.pack(i) for i in order), media_type=OCTETS)
        return JSONResponse({"image": r.name, "version": r.version, "chunks": order})

    # -- agents -----------------------------------------------------------------------------------
    @app.get("/v1/agents", tags=["agents"])
    async def list_agents() -> dict[str, Any]:
        return {"agents": await run(repo.agents)}

    @app.put("/v1/agents/{instance}", tags=["agents"], openapi_extra=json_body)
    async def register_agent(instance: str, request: Request) -> JSONResponse:
        """Register or refresh (heartbeat) an agent: ``{image, version, host, pid, addresses, …}``.
        201 when it is new."""
        new = await run(repo.registry.register_agent, instance_id(instance), await json_of(request))
        return JSONResponse({"instance": instance, "new": new}, status_code=201 if new else 200)

    @app.delete("/v1/agents/{instance}", tags=["agents"])
    async def unregister_agent(instance: str) -> dict[str, Any]:
        await run(repo.unregister_agent, instance_id(instance))
        wakeup.notify()
        return {"removed": instance}

    @app.post("/v1/agents/{instance}/requests", tags=["agents"], status_code=201, openapi_extra=json_body)
    async def post_request(instance: str, request: Request) -> JSONResponse:
        """Ask an agent to do something: ``{"op": "snapshot", "args": {…}}`` → 201 ``{"id"}``."""
        d = await json_of(request)
        if not isinstance(d, dict) or not isinstance(d.get("op"), str):
            raise UsageError('expected {"op": "…", "args": {…}}')
        rid = await run(repo.post_request, instance_id(instance), d["op"], d.get("args"))
        wakeup.notify()
        return JSONResponse({"id": rid}, status_code=201)

    @app.get("/v1/agents/{instance}/requests/next", tags=["agents"], response_class=Response)
    async def next_request(instance: str, request: Request, wait: float = 0.0) -> Response:
        """The oldest pending request, now running under a lease; 204 after ``wait`` s (≤ 30) if none."""
        instance_id(instance)
        deadline = time.monotonic() + wait_param(wait)
        check = True  # the first time, after a local change, when the catalog says so, or every SEEN_EVERY s
        while True:  # bounded by the deadline
            if check:
                checked = time.monotonic()
                req = await run(repo.registry.try_next_request, instance)
                if req is not None:
                    return JSONResponse(req)
            left = deadline - time.monotonic()
            if left <= 0 or draining(request):
                return Response(status_code=204)
            woken = await wakeup.wait(min(POLL, left))
            check = woken or time.monotonic() - checked >= SEEN_EVERY or await ready.has(instance)

    @app.get("/v1/agents/{instance}/requests/{rid}", tags=["agents"])
    async def get_request(instance: str, rid: str, request: Request, wait: float = 0.0) -> dict[str, Any]:
        """A request's state; waits up to ``wait`` s (≤ 30) for it to become done or failed."""
        instance_id(instance)
        request_id(rid)
        deadline = time.monotonic() + wait_param(wait)
        while True:  # bounded by the deadline
            req: dict[str, Any] = await run(repo.registry.get_request, instance, rid)
            left = deadline - time.monotonic()
            if req["state"] in ("done", "failed") or left <= 0 or draining(request):
                return req
            await wakeup.wait(min(POLL, left))

    @app.post("/v1/agents/{instance}/requests/{rid}/result", tags=["agents"], openapi_extra=json_body)
    async def complete_request(instance: str, rid: str, request: Request) -> dict[str, Any]:
        """``{"ok": true, "result": {…}}`` or ``{"ok": false, "error": "…"}``; 409 if already completed."""
        d = await json_of(request)
        if not isinstance(d, dict) or not isinstance(d.get("ok"), bool):
            raise UsageError('expected {"ok": true|false, "result": {…}, "error": "…"}')
        out: dict[str, Any] = await run(repo.complete_request, instance_id(instance), request_id(rid), d["ok"],
                                        d.get("result"), d.get("error"))
        wakeup.notify()
        return out
