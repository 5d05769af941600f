"""The catalog's value types: what a query about images, versions, hosts and boot files returns.

They live with the catalog (which makes them) and are re-exported by nothing: the repository
interfaces (repo/base.py), the service and the CLI import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockprov.boot import EFI_FILES, SETTINGS, BootFile
from blockprov.errors import UsageError


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


@dataclass
class ImageInfo:
    name: str
    versions: int
    tags: dict[str, str]  # tag -> version id
    latest: str | None  # newest version id


@dataclass
class GcStats:
    chunks_removed: int
    bytes_removed: int
    chunks_kept: int
    space_freed: int = 0  # bytes of pack space compacted away (removed chunks, blobs never indexed)


@dataclass
class HostInfo:
    """A host's boot assignment. ``ref`` is what was assigned (``NAME:TAG`` follows the tag);
    ``version`` is the id it names now, None when that tag or version no longer exists.
    ``last_boot``: when the host last booted — the repository sent it the whole initrd of its
    boot script — and ``last_boot_version`` the version it booted; None until it first boots.
    ``last_refused``, ``refused_why``: the last boot request the repository's access rules
    refused, and why.
    The settings (boot.SETTINGS; None: the machine's default) follow: ``policy`` (``restore`` or
    ``keep``), ``hydrate`` (``background``, ``before-boot``, ``off``), ``site`` (a site's name). A
    setting added later is a field here with a None default, so a record from an older server still
    reads. ``firmware``: what the host booted with last, ``bios`` or ``uefi``, as its requests told
    (service/routes/boot.py); None until a boot says."""

    host: str
    ref: str
    args: str
    version: str | None
    updated: float
    last_boot: float | None = None
    last_boot_version: str | None = None
    last_refused: float | None = None  # when the repository last refused the host's boot request
    refused_why: str | None = None  # and why (e.g. tokens required, no --anonymous-boot)
    policy: str | None = None
    hydrate: str | None = None
    firmware: str | None = None
    site: str | None = None  # the site it belongs to (catalog/sites.py): its peers and its site cache

    def settings(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in SETTINGS}


@dataclass
class BootFilesInfo:
    """The boot files of one version (see boot.py for how they are stored). ``efi``: the UEFI
    loader that boots this kernel (boot.EFI_FILES: shim, GRUB, MOK manager), by file name; empty
    when the version has none (a UEFI PC then boots it through iPXE only, and its disk gets no
    UEFI loader)."""

    image: str
    version: str
    kernel: BootFile
    initrd: BootFile
    cmdline: str
    updated: float
    efi: dict[str, BootFile] = field(default_factory=dict)

    def file(self, which: str) -> BootFile | None:
        """The boot file named ``which`` (``kernel``, ``initrd`` or an EFI_FILES name), if the version has it."""
        return {"kernel": self.kernel, "initrd": self.initrd}.get(which) or self.efi.get(which)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "version": self.version, "cmdline": self.cmdline, "updated": self.updated,
                "kernel": self.kernel.to_dict(), "initrd": self.initrd.to_dict(),
                "efi": {k: f.to_dict() for k, f in sorted(self.efi.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootFilesInfo:
        efi = d.get("efi") or {}
        if not isinstance(efi, dict) or not set(efi) <= set(EFI_FILES):
            raise UsageError(f"efi is an object whose keys are among {', '.join(EFI_FILES)}")
        return cls(image=str(d["image"]), version=str(d["version"]), cmdline=str(d["cmdline"]),
                   updated=float(d["updated"]), kernel=BootFile.from_dict(d["kernel"]),
                   initrd=BootFile.from_dict(d["initrd"]), efi={k: BootFile.from_dict(v) for k, v in efi.items()})


@dataclass
class SiteInfo:
    """A site (catalog/sites.py): ``cache`` is its site cache's URL as its machines reach it."""

    name: str
    cache: str | None
    created: float
    updated: float
