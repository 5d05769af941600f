"""The edge of the HTTP API: how errors become answers, and the bound on request bodies.

Why here and only here: every route raises ``blockprov.errors`` classes and never builds an error
answer itself, so a ``BlockprovError`` becomes its ``http_status`` with
``{"error": ClassName, "message": …, "details": {…}, "exit_code": …}`` in one place, and ``repo/remote.py`` can
raise the very same class on the other side. Anything unexpected is logged and answered 500; the
server keeps serving everyone else (docs/architecture.md, invariant 7). A 500's body never carries
the exception's text (a path, a query, a peer's address: what a client has no business reading,
issue 27): it names a reference that the server's log line carries with the traceback.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blockprov.errors import BlockprovError, InternalError, TooLarge, UsageError, error_to_dict

log = logging.getLogger("blockprov.service")


def error_body(exc: BlockprovError) -> dict[str, Any]:
    """The JSON an error becomes: ``errors.error_to_dict``, the form the agent's control socket uses
    too, so ``repo/remote.py`` rebuilds it with ``errors.error_from_dict``."""
    return error_to_dict(exc)


def error_response(exc: BlockprovError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.http_status)


def internal_error_response(method: object, path: object, exc: BaseException) -> JSONResponse:
    """The 500 for a bug: logged here with its traceback under a reference, answered with only the
    reference."""
    ref = secrets.token_hex(4)
    log.error("internal error %s serving %s %s", ref, method, path, exc_info=exc)
    body = {"error": "InternalError", "message": f"internal error (the server's log has it as {ref})",
            "details": {"ref": ref}, "exit_code": InternalError.exit_code}
    return JSONResponse(body, status_code=500)


async def on_blockprov_error(request: Request, exc: BlockprovError) -> Response:
    request.scope["blockprov.error"] = type(exc).__name__
    if exc.http_status == 500:  # no condition a client can act on: a bug
        return internal_error_response(request.method, request.url.path, exc)
    if exc.http_status > 500:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    elif exc.http_status == 422:  # integrity problems are worth an operator's attention
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(exc)


async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's own 422 for a malformed parameter becomes our ``UsageError`` (400), like any other
    bad request, so clients see one error shape."""
    why = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    request.scope["blockprov.error"] = "UsageError"
    return error_response(UsageError(f"bad request: {why}"))


async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's own 404/405 in the same shape as ours."""
    name = "NotFound" if exc.status_code == 404 else "HTTPError"
    request.scope["blockprov.error"] = name
    return JSONResponse({"error": name, "message": str(exc.detail), "details": {}},
                        status_code=exc.status_code, headers=exc.headers)


def add_error_handlers(app: FastAPI) -> None:
    # the decorator form: it takes each handler with the exception type it is registered for
    app.exception_handler(BlockprovError)(on_blockprov_error)
    app.exception_handler(RequestValidationError)(on_validation_error)
    app.exception_handler(StarletteHTTPException)(on_http_error)


_CLOSE = (b"connection", b"close")


class Guard:
    """Outermost layer: bounds request bodies and turns unexpected exceptions into a logged 500.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched.
    A declared ``Content-Length`` over the limit is refused before a byte is read; a streamed body
    is cut off as soon as it passes it (413 either way).

    An answer that starts before the request's body was read to its end (a 413, a 401 from
    ``Access``, any early error) carries ``Connection: close``, so the server closes the connection
    after it instead of reading the rest of the body to reach a next request: a chunked body that
    never ends would otherwise be read forever (issue 17), and a declared one up to its length.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        body_pending = False  # a body was announced and not yet read to its end
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit():  # bytes.isdigit: ASCII digits only
                    scope["blockprov.error"] = "UsageError"
                    await error_response(UsageError("Content-Length is not a number"))(scope, receive,
                                                                                      _closing(send))
                    return
                digits = v.lstrip(b"0")
                if len(digits) > 18 or int(digits or b"0") > limit:  # 18 digits: no int() of 5,000
                    what = f"{int(digits)} bytes" if len(digits) <= 18 else f"{len(digits)} digits"
                    exc = TooLarge(f"request body of {what} exceeds the limit of {limit} bytes")
                    scope["blockprov.error"] = "TooLarge"
                    await error_response(exc)(scope, receive, _closing(send))
                    return
                body_pending = body_pending or bool(digits)
            elif k == b"transfer-encoding":
                body_pending = True
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen, body_pending
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    body_pending = False
                if seen > limit:
                    raise TooLarge(f"request body exceeds the limit of {limit} bytes")
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
        except Exception as e:
            if started:
                raise  # mid-body: the server must cut the connection; nothing else is honest
            scope["blockprov.error"] = "InternalError"
            await internal_error_response(scope.get("method"), scope.get("path"), e)(scope, receive, tracking_send)


def _with_close(msg: Message) -> Message:
    """A ``http.response.start`` message that tells the server to close the connection after it."""
    headers = [(k, v) for k, v in msg.get("headers", ()) if k.lower() != b"connection"]
    return {**msg, "headers": [*headers, _CLOSE]}


def _closing(send: Send) -> Send:
    """``send``, with ``Connection: close`` on the answer (its request's body is left unread)."""

    async def closing_send(msg: Message) -> None:
        await send(_with_close(msg) if msg["type"] == "http.response.start" else msg)

    return closing_send
