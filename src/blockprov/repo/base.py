"""The interface the CLI and the agent use for any repository, local or remote.

``LocalRepository`` (repo/local.py) works in-process on a data directory; ``RemoteRepository``
(repo/remote.py) speaks the HTTP API of ``blockprov serve``. Both raise the same
``blockprov.errors`` classes, so callers never care which one they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from blockprov.boot import Source
from blockprov.catalog.records import BootFilesInfo, GcStats, HostInfo, ImageInfo, VersionInfo
from blockprov.manifest import Manifest
from blockprov.names import Ref


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

    # -- remote boot (boot.py) ------------------------------------------------------------------
    def set_boot_files(self, ref: Ref | str, kernel: Source, initrd: Source, cmdline: str = "") -> BootFilesInfo:
        """Store a kernel and an initrd (bytes or file paths) for the version ``ref`` names now,
        replacing any it had. InvalidName for a bad ``cmdline``; ImageNotFound for the version."""
        ...

    def get_boot_files(self, ref: Ref | str) -> BootFilesInfo | None:
        """The version's boot files, or None when it has none."""
        ...

    def boot_file(self, ref: Ref | str, which: str) -> bytes:
        """The content of ``"kernel"`` or ``"initrd"``, verified; BootFilesMissing when none."""
        ...

    def assign_host(self, host: str, ref: Ref | str, args: str = "") -> HostInfo:
        """Boot ``host`` (a MAC or host id) from ``ref``: ``NAME:TAG`` follows the tag, ``NAME@ID``
        stays. ``args`` are extra kernel arguments for that host. Replaces an earlier assignment."""
        ...

    def hosts(self) -> list[HostInfo]: ...

    def remove_host(self, host: str) -> None:
        """Forget a host's assignment; HostNotFound if it had none."""
        ...

    def boot_script(self, host: str, base_url: str | None = None) -> str:
        """The iPXE script for ``host``. ``base_url``: the repository's URL as the host reaches it
        (a remote repository defaults to the URL the server was reached at). HostNotFound,
        BootFilesMissing, or Conflict when the assigned tag or version is gone."""
        ...

    # -- boot profiles ----------------------------------------------------------------------------
    def put_profile(self, image: str, version: str, order: Sequence[int]) -> None:
        """Record the order in which a boot first read chunk indices (distinct, < chunk count)."""
        ...

    def get_profile(self, image: str, version: str) -> list[int] | None:
        """The recorded boot order of a version, or None; ImageNotFound for an unknown version."""
        ...

    # -- agents and repository-initiated requests -------------------------------------------------
    def register_agent(self, instance: str, info: dict[str, Any]) -> None:
        """Register (or refresh: also the heartbeat) an agent instance attached to this repository."""
        ...

    def agents(self) -> list[dict[str, Any]]:
        """Registered agents: instance, info, registered, last_seen, seen_ago, pending, running."""
        ...

    def unregister_agent(self, instance: str) -> None:
        """Forget an agent; its unfinished requests fail. AgentNotFound if unknown."""
        ...

    def post_request(self, instance: str, op: str, args: dict[str, Any] | None = None) -> str:
        """Queue a request for a registered agent; returns its id. AgentNotFound if unknown."""
        ...

    def next_request(self, instance: str, wait: float = 0.0) -> dict[str, Any] | None:
        """The agent's oldest pending request, now ``running`` under a lease, or None after ``wait`` s."""
        ...

    def complete_request(self, instance: str, rid: str, ok: bool, result: dict[str, Any] | None = None,
                         error: str | None = None) -> dict[str, Any]:
        """Record a request's outcome (``done`` or ``failed``); Conflict if it was already completed."""
        ...

    def get_request(self, instance: str, rid: str, wait: float = 0.0) -> dict[str, Any]:
        """A request's state, waiting up to ``wait`` s for it to finish. RequestNotFound if unknown."""
        ...

    def close(self) -> None: ...
