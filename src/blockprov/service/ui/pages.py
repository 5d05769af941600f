"""The console's routes: pages (GET, ``read``), forms (POST, ``write``), login and static files.

Each page is one template whose ``live`` block is also served alone (``?fragment=live``) for the
live updates (static/console.js). A form does its one thing and redirects back (POST, redirect,
GET: a reload never repeats it) with a one-shot message in a cookie, so what the page says after
an action is never taken from the URL. Scopes are not checked here: service/access.py refused the
request before it arrived if the token lacks the scope.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from blockprov.boot import SETTINGS, stranded
from blockprov.catalog.tokens import TokenStore
from blockprov.errors import BlockprovError, CatalogMisconfigured, CatalogUnavailable, TooLarge, UsageError
from blockprov.names import Ref, host_id, image_name, instance_id, parse_ref, tag_name, version_id
from blockprov.service.state import Service
from blockprov.service.ui import views
from blockprov.service.ui.auth import COOKIE, PREFIX, drop_cookie, login_page, set_cookie
from blockprov.service.ui.render import HEADERS, page
from blockprov.service.ui.views import ConsoleState, Viewer

log = logging.getLogger("blockprov.console")

router = APIRouter(include_in_schema=False)  # the API's OpenAPI document describes the API, not pages

FLASH = "blockprov_flash"
UNCHANGED = "unchanged"  # a setting's choice in the Assign form that keeps each host's value
MAX_FORM = 64 << 10  # bytes of a console form (the largest is a list of hosts)
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
OPS = ("snapshot", "reset")


# -- shared ---------------------------------------------------------------------------------------
def viewer(request: Request) -> Viewer:
    info = request.scope.get("blockprov.token_info")
    if info is not None:
        return Viewer(info.name or f"token {info.id}", info.scope)
    if request.scope.get("blockprov.enforced"):
        return Viewer("anonymous", "read")  # --anonymous-read let the request in without a token
    return Viewer("open console", "write", open=True)


def console_state(request: Request) -> ConsoleState:
    st = getattr(request.app.state, "console", None)
    if st is None:
        st = request.app.state.console = ConsoleState()
    return st


def _flash_of(request: Request) -> tuple[str, str] | None:
    raw = request.cookies.get(FLASH)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return (kind if kind in ("ok", "error") else "error", text[:2000])


def back(url: str, kind: str, text: str) -> Response:
    """Redirect to ``url`` showing ``text`` once (kind ``ok`` or ``error``)."""
    resp = RedirectResponse(url, status_code=303)
    resp.set_cookie(FLASH, quote(f"{kind}:{text[:1500]}"), max_age=60, path=PREFIX, httponly=True, samesite="strict")
    return resp


async def show(request: Request, template: str, nav: str, gather: Any, *args: Any) -> Response:
    """Render ``template`` with what ``gather(*args)`` returns (on the pool); a repository error
    becomes a page saying so (no stack trace), and ``?fragment=live`` renders only the live block."""
    svc = Service.of(request)
    fragment = request.query_params.get("fragment")
    flash = None if fragment else _flash_of(request)
    ctx: dict[str, Any] = {"viewer": viewer(request), "nav": nav, "flash": flash, "query": request.query_params}
    try:
        ctx |= await svc.run(gather, *args)
        resp = page(template, ctx, fragment=fragment)
    except BlockprovError as e:
        if fragment:
            return PlainTextResponse(e.message, status_code=e.http_status)
        unreachable = isinstance(e, CatalogUnavailable | CatalogMisconfigured) or e.http_status == 503
        return page("error.html", ctx | {"error": e.message, "unreachable": unreachable}, status=e.http_status)
    except Exception:  # never a stack trace in a page: logged here, summarized there
        log.exception("console page %s", request.url.path)
        if fragment:
            return PlainTextResponse("internal error (see the server's log)", status_code=500)
        return page("error.html", ctx | {"error": "internal error: the server's log has the details",
                                         "unreachable": False}, status=500)
    if flash is not None:
        resp.delete_cookie(FLASH, path=PREFIX)
    return resp


async def form_of(request: Request) -> dict[str, list[str]]:
    """The form (``application/x-www-form-urlencoded``), at most ``MAX_FORM`` bytes."""
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_FORM:
            raise TooLarge(f"a console form is at most {MAX_FORM} bytes")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"malformed form: {e}") from None


def one(f: dict[str, list[str]], key: str) -> str:
    return (f.get(key) or [""])[0].strip()


# -- login, static --------------------------------------------------------------------------------
@router.get("/ui")
@router.get("/ui/")
async def home() -> Response:
    return RedirectResponse("/ui/images", status_code=303)


@router.get("/ui/login")
async def login_form(request: Request) -> Response:
    return login_page(None)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    token = one(await form_of(request), "token")
    svc = Service.of(request)
    store = getattr(request.app.state, "console_tokens", None)
    if store is None:
        store = request.app.state.console_tokens = await svc.run(TokenStore, svc.repo.catalog.db)
    try:
        info = await svc.run(store.lookup, token) if token else None
        if info is None and not await svc.run(store.any_created):
            return back("/ui/images", "ok", "This repository has no tokens yet: the console is open to anyone "
                        "who reaches it, like the API (`blockprov token create` closes both).")
    except BlockprovError as e:
        return login_page(f"Cannot check the token: {e.message}", e.http_status)
    if info is None:
        if not token:
            return login_page("Paste a token.", 400)
        return login_page("The token is not valid: it is unknown, revoked or expired.", 401)
    resp = RedirectResponse("/ui/images", status_code=303)
    set_cookie(resp, token, request.scope)
    return resp


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    resp = RedirectResponse("/ui/login", status_code=303)
    drop_cookie(resp)
    return resp


@router.get("/ui/static/{name}")
async def static(name: str) -> Response:
    kind = STATIC.get(name)
    if kind is None:
        return PlainTextResponse("not found", status_code=404)
    data = (resources.files("blockprov.service.ui") / "static" / name).read_bytes()
    return Response(data, media_type=kind, headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"})


# -- images ---------------------------------------------------------------------------------------
@router.get("/ui/images")
async def images_page(request: Request) -> Response:
    return await show(request, "images.html", "images", views.images, Service.of(request))


@router.get("/ui/images/{name}")
async def image_page(name: str, request: Request) -> Response:
    svc = Service.of(request)
    a, b = request.query_params.get("a"), request.query_params.get("b")

    def gather() -> dict[str, Any]:
        ctx = views.image(svc, console_state(request), name)
        if a and b:
            ctx["diff"] = views.diff(svc, ctx["name"], version_id(a), version_id(b))
        return ctx

    return await show(request, "image.html", "images", gather)


@router.post("/ui/images/{name}/tags")
async def move_tag(name: str, request: Request) -> Response:
    """Point a tag at a version: a promotion (``prod`` → the tested version) or a rollback."""
    f = await form_of(request)
    svc = Service.of(request)
    here = f"/ui/images/{quote(name)}"
    try:
        image, tag, vid = image_name(name), tag_name(one(f, "tag")), version_id(one(f, "version"))
        before = (await svc.run(svc.repo.images))
        old = next((i.tags.get(tag) for i in before if i.name == image), None)
        await svc.run(svc.repo.catalog.set_tag, image, tag, vid, viewer(request).who)
        following = [h.host for h in await svc.run(svc.repo.hosts) if h.ref == f"{image}:{tag}"]
        bare = following and await svc.run(svc.repo.get_boot_files, f"{image}@{vid}") is None
    except BlockprovError as e:
        return back(here, "error", f"Tag not moved: {e.message}")
    what = f"{image}:{tag} → {vid[:12]}" + (f" (was {old[:12]})" if old and old != vid else "")
    if bare:
        return back(here, "error", f"Moved {what}, but {stranded(f'{image}:{tag}', vid, following)}")
    return back(here, "ok", f"Moved {what}")


# -- machines -------------------------------------------------------------------------------------
@router.get("/ui/machines")
async def machines_page(request: Request) -> Response:
    svc = Service.of(request)

    def gather() -> dict[str, Any]:
        ctx = views.machines(svc)
        if request.query_params.get("fragment") is None:
            ctx["refs"] = views.refs(svc)
        return ctx

    return await show(request, "machines.html", "machines", gather)


@router.post("/ui/hosts")
async def assign_hosts(request: Request) -> Response:
    """Assign one version (``NAME:TAG`` follows the tag, ``NAME@ID`` pins) to the hosts ticked and
    the one typed; each host is assigned on its own, and every failure is reported. What the form
    leaves as it is stays: an empty arguments field keeps each host's arguments (the "clear" box
    clears them), a setting left at "unchanged" keeps its value."""
    f = await form_of(request)
    svc = Service.of(request)
    hosts = [h.strip() for h in f.get("host", []) if h.strip()]
    if one(f, "new_host"):
        hosts.append(one(f, "new_host"))
    ref_text = one(f, "ref")
    args: str | None = "" if one(f, "clear_args") else (one(f, "args") or None)
    settings = {k: one(f, k) for k in SETTINGS if one(f, k) not in ("", UNCHANGED)}
    if not hosts:
        return back("/ui/machines", "error", "No host assigned: tick hosts or type a MAC address or host id.")
    if one(f, "clear_args") and one(f, "args"):  # issue 27: the typed arguments were dropped without a word
        return back("/ui/machines", "error", "No host assigned: arguments typed and \"clear arguments\" ticked: "
                                             "which one?")
    try:
        ref = parse_ref(ref_text)
    except BlockprovError as e:
        return back("/ui/machines", "error", f"No host assigned: {e.message}")
    done, failed = [], []
    for h in hosts:
        try:
            await svc.run(svc.repo.assign_host, host_id(h), ref, args, settings)
            done.append(host_id(h))
        except BlockprovError as e:
            failed.append(f"{h}: {e.message}")
    if failed:
        ok = f"Assigned {ref} to {', '.join(done)}. " if done else ""
        return back("/ui/machines", "error", ok + "Not assigned: " + "; ".join(failed))
    return back("/ui/machines", "ok", f"Assigned {ref} to {', '.join(done)}")


@router.post("/ui/requests")
async def ask_agents(request: Request) -> Response:
    """Queue a request (snapshot or reset) for each agent ticked; the page follows it to the end."""
    f = await form_of(request)
    svc = Service.of(request)
    op = one(f, "op")
    instances = [i for i in f.get("instance", []) if i.strip()]
    if op not in OPS:
        return back("/ui/machines", "error", f"Nothing asked: the console asks for {' or '.join(OPS)}, not {op!r}")
    if not instances:
        return back("/ui/machines", "error", "Nothing asked: choose an agent.")
    args: dict[str, Any] = {}
    try:
        if op == "snapshot":
            to = parse_ref(one(f, "to"))
            if to.tag is None:
                raise UsageError(f"a snapshot is named NAME:TAG, not {one(f, 'to')!r}")
            args["to"] = str(Ref(to.name, tag=to.tag))
    except BlockprovError as e:
        return back("/ui/machines", "error", f"Nothing asked: {e.message}")
    asked, failed = [], []
    for inst in instances:
        try:
            rid = await svc.run(svc.repo.post_request, instance_id(inst), op, args)
            asked.append(f"{inst} (request {rid})")
        except BlockprovError as e:
            failed.append(f"{inst}: {e.message}")
    if asked:
        svc.wakeup.notify()  # the agents' long polls take it now
    if failed:
        return back("/ui/machines", "error", (f"Asked {', '.join(asked)}. " if asked else "") +
                    "Not asked: " + "; ".join(failed))
    return back("/ui/machines", "ok", f"Asked for a {op}: {', '.join(asked)}. Its state is followed below.")


# -- pools, health --------------------------------------------------------------------------------
@router.get("/ui/pools")
async def pools_page(request: Request) -> Response:
    return await show(request, "pools.html", "pools", views.pools, Service.of(request), viewer(request))


@router.get("/ui/health")
async def health_page(request: Request) -> Response:
    return await show(request, "health.html", "health", views.health, Service.of(request), console_state(request),
                      viewer(request))


__all__ = ["COOKIE", "HEADERS", "router"]
