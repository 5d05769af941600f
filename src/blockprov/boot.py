"""Boot files (kernel, initrd, the UEFI loader), iPXE scripts and what a UEFI boot volume holds. Pure apart
from reading the caller's file.

Why boot files are stored as chunks of the chunk store, not as files next to the catalog:

* **One storage path.** A kernel (~8 MB) and an initrd (~30 MB) are cut into 1 MiB pieces,
  each stored like any disk chunk: named by its BLAKE3 digest, zstd-compressed, verified on every
  read (invariant 6 of docs/architecture.md holds for what a booting host downloads, too),
  deduplicated (the same kernel under fifty versions is stored once), reclaimed by ``gc`` when no
  version needs it, and carried by whatever backend holds chunks — including the S3 store several
  stateless servers share, where files on one server's disk would be missing on the others.
* **Uploads reuse the chunk protocol.** A remote client asks which pieces are missing, uploads only
  those, then records the descriptor; the server refuses a descriptor naming an absent piece
  (``MissingChunks``), exactly as a commit does.
* The catalog keeps, per version, a ``BootFile`` descriptor for each: size and ordered piece ids.
  Its ``id`` (a BLAKE3 over the size and the piece ids) changes whenever the content does: it is
  the HTTP ETag.

Crash rule: pieces are made durable (``store.sync``) before the catalog row naming them is
written, in one transaction; a crash leaves either the old row or the new one, and orphaned pieces
are reclaimed by ``gc`` after its grace period.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3

from blockprov import codec, fat
from blockprov.errors import IntegrityError, SourceError, UsageError
from blockprov.names import kernel_args, site_name

# What marks blockprov's network-boot initramfs (netboot/initramfs.py writes it among the archive's
# first entries: the in-machine agent's DHCP hook), so `vm run` can tell a PC's boot files from a VM's.
INITRAMFS_MARK = "etc/blockprov/udhcpc.sh"

PIECE = 1 << 20  # bytes per stored piece of a boot file
MAX_BOOT_FILE = 1 << 30  # a kernel or initrd larger than this is a mistake, not a boot file
BATCH = 16  # pieces handed to the sink at once (16 MiB)
ID = codec.DIGEST_SIZE

Source = bytes | bytearray | memoryview | str | os.PathLike[str]
Sink = Callable[[list[tuple[bytes, bytes]]], None]
T = TypeVar("T")


@dataclass(frozen=True)
class BootFile:
    """One stored boot file: its size and the ids of its ``PIECE``-sized pieces, in order."""

    size: int
    pieces: bytes  # n × 32 bytes

    def __post_init__(self) -> None:
        if not 0 < self.size <= MAX_BOOT_FILE:
            raise UsageError(f"a boot file must hold 1 byte to {MAX_BOOT_FILE} bytes, not {self.size}")
        if len(self.pieces) != ID * ((self.size + PIECE - 1) // PIECE):
            raise UsageError(f"a boot file of {self.size} bytes has {(self.size + PIECE - 1) // PIECE} pieces, "
                             f"not {len(self.pieces) / ID:g}")

    @property
    def id(self) -> str:
        """Content identity (ETag): BLAKE3 of the size and the piece ids, 32 hex digits."""
        return blake3.blake3(b"blockprov-bootfile/1" + struct.pack("<Q", self.size) + self.pieces).hexdigest()[:32]

    @property
    def count(self) -> int:
        return len(self.pieces) // ID

    def piece_id(self, i: int) -> bytes:
        return self.pieces[i * ID:(i + 1) * ID]

    def piece_ids(self) -> list[bytes]:
        return [self.piece_id(i) for i in range(self.count)]

    def piece_length(self, i: int) -> int:
        return min(PIECE, self.size - i * PIECE)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "id": self.id, "pieces": [p.hex() for p in self.piece_ids()]}

    @classmethod
    def from_dict(cls, d: object) -> BootFile:
        """Parse a descriptor received over HTTP; every field is checked."""
        if not isinstance(d, dict) or not isinstance(d.get("size"), int) or not isinstance(d.get("pieces"), list):
            raise UsageError('a boot file is {"size": N, "pieces": [hex id, …]}')
        if len(d["pieces"]) > MAX_BOOT_FILE // PIECE + 1:
            raise UsageError("too many pieces for a boot file")
        f = cls(size=d["size"], pieces=b"".join(codec.parse_hexid(str(p)) for p in d["pieces"]))
        if "id" in d and d["id"] != f.id:
            raise UsageError(f"boot file id {d['id']!r} does not match its pieces ({f.id})")
        return f


def split(source: Source, what: str, sink: Sink) -> BootFile:
    """Cut ``source`` (bytes or a file path) into pieces; hand ``(id, blob)`` batches to ``sink``.

    Reads a file piece by piece, so memory stays at one batch whatever the size."""
    pieces: list[bytes] = []
    size = 0
    batch: list[tuple[bytes, bytes]] = []
    for data in _read_pieces(source, what):
        size += len(data)
        if size > MAX_BOOT_FILE:
            raise UsageError(f"the {what} is larger than {MAX_BOOT_FILE} bytes")
        cid = codec.digest(data)
        pieces.append(cid)
        batch.append((cid, codec.encode(data)))
        if len(batch) >= BATCH:
            sink(batch)
            batch = []
    if batch:
        sink(batch)
    if size == 0:
        raise UsageError(f"the {what} is empty")
    return BootFile(size=size, pieces=b"".join(pieces))


def _read_pieces(source: Source, what: str) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for off in range(0, len(view), PIECE):
            yield bytes(view[off:off + PIECE])
        return
    path = Path(source)
    try:
        with open(path, "rb") as f:
            while data := f.read(PIECE):
                yield data
    except OSError as e:
        raise SourceError(path=str(path), why=f"{e.strerror or e} (the {what})") from None


def assemble(f: BootFile, blobs: Sequence[bytes], first: int = 0) -> list[bytes]:
    """Decode pieces ``first …`` of ``f`` from their blobs, each verified and length-checked."""
    out = []
    for k, blob in enumerate(blobs):
        i = first + k
        data = codec.decode(blob, f.piece_id(i))
        if len(data) != f.piece_length(i):
            raise IntegrityError(f"boot file piece {i} holds {len(data)} bytes, not {f.piece_length(i)}")
        out.append(data)
    return out


# -- a host's settings ------------------------------------------------------------------------------
# Fields of the host record beside its assignment (catalog/machines.py keeps each in a column of
# ``hosts``, changed only when named). Those listed in KERNEL_WORDS reach the machine as a kernel
# argument of its boot script; the blockprov initramfs reads them (netboot/params.py). A field
# added later (a firmware, a site) is one more entry in SETTINGS, and in KERNEL_WORDS only if the
# machine reads it from its command line.
POLICIES = ("restore", "keep")  # restore: reboot-to-restore; keep: the disk keeps its changes
HYDRATE = ("background", "before-boot", "off")
# A setting with no fixed values (None) names something: ``site``, the host's site (catalog/sites.py),
# checked by its name's rules here and by the catalog for existence.
SETTINGS: dict[str, tuple[str, ...] | None] = {"policy": POLICIES, "hydrate": HYDRATE, "site": None}
KERNEL_WORDS = {"policy": "blockprov.policy", "hydrate": "blockprov.hydrate", "site": "blockprov.site"}


def host_setting(name: str, value: object) -> str | None:
    """A host setting checked: one of its values, or None for "" (cleared: the machine's default). Pure."""
    if name not in SETTINGS:
        raise UsageError(f"a host has no setting {name!r} (settings: {', '.join(SETTINGS)})")
    if value is None or value == "":
        return None
    allowed = SETTINGS[name]
    if allowed is None:
        if not isinstance(value, str):
            raise UsageError(f"a host's {name} is a name, not {value!r}")
        return site_name(value)
    if not isinstance(value, str) or value not in allowed:
        raise UsageError(f"a host's {name} is one of {', '.join(allowed)}, not {value!r}")
    return value


def split_settings(args: str) -> tuple[str, dict[str, str]]:
    """Kernel arguments with the words that are host settings (``blockprov.policy=restore``) taken
    out, and those settings. The settings are fields of the host record, not words of its
    arguments: replacing the arguments must never drop them (issue 27 item 1). A setting given
    twice with two values is refused. Pure."""
    words: list[str] = []
    found: dict[str, str] = {}
    by_word = {w: k for k, w in KERNEL_WORDS.items()}
    for w in kernel_args(args).split():
        key, eq, value = w.partition("=")
        name = by_word.get(key)
        if name is None or not eq:
            words.append(w)
            continue
        checked = host_setting(name, value)
        if checked is None:
            raise UsageError(f"{w}: give the host's {name} a value ({', '.join(SETTINGS[name] or ('a name',))})")
        if found.get(name, checked) != checked:
            raise UsageError(f"the host's {name} is given twice: {found[name]} and {checked}")
        found[name] = checked
    return " ".join(words), found


def setting_words(settings: dict[str, str | None]) -> list[str]:
    """The kernel arguments a host's settings become in its boot script. Pure."""
    return [f"{KERNEL_WORDS[k]}={v}" for k, v in settings.items() if v and k in KERNEL_WORDS]


def boot_words(*, host: str, image: str, version: str, base: str, cmdline: str, args: str,
               settings: dict[str, str | None] | None = None, reprovision: str | None = None) -> list[str]:
    """The kernel command line of ``host`` booting ``image@version`` over the network, whatever
    loads the kernel (iPXE's script, GRUB in the UEFI boot image): the version's command line, the
    host's extra arguments and settings (policy, hydration: ``blockprov.*`` words), and what an
    in-guest agent needs to attach: ``blockprov.repo`` (where the repository is, as the host
    reaches it), ``blockprov.image`` (the immutable ``NAME@ID``: a tag moved during the boot must
    not change what the kernel and the agent see) and ``blockprov.host``. ``reprovision``: the
    operator's last re-provision request for the host (``host reprovision``), which the PC's agent
    compares with the one its disk was set up under. Pure."""
    words = [w for w in (kernel_args(cmdline), kernel_args(args)) if w] + setting_words(settings or {})
    if reprovision:
        words.append(f"blockprov.reprovision={reprovision}")
    return [*words, f"blockprov.repo={base}", f"blockprov.image={image}@{version}", f"blockprov.host={host}"]


def script(*, host: str, assigned: str, image: str, version: str, base: str, cmdline: str, args: str,
           settings: dict[str, str | None] | None = None, reprovision: str | None = None) -> str:
    """The iPXE script that boots ``image@version`` on ``host``, with the kernel command line
    ``boot_words`` makes. URLs name the version by id, as ``blockprov.image`` does; the initrd's
    names the host, whose last boot the repository records once it has sent all of it, and iPXE's
    ``${platform}`` (``efi`` or ``pcbios``), kept as the host's firmware. ``initrd=initrd.img``
    plus ``--name`` lets an EFI-stub kernel find the initrd (iPXE's EFI build on a UEFI PC)."""
    files = f"{base}/v1/images/{image}/versions/{version}/boot"
    words = [*boot_words(host=host, image=image, version=version, base=base, cmdline=cmdline, args=args,
                         settings=settings, reprovision=reprovision), "initrd=initrd.img"]
    return (
        "#!ipxe\n"
        f"# blockprov: host {host} is assigned {assigned} = {image}@{version}\n"
        f"kernel {files}/kernel {' '.join(words)}\n"
        f"initrd --name initrd.img {files}/initrd?host={host}&platform=${{platform}}\n"
        "boot\n"
    )


# -- the every-day boot: a PC whose disk is complete and current boots it (issue 24 item 4) ---------
# The one place that decides it: the iPXE script's ``exit`` (routes/boot.py, through the
# repository's boot_script) and the disk's own initramfs's question (netboot/everyday.py) both
# ask ``disk_verdict``. What a disk boots by itself is its loader's kernel, initramfs and command
# line (netboot/loader.py records them): the command line of the network boot that wrote it,
# without what a loader adds itself, plus FROM_DISK.
FROM_DISK = "blockprov.from=disk"
LOADER_DROPS = ("initrd=", "BOOT_IMAGE=", "blockprov.from=")  # words a loader gives, or the network boot had
IPXE_EFI_NAME = "kernel"  # iPXE's EFI build puts the image's name first on the command line
DISK_GRACE = 600.0  # seconds: a PC told to boot its disk that asks again within this, unheard from, did not


def disk_cmdline(cmdline: str) -> str:
    """The command line a PC's disk boots with, from its network boot's: without what a loader
    adds itself (iPXE's EFI build: the image's name, first), plus FROM_DISK. Pure."""
    words = cmdline.split()
    words = [w for w in words[1 if words[:1] == [IPXE_EFI_NAME] else 0:] if not w.startswith(LOADER_DROPS)]
    return " ".join([*words, FROM_DISK])


def disk_fingerprint(kernel: str, initrd: str, cmdline: str) -> str:
    """What a disk's own loader boots (boot file ids, ``disk_cmdline``), in 32 hex digits. Pure."""
    text = json.dumps({"kernel": kernel, "initrd": initrd, "cmdline": cmdline}, sort_keys=True)
    return blake3.blake3(b"blockprov-disk/1" + text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DiskState:
    """What the repository knows of a PC's disk (catalog/machines.py keeps it on the host): the
    version it holds whole and its loader's fingerprint, as the PC last said (``said``); when the
    repository last told the PC's iPXE to boot the disk (``told``), and when the disk's own
    initramfs last asked (``seen``: the disk came up)."""

    version: str  # NAME@ID
    fingerprint: str
    said: float = 0.0
    told: float = 0.0
    seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "said": self.said, "told": self.told,
                "seen": self.seen}

    @classmethod
    def from_dict(cls, d: object) -> DiskState | None:
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("version", "fingerprint")):
            return None
        times = []
        for k in ("said", "told", "seen"):
            v = d.get(k) or 0.0
            times.append(float(v) if isinstance(v, int | float) else 0.0)
        return cls(d["version"], d["fingerprint"], *times)


