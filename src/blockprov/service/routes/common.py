"""Small pieces several route modules use: request bodies, references, OpenAPI body schemas.

The write routes read their bodies themselves (not through a Pydantic model) so that a binary or
loosely shaped body costs no validation layer; ``JSON_BODY``/``OCTETS_BODY`` still describe the
body in the OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from blockprov.errors import UsageError
from blockprov.names import Ref, image_name, parse_ref, tag_name, version_id

OCTETS = "application/octet-stream"
OCTETS_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}
T = TypeVar("T")

JSON_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}}}}}


async def body_of(request: Request) -> bytes:
    """The whole body; one part (the usual case) is returned without a copy."""
    parts = [p async for p in request.stream()]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def decoded(raw: bytes, decode: Callable[[bytes], T]) -> T:
    """``decode(raw)``, with a body nested too deeply refused as a ``UsageError`` (400).

    Why: Python's JSON decoder recurses, so ``[[[[…`` a thousand deep raises ``RecursionError``,
    which is no ``ValueError`` and would escape every route's "not JSON" handler as a 500 (issue 17).
    Every JSON body the service decodes goes through here."""
    try:
        return decode(raw)
    except RecursionError:
        raise UsageError("the body is nested too deeply") from None


async def json_of(request: Request) -> Any:
    try:
        return decoded(await body_of(request), json.loads)
    except ValueError as e:
        raise UsageError(f"the body is not JSON: {e}") from None


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
