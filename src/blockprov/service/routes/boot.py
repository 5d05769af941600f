"""Routes for network boot: a version's boot files (kernel, initrd) and the hosts booting from them.

* ``GET /v1/boot/{host}/boot.img`` is what a UEFI PC's own HTTP boot fetches, with no iPXE: a FAT
  image of shim, GRUB, a grub.cfg, the kernel and the initramfs (boot.uefi_image), served from the
  chunk store as it is sent, with Range and ETag. It boots under Secure Boot too. A PC whose disk
  is complete and current gets a 404 instead: its firmware boots its disk's own loader.
* ``GET /v1/boot/{host}`` is what iPXE fetches (``chain http://repo/v1/boot/${net0/mac}``): a
  ``text/plain`` ``#!ipxe`` script. URLs in it are built from the address the host used to reach
  us (the request's Host), unless ``?base=`` says otherwise, so NAT or a proxy in between is
  handled by the client's own view. Errors there are one ``text/plain`` line (curl shows it)
  unless the client asks for JSON (``RemoteRepository`` does). iPXE itself (its User-Agent) gets,
  for a host that cannot boot *yet* (404 unknown host, 409 no boot files or tag gone), a 200
  script that prints the reason on the machine's console and asks again after ``?retry=`` seconds
  (boot.retry_script): iPXE never shows an error's body, and a machine left at "No bootable
  device" needs a human to power-cycle it.
* Boot files are served with ``Content-Length``, a strong ETag (the content id), single ranges
  and HEAD: iPXE, curl and resumable downloads all work. Every piece is verified before a byte of
  it is sent; the first is rendered before the status line, so a bad piece is a clean 422.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from blockprov import boot, names
from blockprov.errors import BlockprovError, UsageError
from blockprov.names import host_id, parse_ref
from blockprov.results import to_dict
from blockprov.service.rawview import RangeNotSatisfiable, etag_matches, parse_range
from blockprov.service.routes.common import JSON_BODY, OCTETS, fields_of, json_body, json_of, own_url, version_ref
from blockprov.service.state import Service

PIECES_PER_JOB = 4  # boot file pieces decoded per thread-pool job (4 MiB)

log = logging.getLogger("blockprov.service")
router = APIRouter()


# -- boot files -----------------------------------------------------------------------------------
@router.get("/v1/images/{name}/versions/{vid}/boot", tags=["boot"])
async def get_boot_files(name: str, vid: str, request: Request) -> dict[str, Any]:
    """The version's boot file descriptors and command line; ``{"boot": null}`` when it has none."""
    svc = Service.of(request)
    info = await svc.run(svc.repo.get_boot_files, version_ref(name, vid))
    return {"boot": None if info is None else to_dict(info)}


@router.put("/v1/images/{name}/versions/{vid}/boot", tags=["boot"], openapi_extra=json_body(1 << 20))
async def put_boot_files(name: str, vid: str, request: Request) -> dict[str, Any]:
    """Record ``{"kernel": {size, pieces}, "initrd": {…}, "cmdline": "…", "efi": {"shimx64.efi": {…},
    "grubx64.efi": {…}, "mmx64.efi": {…}}}`` (``efi``, the UEFI loader, optional) whose pieces were
    uploaded as chunks first (409 ``MissingChunks`` lists those still absent)."""
    svc = Service.of(request)
    r = version_ref(name, vid)
    d = fields_of(await json_of(request), ("kernel", "initrd", "cmdline", "efi"),
                  'expected {"kernel": …, "initrd": …, "cmdline": "…", "efi": {…}}')
    kernel, initrd = boot.BootFile.from_dict(d.get("kernel")), boot.BootFile.from_dict(d.get("initrd"))
    cmdline = d.get("cmdline", "")
    if not isinstance(cmdline, str):
        raise UsageError("cmdline must be a string")
    efi = d.get("efi") or {}
    if not isinstance(efi, dict) or not set(efi) <= set(boot.EFI_FILES):
        raise UsageError(f"efi is an object whose keys are among {', '.join(boot.EFI_FILES)}")
    loader = {k: boot.BootFile.from_dict(v) for k, v in efi.items()}
    info = await svc.run(svc.repo.record_boot_files, r.name, str(r.version), kernel, initrd, cmdline, loader)
    if svc.prepare is not None and request.query_params.get("prepare", "1") != "0":
        await svc.run(svc.prepare, r.name, str(r.version))  # a profile prepared in the background (vm/prepare.py)
    return to_dict(info)


