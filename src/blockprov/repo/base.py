"""The interface the CLI and the agent use for any repository, local or remote.

``LocalRepository`` (repo/local.py) works in-process on a data directory; ``RemoteRepository``
(repo/remote.py) speaks the HTTP API of ``blockprov serve``. Both raise the same
``blockprov.errors`` classes, so callers never care which one they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..manifest import Manifest
from ..names import Ref


@dataclass
class VersionInfo:
    image: str
    id: str
    size: int
    chunk_size: int
    created: float
    parent: str | None
    labels: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageInfo:
    name: str
    versions: int
    tags: dict[str, str]  # tag -> version id
    latest: str | None  # newest version id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcStats:
    chunks_removed: int
    bytes_removed: int
    chunks_kept: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Repository(Protocol):
    url: str

    def resolve(self, ref: Ref | str) -> Manifest:
        """The manifest a reference names (``NAME:TAG`` or ``NAME@ID``); ImageNotFound if none."""
        ...

    def images(self) -> list[ImageInfo]: ...

    def versions(self, name: str) -> list[VersionInfo]: ...

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        """Stored (encoded, unverified) blobs of these chunk ids, in order; the caller verifies
        with ``codec.decode``. Raises ChunkMissing naming the first absent id."""
        ...

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``ids`` the repository does not hold (zero marker never counts)."""
        ...

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        """Store (id, blob) pairs, each verified on arrival; returns how many were new.

        ``trusted=True`` says the caller encoded the blobs from bytes it hashed itself: the embedded
        repository then skips re-verifying them; a remote one verifies anyway (it cannot trust the
        network)."""
        ...

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        """Record a version whose chunks are all present; its id is the acknowledgement.
        Raises MissingChunks listing the absent ones."""
        ...

    def set_tag(self, name: str, tag: str, version: str) -> None: ...

    def remove(self, ref: Ref | str) -> list[str]:
        """Remove a tag (``NAME:TAG``) or a version and its tags (``NAME@ID``); returns what went."""
        ...

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]: ...

    def gc(self) -> GcStats: ...

    def raw_url(self, ref: Ref | str) -> str | None:
        """HTTP URL of the raw view of a version, when the repository is remote."""
        ...

    def close(self) -> None: ...
