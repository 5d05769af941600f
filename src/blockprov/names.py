"""Names are validated in one place: image names, tags, version ids, references, host ids.

"No crap in, no crap out": anything that becomes a path component, a URL segment or an SQL value
passes through here first, so traversal (``..``, ``/``) and surprises never reach storage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VID = re.compile(r"^[0-9a-f]{16}$")
DEFAULT_TAG = "latest"


def image_name(s: str) -> str:
    if not _NAME.match(s) or ".." in s:
        raise InvalidName(kind="image name", name=s,
                          why="use lower-case letters, digits, '.', '_' and '-' (at most 128), "
                              "starting with a letter or digit")
    return s


def tag_name(s: str) -> str:
    if not _TAG.match(s) or ".." in s:
        raise InvalidName(kind="tag", name=s,
                          why="use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
    return s


def version_id(s: str) -> str:
    if not _VID.match(s):
        raise InvalidName(kind="version id", name=s, why="must be 16 lower-case hex digits")
    return s


@dataclass(frozen=True)
class Ref:
    """``NAME:TAG`` (movable) or ``NAME@ID`` (immutable); plain ``NAME`` means ``NAME:latest``."""

    name: str
    tag: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else f"{self.name}:{self.tag}"


def parse_ref(s: str, *, allow_version: bool = True) -> Ref:
    if "@" in s:
        if not allow_version:
            raise InvalidName(kind="reference", name=s, why="expected NAME:TAG here, not NAME@ID")
        name, vid = s.split("@", 1)
        return Ref(image_name(name), version=version_id(vid))
    if ":" in s:
        name, tag = s.split(":", 1)
        return Ref(image_name(name), tag=tag_name(tag))
    return Ref(image_name(s), tag=DEFAULT_TAG)