@router.get("/v1/images/{name}/versions/{vid}/preparation", tags=["boot"])
async def get_preparation(name: str, vid: str, request: Request) -> dict[str, Any]:
    """Where the preparation of the version's boot profile stands: ``state`` (queued, running, done,
    skipped, failed, or null when none was started), ``detail``, ``updated``."""
    svc = Service.of(request)
    got = await svc.run(svc.repo.preparation, version_ref(name, vid))
    return got or {"state": None}


@router.get("/v1/images/{name}/versions/{vid}/boot/{which}", tags=["boot"], response_class=Response)
@router.head("/v1/images/{name}/versions/{vid}/boot/{which}", tags=["boot"], response_class=Response)
async def get_boot_file(name: str, vid: str, which: str, request: Request, host: str | None = None,
                        platform: str | None = None) -> Response:
    """The kernel, the initrd or a file of the UEFI loader (boot.EFI_FILES): Content-Length, ETag,
    single ``Range``, HEAD; verified as it is sent. ``?host=`` (the boot script puts it on the
    initrd's URL): once the whole initrd was sent, the host's last boot is recorded — not for a
    curl of the script, nor for a boot that stops before — and with ``?platform=`` (iPXE's
    ``${platform}``: ``efi`` or ``pcbios``) its firmware."""
    svc = Service.of(request)
    booting = None if host is None else host_id(host)
    f: boot.BootFile = await svc.run(svc.repo.boot_file_info, version_ref(name, vid), which)

    async def booted() -> None:
        assert booting is not None
        await record_boot(svc, booting, name, vid, boot.IPXE_PLATFORMS.get(platform or ""))

    return await _ranged(request, f.size, f.id, [(0, f.size, f)], OCTETS,
                         booted if booting is not None and which == "initrd" else None)


Part = tuple[int, int, "boot.BootFile | bytes"]  # (offset, length, a boot file's bytes from its start, or bytes)


async def _ranged(request: Request, size: int, tag: str, parts: list[Part], media: str,
                  on_sent: Callable[[], Awaitable[None]] | None = None) -> Response:
    """A body of ``size`` bytes made of ``parts`` (zeros between them) served with a strong ETag
    ``tag``, single ranges and HEAD. A boot file's pieces are verified before a byte of them is
    sent; the first job is rendered before the status line, so a bad first piece is a clean 422.
    ``on_sent``: called when the whole body from its first byte is being sent (a host booted), before
    its last piece goes out: a client holding the whole initrd may ask about the host at once."""
    svc = Service.of(request)
    etag = f'"{tag}"'
    headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": "no-cache"}
    h = request.headers
    inm = h.get("if-none-match")
    if inm is not None and etag_matches(inm, etag):
        return Response(status_code=304, headers=headers)
    try:
        if_range = h.get("if-range")
        rng = parse_range(h.get("range"), size) if if_range is None or if_range.strip() == etag else None
    except RangeNotSatisfiable:
        return Response(status_code=416, headers=headers | {"content-range": f"bytes */{size}"})
    lo, hi = rng if rng is not None else (0, size)
    if rng is not None:
        headers["content-range"] = f"bytes {lo}-{hi - 1}/{size}"
    headers["content-length"] = str(hi - lo)
    status = 206 if rng is not None else 200
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media)
    store = svc.store

    def render(f: boot.BootFile, first: int, stop: int, a: int, b: int) -> bytes:
        """Bytes ``a``..``b`` of ``f`` (within its pieces ``first``..``stop``), verified."""
        data = b"".join(boot.assemble(f, store.get_blobs([f.piece_id(i) for i in range(first, stop)]), first))
        return data[a - first * boot.PIECE:b - first * boot.PIECE]

    jobs: list[bytes | tuple[boot.BootFile, int, int, int, int]] = []
    at = lo
    for off, length, what in sorted(parts, key=lambda x: x[0]):
        a, b = max(lo, off), min(hi, off + length)
        if a >= b:
            continue
        if a > at:
            jobs.append(bytes(a - at))
        if isinstance(what, bytes):
            jobs.append(what[a - off:b - off])
        else:
            p = (a - off) // boot.PIECE
            while p * boot.PIECE < b - off:
                stop = min(p + PIECES_PER_JOB, what.count)
                jobs.append((what, p, stop, max(a - off, p * boot.PIECE), min(b - off, stop * boot.PIECE)))
                p = stop
        at = b
    if at < hi:
        jobs.append(bytes(hi - at))

    async def get(job: bytes | tuple[boot.BootFile, int, int, int, int]) -> bytes:
        return job if isinstance(job, bytes) else await svc.run(render, *job)

    head = await get(jobs[0]) if jobs else b""

    async def body() -> AsyncIterator[bytes]:
        # The boot is recorded before the last piece goes out, not after: a client holding the
        # whole initrd may ask about the host at once, before this generator is resumed.
        pieces = [head]
        for job in jobs[1:]:
            pieces.append(await get(job))
            yield pieces.pop(0)
        if on_sent is not None and lo == 0 and hi == size:
            await on_sent()
        yield pieces.pop()

    return StreamingResponse(body(), status_code=status, headers=headers, media_type=media)


