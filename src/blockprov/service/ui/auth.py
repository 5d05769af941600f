"""How the console authenticates a browser and refuses what a token may not do, in HTML.

* **The token is a cookie** set by the login form: ``HttpOnly`` (no script can read it, an injected
  one included), ``SameSite=Strict``, ``Path=/ui`` and ``Secure`` behind TLS. service/access.py reads it
  on console routes only, so the API never accepts a cookie and the same middleware gives console
  routes their scopes (a page needs ``read``, a form ``write``).
* **Cross-site request forgery**: a console POST must come from the console's own pages. The
  ``SameSite=Strict`` cookie alone stops a forged form while tokens are enforced: the browser does not
  attach the cookie to a request started by another site, so it arrives without a token and is
  refused. It does not cover an open console (no tokens configured: nothing to withhold) nor a
  sibling host of the same site (``SameSite`` is per site, not per origin). So console POSTs must also
  carry an ``Origin`` (or, failing that, a ``Referer``) naming the host they were sent to: browsers
  set ``Origin`` on every POST and a page cannot forge it. A POST without either is refused: a
  browser always sends one, and other clients have the API.
* **Refusals are pages**, not JSON: no token → the login page; a bad, revoked or expired token →
  the login page saying so (and the cookie is dropped); a token without the scope → a page naming the
  scope needed; the catalog unreachable → a page saying so. A live-update request (``?fragment=``)
  gets the same status with one line, which the script shows in its status bar.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import Scope

from blockprov.errors import BlockprovError, CrossSite, Forbidden, Unauthorized
from blockprov.service.ui.render import page

PREFIX = "/ui"
COOKIE = "blockprov_console"
LOGIN = "/ui/login"


def is_console(route_or_path: str) -> bool:
    return route_or_path == PREFIX or route_or_path.startswith(PREFIX + "/")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def cookie_token(scope: Scope) -> str | None:
    """The console's token from its cookie, if the request carries one."""
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    token = cookie_parser(raw).get(COOKIE)
    return token or None


def same_origin(scope: Scope) -> bool:
    """Whether a POST was sent by a page of the host it was sent to (``Origin``, else ``Referer``)."""
    host = _header(scope, b"host")
    source = _header(scope, b"origin") or _header(scope, b"referer")
    if not host or not source or source == "null":
        return False
    try:
        return urlsplit(source).netloc.lower() == host.lower()
    except ValueError:
        return False


def cross_site(scope: Scope) -> CrossSite:
    return CrossSite(origin=_header(scope, b"origin") or _header(scope, b"referer") or "missing")


def set_cookie(resp: Response, token: str, scope: Scope) -> None:
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=PREFIX,
                    secure=scope.get("scheme") == "https")


def drop_cookie(resp: Response) -> None:
    resp.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")


def login_page(why: str | None, status: int = 200) -> Response:
    return page("login.html", {"why": why, "viewer": None, "nav": "login"}, status=status)


def denied(scope: Scope, err: BlockprovError, token_info: Any = None) -> Response:
    """The console's answer to a request access.py refused (``err``), in HTML."""
    live = any(k == "fragment" for k, _v in _query(scope))
    if live:
        return PlainTextResponse(err.message, status_code=err.http_status)
    if isinstance(err, Unauthorized):
        if cookie_token(scope) is None and _header(scope, b"authorization") is None:
            return RedirectResponse(LOGIN, status_code=303)
        resp = login_page("The token is not valid: it is unknown, revoked or expired. Paste a valid token.", 401)
        drop_cookie(resp)
        return resp
    ctx: dict[str, Any] = {"error": err.message, "needed": None, "unreachable": err.http_status == 503}
    if isinstance(err, Forbidden) and not isinstance(err, CrossSite):
        ctx["needed"] = err.kwargs.get("needed")
        ctx["have"] = err.kwargs.get("scope")
        return page("denied.html", ctx, status=err.http_status)
    return page("error.html", ctx, status=err.http_status)


def _query(scope: Scope) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(scope.get("query_string", b"").decode("latin-1"))
