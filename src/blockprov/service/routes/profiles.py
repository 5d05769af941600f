"""Routes for boot profiles: the order in which the first boot of a version read its chunks, saved by
that machine's agent so the agents that boot it later prefetch in that order. Binary (u32 LE indices,
what ``RemoteRepository`` sends and asks for: a large image's profile is long) or JSON (for people
and scripts), as the client says."""

from __future__ import annotations

import functools
import struct
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from blockprov.catalog.machines import MAX_PROFILE
from blockprov.errors import ProfileNotFound, UsageError
from blockprov.service.routes.common import OCTETS, body_of, fields_of, json_body, json_of, version_ref
from blockprov.service.state import Service

U32 = struct.Struct("<I")

router = APIRouter()


@router.put("/v1/images/{name}/versions/{vid}/profile", tags=["profiles"],
            openapi_extra=json_body(4 * MAX_PROFILE + (64 << 10)))  # u32 LE indices; JSON for fewer
async def put_profile(name: str, vid: str, request: Request) -> dict[str, Any]:
    """Body ``{"chunks": [i, …]}`` or, as ``application/octet-stream``, u32 LE indices."""
    svc = Service.of(request)
    r = version_ref(name, vid)
    if request.headers.get("content-type", "").startswith(OCTETS):
        raw = await body_of(request)
        if len(raw) % U32.size:
            raise UsageError("a binary profile is a whole number of 4-byte indices")
        order = [v for (v,) in U32.iter_unpack(raw)]
    else:
        d = fields_of(await json_of(request), ("chunks",), 'expected {"chunks": [index, …]}')
        if not isinstance(d.get("chunks"), list):
            raise UsageError('expected {"chunks": [index, …]}')
        order = d["chunks"]
    await svc.run(svc.repo.put_profile, r.name, str(r.version), order)
    return {"image": r.name, "version": r.version, "chunks": len(order)}


@router.get("/v1/images/{name}/versions/{vid}/profile", tags=["profiles"], response_class=Response)
async def get_profile(name: str, vid: str, request: Request, own: bool = False) -> Response:
    """``{"chunks": […]}``, or u32 LE indices when the client accepts ``application/octet-stream``;
    404 ``ProfileNotFound`` when none is recorded. A version without a profile of its own answers
    with the one it inherits (catalog/inherit.py), unless ``own=1``."""
    svc = Service.of(request)
    r = version_ref(name, vid)
    order = await svc.run(functools.partial(svc.repo.get_profile, r.name, str(r.version), inherit=not own))
    if order is None:
        raise ProfileNotFound(ref=str(r))
    if OCTETS in request.headers.get("accept", ""):
        return Response(b"".join(U32.pack(i) for i in order), media_type=OCTETS)
    return JSONResponse({"image": r.name, "version": r.version, "chunks": order})
