"""The console's templates (Jinja2, autoescaped) and how a page or a fragment of it becomes a response.

Why a module of its own: the access middleware (service/access.py) renders the login and refusal
pages for console routes, and must not import the routes to do so.
"""

from __future__ import annotations

import datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from blockprov import humanize
from blockprov.errors import UsageError

# No inline script or style anywhere, so the policy can forbid them: an injected tag would not run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
           "cache-control": "no-store"}


def when(t: float | None) -> str:
    """A Unix time as UTC, to the second (operators compare it with logs)."""
    if t is None:
        return "—"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def short(vid: object) -> str:
    """A version id as people read it (its first 12 hex digits); anything else as text."""
    return "—" if not vid else str(vid)[:12]


def size(n: int | float | None) -> str:
    return "—" if n is None else humanize.size(n)


DEFAULTS: dict[str, Any] = {"viewer": None, "nav": "", "flash": None, "query": {}}  # what base.html reads
ENV = Environment(loader=PackageLoader("blockprov.service.ui", "templates"),
                  autoescape=select_autoescape(default=True, default_for_string=True),
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=when, short=short, size=size)


LAYOUT_BLOCKS = {"title", "content"}  # a page's frame, never served alone (``?fragment=`` serves the others)


def page(name: str, ctx: dict[str, Any], *, status: int = 200, fragment: str | None = None,
         headers: dict[str, str] | None = None) -> HTMLResponse:
    """Render template ``name``; with ``fragment``, only that block of it (the live updates)."""
    tpl = ENV.get_template(name)
    ctx = DEFAULTS | ctx
    if fragment is not None:
        live = sorted(set(tpl.blocks) - LAYOUT_BLOCKS)
        if fragment not in live:  # issue 27: `?fragment=x` rendered the page without its whole context (a 500)
            raise UsageError(f"?fragment={fragment[:40]!r}: this page's live parts are {', '.join(live)}")
        text = "".join(tpl.blocks[fragment](tpl.new_context(ctx)))
    else:
        text = tpl.render(ctx)
    return HTMLResponse(text, status_code=status, headers=HEADERS | (headers or {}))
