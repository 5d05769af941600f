"""Routes for agents and the requests the repository queues for them (``snapshot``, ``status`` …).

Long polls (``…/requests/next?wait=``, ``…/requests/{id}?wait=``) wait on the event loop and are
woken by ``Wakeup`` for a change made through this process, or by ``ReadySet`` for one made through
another server (service/longpoll.py). A waiting agent re-checks by itself every ``SEEN_EVERY`` s, and that
check refreshes its ``last_seen``. Long polls end early when the server is shutting down
(``app.state.draining``, set by service/run.py), so a stop never waits out an agent's poll.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from blockprov.catalog.machines import MAX_INFO, MAX_RESULT, SEEN_EVERY
from blockprov.errors import UsageError
from blockprov.names import instance_id, request_id
from blockprov.service.longpoll import POLL, wait_param
from blockprov.service.routes.common import fields_of, json_body, json_of
from blockprov.service.state import Service

router = APIRouter()


def draining(request: Request) -> bool:
    return bool(getattr(request.app.state, "draining", False))


@router.get("/v1/agents", tags=["agents"])
async def list_agents(request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"agents": await svc.run(svc.repo.agents)}


@router.put("/v1/agents/{instance}", tags=["agents"], openapi_extra=json_body(2 * MAX_INFO))
async def register_agent(instance: str, request: Request) -> JSONResponse:
    """Register or refresh (heartbeat) an agent: ``{image, version, host, pid, addresses, …}``.
    201 when it is new."""
    svc = Service.of(request)
    instance = instance_id(instance)
    new = await svc.run(svc.repo.registry.register_agent, instance, await json_of(request))
    return JSONResponse({"instance": instance, "new": new}, status_code=201 if new else 200)


@router.delete("/v1/agents/{instance}", tags=["agents"])
async def unregister_agent(instance: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    await svc.run(svc.repo.unregister_agent, instance_id(instance))
    svc.wakeup.notify()
    return {"removed": instance}


@router.post("/v1/agents/{instance}/requests", tags=["agents"], status_code=201,
             openapi_extra=json_body(2 * MAX_INFO))
async def post_request(instance: str, request: Request) -> JSONResponse:
    """Ask an agent to do something: ``{"op": "snapshot", "args": {…}}`` → 201 ``{"id"}``."""
    svc = Service.of(request)
    instance = instance_id(instance)
    d = fields_of(await json_of(request), ("op", "args"), 'expected {"op": "…", "args": {…}}')
    if not isinstance(d.get("op"), str):
        raise UsageError('expected {"op": "…", "args": {…}}')
    rid = await svc.run(svc.repo.post_request, instance, d["op"], d.get("args"))
    svc.wakeup.notify()
    return JSONResponse({"id": rid}, status_code=201)


@router.get("/v1/agents/{instance}/requests/next", tags=["agents"], response_class=Response)
async def next_request(instance: str, request: Request, wait: float = 0.0) -> Response:
    """The oldest pending request, now running under a lease; 204 after ``wait`` s (≤ 30) if none."""
    svc = Service.of(request)
    instance_id(instance)
    deadline = time.monotonic() + wait_param(wait)
    check = True  # the first time, after a local change, when the catalog says so, or every SEEN_EVERY s
    while True:  # bounded by the deadline
        if check:
            checked = time.monotonic()
            req = await svc.run(svc.repo.registry.try_next_request, instance)
            if req is not None:
                return JSONResponse(req)
        left = deadline - time.monotonic()
        if left <= 0 or draining(request):
            return Response(status_code=204)
        woken = await svc.wakeup.wait(min(POLL, left))
        check = woken or time.monotonic() - checked >= SEEN_EVERY or await svc.ready.has(instance)


@router.get("/v1/agents/{instance}/requests/{rid}", tags=["agents"])
async def get_request(instance: str, rid: str, request: Request, wait: float = 0.0) -> dict[str, Any]:
    """A request's state; waits up to ``wait`` s (≤ 30) for it to become done or failed."""
    svc = Service.of(request)
    instance_id(instance)
    request_id(rid)
    deadline = time.monotonic() + wait_param(wait)
    while True:  # bounded by the deadline
        req: dict[str, Any] = await svc.run(svc.repo.registry.get_request, instance, rid)
        left = deadline - time.monotonic()
        if req["state"] in ("done", "failed") or left <= 0 or draining(request):
            return req
        await svc.wakeup.wait(min(POLL, left))


@router.post("/v1/agents/{instance}/requests/{rid}/result", tags=["agents"],
             openapi_extra=json_body(2 * MAX_RESULT))
async def complete_request(instance: str, rid: str, request: Request) -> dict[str, Any]:
    """``{"ok": true, "result": {…}}`` or ``{"ok": false, "error": "…"}``; 409 if already completed."""
    svc = Service.of(request)
    instance, rid = instance_id(instance), request_id(rid)
    expected = 'expected {"ok": true|false, "result": {…}, "error": "…"}'
    d = fields_of(await json_of(request), ("ok", "result", "error"), expected)
    if not isinstance(d.get("ok"), bool):
        raise UsageError(expected)
    out: dict[str, Any] = await svc.run(svc.repo.complete_request, instance, rid, d["ok"], d.get("result"),
                                        d.get("error"))
    svc.wakeup.notify()
    return out