async def record_boot(svc: Service, host: str, name: str, vid: str, firmware: str | None = None) -> None:
    """``host`` booted ``name@vid`` (with ``firmware``, when known: boot.IPXE_PLATFORMS). A boot
    the catalog cannot record (a write refused) has still booted: logged, not raised."""
    try:
        await svc.run(svc.repo.registry.record_boot, host, version_ref(name, vid).version or vid)
        if firmware is not None:
            await svc.run(svc.repo.registry.record_firmware, host, firmware)
    except BlockprovError as e:
        log.warning("host %s booted %s@%s, but its last boot could not be recorded: %s", host, name, vid, e)


def is_ipxe(request: Request) -> bool:
    return request.headers.get("user-agent", "").startswith("iPXE/")


async def refused_boot(request: Request, err: BlockprovError) -> Response | None:
    """What a boot request the access rules refused gets (service/access.py asks): logged, and
    recorded on the host (``host show``, the console); iPXE gets a 200 script that prints why on
    the machine's screen and asks again (a 401 would leave it at "Permission denied" and fall
    through to the disk, booting offline on its old version). None: the usual 401/403."""
    raw = request.path_params.get("host") or unquote(request.url.path.rsplit("/", 1)[-1])
    if err.http_status == 401 and "authorization" not in request.headers:
        why = ("this repository requires access tokens and iPXE cannot send one: start `blockprov serve` with "
               "--anonymous-boot (it opens only boot scripts and kernel/initrd downloads)")
    elif err.http_status in (401, 403):
        why = f"the repository refused the token sent: {err.message}"
    else:  # the catalog out of reach, say: nothing to record, but the PC still says why and asks again
        why = f"the repository cannot check access now: {err.message}"
    log.warning("boot request of host %s from %s refused: %s", raw[:64],
                request.client.host if request.client else "?", why)
    svc = Service.of(request)
    with contextlib.suppress(BlockprovError):  # an invalid host, or the catalog unreachable: the log has it
        await svc.run(svc.repo.registry.record_refused, host_id(raw), why)
    if not is_ipxe(request):
        return None
    return PlainTextResponse(boot.retry_script(f"{why} [{err.http_status}]", str(request.url), boot.RETRY_SECONDS),
                             headers={"cache-control": "no-store", "x-blockprov-error": type(err).__name__})


# -- hosts ----------------------------------------------------------------------------------------
def _base(request: Request, base: str | None, *, firmware: bool = False) -> str:
    """The repository's URL as the host reached it: ``base`` when given, else the request's own
    (routes/common.py ``own_url``; ``firmware``: the UEFI HTTP boot image's port rule)."""
    return names.base_url(base) if base is not None else own_url(request, firmware=firmware)


