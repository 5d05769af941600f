"""The machine's own disk as the agent's cache: which disk, and how it is laid out.

Layout (an MBR partition table blockprov writes, so the kernel itself finds the parts)::

    sector 0        MBR: syslinux's boot code (netboot/loader.py), disk signature "BPRV", four entries
    sector 1        blockprov label: LABEL_MAGIC, LABEL_VERSION, then JSON (written last at setup)
    1 MiB           partition 1, BOOT_BYTES (type 0x0E, FAT16): the disk's own boot loader, kernel and
                    blockprov initramfs (netboot/loader.py); *active* only while it is complete
    + BOOT          partition 2, META_BYTES (0x83): an ext4 file system holding the cache directory
                    (meta, journal, manifest.json, profile: cache/opening.py) and loader.json
    + META          partition 3, the golden reserve (0xDA, size chosen at setup: ``blockprov.reserve``,
                    default RESERVE_SHARE of the image, less if the disk is short): cache/reserve.py
    + RESERVE       partition 4, to the end of the disk: the cache's data, chunk i at byte
                    i × chunk_size (the cache opens a block device as its data file: cache/files.py)

Why a partition for the metadata and the raw rest for the data, rather than one file system
holding a data file: the data is the bulk of the disk and gains nothing from a file system (the
cache addresses it by offset; a file system would only add its own metadata writes to every
fill), while the metadata needs exactly what a journaled file system gives — atomic renames and
fsync'd appends that survive a power cut, the crash rules the cache already states for a
directory (cache/journal.py). So the metadata keeps the cache's proven on-disk format unchanged,
on an ext4 of its own (made with the initramfs's mke2fs), and a power cut is survived exactly as
kill -9 is on a host agent. The reserve and the data are raw for the same reason as the data.
MBR limits the disk to 2 TiB (GPT: later; a larger disk is used up to 2 TiB).

Crash rules: ``initialize`` first erases the label sector, then writes the partition table
(boot partition *not* active) and makes the file system, and writes the label last (fsync'd): a
disk whose label is absent is not trusted and is initialized again at the next boot (it held
nothing anyone relied on). The boot partition's own rules (the active flag is set only after
the loader is complete, cleared before it is rewritten) are in netboot/loader.py; the reserve's
in cache/reserve.py. Sector 0 is rewritten whole each time (one sector: written atomically by
the disk), its partition entries unchanged.

Older layouts: a disk labelled with LABEL_VERSION 1 (two partitions, no boot partition, no
reserve: the first network-boot layout) is recognised as ``blockprov-old`` and re-initialized,
knowingly and saying so on the console — its cache is fetched again (the layout cannot grow a
boot partition in front of its metadata without moving it, and such disks only ever held a copy
of an image the repository has).

Recognition (``examine``): a disk is ours when its label sector says so; blank when its first
and last MiB hold no known signature; otherwise foreign, and then refused unless the operator
named it with ``blockprov.disk=``.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockprov.errors import DiskRefused, NetbootError

SECTOR = 512
START = 1 << 20  # first partition at 1 MiB (2048 sectors)
BOOT_BYTES = 128 << 20  # a kernel (~10 MB) and the blockprov initramfs (< 40 MB), with room to grow
META_BYTES = 64 << 20
RESERVE_SHARE = 8  # default golden reserve: 1/8 of the image
MIB = 1 << 20
DISK_SIGNATURE = b"BPRV"
LABEL_MAGIC = b"BLOCKPROV-NETBOOT-DISK\n"
LABEL_VERSION = 2
TYPE_BOOT, TYPE_META, TYPE_RESERVE, TYPE_DATA = 0x0E, 0x83, 0xDA, 0xDA
ACTIVE = 0x80
FIXED = START + BOOT_BYTES + META_BYTES  # where the reserve starts
# Boot code of a disk without its loader: ``int 0x18`` (the BIOS's "boot failed: try the next
# device") then a halt loop, so the firmware moves on (to the network) rather than run zeros.
NO_LOADER = b"\xcd\x18\xeb\xfe"
BLKRRPART = 0x125F
MBR_LIMIT = 0xFFFFFFFF * SECTOR

# (offset, bytes) of signatures that say "somebody's data is here" (a blkid of the common ones).
SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    ("ext2/3/4", 1080, b"\x53\xef"),
    ("xfs", 0, b"XFSB"),
    ("btrfs", 65600, b"_BHRfS_M"),
    ("ntfs", 3, b"NTFS    "),
    ("vfat", 82, b"FAT32   "),
    ("vfat", 54, b"FAT1"),
    ("swap", 4086, b"SWAPSPACE2"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("iso9660", 32769, b"CD001"),
    ("lvm2", 536, b"LVM2 001"),
    ("gpt", 512, b"EFI PART"),
    ("mbr", 510, b"\x55\xaa"),
)


@dataclass(frozen=True)
class Disk:
    name: str  # vda, sda, nvme0n1
    size: int
    dev_dir: str = "/dev"  # another directory of device nodes (the agent's own after the root switch)

    @property
    def path(self) -> str:
        return f"{self.dev_dir}/{self.name}"

    def part_name(self, n: int) -> str:
        return f"{self.name}{'p' if self.name[-1].isdigit() else ''}{n}"

    def part(self, n: int) -> str:
        return f"{self.dev_dir}/{self.part_name(n)}"

    @property
    def boot(self) -> str:
        return self.part(1)

    @property
    def meta(self) -> str:
        return self.part(2)

    @property
    def reserve(self) -> str:
        return self.part(3)

    @property
    def data(self) -> str:
        return self.part(4)

    @property
    def data_bytes(self) -> int:
        """Room for the image when the reserve is left out (the reserve takes what is left over)."""
        return min(self.size, MBR_LIMIT) - FIXED - MIB


def reserve_bytes(disk_size: int, image: int, wanted: int | None) -> int:
    """The golden reserve for an image of ``image`` bytes on a disk of ``disk_size``: ``wanted``
    (default: 1/RESERVE_SHARE of the image), less when the disk has no room for it; whole MiB. Pure."""
    want = image // RESERVE_SHARE if wanted is None else wanted
    room = min(disk_size, MBR_LIMIT) - FIXED - image
    return max(MIB, min(want, room) // MIB * MIB)  # at least 1 MiB: partition 3 always exists


def identify(head: bytes) -> str:
    """'blockprov', 'blockprov-old' (an older layout: re-initialized), 'blank' (also: blockprov's
    own partition table without its label) or the name of the first foreign signature found in
    ``head`` (the disk's first bytes, at least 68 KiB). Pure."""
    if head[SECTOR:SECTOR + len(LABEL_MAGIC)] == LABEL_MAGIC:
        (version,) = struct.unpack_from("<I", head, SECTOR + len(LABEL_MAGIC))
        return "blockprov" if version == LABEL_VERSION else "blockprov-old"
    if head[440:444] == DISK_SIGNATURE and head[510:512] == b"\x55\xaa":
        return "blank"  # our own setup, cut short before its label: nothing anyone relies on
    for name, off, magic in SIGNATURES:
        if head[off:off + len(magic)] == magic:
            return name
    return "blank"


def mbr(size: int, reserve: int, *, code: bytes = NO_LOADER, active: bool = False) -> bytes:
    """Sector 0 for a disk of ``size`` bytes with a reserve of ``reserve``: boot ``code`` (at most
    440 bytes: syslinux's mbr.bin, which boots the active partition and, when none is, hands back
    to the firmware), the signature, and the four partitions, the boot one ``active`` or not. Pure."""
    if len(code) > 440:
        raise NetbootError("MBR boot code longer than 440 bytes")
    total = min(size, MBR_LIMIT) // SECTOR
    parts = [(TYPE_BOOT, START, BOOT_BYTES), (TYPE_META, START + BOOT_BYTES, META_BYTES),
             (TYPE_RESERVE, FIXED, reserve), (TYPE_DATA, FIXED + reserve, total * SECTOR - FIXED - reserve)]
    table = b""
    for n, (ptype, at, length) in enumerate(parts):
        flag = ACTIVE if n == 0 and active else 0
        table += struct.pack("<B3sB3sII", flag, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", at // SECTOR,
                             length // SECTOR)
    return code.ljust(440, b"\0") + DISK_SIGNATURE + bytes(2) + table + b"\x55\xaa"


def partitions(sector0: bytes) -> list[tuple[int, int, int, bool]]:
    """(type, byte offset, bytes, active) of the four entries of an MBR. Pure."""
    out = []
    for n in range(4):
        flag, _c, ptype, _c2, lba, count = struct.unpack_from("<B3sB3sII", sector0, 446 + 16 * n)
        out.append((ptype, lba * SECTOR, count * SECTOR, flag == ACTIVE))
    return out


def with_boot(sector0: bytes, *, code: bytes, active: bool) -> bytes:
    """``sector0`` with new boot code and the boot partition's active flag, entries unchanged. Pure."""
    if len(code) > 440:
        raise NetbootError("MBR boot code longer than 440 bytes")
    s = bytearray(sector0[:SECTOR])
    s[:440] = code.ljust(440, b"\0")
    s[446] = ACTIVE if active else 0
    return bytes(s)


def label(info: dict[str, object]) -> bytes:
    body = LABEL_MAGIC + struct.pack("<I", LABEL_VERSION) + json.dumps(info, sort_keys=True).encode()
    if len(body) > SECTOR:
        raise NetbootError("disk label too long")
    return body.ljust(SECTOR, b"\0")


def read_label(head: bytes) -> dict[str, object]:
    body = head[SECTOR + len(LABEL_MAGIC) + 4:2 * SECTOR].rstrip(b"\0")
    try:
        d = json.loads(body)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def disks(sys_block: Path = Path("/sys/block")) -> list[Disk]:
    """Whole disks the kernel found, in name order (no loop, ram, nbd, device-mapper)."""
    out = []
    for p in sorted(sys_block.iterdir()) if sys_block.exists() else []:
        if p.name.startswith(("loop", "ram", "nbd", "dm-", "sr", "zram", "md")):
            continue
        try:
            sectors = int((p / "size").read_text())
        except (OSError, ValueError):
            continue
        if sectors:
            out.append(Disk(p.name, sectors * SECTOR))
    return out


def read_head(path: str, n: int = 68 << 10) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def choose(found: list[Disk], need: int, named: str | None,
           head_of: Callable[[str], bytes] = read_head) -> tuple[Disk, str]:
    """The disk to use and what it holds ('blockprov' or 'blank'). ``named`` (blockprov.disk=)
    may name a foreign disk, which is then taken; otherwise the first disk holding blockprov's
    layout, else the first blank one large enough. Raises DiskRefused saying why none fits."""
    reasons = []
    if named:
        name = named.removeprefix("/dev/")
        match = [d for d in found if d.name == name]
        if not match:
            names = ", ".join(d.name for d in found) or "-"
            raise DiskRefused(f"blockprov.disk={named}: no such disk (found: {names})")
        d = match[0]
        if d.data_bytes < need:
            raise DiskRefused(f"disk {d.name} has {d.size} bytes; the image needs {need + FIXED + MIB}")
        kind = identify(head_of(d.path))
        return d, kind if kind in ("blockprov", "blockprov-old") else "blank"
    candidates = []
    for d in found:
        kind = identify(head_of(d.path))
        if d.data_bytes < need:
            reasons.append(f"{d.name}: too small ({d.size} bytes; the image needs {need + FIXED + MIB})")
        elif kind not in ("blockprov", "blockprov-old", "blank"):
            reasons.append(f"{d.name}: holds {kind} data blockprov did not write (name it with blockprov.disk=)")
        else:
            candidates.append((("blockprov", "blockprov-old", "blank").index(kind), d, kind))
    if not candidates:
        raise DiskRefused("no usable disk: " + ("; ".join(reasons) or "the machine has none"))
    _, d, kind = min(candidates, key=lambda c: c[0])
    return d, kind


def initialize(d: Disk, info: dict[str, object], mkfs: list[str], reserve: int) -> None:
    """Write blockprov's layout on ``d`` with a golden reserve of ``reserve`` bytes (see the crash
    rules above); ``mkfs`` is the command that makes the metadata file system, the partition's
    path appended. The boot partition is left inactive (netboot/loader.py fills it)."""
    import subprocess

    fd = os.open(d.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(SECTOR), SECTOR)  # the label first: a half-made disk is not trusted
        for at in (START, START + BOOT_BYTES, FIXED):  # old file systems' and the reserve's headers
            os.pwrite(fd, bytes(64 << 10), at)
        os.fsync(fd)
        os.pwrite(fd, mbr(d.size, reserve), 0)  # no loader, no active partition: the firmware moves on
        os.fsync(fd)
        reread(fd)
    finally:
        os.close(fd)
    for part in (d.boot, d.meta, d.reserve, d.data):
        wait_for(part)
    p = subprocess.run([*mkfs, d.meta], capture_output=True, timeout=120)
    if p.returncode:
        raise NetbootError(f"cannot make the metadata file system on {d.meta}: "
                           f"{p.stderr.decode(errors='replace').strip()}")
    fd = os.open(d.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, label(info), SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)


def reread(fd: int) -> None:
    for _ in range(50):
        try:
            fcntl.ioctl(fd, BLKRRPART)
            return
        except OSError:
            time.sleep(0.1)
    raise NetbootError("the kernel did not re-read the partition table")


def wait_for(path: str, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise NetbootError(f"{path} did not appear")
        time.sleep(0.05)
