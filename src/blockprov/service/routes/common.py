"""Small pieces several route modules use: request bodies, references, OpenAPI body schemas.

The write routes read their bodies themselves (not through a Pydantic model) so that a binary or
loosely shaped body costs no validation layer. ``json_body``/``octets_body`` describe the body in
the OpenAPI document and declare the most the route reads (bounds.py enforces it; ``JSON_BODY`` is
a JSON body of at most ``bounds.DEFAULT_BODY``). A JSON body is read with ``json_of``, which checks
its values (jsonvalue.py): a new route that reads JSON with these two is bounded and checked.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from starlette.requests import Request

from blockprov import jsonvalue
from blockprov.errors import UsageError
from blockprov.names import Ref, base_url, image_name, parse_ref, tag_name, version_id
from blockprov.service.bounds import DEFAULT_BODY, body_spec
from blockprov.service.state import Service

OCTETS = "application/octet-stream"
DEFAULT_PORTS = {"http": 80, "https": 443}


def json_body(limit: int = DEFAULT_BODY, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` of a route reading a JSON body of at most ``limit`` bytes."""
    return body_spec(limit, "application/json", schema)


def octets_body(limit: int) -> dict[str, Any]:
    """``openapi_extra`` of a route reading a binary body of at most ``limit`` bytes."""
    return body_spec(limit, OCTETS, {"type": "string", "format": "binary"})


JSON_BODY = json_body()


async def body_of(request: Request) -> bytes:
    """The whole body; one part (the usual case) is returned without a copy."""
    parts = [p async for p in request.stream()]
    return parts[0] if len(parts) == 1 else b"".join(parts)


JSON_ON_LOOP = 64 << 10  # a JSON body larger than this is decoded and checked on the thread pool


async def json_of(request: Request) -> Any:
    """The request's JSON body, decoded and checked by ``jsonvalue.loads`` (the one check of JSON
    from outside: finite numbers within 64 bits, Unicode text without NUL, bounded nesting), so
    nothing a route stores can break a later read. Every JSON body the service reads comes here."""
    raw = await body_of(request)
    if len(raw) <= JSON_ON_LOOP:
        return jsonvalue.loads(raw)
    return await Service.of(request).run(jsonvalue.loads, raw)


def fields_of(d: Any, allowed: Collection[str], expected: str) -> dict[str, Any]:
    """``d``, a JSON object holding only fields the route reads: one it does not know (a misspelt
    one) is refused, not ignored (issue 27: ``PUT /v1/sites/S {"cahce": URL}`` made a site without
    its cache, and a request's ``"arg"`` queued a snapshot without its target)."""
    if not isinstance(d, dict):
        raise UsageError(expected)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UsageError(f"unknown field {', '.join(repr(k[:40]) for k in unknown[:5])}: {expected}")
    return d


def ref_in(name: str, s: str, *, allow_other: bool = False) -> Ref:
    """A reference given relative to image ``name``: ``TAG`` or ``@ID`` (or, where another image
    may be named, a full ``NAME:TAG`` / ``NAME@ID``). Tags never contain ':' or '@', so this is
    unambiguous."""
    if s.startswith("@"):
        return Ref(image_name(name), version=version_id(s[1:]))
    if allow_other and (":" in s or "@" in s):
        return parse_ref(s)
    return Ref(image_name(name), tag=tag_name(s))


def version_ref(name: str, vid: str) -> Ref:
    return Ref(image_name(name), version=version_id(vid))


def own_url(request: Request, *, firmware: bool = False) -> str:
    """This server's URL as the client reached it, from its Host header (so NAT or a proxy in
    between is handled by the client's own view). ``firmware`` (a UEFI HTTP boot image, here or
    through a site cache): with this server's port when that header has none and the port is not
    the scheme's default. edk2's HTTP boot (OVMF, and the firmware of many PCs) sends ``Host:
    ADDRESS`` without the port of the URL it fetches; the kernel command line built from it would
    name port 80. Only there: behind a reverse proxy (``proxy_set_header Host $host``) a header
    without a port means the proxy's default port, and iPXE's scripts must name the proxy, not
    this server's port."""
    url = request.base_url
    server = request.scope.get("server")
    host = request.headers.get("host", "")
    if firmware and server and ":" not in host.rpartition("]")[2] and server[1] != DEFAULT_PORTS.get(url.scheme):
        url = url.replace(port=server[1])
    return base_url(str(url))
