"""Routes for images, versions and tags (the catalog), and the raw view of a version (service/rawview.py).

A commit's ``201`` is the acknowledgement snapshots rely on: it is given only once every chunk the
manifest references is present (409 ``MissingChunks`` lists the others). Manifests by version id
are immutable, so they carry a strong ETag and are cacheable forever; by tag they revalidate.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from blockprov import manifest as mf
from blockprov.errors import UsageError
from blockprov.manifest import Manifest
from blockprov.names import Ref, image_name, tag_name, version_id
from blockprov.results import to_dict
from blockprov.service.rawview import IMMUTABLE, etag_matches
from blockprov.service.routes.common import body_of, fields_of, json_body, json_of, ref_in
from blockprov.service.state import Service

router = APIRouter()


@router.get("/v1/images", tags=["catalog"])
async def list_images(request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"images": [to_dict(i) for i in await svc.run(svc.repo.images)]}


@router.get("/v1/images/{name}/versions", tags=["catalog"])
async def list_versions(name: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"versions": [to_dict(v) for v in await svc.run(svc.repo.versions, image_name(name))]}


@router.get("/v1/images/{name}/manifest", tags=["catalog"], response_class=Response)
async def get_manifest(name: str, request: Request, ref: str = "latest") -> Response:
    """The manifest exactly as ``Manifest.to_json()``: a client that asked by id re-hashes it."""
    svc = Service.of(request)
    r = ref_in(name, ref)
    vid, _m, raw_json = await svc.run(svc.manifests.get, r)
    etag = f'"{vid}"'
    headers = {"etag": etag, "x-blockprov-version": vid,
               "cache-control": IMMUTABLE if r.version else "no-cache"}
    inm = request.headers.get("if-none-match")
    if inm is not None and etag_matches(inm, etag):
        return Response(status_code=304, headers=headers)
    return Response(raw_json, headers=headers, media_type="application/json")


@router.post("/v1/images/{name}/versions", tags=["catalog"], status_code=201,
             openapi_extra=json_body(mf.MAX_MANIFEST_BYTES))
async def commit(name: str, request: Request, tag: str | None = None) -> JSONResponse:
    """Record a version whose chunks are all present; the ``201`` is the acknowledgement.
    409 with ``missing`` lists the chunks still to upload."""
    svc = Service.of(request)
    image_name(name)
    if tag is not None:
        tag_name(tag)
    m = await svc.run(Manifest.from_json, await body_of(request))
    if m.image != name:
        raise UsageError(f"manifest is for image {m.image!r}, posted to {name!r}")
    vid = await svc.run(svc.repo.commit, m, tag)
    return JSONResponse({"id": vid, "image": name, "tag": tag}, status_code=201)


@router.put("/v1/images/{name}/tags/{tag}", tags=["catalog"], openapi_extra=json_body(schema={
    "type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}}))
async def set_tag(name: str, tag: str, request: Request) -> dict[str, Any]:
    """Body ``{"version": ID}``: the tag names that version from now on."""
    svc = Service.of(request)
    name, tag = image_name(name), tag_name(tag)
    d = fields_of(await json_of(request), ("version",), 'expected {"version": "<16 hex digits>"}')
    if not isinstance(d.get("version"), str):
        raise UsageError('expected {"version": "<16 hex digits>"}')
    vid = version_id(d["version"])
    await svc.run(svc.repo.set_tag, name, tag, vid)
    return {"image": name, "tag": tag, "version": vid}


@router.delete("/v1/images/{name}/tags/{tag}", tags=["catalog"])
async def delete_tag(name: str, tag: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"removed": await svc.run(svc.repo.remove, Ref(image_name(name), tag=tag_name(tag)))}


@router.delete("/v1/images/{name}/versions/{vid}", tags=["catalog"])
async def delete_version(name: str, vid: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"removed": await svc.run(svc.repo.remove, Ref(image_name(name), version=version_id(vid)))}


@router.get("/v1/images/{name}/diff", tags=["catalog"])
async def diff(name: str, a: str, b: str, request: Request) -> dict[str, Any]:
    """Chunk indices of ``b`` whose content differs from ``a`` (like EBS ListChangedBlocks).
    ``a``/``b``: ``TAG``, ``@ID``, or a full ``NAME:TAG``/``NAME@ID``."""
    svc = Service.of(request)
    ra, rb = ref_in(name, a, allow_other=True), ref_in(name, b, allow_other=True)
    (ida, ma, _), (idb, mb, _) = await svc.run(svc.manifests.get, ra), await svc.run(svc.manifests.get, rb)
    changed = await svc.run(mf.diff, ma, mb)
    return {"a": ida, "b": idb, "chunk_size": mb.chunk_size, "changed": changed}


@router.get("/v1/images/{name}/raw/{ref}", tags=["raw"], response_class=Response)
@router.head("/v1/images/{name}/raw/{ref}", tags=["raw"], response_class=Response)
async def raw_view(name: str, ref: str, request: Request) -> Response:
    """The version as a plain disk image with single-range support (curl, qemu http, iPXE)."""
    h = request.headers
    return await Service.of(request).raw.respond(ref_in(name, ref), request.method, h.get("range"),
                                                 h.get("if-range"), h.get("if-none-match"))
