"""What one request, and all requests together, may cost the server in time and memory (issue 27).

The one place that bounds requests; a route only declares the largest body it reads.

* **Headers** (``bounded_http``, uvicorn's httptools protocol): a request's line and headers must
  arrive within ``timeout`` seconds of its first byte (a new connection owes its first request from
  the moment it is made) and hold at most ``MAX_HEADER`` bytes; else 408 or 431 and the connection
  is closed. Without it a client sending a header byte a second held a connection for ever.
* **Bodies, per route**: each route declares the largest body it reads in its ``openapi_extra``
  (``body_spec``: ``x-blockprov-max-body``, also in the OpenAPI document); a route that declares
  none reads at most ``DEFAULT_BODY``. A declared ``Content-Length`` over the limit is refused
  before a byte is read, a streamed body as soon as it passes it (413). ``--max-body`` caps them all.
* **Bodies, in time**: while a route waits for its body, the body must keep coming: after a grace
  of ``timeout`` seconds, at least ``MIN_BODY_RATE`` bytes a second on average since the route
  began reading it; a slower client gets 408 and the connection is closed.
* **Bodies, together**: the bytes of all request bodies being received or held by their routes are
  bounded by ``in_flight``. A route that starts reading a body that would pass it waits (at most
  ``timeout``) for others to finish, then gets 503 (``Busy``).
* **Answers** (``bounded_http``): while the server waits for a client to take its answer (the
  transport's buffer above its high-water mark), a watchdog checks that the buffer shrinks; a
  client that takes none of it for ``WRITE_TIMEOUTS × timeout`` seconds (60 s by default) is
  disconnected (the connection aborted: closing it would wait for the client to read). A slow
  reader that takes something is never cut off.

An answer that starts before its request's body was read to its end (a 413, a 408, a 401 from
``Access``, any early error) carries ``Connection: close``, so the server closes the connection
after it instead of reading the rest of the body to reach a next request: a chunked body that never
ends would otherwise be read forever (issue 17), and a declared one up to its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from blockprov.errors import Busy, RequestTimeout, TooLarge, UsageError
from blockprov.service.access import UNKNOWN, RouteFinder
from blockprov.service.edge import error_response, internal_error_response

log = logging.getLogger("blockprov.service")
MAX_BODY_KEY = "x-blockprov-max-body"
MAX_BODY = 256 << 20  # the cap of every route's own limit (serve --max-body)
DEFAULT_BODY = 64 << 10  # a route that declares nothing: a small JSON document or a form
REQUEST_TIMEOUT = 30.0  # seconds for a request's headers; the grace before a body's rate counts
MIN_BODY_RATE = 4 << 10  # bytes a second a body must average once the grace is over
IN_FLIGHT = 512 << 20  # bytes of request bodies held at once, the whole server
MAX_HEADER = 64 << 10  # bytes of request line and headers
WRITE_TIMEOUTS = 2  # a client may take none of its answer for this many request timeouts (60 s)
_CLOSE = (b"connection", b"close")


def body_spec(limit: int, media: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A route's ``openapi_extra``: its body's media type and schema, and the most it reads."""
    return {"requestBody": {"required": True, "content": {media: {"schema": schema or {"type": "object"}}}},
            MAX_BODY_KEY: limit}


