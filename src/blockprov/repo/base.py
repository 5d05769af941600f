"""The interface the CLI and the agent use for any repository, local or remote, split by role.

``LocalRepository`` (repo/local.py) works in-process on a data directory; ``RemoteRepository``
(repo/remote.py) speaks the HTTP API of ``blockprov serve``; ``FailoverRepository`` (repo/multi.py)
spreads over several servers. All raise the same ``blockprov.errors`` classes, so callers never care
which one they hold.

Why roles: most code needs a small part of a repository, and a parameter typed with that part says
what the code touches and lets a test hand it a small fake. ``BlobSource`` is what a chunk reader
needs (cache/fetcher.py), ``BlobViews`` an optional capability of a source that the fetcher checks
for, ``BlobSink`` what an upload needs, ``Images`` the catalog of images, versions and tags,
``Machines`` boot files, hosts and boot profiles, ``AgentQueue`` agents and the requests queued for
them, ``Sites`` the groups of hosts and agents that share chunks (and the tickets their peers
check). ``Repository`` composes every role but the optional ``BlobViews``, so a hint of ``Repository``
keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from blockprov.boot import Source
from blockprov.catalog.records import BootFilesInfo, GcStats, HostInfo, ImageInfo, SiteInfo, VersionInfo
from blockprov.errors import BlockprovError
from blockprov.manifest import Manifest
from blockprov.names import Ref


class BlobSource(Protocol):
    """Where chunks are read from."""

    url: str  # for messages: which repository failed or sent a bad blob

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        """Stored (encoded, unverified) blobs of these chunk ids, in order; the caller verifies
        with ``codec.decode``. Raises ChunkMissing naming the first absent id."""
        ...


@runtime_checkable
class BlobViews(Protocol):
    """An optional capability of a ``BlobSource``: ``get_blobs`` answered with read-only views into
    one buffer, saving a copy per blob (RemoteRepository reads a whole fetch answer into one).
    Check with ``isinstance(source, BlobViews)``; a source without it is read with ``get_blobs``."""

    def get_blob_views(self, ids: Sequence[bytes]) -> Sequence[bytes | memoryview | BlockprovError]:
        """Like ``get_blobs``; a view stays valid as long as the caller holds it. A partial answer is
        allowed here: in place of a blob, the error that kept that one chunk away while the others
        came (a site cache that lacks it while its upstream is down); the caller fails that chunk
        alone. A source that got none raises, as ``get_blobs``."""
        ...


class BlobSink(Protocol):
    """Where chunks are uploaded to (imports, snapshots, boot files)."""

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``ids`` the repository does not hold (zero marker never counts)."""
        ...

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        """Store (id, blob) pairs, each verified on arrival; returns how many were new.

        ``trusted=True`` says the caller encoded the blobs from bytes it hashed itself: the embedded
        repository then skips re-verifying them; a remote one verifies anyway (it cannot trust the
        network)."""
        ...


class Images(Protocol):
    """The catalog: images, their versions (manifests) and tags."""

    def resolve(self, ref: Ref | str) -> Manifest:
        """The manifest a reference names (``NAME:TAG`` or ``NAME@ID``); ImageNotFound if none."""
        ...

    def images(self) -> list[ImageInfo]: ...

    def versions(self, name: str) -> list[VersionInfo]: ...

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        """Record a version whose chunks are all present; its id is the acknowledgement.
        Raises MissingChunks listing the absent ones."""
        ...

    def set_tag(self, name: str, tag: str, version: str) -> None: ...

    def remove(self, ref: Ref | str) -> list[str]:
        """Remove a tag (``NAME:TAG``) or a version and its tags (``NAME@ID``); returns what went."""
        ...

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]: ...

    def raw_url(self, ref: Ref | str) -> str | None:
        """HTTP URL of the raw view of a version, when the repository is remote."""
        ...