def disk_verdict(state: DiskState | None, *, version: str, fingerprint: str, now: float,
                 from_disk: bool) -> str | None:
    """None when the PC's disk is complete and current — it holds ``version`` (``NAME@ID``, what
    the host is assigned now) and its loader boots what a network boot would (``fingerprint``:
    the same kernel, initramfs and command line; a changed setting, argument or a re-provision
    changes it) — so the PC boots its own disk; else why it must boot from the network.
    ``from_disk``: the disk's initramfs asks (it came up); else iPXE asks, and a PC told to boot
    its disk that asks again within DISK_GRACE without its disk having asked meanwhile did not
    come up from it (a disk replaced, a loader broken): it boots from the network. Pure."""
    if state is None:
        return "the repository has not heard that this disk holds its whole version"
    if state.version != version:
        return f"the host is assigned {version}; the disk holds {state.version}"
    if state.fingerprint != fingerprint:
        return "the disk's kernel, initramfs or command line is not the one the host boots now"
    if not from_disk and state.told > state.seen and now - state.told < DISK_GRACE:
        return "the disk did not come up after the last answer to boot it"
    return None


def disk_note(host: str, version: str) -> str:
    """Why a PC is sent to its own disk (the iPXE script's comment, the firmware's 404). Pure."""
    return f"blockprov: host {host}: its disk holds {version}, complete and current: it boots its own loader"


