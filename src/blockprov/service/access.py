"""Who may call what: each route's scope (catalog/tokens.py), checked before a byte of the body is read.

Why it is shaped like this:

* **One rule, few exceptions.** ``GET``/``HEAD`` need ``read``; every other method needs
  ``write``; the exceptions are listed here and nowhere else: three read-only POSTs (a batch chunk
  fetch and a missing-chunks question are reads sent as POST bodies; joining a site asks for a
  ticket to read from its peers), the routes an agent uses for
  itself (``agent``), and the open ones (health for load balancers, the OpenAPI document and its
  browser page, which describe the API and hold no data). A route added later is ``write`` unless
  it is a GET: forgetting to list it errs on the closed side. ``GET …/requests/next`` is a GET but
  leases a request, so it is listed under ``agent``. The scope of each operation is also written
  into the OpenAPI document (``x-blockprov-scope``).
* **A pure ASGI middleware** (not a FastAPI dependency): a dependency runs after the body was read,
  so an unauthenticated client could make the server read a 256 MiB upload before being refused.
  The route is found by matching the path against the app's routes (cached per path).
* **Anonymous access is opt-in per kind**: ``anonymous_read`` opens every ``read`` route, the two
  read-only POSTs included (an agent without a token must be able to fetch chunks);
  ``anonymous_boot`` opens only the boot script, the UEFI boot image and the boot file downloads
  (kernel, initrd, the UEFI loader's files), because a firmware sends no token and iPXE cannot
  easily send an ``Authorization`` header and a token in a URL leaks into logs, proxies and the
  boot script itself. A request that does carry a token is always checked, also on open routes, so
  a mistyped token is reported instead of silently ignored.
* **A refused boot request is said on the PC's screen.** ``GET /v1/boot/HOST`` refused (tokens
  enforced, no ``--anonymous-boot``) is logged, recorded on the host, and answered to iPXE with a
  script that prints why and asks again (``refused_boot``, from service/routes/boot.py): iPXE
  shows a 401 as "Permission denied" and falls through to the disk, which boots its old version
  offline — the first ``token create`` silently stopped every PC from following its assignment.
* **When it is enforced** (``mode``): ``on`` always; ``off`` never; ``auto`` (the default) once any
  token was ever created in the catalog. ``auto`` keeps a repository without tokens working as before
  (loopback, tests, a trusted lab network, with a warning at start) and closes it the moment the
  operator creates a first token, even while it runs: creating a token is the operator saying who may
  come in, and a server that kept ignoring tokens until a restart would be a trap.
* **The console** (``/ui/``, service/ui/) follows the same rules: its pages are GETs (``read``), its
  forms POSTs (``write``); its login page, login and logout forms and static files are open. On
  console routes only, the token may also come from the console's cookie, every POST must come from
  the console's own origin (service/ui/auth.py says why), and a refusal is a page, not JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from blockprov.catalog.tokens import TokenInfo, TokenStore, allows
from blockprov.errors import BlockprovError, Forbidden, Unauthorized, error_to_dict
from blockprov.service.ui.auth import cookie_token, cross_site, denied, is_console, same_origin

log = logging.getLogger("blockprov.service")

MODES = ("auto", "on", "off")
OPEN_ROUTES = {("GET", "/v1/health"), ("GET", "/v1/whoami"), ("GET", "/openapi.json"), ("GET", "/docs"),
               ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"),
               ("GET", "/ui/login"), ("POST", "/ui/login"), ("POST", "/ui/logout"), ("GET", "/ui/static/{name}")}
READ_POSTS = {("POST", "/v1/chunks/fetch"), ("POST", "/v1/chunks/missing"), ("POST", "/v1/sites/{site}/join")}
AGENT_ROUTES = {("PUT", "/v1/agents/{instance}"), ("DELETE", "/v1/agents/{instance}"),
                ("GET", "/v1/agents/{instance}/requests/next"),
                ("POST", "/v1/agents/{instance}/requests/{rid}/result"),
                ("PUT", "/v1/boot/{host}/disk"), ("POST", "/v1/boot/{host}/disk")}
BOOT_ROUTES = {("GET", "/v1/boot/{host}"), ("HEAD", "/v1/boot/{host}"), ("POST", "/v1/boot/{host}/disk"),
               ("GET", "/v1/boot/{host}/boot.img"), ("HEAD", "/v1/boot/{host}/boot.img"),
               ("GET", "/v1/images/{name}/versions/{vid}/boot/{which}"),
               ("HEAD", "/v1/images/{name}/versions/{vid}/boot/{which}")}
BOOT_SCRIPT = "/v1/boot/{host}"
# What a refused boot request gets instead of the 401/403 (service/routes/boot.py), or None
RefusedBoot = Callable[[Request, BlockprovError], Awaitable[Response | None]]
UNKNOWN = "(unmatched)"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def required_scope(method: str, route: str) -> str | None:
    """The scope a call needs; None: open to anyone."""
    key = (method, route)
    if key in OPEN_ROUTES or (method == "HEAD" and ("GET", route) in OPEN_ROUTES):
        return None
    if key in AGENT_ROUTES:
        return "agent"
    if method in ("GET", "HEAD", "OPTIONS") or key in READ_POSTS:
        return "read"
    return "write"


def action(method: str, route: str) -> str:
    return f"{method} {route}"


@dataclass(frozen=True)
class AccessPolicy:
    mode: str = "auto"
    anonymous_read: bool = False
    anonymous_boot: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"auth mode is one of {MODES}, not {self.mode!r}")


def bearer(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if any (other schemes count as none)."""
    for k, v in scope["headers"]:
        if k == b"authorization":
            kind, _, value = v.decode("latin-1").strip().partition(" ")
            if kind.lower() == "bearer" and value.strip():
                return str(value.strip())
            return ""
    return None


