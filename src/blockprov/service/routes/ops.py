"""Routes for operating the service itself: liveness, Prometheus metrics (service/metrics.py),
garbage collection.

Health is open to anyone (service/access.py) because load balancers carry no token; ``/metrics``
is not: it needs ``read`` like any GET (Prometheus can send a token).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from blockprov import __version__
from blockprov.errors import Unauthorized, UsageError
from blockprov.results import to_dict
from blockprov.service.access import bearer
from blockprov.service.state import Service

router = APIRouter()
MAX_GRACE = 10 * 365 * 86400.0


@router.get("/v1/health", tags=["service"])
async def health() -> dict[str, str]:
    """Liveness for load balancers and for ``blockprov serve`` readiness checks. ``role`` tells an
    agent what it talks to (a site cache answers ``site-cache``; service/sitecache.py)."""
    return {"status": "ok", "version": __version__, "role": "repository"}


@router.get("/v1/whoami", tags=["service"])
async def whoami(request: Request) -> dict[str, Any]:
    """What this server lets the caller do: whether tokens are enforced, what anonymous callers may,
    and the caller's token (id, name, scope, site; 401 for a token that is not valid). Open to anyone:
    a site cache asks it with its clients' tokens to decide alone while this server is unreachable."""
    svc = Service.of(request)
    policy, tokens = svc.access, svc.tokens
    enforced = policy.mode == "on" or (policy.mode == "auto" and tokens is not None
                                       and await svc.run(tokens.any_created))
    token = bearer(request.scope)
    info = await svc.run(tokens.lookup, token) if token and tokens is not None else None
    if enforced and token is not None and info is None:
        raise Unauthorized(why="the token given is not valid (unknown, revoked or malformed)")
    return {"enforced": enforced, "anonymous_read": policy.anonymous_read, "anonymous_boot": policy.anonymous_boot,
            "token": None if info is None else {k: v for k, v in to_dict(info).items() if k != "revoked"}}


@router.get("/metrics", tags=["service"], response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: requests by route and status, bytes in and out, chunk traffic,
    errors by class, the process's CPU and memory."""
    svc = Service.of(request)
    # on the pool: the sites' traffic is read from the catalog (the counters are plain ints and dicts,
    # copied before they are read)
    return Response(await svc.run(generate_latest, svc.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/gc", tags=["service"])
async def gc(request: Request, grace: float | None = None) -> dict[str, Any]:
    """Delete chunks no version references and older than ``grace`` seconds (default 1 hour,
    which protects uploads still in progress)."""
    svc = Service.of(request)
    if grace is not None and not 0 <= grace <= MAX_GRACE:  # NaN, a negative or endless grace (issue 27):
        # NaN compares false with every upload time, so it would delete uploads still in progress
        raise UsageError(f"grace must be 0 to {MAX_GRACE:g} seconds, not {grace}")
    stats = await svc.run(svc.repo.gc) if grace is None else await svc.run(svc.repo.gc, grace)
    return to_dict(stats)
