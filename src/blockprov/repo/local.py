"""The embedded repository: a chunk store and a catalog in one data directory, used in-process.

Layout of the data directory::

    DATA/catalog.sqlite   images, versions (manifests), tags (catalog/images.py); boot files, hosts,
                          profiles, agents (catalog/machines.py); tokens (catalog/tokens.py) — unless
                          the catalog is in PostgreSQL (``--catalog``, catalog/db.py)
    DATA/chunks/          the pack-file chunk store (store/pack.py)
    DATA/tmp/             scratch space for imports of non-raw formats

Crash rules: ``commit`` first makes every chunk durable (``store.sync``), then records the version
in one catalog transaction, so a version that exists names only durable chunks. ``gc`` deletes
only chunks that no version references *and* that are older than a grace period, so chunks of an
upload in progress (not yet committed) survive a concurrent gc.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blockprov import boot, codec, names, tickets
from blockprov import manifest as mf
from blockprov.catalog.db import SQLDatabase
from blockprov.catalog.images import Catalog
from blockprov.catalog.machines import Registry
from blockprov.catalog.preparation import Preparations
from blockprov.catalog.records import BootFilesInfo, GcStats, HostInfo, ImageInfo, SiteInfo, VersionInfo
from blockprov.catalog.sites import Sites, online
from blockprov.codec import ZERO_DIGEST
from blockprov.durable import ensure_dir
from blockprov.errors import (
    BlockprovError,
    BootFilesMissing,
    Conflict,
    EfiLoaderMissing,
    Forbidden,
    MissingChunks,
    SiteNotFound,
    UsageError,
)
from blockprov.manifest import Manifest
from blockprov.names import Ref, image_name, instance_id, kernel_args, parse_ref, site_name, version_id
from blockprov.store.base import ChunkStore
from blockprov.store.pack import PackChunkStore

GC_GRACE_SECONDS = 3600.0


def as_ref(ref: Ref | str) -> Ref:
    return ref if isinstance(ref, Ref) else parse_ref(ref)


class LocalRepository:
    def __init__(self, data_dir: str | os.PathLike[str], store: ChunkStore | None = None,
                 catalog: SQLDatabase | None = None) -> None:
        self.data_dir = ensure_dir(data_dir)
        self.url = f"file://{Path(self.data_dir).resolve()}"
        self.store = store if store is not None else PackChunkStore(self.data_dir / "chunks")
        self.catalog = Catalog(catalog if catalog is not None else self.data_dir / "catalog.sqlite")
        self.registry = Registry(self.catalog)  # boot files, hosts, profiles, agents (catalog/machines.py)
        self.site_table = Sites(self.catalog.db)  # sites and their ticket secret (catalog/sites.py)
        self.preparations = Preparations(self.catalog.db)  # boot profiles being prepared (vm/prepare.py)
        self.tmp_dir = ensure_dir(self.data_dir / "tmp")

    # -- reading --------------------------------------------------------------------------------
    def resolve(self, ref: Ref | str) -> Manifest:
        r = as_ref(ref)
        return self.catalog.manifest(r.name, self.catalog.resolve_id(r))

    def images(self) -> list[ImageInfo]:
        return self.catalog.images()

    def versions(self, name: str) -> list[VersionInfo]:
        return self.catalog.versions(name)

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return self.store.get_blobs(ids)

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        return self.store.missing(ids)

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]:
        return mf.diff(self.resolve(a), self.resolve(b))

    def raw_url(self, ref: Ref | str) -> str | None:
        return None

    # -- writing --------------------------------------------------------------------------------
    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        return self.store.put_blobs(items, trusted=trusted)

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        missing = self.store.missing(manifest.unique_digests())
        if missing:
            raise MissingChunks([c.hex() for c in missing])
        self.catalog.check_parent(manifest)
        self.store.sync()
        return self.catalog.add_version(manifest, tag)

    def set_tag(self, name: str, tag: str, version: str) -> None:
        self.catalog.set_tag(name, tag, version)

    def remove(self, ref: Ref | str) -> list[str]:
        return self.catalog.remove(as_ref(ref))

    def gc(self, grace: float = GC_GRACE_SECONDS) -> GcStats:
        referenced: set[bytes] = set()
        for m in self.catalog.all_manifests():
            referenced |= m.unique_digests()
        referenced |= self.registry.boot_piece_ids()
        referenced.discard(ZERO_DIGEST)
        cutoff = time.time() - grace
        kept = 0
        doomed: list[bytes] = []
        for cid, _size, mtime in list(self.store.iter_ids()):
            if cid in referenced or mtime > cutoff:
                kept += 1
            else:
                doomed.append(cid)
        freed = self.store.delete_many(doomed)
        removed = len(doomed)
        space = self.store.compact(spare=grace)  # the pack store's also removes packs nothing indexes
        return GcStats(chunks_removed=removed, bytes_removed=freed, chunks_kept=kept, space_freed=space)

    def close(self) -> None:
        self.store.close()
        self.catalog.close()

    # -- remote boot, profiles, agents (catalog/machines.py; the HTTP service calls these too) -
    def set_boot_files(self, ref: Ref | str, kernel: boot.Source, initrd: boot.Source, cmdline: str = "",
                       efi: Mapping[str, boot.Source] | None = None, *, prepare: bool = True) -> BootFilesInfo:
        r = as_ref(ref)
        cmdline = kernel_args(cmdline)
        vid = self.catalog.resolve_id(r)

        def sink(items: list[tuple[bytes, bytes]]) -> None:
            self.store.put_blobs(items, trusted=True)

        k = boot.split(kernel, "kernel", sink)
        i = boot.split(initrd, "initrd", sink)
        loader = {name: boot.split(src, name, sink) for name, src in (efi or {}).items()}
        return self.record_boot_files(r.name, vid, k, i, cmdline, loader)

    def record_boot_files(self, image: str, vid: str, kernel: boot.BootFile, initrd: boot.BootFile,
                          cmdline: str, efi: Mapping[str, boot.BootFile] | None = None) -> BootFilesInfo:
        """Record descriptors whose pieces were uploaded already: every piece must be present and
        decode to the length the descriptor implies; pieces are made durable before the row.
        ``efi``: the version's UEFI loader (boot.EFI_FILES), shim and GRUB both or neither."""
        efi = dict(efi or {})
        if efi and boot.efi_missing(efi):
            raise UsageError(f"a UEFI loader needs {' and '.join(boot.EFI_NEEDED)}; "
                             f"{', '.join(boot.efi_missing(efi))} missing")
        files = [kernel, initrd, *efi.values()]
        missing = self.store.missing([p for f in files for p in f.piece_ids()])
        if missing:
            raise MissingChunks([c.hex() for c in missing])
        for f in files:
            for n in range(f.count):  # header only: the length a piece decodes to
                blob = self.store.get_blob(f.piece_id(n))
                if len(blob) < codec.HEADER_SIZE or codec.HEADER.unpack_from(blob)[4] != f.piece_length(n):
                    raise UsageError(f"boot file piece {n} ({f.piece_id(n).hex()}) does not have the length "
                                     f"{f.piece_length(n)} its descriptor implies")
        self.store.sync()
        return self.registry.set_boot_files(image_name(image), version_id(vid), kernel, initrd, cmdline, efi)

    def preparation(self, ref: Ref | str) -> dict[str, Any] | None:
        r = as_ref(ref)
        return self.preparations.get(r.name, self.catalog.resolve_id(r))

    def get_boot_files(self, ref: Ref | str) -> BootFilesInfo | None:
        r = as_ref(ref)
        return self.registry.boot_files(r.name, self.catalog.resolve_id(r))

    def _boot_files(self, ref: Ref) -> BootFilesInfo:
        info = self.get_boot_files(ref)
        if info is None:
            raise BootFilesMissing(ref=str(ref))
        return info

    def boot_file(self, ref: Ref | str, which: str) -> bytes:
        f = self.boot_file_info(as_ref(ref), which)
        return b"".join(boot.assemble(f, self.store.get_blobs(f.piece_ids())))

    def boot_file_info(self, ref: Ref, which: str) -> boot.BootFile:
        if which not in boot.BOOT_FILES:
            raise UsageError(f"a boot file is one of {', '.join(boot.BOOT_FILES)}, not {which!r}")
        info = self._boot_files(ref)
        f = info.file(which)
        if f is None:
            raise EfiLoaderMissing(ref=f"{info.image}@{info.version}", missing=which)
        return f

    def assign_host(self, host: str, ref: Ref | str, args: str | None = None,
                    settings: Mapping[str, str | None] | None = None) -> HostInfo:
        return self.registry.assign_host(host, as_ref(ref), args, settings)

    def hosts(self) -> list[HostInfo]:
        return self.registry.hosts()

    def remove_host(self, host: str) -> None:
        self.registry.remove_host(host)

    def _boot_plan(self, host: str, base_url: str | None) -> tuple[HostInfo, str, BootFilesInfo, str]:
        """(host record, image, its version's boot files, base URL) of ``host`` booting now."""
        if base_url is None:
            raise UsageError("a boot script needs the repository's HTTP URL as hosts reach it (--base-url): "
                             "the embedded repository has none until `blockprov serve` exposes it")
        base = names.base_url(base_url)
        h = self.registry.host(host)
        if h.site is not None:  # a host of a site with a site cache boots from it: kernel, initramfs, chunks
            with contextlib.suppress(SiteNotFound):
                base = self.site_table.get(h.site).cache or base
        ref = parse_ref(h.ref)
        if h.version is None:
            raise Conflict(f"host {h.host} is assigned {h.ref}, which no longer exists: re-assign it")
        info = self._boot_files(Ref(ref.name, version=h.version))
        return h, ref.name, info, base

    def _words(self, h: HostInfo, image: str, info: BootFilesInfo, base: str) -> list[str]:
        """The kernel command line of ``h``'s network boot (boot.boot_words), with the operator's
        last re-provision request."""
        assert h.version is not None
        return boot.boot_words(host=h.host, image=image, version=h.version, base=base, cmdline=info.cmdline,
                               args=h.args, settings=h.settings(), reprovision=self.registry.reprovision_token(h.host))

    def _disk_verdict(self, host: str, base_url: str | None, *, from_disk: bool) -> tuple[HostInfo, str, str | None]:
        """(host record, NAME@ID it is assigned, boot.disk_verdict on its disk): the fingerprint
        of what its disk's loader boots after this network boot is the version's kernel and
        initramfs and this command line as the loader keeps it (boot.disk_cmdline)."""
        h, image, info, base = self._boot_plan(host, base_url)
        version = f"{image}@{h.version}"
        fingerprint = boot.disk_fingerprint(info.kernel.id, info.initrd.id,
                                            boot.disk_cmdline(" ".join(self._words(h, image, info, base))))
        return h, version, boot.disk_verdict(self.registry.disk_state(h.host), version=version,
                                             fingerprint=fingerprint, now=time.time(), from_disk=from_disk)

    def boot_script(self, host: str, base_url: str | None = None, *, booting: bool = False) -> str:
        """The host's iPXE script: ``exit`` when its disk is complete and current (boot.py's
        ``disk_verdict``: the PC boots its own disk's loader), else the network boot. Answering
        it records nothing but, with ``booting`` (iPXE asks, not an operator), that the PC was told
        to boot its disk: a host has booted once it has fetched the whole initrd the script
        names (service/routes/boot.py records that), or once its disk's initramfs asked
        (``check_disk``), so neither an operator looking (``host script``, curl) nor a boot that
        fails before then counts as its last boot."""
        disk = self._boots_disk(host, base_url, booting=booting)
        if disk is not None:
            return boot.disk_script(*disk)
        h, image, info, base = self._boot_plan(host, base_url)
        assert h.version is not None
        return boot.script(host=h.host, assigned=h.ref, image=image, version=h.version, base=base,
                           cmdline=info.cmdline, args=h.args, settings=h.settings(),
                           reprovision=self.registry.reprovision_token(h.host))

    def _boots_disk(self, host: str, base_url: str | None, *, booting: bool) -> tuple[str, str] | None:
        """(host, NAME@ID its disk holds) when the host's PC boots its own disk now (boot.py's
        ``disk_verdict``, asked as the network boot would be), else None. ``booting``: the PC's
        firmware or iPXE asks, not an operator: that it was told so is recorded (``told``)."""
        h, version, why = self._disk_verdict(host, base_url, from_disk=False)
        if why is not None:
            return None
        if booting:
            self.registry.record_told(h.host)
        return h.host, version

    def check_disk(self, host: str, base_url: str | None, version: str, fingerprint: str) -> str | None:
        """The disk's own initramfs asks (netboot/everyday.py): it holds ``version`` whole and its
        loader boots ``fingerprint``. When that is what its agent last said, the disk's coming up
        is recorded and the verdict follows: None, the disk is current (and this is the host's
        last boot), else why the PC must boot from the network."""
        if not self.registry.record_seen(host, version, fingerprint):
            return "the disk's word differs from what the PC's agent last said of it (or it said nothing)"
        try:
            h, _version, why = self._disk_verdict(host, base_url, from_disk=True)
        except (Conflict, BootFilesMissing) as e:  # the assignment cannot boot from the network either
            return str(e)
        if why is None:
            with contextlib.suppress(BlockprovError):
                self.registry.record_boot(h.host, str(h.version))
        return why

    def record_disk(self, host: str, version: str, fingerprint: str) -> None:
        """The PC's agent says its disk holds ``version`` whole and its loader boots ``fingerprint``."""
        self.registry.record_disk(host, version, fingerprint)

    def reprovision_host(self, host: str) -> str:
        return self.registry.reprovision(host)

    def uefi_image(self, host: str, base_url: str | None = None, *,
                   booting: bool = False) -> tuple[boot.UefiImage | str, str, str]:
        """The UEFI HTTP boot image of ``host`` (boot.uefi_image), its image and version: the
        version's kernel, initramfs and UEFI loader, and a grub.cfg booting them with the command
        line its iPXE script would give. EfiLoaderMissing when the version has no UEFI loader.
        Instead of the image, why the PC boots its own disk (boot.disk_note) when the disk is
        complete and current, the rule of the iPXE script's ``exit``; ``booting``: the firmware
        asks for the image itself, not its size nor an operator: that it was told so is recorded."""
        disk = self._boots_disk(host, base_url, booting=booting)
        h, image, info, base = self._boot_plan(host, base_url)
        assert h.version is not None
        if disk is not None:
            return boot.disk_note(*disk), image, h.version
        if missing := boot.efi_missing(info.efi):
            raise EfiLoaderMissing(ref=f"{image}@{h.version}", missing=", ".join(missing))
        words = self._words(h, image, info, base)
        return boot.uefi_image({"kernel": info.kernel, "initrd": info.initrd, **info.efi}, words,
                               f"host {h.host} is assigned {h.ref} = {image}@{h.version}"), image, h.version

    def put_profile(self, image: str, version: str, order: Sequence[int]) -> None:
        self.registry.put_profile(image, version, list(order))

    def get_profile(self, image: str, version: str, *, inherit: bool = True) -> list[int] | None:
        return self.registry.get_profile(image, version, inherit=inherit)

    def register_agent(self, instance: str, info: dict[str, Any]) -> None:
        self.registry.register_agent(instance, info)

    def agents(self) -> list[dict[str, Any]]:
        return self.registry.agents()

    def unregister_agent(self, instance: str) -> None:
        self.registry.unregister_agent(instance)

    def post_request(self, instance: str, op: str, args: dict[str, Any] | None = None) -> str:
        return self.registry.post_request(instance, op, args)

    def next_request(self, instance: str, wait: float = 0.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + _wait(wait)
        while True:  # bounded by the deadline
            req = self.registry.try_next_request(instance)
            left = deadline - time.monotonic()
            if req is not None or left <= 0:
                return req
            time.sleep(min(POLL_SECONDS, left))

    def complete_request(self, instance: str, rid: str, ok: bool, result: dict[str, Any] | None = None,
                         error: str | None = None) -> dict[str, Any]:
        return self.registry.complete_request(instance, rid, ok, result, error)

    def get_request(self, instance: str, rid: str, wait: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + _wait(wait)
        while True:  # bounded by the deadline
            req = self.registry.get_request(instance, rid)
            left = deadline - time.monotonic()
            if req["state"] in ("done", "failed") or left <= 0:
                return req
            time.sleep(min(POLL_SECONDS, left))

    # -- sites (catalog/sites.py, tickets.py) --------------------------------------------------
    def add_site(self, name: str, cache: str | None = None) -> SiteInfo:
        return self.site_table.add(name, cache)

    def sites(self) -> list[SiteInfo]:
        return self.site_table.all()

    def remove_site(self, name: str) -> None:
        self.site_table.remove(name)

    def rotate_site_secret(self) -> None:
        self.site_table.rotate_secret()

    def join_site(self, site: str, instance: str, *, token_site: str | None = None) -> dict[str, Any]:
        """``token_site``: the site the caller's token is bound to (the service passes it), if any."""
        site, instance = site_name(site), instance_id(instance)
        info = self.site_table.get(site)  # SiteNotFound
        if token_site is not None and token_site != site:
            raise Forbidden(scope=f"site {token_site!r}", action=f"join site {site!r}", needed=f"site {site!r}")
        secret = self.site_table.secret()
        now = time.time()
        return {"site": site, "instance": instance, "cache": info.cache,
                "ticket": tickets.issue(secret, site, instance, now), "expires": now + tickets.TICKET_SECONDS,
                "keys": {str(e): k.hex() for e, k in tickets.site_keys(secret, site, now).items()},
                "peers": online(self.registry.agents(), site, exclude=instance), "refresh": JOIN_REFRESH}


JOIN_REFRESH = 30.0  # seconds between an agent's joins: new peers, a fresh ticket long before it expires
POLL_SECONDS = 0.15  # how often a waiting caller re-reads the shared catalog
MAX_WAIT = 3600.0


def _wait(wait: float) -> float:
    if not 0 <= wait <= MAX_WAIT:  # also refuses NaN
        raise UsageError(f"wait must be 0 to {MAX_WAIT:g} seconds, not {wait}")
    return float(wait)
