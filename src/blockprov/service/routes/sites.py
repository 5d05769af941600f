"""Routes for sites: the groups of hosts and agents that share chunks on their LAN (catalog/sites.py).

``POST /v1/sites/{site}/join`` is how an agent takes part: it needs only the ``read`` scope (it
reads chunks, nothing more), and a token bound to another site is refused (catalog/tokens.py). The
answer carries the ticket the agent shows its peers and the site's keys with which it checks
theirs (tickets.py), so peers never need the repository to let each other in.
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request

from blockprov.catalog.tokens import TokenInfo
from blockprov.errors import UsageError
from blockprov.names import site_name
from blockprov.results import to_dict
from blockprov.service.routes.common import fields_of, json_body, json_of
from blockprov.service.state import Service

router = APIRouter()


@router.get("/v1/sites", tags=["sites"])
async def list_sites(request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"sites": [to_dict(s) for s in await svc.run(svc.repo.sites)]}


@router.put("/v1/sites/{site}", tags=["sites"], openapi_extra=json_body(4096))
async def add_site(site: str, request: Request) -> dict[str, Any]:
    """Body ``{"cache": "http://…"}`` (the site cache as the site's machines reach it; ``""`` removes
    it; absent keeps it), or ``{}``."""
    svc = Service.of(request)
    site = site_name(site)  # before the body is read: a bad name costs no body
    d = fields_of(await json_of(request), ("cache",), 'expected {"cache": "http://HOST:PORT"} or {}')
    if not isinstance(d.get("cache", ""), str | None):
        raise UsageError('expected {"cache": "http://HOST:PORT"} or {}')
    return to_dict(await svc.run(svc.repo.add_site, site, d.get("cache")))


@router.delete("/v1/sites/{site}", tags=["sites"])
async def remove_site(site: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    await svc.run(svc.repo.remove_site, site)
    return {"removed": site}


@router.post("/v1/site-secret/rotate", tags=["sites"])
async def rotate_site_secret(request: Request) -> dict[str, Any]:
    """Every ticket and site key handed out so far stops working; agents get new ones when they join."""
    svc = Service.of(request)
    await svc.run(svc.repo.rotate_site_secret)
    return {"rotated": True}


@router.post("/v1/sites/{site}/join", tags=["sites"], openapi_extra=json_body(4096))
async def join_site(site: str, request: Request) -> dict[str, Any]:
    """Body ``{"instance": "ID"}``: a ticket for that agent, the site's keys and its online peers."""
    svc = Service.of(request)
    site = site_name(site)
    d = fields_of(await json_of(request), ("instance",), 'expected {"instance": "ID"}')
    if not isinstance(d.get("instance"), str):
        raise UsageError('expected {"instance": "ID"}')
    info = request.scope.get("blockprov.token_info")
    bound = info.site if isinstance(info, TokenInfo) else None
    return dict(await svc.run(functools.partial(svc.repo.join_site, site, d["instance"], token_site=bound)))
