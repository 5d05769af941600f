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

from blockprov.errors import BlockprovError, InternalError, UsageError, error_to_dict

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