class InFlight:
    """A server-wide budget of body bytes: taken while a body is received and held, given back when
    its request is answered. A request that does not fit waits for at most ``wait`` s."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def take(self, n: int, wait: float) -> None:
        n = min(n, self.total)  # one body larger than the whole budget waits for all of it
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.used + n > self.total:
            left = deadline - loop.time()
            if left <= 0:
                raise Busy(f"the server holds {self.used} bytes of request bodies (at most {self.total}); "
                           "try again shortly")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= min(n, self.total)
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each looks again; those that still do not fit wait again
            if not w.done():
                w.set_result(None)


class Guard:
    """Outermost request layer but the metrics: bounds request bodies (module docstring) and turns
    unexpected exceptions into a logged 500.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched."""

    def __init__(self, app: ASGIApp, max_body: int, routes: list[Any], in_flight: int = IN_FLIGHT,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.app = app
        self.max_body = max_body
        self.routes = routes
        self.find = RouteFinder(routes)
        self.budget = InFlight(in_flight)
        self.timeout = timeout
        self._limits: dict[tuple[str, str], int] | None = None

    def limit(self, method: str, route: str) -> int:
        """The most a request to ``route`` may send, from the routes' declarations."""
        if self._limits is None:  # the app's routes are complete once it serves
            self._limits = {}
            for r in self.routes:
                extra = getattr(r, "openapi_extra", None) or {}
                if MAX_BODY_KEY in extra:
                    for m in getattr(r, "methods", None) or ():
                        self._limits[(m, str(r.path_format))] = int(extra[MAX_BODY_KEY])
        return min(self.max_body, self._limits.get((method, route), DEFAULT_BODY))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        body_pending = False  # a body was announced and not yet read to its end
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit():  # bytes.isdigit: ASCII digits only
                    await self._refuse(UsageError("Content-Length is not a number"), scope, receive, send)
                    return
                digits = v.lstrip(b"0")
                declared = int(digits or b"0") if len(digits) <= 18 else 1 << 62  # 18 digits: no int() of 5,000
                body_pending = body_pending or declared > 0
            elif k == b"transfer-encoding":
                body_pending = True
        limit = self.max_body
        if body_pending:
            method = scope["method"]
            route = scope.setdefault("blockprov.route", self.find(method, scope["path"]))
            limit = self.limit(method, route) if route != UNKNOWN else min(self.max_body, DEFAULT_BODY)
        if declared is not None and declared > limit:
            what = f"{declared} bytes" if declared < 1 << 62 else "a length of more than 18 digits"
            await self._refuse(TooLarge(f"request body of {what} exceeds the limit of {limit} bytes "
                                        f"for {scope['method']} {scope.get('blockprov.route', scope['path'])}"),
                               scope, receive, send)
            return
        seen = 0
        taken = 0
        started_at: float | None = None
        budget, timeout = self.budget, self.timeout

        async def bounded_receive() -> Message:
            nonlocal seen, taken, body_pending, started_at
            if not body_pending:  # the body is read (or none came): a disconnect listener waits untimed
                return await receive()
            now = time.monotonic()
            if started_at is None:
                started_at = now
                if declared is not None:
                    await budget.take(declared, timeout)
                    taken = min(declared, budget.total)
            allowed = started_at + timeout + seen / MIN_BODY_RATE - now
            try:
                msg = await asyncio.wait_for(receive(), max(allowed, 0.001))
            except TimeoutError:
                raise RequestTimeout(f"the request body came too slowly: {seen} bytes in "
                                     f"{now - started_at:.0f} s (at least {MIN_BODY_RATE} bytes/s after "
                                     f"{timeout:g} s)") from None
            if msg["type"] == "http.request":
                n = len(msg.get("body", b""))
                seen += n
                if not msg.get("more_body", False):
                    body_pending = False
                if seen > limit:
                    raise TooLarge(f"request body exceeds the limit of {limit} bytes")
                if declared is None and n:
                    await budget.take(n, timeout)
                    taken += min(n, budget.total)
            else:
                body_pending = False  # the client went away
            return msg

        started = False

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if body_pending:
                    msg = _with_close(msg)
            await send(msg)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except ClientDisconnect:  # gone before its body was sent: nobody to answer, and no bug of ours
            scope["blockprov.error"] = "ClientDisconnect"
            log.info("%s %s: the client went away before it sent its body (%d bytes came)", scope.get("method"),
                     scope.get("path"), seen)
        except Exception as e:
            if started:
                raise  # mid-body: the server must cut the connection; nothing else is honest
            scope["blockprov.error"] = "InternalError"
            await internal_error_response(scope.get("method"), scope.get("path"), e)(scope, receive, tracking_send)
        finally:
            if taken:
                budget.give(taken)

    async def _refuse(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        assert isinstance(exc, TooLarge | UsageError)
        scope["blockprov.error"] = type(exc).__name__
        await error_response(exc)(scope, receive, _closing(send))


def _with_close(msg: Message) -> Message:
    """A ``http.response.start`` message that tells the server to close the connection after it."""
    headers = [(k, v) for k, v in msg.get("headers", ()) if k.lower() != b"connection"]
    return {**msg, "headers": [*headers, _CLOSE]}


def _closing(send: Send) -> Send:
    """``send``, with ``Connection: close`` on the answer (its request's body is left unread)."""

    async def closing_send(msg: Message) -> None:
        await send(_with_close(msg) if msg["type"] == "http.response.start" else msg)

    return closing_send


def bounded_http(timeout: float = REQUEST_TIMEOUT, max_header: int = MAX_HEADER) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline and a size bound for each request's headers."""

    write_timeout = WRITE_TIMEOUTS * timeout

    class BoundedHttp(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _too_large = False
        _watchdog: asyncio.TimerHandle | None = None
        _mark = 0  # the transport's buffer when last looked
        _progress_at = 0.0  # when the client was last seen taking bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection owes its first request from the start

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._watchdog is None:
                self._mark, self._progress_at = self.transport.get_write_buffer_size(), self.loop.time()
                self._watchdog = self.loop.call_later(write_timeout, self._check_progress)

        def _check_progress(self) -> None:
            self._watchdog = None
            if not self.flow.write_paused or self.transport.is_closing():
                return  # the client took enough: looked at again when writing pauses next
            now, size = self.loop.time(), self.transport.get_write_buffer_size()
            if size < self._mark:
                self._progress_at = now
            self._mark = size
            if now - self._progress_at >= write_timeout:
                log.warning("a client took none of its answer for %.0f s; disconnecting it", write_timeout)
                sock = self.transport.get_extra_info("socket")
                with contextlib.suppress(Exception):  # a reset: the kernel drops what it still holds for it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.transport.abort()
                return
            self._watchdog = self.loop.call_at(self._progress_at + write_timeout, self._check_progress)

        def on_message_begin(self) -> None:
            self._header_bytes = 0
            self._arm()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._too_large:  # the parse was stopped by _count
                self._answer(431, f"the request's headers are larger than {max_header} bytes")
            else:
                super().send_400_response(msg)

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > max_header:
                self._too_large = True
                raise ValueError("headers too large")  # the parser stops; uvicorn answers 400, we 431

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm()  # a pipelined request's headers wait behind an answer still going out
                return
            self._answer(408, f"the request's headers did not arrive within {timeout:g} s")

        def _answer(self, status: int, text: str) -> None:
            body = text.encode() + b"\n"
            with contextlib.suppress(Exception):
                self.transport.write(b"".join([
                    STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
            self.transport.close()

    return BoundedHttp
