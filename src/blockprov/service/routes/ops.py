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
from blockprov.results import to_dict
from blockprov.service.state import Service

router = APIRouter()


@router.get("/v1/health", tags=["service"])
async def health() -> dict[str, str]:
    """Liveness for load balancers and for ``blockprov serve`` readiness checks. ``role`` tells an
    agent what it talks to (a site cache answers ``site-cache``; service/sitecache.py)."""
    return {"status": "ok", "version": __version__, "role": "repository"}


@router.get("/metrics", tags=["service"], response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: requests by route and status, bytes in and out, chunk traffic,
    errors by class, the process's CPU and memory."""
    return Response(generate_latest(Service.of(request).registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/gc", tags=["service"])
async def gc(request: Request, grace: float | None = None) -> dict[str, Any]:
    """Delete chunks no version references and older than ``grace`` seconds (default 1 hour,
    which protects uploads still in progress)."""
    svc = Service.of(request)
    stats = await svc.run(svc.repo.gc) if grace is None else await svc.run(svc.repo.gc, grace)
    return to_dict(stats)