class Machines(Protocol):
    """What machines boot from: a version's boot files (boot.py), hosts assigned to versions, and
    the boot profiles (read orders) agents record and prefetch by."""

    def set_boot_files(self, ref: Ref | str, kernel: Source, initrd: Source, cmdline: str = "",
                       efi: Mapping[str, Source] | None = None, *, prepare: bool = True) -> BootFilesInfo:
        """Store a kernel and an initrd (bytes or file paths) for the version ``ref`` names now,
        and its UEFI loader (``efi``: boot.EFI_FILES by name, shim and GRUB both or none),
        replacing any it had. InvalidName for a bad ``cmdline``; ImageNotFound for the version.
        ``prepare``: a server that prepares boot profiles (vm/prepare.py) starts one for the
        version if it has none (the embedded repository leaves that to its caller)."""
        ...

    def preparation(self, ref: Ref | str) -> dict[str, Any] | None:
        """Where the preparation of the version's boot profile stands (catalog/preparation.py:
        ``state``, ``detail``, ``updated``), or None when none was started."""
        ...

    def get_boot_files(self, ref: Ref | str) -> BootFilesInfo | None:
        """The version's boot files, or None when it has none."""
        ...

    def boot_file(self, ref: Ref | str, which: str) -> bytes:
        """The content of ``"kernel"``, ``"initrd"`` or an EFI loader file (boot.BOOT_FILES),
        verified; BootFilesMissing when the version has no boot files, EfiLoaderMissing when it
        lacks that EFI file."""
        ...

    def assign_host(self, host: str, ref: Ref | str, args: str | None = None,
                    settings: Mapping[str, str | None] | None = None) -> HostInfo:
        """Boot ``host`` (a MAC or host id) from ``ref``: ``NAME:TAG`` follows the tag, ``NAME@ID``
        stays. ``args`` are extra kernel arguments for that host, ``settings`` its settings
        (boot.SETTINGS: policy, hydrate). Only what is named changes: ``args`` None and a setting
        left out keep their values; ``""`` clears."""
        ...

    def hosts(self) -> list[HostInfo]: ...

    def remove_host(self, host: str) -> None:
        """Forget a host's assignment; HostNotFound if it had none."""
        ...

    def boot_script(self, host: str, base_url: str | None = None, *, booting: bool = False) -> str:
        """The iPXE script for ``host``: ``exit`` when its disk is complete and current (boot.py's
        ``disk_verdict``), else its network boot. ``base_url``: the repository's URL as the host
        reaches it (a remote repository defaults to the URL the server was reached at);
        ``booting``: the PC's iPXE asks (recorded), not an operator. HostNotFound,
        BootFilesMissing, or Conflict when the assigned tag or version is gone."""
        ...

    def check_disk(self, host: str, base_url: str | None, version: str, fingerprint: str) -> str | None:
        """The every-day boot's question (netboot/everyday.py): the PC's disk, come up, holds
        ``version`` (``NAME@ID``) whole and its loader boots ``fingerprint``
        (boot.disk_fingerprint). Recorded; None when it is current, else why it must boot from
        the network."""
        ...

    def record_disk(self, host: str, version: str, fingerprint: str) -> None:
        """The PC's agent says its disk holds ``version`` whole and its loader boots ``fingerprint``."""
        ...

    def reprovision_host(self, host: str) -> str:
        """Ask the host's PC to set its disk up from scratch at its next boot; returns the
        request's token (boot.py: ``blockprov.reprovision=``)."""
        ...

    def put_profile(self, image: str, version: str, order: Sequence[int]) -> None:
        """Record the order in which a boot first read chunk indices (distinct, < chunk count);
        the first a version records is merged with the profile it inherited."""
        ...

    def get_profile(self, image: str, version: str, *, inherit: bool = True) -> list[int] | None:
        """The recorded boot order of a version, else the one it inherits from the version it was
        made from, translated (catalog/inherit.py; not with ``inherit=False``), or None;
        ImageNotFound for an unknown version."""
        ...


class AgentQueue(Protocol):
    """Agents attached to the repository, and the requests (snapshot, status …) queued for them."""

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


class Sites(Protocol):
    """Sites (catalog/sites.py): named groups of hosts and agents that share chunks on their LAN."""

    def add_site(self, name: str, cache: str | None = None) -> SiteInfo:
        """Add a site or change its site cache URL (``""`` removes it, None keeps it)."""
        ...

    def sites(self) -> list[SiteInfo]: ...

    def remove_site(self, name: str) -> None:
        """SiteNotFound if there is none."""
        ...

    def rotate_site_secret(self) -> None:
        """Every ticket and site key handed out so far stops working (tickets.py)."""
        ...

    def join_site(self, site: str, instance: str) -> dict[str, Any]:
        """What an agent of ``site`` needs to take part: ``ticket`` (shown to peers), ``keys``
        (epoch → hex, to check the peers' tickets), ``peers`` (the site's online agents that serve
        chunks: instance, url, image, version), ``cache`` (the site cache's URL or None),
        ``expires`` and ``refresh`` (seconds until it should join again). SiteNotFound; Forbidden
        for a token bound to another site."""
        ...


class Repository(BlobSource, BlobSink, Images, Machines, AgentQueue, Sites, Protocol):
    """A whole repository: every role, and what spans them."""

    def gc(self) -> GcStats:
        """Delete chunks no version references (after a grace period that protects uploads in progress)."""
        ...

    def close(self) -> None: ...