def disk_script(host: str, version: str) -> str:
    """The iPXE script of a PC whose disk is complete and current: ``exit``, so the firmware goes
    on to its next boot device, the disk and its own loader. Pure."""
    return (
        "#!ipxe\n"
        f"# {disk_note(host, version)}\n"
        "echo blockprov: booting this PC's own disk (complete and current)\n"
        "exit\n"
    )


def stranded(ref: str, version: str, hosts: Sequence[str]) -> str:
    """What a tag move (or an assignment) to a version without boot files does to the hosts that
    follow the tag: said at once, not found out at their next boot. Pure."""
    shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
    return (f"{len(hosts)} host(s) follow {ref} ({shown}) and {ref.split(':')[0]}@{version[:12]} has no boot files: "
            f"they cannot boot until it has (a PC that boots onto its own disk: blockprov boot-files build {ref}; "
            f"another kernel and initrd: blockprov boot-files set {ref} --kernel FILE --initrd FILE)")


IPXE_PLATFORMS = {"efi": "uefi", "pcbios": "bios"}  # iPXE's ${platform} → the host's firmware


RETRY_SECONDS = 30  # how long a machine waits before asking again for its boot script


def retry_script(reason: str, url: str, seconds: int = RETRY_SECONDS) -> str:
    """The iPXE script a machine gets when it cannot be booted yet (an unknown host, a version
    without boot files, a tag that is gone): it prints ``reason`` on the machine's console, waits
    ``seconds`` and fetches ``url`` (its own boot script) again, replacing itself — so a host
    assigned while the machine waits boots without a power cycle, and the loop never nests.

    Why a 200 script and not the 404 itself: iPXE shows only "No such file or directory" for an
    HTTP error (never the body), then gives up to the next boot device; a script is the only way
    to say why on the machine's screen and keep asking. Pure."""
    text = " ".join(reason.replace("$", "").split())  # iPXE expands ${…}: keep the text literal
    return (
        "#!ipxe\n"
        f"echo blockprov: {text}\n"
        f"echo blockprov: asking the repository again in {seconds} s\n"
        f"sleep {seconds}\n"
        f"chain --replace --autofree {url}\n"
    )