@router.get("/v1/boot/{host}", tags=["boot"], response_class=PlainTextResponse)
async def boot_script(host: str, request: Request, base: str | None = None,
                      retry: int = boot.RETRY_SECONDS) -> Response:
    """The iPXE script of a host (MAC with ':' or '-', or host id). 404: unknown host;
    409: its version has no boot files or its tag is gone; 400: a malformed host. To iPXE, a 404
    or 409 is a 200 script that says why and asks again ``retry`` seconds later. Answering it
    records nothing: the host's last boot is recorded once it has fetched the whole initrd."""
    svc = Service.of(request)
    try:
        text = await svc.run(functools.partial(svc.repo.boot_script, host, _base(request, base),
                                               booting=is_ipxe(request)))
    except BlockprovError as e:
        if "application/json" in request.headers.get("accept", ""):
            raise
        if e.http_status in (404, 409) and is_ipxe(request):
            if not 1 <= retry <= 3600:
                raise UsageError(f"retry={retry}: expected 1 to 3600 seconds") from None
            return PlainTextResponse(boot.retry_script(f"{e} [{e.http_status}]", str(request.url), retry),
                                     headers={"cache-control": "no-store", "x-blockprov-error": type(e).__name__})
        return PlainTextResponse(f"blockprov: {e}\n", status_code=e.http_status)
    return PlainTextResponse(text, headers={"cache-control": "no-store"})


@router.get("/v1/boot/{host}/boot.img", tags=["boot"], response_class=Response)
@router.head("/v1/boot/{host}/boot.img", tags=["boot"], response_class=Response)
async def uefi_boot_image(host: str, request: Request, base: str | None = None, record: bool = True) -> Response:
    """The host's UEFI HTTP boot image (boot.uefi_image): a FAT volume holding shim, GRUB, a
    grub.cfg with the host's command line, the kernel and the initramfs, which the firmware
    downloads into a RAM disk and boots, with or without Secure Boot, with no iPXE. The DHCP boot
    file names it (docs/operations.md, "UEFI and Secure Boot"). Served as the boot files are
    (ETag, single ranges, HEAD: the firmware asks the size first), as ``application/vnd.efi-img``
    (UEFI 2.6's type for a disk image). Sending all of it records the host's last boot, its
    firmware UEFI (unless ``record=false``). Errors are a status and one text line (the firmware
    shows the status, then tries its next boot option): 404 unknown host, 409 no boot files, no
    UEFI loader, or a tag that is gone.

    The short every-day boot: when the host's disk is complete and current (boot.py's
    ``disk_verdict``, the iPXE script's ``exit``), a 404 saying so (``x-blockprov-disk:
    current``): edk2 shows "Client Error: 404 Not Found" and boots its next option, the disk's
    EFI System Partition, at once (4xx and 5xx alike; a 2xx it downloads and fails to boot).
    edk2 asks the size (HEAD), then, refused, the image (GET); the GET records that the PC was
    told to boot its disk (not with ``record=false``), so a PC whose disk does not come up is
    sent the image at its next boot (``DISK_GRACE``)."""
    svc = Service.of(request)
    url, booting = _base(request, base, firmware=True), record and request.method == "GET"
    try:
        image, name, vid = await svc.run(functools.partial(svc.repo.uefi_image, host, url, booting=booting))
    except BlockprovError as e:
        if "application/json" in request.headers.get("accept", ""):
            raise
        return PlainTextResponse(f"blockprov: {e}\n", status_code=e.http_status)
    if isinstance(image, str):
        return PlainTextResponse(f"{image}\n", status_code=404,
                                 headers={"cache-control": "no-store", "x-blockprov-disk": "current"})
    parts: list[Part] = [(at, n, what if isinstance(what, bytes) else image.content[what]) for at, n, what in
                         image.volume.extents()]

    async def booted() -> None:
        await record_boot(svc, host_id(host), name, vid, "uefi")

    return await _ranged(request, image.volume.size, image.etag, parts, boot.EFI_IMAGE_TYPE,
                         booted if record else None)


def disk_claim(d: object) -> tuple[str, str]:
    """(version, fingerprint) of a PC's word about its disk: ``{"version": "NAME@ID", "fingerprint":
    "32 hex digits"}`` (checked: a version reference and a fingerprint's form)."""
    expected = 'expected {"version": "NAME@ID", "fingerprint": "…"}'
    d = fields_of(d, ("version", "fingerprint"), expected)
    if not isinstance(d.get("version"), str) or not isinstance(d.get("fingerprint"), str):
        raise UsageError(expected)
    ref = names.parse_ref(d["version"])
    if ref.version is None:
        raise UsageError(f"a disk holds a version NAME@ID, not {d['version'][:80]!r}")
    return f"{ref.name}@{ref.version}", d["fingerprint"]