class RouteFinder:
    """The route template a request path belongs to (``/v1/chunks/{cid}``), as the router would pick it."""

    MAX_CACHED = 4096

    def __init__(self, routes: list[Any]) -> None:
        opaque = [r for r in routes if getattr(r, "path_regex", None) is None]
        if opaque:  # e.g. app.include_router's lazy router: its routes would all look unknown ("read")
            raise TypeError(f"access control cannot see the routes inside {opaque[0]!r}; add routes flat")
        self.routes = routes  # the app's live list: routes added after the middleware are seen
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, method: str, path: str) -> str:
        key = (method, path)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        found = UNKNOWN
        for r in self.routes:
            regex = getattr(r, "path_regex", None)
            if regex is None or not regex.match(path):
                continue
            methods = getattr(r, "methods", None) or set()
            if method in methods or (method == "HEAD" and "GET" in methods) or not methods:
                found = str(r.path_format)
                break
            if found == UNKNOWN:
                found = str(r.path_format)  # the path exists for another method: the router says 405
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = found
        return found


class Access:
    """ASGI middleware enforcing ``policy`` with the tokens of ``tokens``."""

    def __init__(self, app: ASGIApp, routes: list[Any], tokens: TokenStore, policy: AccessPolicy,
                 refused_boot: RefusedBoot | None = None) -> None:
        self.app = app
        self.refused_boot = refused_boot
        self.find = RouteFinder(routes)
        self.tokens = tokens
        self.policy = policy

    async def _enforced(self) -> bool:
        if self.policy.mode != "auto":
            return self.policy.mode == "on"
        known = self.tokens.any_cached()
        if known is not None:
            return known
        return await asyncio.to_thread(self.tokens.any_created)

    async def _lookup(self, token: str) -> TokenInfo | None:
        known, info = self.tokens.cached(token)
        if known:
            return info
        return await asyncio.to_thread(self.tokens.lookup, token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        console = is_console(scope["path"])
        if self.policy.mode == "off" and not (console and method not in SAFE_METHODS):
            await self.app(scope, receive, send)
            return
        route = scope.get("blockprov.route") or self.find(method, scope["path"])  # bounds.Guard may know it
        scope["blockprov.route"] = route
        need = required_scope(method, route) if route != UNKNOWN else "read"
        token = bearer(scope)
        if token is None and console:
            token = cookie_token(scope)
        err: BlockprovError | None = None
        if console and method not in SAFE_METHODS and not same_origin(scope):
            err = cross_site(scope)
        try:
            enforced = err is None and self.policy.mode != "off" and await self._enforced()
            scope["blockprov.enforced"] = enforced
            if need is not None and enforced:
                anonymous = ((need == "read" and self.policy.anonymous_read)
                             or ((method, route) in BOOT_ROUTES and self.policy.anonymous_boot))
                if token is None and not anonymous:
                    err = Unauthorized(why="this repository needs a token")
                elif token is not None:
                    info = await self._lookup(token) if token else None
                    if info is None:
                        err = Unauthorized(why="the token given is not valid (unknown, revoked or malformed)")
                    elif not allows(info.scope, need):
                        err = Forbidden(scope=info.scope, action=action(method, route), needed=need)
                    else:
                        scope["blockprov.token"] = info.id
                        scope["blockprov.token_info"] = info
        except BlockprovError as e:  # the catalog is unreachable (and nothing cached answers): 503
            err = e
        if err is not None:
            scope["blockprov.error"] = type(err).__name__
            if route == BOOT_SCRIPT and self.refused_boot is not None and method in ("GET", "HEAD"):
                answer = await self.refused_boot(Request(scope, receive), err)  # says why on the PC's screen
                if answer is not None:
                    await answer(scope, receive, send)
                    return
            if console:
                await denied(scope, err)(scope, receive, send)
                return
            headers = {"www-authenticate": 'Bearer realm="blockprov"'} if err.http_status == 401 else None
            await JSONResponse(error_to_dict(err), status_code=err.http_status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def annotate_openapi(app: Any) -> None:
    """Write each operation's scope into the OpenAPI document (``x-blockprov-scope``: read, agent,
    write or none), from the same rule the middleware applies, so clients and tests can read it."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc: dict[str, Any] = plain()
            for path, ops in doc.get("paths", {}).items():
                for method, op in ops.items():
                    if isinstance(op, dict):
                        op["x-blockprov-scope"] = required_scope(method.upper(), path) or "none"
            app.openapi_schema = doc
        return dict(app.openapi_schema)

    app.openapi = openapi