def parse_script(text: str) -> dict[str, Any]:
    """What a boot script asks for: kernel URL, kernel arguments (as a list and as key=value),
    initrd URL; or, for ``disk_script``, ``{"disk": True}`` (the PC boots its own disk). For tests
    and ``blockprov host script --json``; raises UsageError if malformed."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not text.startswith("#!ipxe\n"):
        raise UsageError("not an iPXE script")
    if lines and lines[-1] == ["exit"]:  # disk_script: the PC boots its own disk
        return {"disk": True}
    kernel = next((ln for ln in lines if ln[0] == "kernel"), None)
    initrd = next((ln for ln in lines if ln[0] == "initrd"), None)
    if kernel is None or initrd is None or len(kernel) < 2 or lines[-1] != ["boot"]:
        raise UsageError("a boot script needs kernel, initrd and boot lines")
    params = dict(w.split("=", 1) for w in kernel[2:] if "=" in w)
    return {"kernel": kernel[1], "args": kernel[2:], "params": params, "initrd": initrd[-1]}


# -- UEFI: the boot volume (the disk's EFI System Partition, the UEFI HTTP boot image) -----------
# The chain a UEFI PC boots, with or without Secure Boot: the firmware runs shim (signed by
# Microsoft's UEFI CA, which every PC's firmware trusts), shim runs GRUB (signed by the
# distribution, whose key shim carries), GRUB reads its grub.cfg and loads the kernel (checked by
# shim's verifier when Secure Boot is on) and the initramfs (not checked: docs/operations.md).
SHIM, GRUB, MOK_MANAGER = "shimx64.efi", "grubx64.efi", "mmx64.efi"
EFI_FILES = (SHIM, GRUB, MOK_MANAGER)
EFI_NEEDED = (SHIM, GRUB)  # the MOK manager only runs when an operator enrolls a key (mokutil)
BOOT_FILES = ("kernel", "initrd", *EFI_FILES)
# Debian's signed builds (shim-signed, shim-helpers-amd64-signed, grub-efi-amd64-signed): shim signed
# by Microsoft's UEFI CA and carrying Debian's key; GRUB and the MOK manager signed with that key.
# grubx64.efi is the one for disks: it has no HTTP, and its grubnetx64 sibling can fetch only over
# TFTP and finds no configuration when the firmware loads it over HTTP (docs/operations.md).
DEBIAN_EFI = {SHIM: "/usr/lib/shim/shimx64.efi.signed", GRUB: "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
              MOK_MANAGER: "/usr/lib/shim/mmx64.efi.signed"}
DEBIAN_EFI_PACKAGES = "shim-signed grub-efi-amd64-signed"
# Where each file goes on the volume (fat.py short names). shim is the removable-media path
# \EFI\BOOT\BOOTX64.EFI, which firmware boots without an NVRAM entry; shim loads grubx64.efi and
# mmx64.efi from its own directory; Debian's signed GRUB reads $prefix/grub.cfg, its prefix being
# /EFI/debian on the volume it was loaded from. No fbx64.efi: shim would run it, and it rewrites
# the firmware's boot entries and order.
VOLUME_PATHS = {"kernel": "vmlinuz", "initrd": "initrd.img", SHIM: "EFI/BOOT/BOOTX64.EFI",
                GRUB: "EFI/BOOT/grubx64.efi", MOK_MANAGER: "EFI/BOOT/mmx64.efi"}
GRUB_CFG = "EFI/debian/grub.cfg"
EFI_IMAGE_TYPE = "application/vnd.efi-img"  # UEFI HTTP boot: a disk image to boot from a RAM disk
IMAGE_CLUSTER = 4096  # the HTTP boot image's clusters: FAT16 needs 4085 of them, so larger ones pad the image


def efi_missing(efi: Mapping[str, object]) -> list[str]:
    """The EFI loader files a UEFI boot needs and ``efi`` lacks. Pure."""
    return [n for n in EFI_NEEDED if n not in efi]


def grub_cfg(words: Sequence[str], note: str, initrd: str = VOLUME_PATHS["initrd"]) -> bytes:
    """GRUB's configuration on a boot volume: no menu, the kernel with ``words`` as its command
    line, the initramfs (``initrd``, its path on the volume: the disk's loader boots its fast part
    alone, netboot/loader.py), boot. ``note`` is printed first (the kernel arguments are plain
    words: names.kernel_args). Pure."""
    text = " ".join(note.replace("'", "").split())
    return (f"# blockprov: {text}\nset timeout=0\necho 'blockprov: {text}'\n"
            f"linux /{VOLUME_PATHS['kernel']} {' '.join(words)}\n"
            f"initrd /{initrd}\nboot\n").encode()


def volume_files(files: Mapping[str, T], grub: bytes, extra: Sequence[tuple[str, bytes]] = ()) -> list[
        tuple[str, T | bytes]]:
    """What a UEFI boot volume holds, in the order it is laid out: the kernel and the initramfs
    first (their place then depends on nothing else: the disk's loader reads them back), the EFI
    loader, GRUB's configuration, then ``extra`` (SYSLINUX's on the disk). ``files``: ``kernel``,
    ``initrd`` and the EFI_FILES present. Pure."""
    out: list[tuple[str, T | bytes]] = [(VOLUME_PATHS[k], files[k]) for k in ("kernel", "initrd", *EFI_FILES)
                                        if k in files]
    return [*out, (GRUB_CFG, grub), *extra]


def image_etag(parts: Sequence[tuple[str, str | bytes]]) -> str:
    """A strong ETag for a boot image made of ``parts`` (path, a boot file's id or literal bytes). Pure."""
    h = blake3.blake3(b"blockprov-uefi-image/1")
    for path, what in parts:
        data = what if isinstance(what, bytes) else what.encode()
        h.update(struct.pack("<HQ", len(path), len(data)) + path.encode() + data)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class UefiImage:
    """A UEFI HTTP boot image: its FAT volume's layout, what each path holds (a boot file, served
    from its pieces, or bytes) and its ETag."""

    volume: fat.Volume
    content: dict[str, BootFile | bytes]
    etag: str


def uefi_image(files: Mapping[str, BootFile], words: Sequence[str], note: str) -> UefiImage:
    """The UEFI HTTP boot image of a host: a FAT16 volume (fat.py) holding ``files`` (the kernel,
    the initramfs and the EFI loader) and a grub.cfg that boots the kernel with ``words``; the
    firmware downloads it into a RAM disk and boots its \\EFI\\BOOT\\BOOTX64.EFI (shim). Its ETag is
    its content's (the same inputs make the same bytes). Pure."""
    content = volume_files(files, grub_cfg(words, note))
    etag = image_etag([(p, x.id if isinstance(x, BootFile) else x) for p, x in content])
    volume = fat.layout([(p, x.size if isinstance(x, BootFile) else len(x)) for p, x in content],
                        cluster=IMAGE_CLUSTER, label="BLOCKPROV", serial=int(etag[:8], 16))
    return UefiImage(volume, dict(content), etag)


def is_blockprov_initramfs(initrd: bytes) -> bool:
    """True for blockprov's network-boot initramfs (a gzip'd newc cpio holding INITRAMFS_MARK near
    its start): only the first MiB is unpacked, whatever the archive's size."""
    import zlib

    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(initrd[:PIECE], PIECE)
    except zlib.error:
        return False
    return INITRAMFS_MARK.encode() in head