@router.post("/v1/boot/{host}/disk", tags=["boot"], response_class=PlainTextResponse, openapi_extra=JSON_BODY)
async def check_disk(host: str, request: Request, base: str | None = None) -> Response:
    """The every-day boot's one small question (netboot/everyday.py): the PC's disk, come up, holds
    ``version`` whole and its loader boots ``fingerprint``. Recorded; the answer is one
    ``text/plain`` line: ``disk`` (current: boot it), or ``network: WHY`` (its initramfs boots
    the slow path: the update, re-provision or change reaches it). The same rule as the iPXE
    script's ``exit`` (boot.py's ``disk_verdict``)."""
    svc = Service.of(request)
    host = host_id(host)
    version, fingerprint = disk_claim(await json_of(request))
    why = await svc.run(svc.repo.check_disk, host, _base(request, base), version, fingerprint)
    return PlainTextResponse("disk\n" if why is None else f"network: {why}\n", headers={"cache-control": "no-store"})


@router.put("/v1/boot/{host}/disk", tags=["boot"], openapi_extra=JSON_BODY)
async def record_disk(host: str, request: Request) -> dict[str, Any]:
    """The PC's agent says its disk holds ``version`` whole and its loader boots ``fingerprint``
    (netboot/inagent.py, once the loader is current): from then on iPXE is told to boot the disk
    while the host's assignment leaves both as they are."""
    svc = Service.of(request)
    host = host_id(host)
    version, fingerprint = disk_claim(await json_of(request))
    await svc.run(svc.repo.record_disk, host, version, fingerprint)
    return {"host": host, "version": version, "fingerprint": fingerprint}


@router.post("/v1/hosts/{host}/reprovision", tags=["hosts"])
async def reprovision_host(host: str, request: Request) -> dict[str, Any]:
    """The host's PC sets its disk up from scratch at its next boot (a network boot)."""
    svc = Service.of(request)
    host = host_id(host)
    return {"host": host, "reprovision": await svc.run(svc.repo.reprovision_host, host)}


@router.get("/v1/hosts", tags=["hosts"])
async def list_hosts(request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return {"hosts": [to_dict(h) for h in await svc.run(svc.repo.hosts)]}


@router.get("/v1/hosts/{host}", tags=["hosts"])
async def get_host(host: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    return to_dict(await svc.run(svc.repo.registry.host, host))


@router.put("/v1/hosts/{host}", tags=["hosts"], openapi_extra=JSON_BODY)
async def assign_host(host: str, request: Request) -> dict[str, Any]:
    """Body ``{"ref": "NAME:TAG" | "NAME@ID", "args": "extra kernel arguments", "policy": "restore"
    | "keep", "hydrate": "background" | "before-boot" | "off"}``. Only ``ref`` is required; a field
    left out keeps the host's value (``"args": ""`` clears the arguments, ``"policy": null`` or
    ``""`` a setting)."""
    svc = Service.of(request)
    host = host_id(host)  # before the body is read: a bad name costs no body
    d = await json_of(request)
    fields = {"ref", "args", *boot.SETTINGS}
    if (not isinstance(d, dict) or not isinstance(d.get("ref"), str) or not isinstance(d.get("args", ""), str)
            or not set(d) <= fields):
        raise UsageError('expected {"ref": "NAME:TAG", "args": "…"} and optionally the host\'s settings '
                         f"({', '.join(boot.SETTINGS)}); only ref is required")
    settings = {k: d[k] for k in boot.SETTINGS if k in d}
    info = await svc.run(svc.repo.assign_host, host, parse_ref(d["ref"]), d.get("args"), settings)
    return to_dict(info)


@router.delete("/v1/hosts/{host}", tags=["hosts"])
async def remove_host(host: str, request: Request) -> dict[str, Any]:
    svc = Service.of(request)
    await svc.run(svc.repo.remove_host, host_id(host))
    return {"removed": host_id(host)}
