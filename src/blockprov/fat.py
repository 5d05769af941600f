"""A FAT16 file system laid out in one pass: the disk's boot partition and the UEFI boot image. Pure.

Two things need a FAT file system whose every byte blockprov decides:

* the disk's own boot partition (netboot/loader.py), which UEFI firmware reads as an EFI System
  Partition and SYSLINUX boots on a BIOS PC. Its crash rule needs to know which write makes the
  file system exist: the boot sector. Everything else is written first, the boot sector last, so
  the firmware sees either no file system at all (it passes the disk over) or a complete one;
* the UEFI HTTP boot image the repository serves per host (service/routes/boot.py), which the
  firmware downloads into a RAM disk and boots. It is served with Range and a strong ETag without
  ever being materialized: the layout says which file's bytes are at which offset, the files
  (kernel, initramfs, shim, GRUB) come from the chunk store as they are sent.

``mkfs.fat`` and ``mcopy`` do neither: they write the boot sector first and decide where files go.
So this module computes the layout (boot sector, two FATs, a fixed root directory, one cluster per
subdirectory, every file contiguous, in the order given) and hands back the bytes of the metadata
and where each file's data goes; the caller writes or serves them. A given list of files, sizes
and options always yields the same bytes (fixed timestamps, a serial number the caller chooses).

Why FAT16: both users are far below FAT32's floor of 65,525 clusters at a sensible cluster size
(the boot partition is 128 MiB: FAT32 would need 1 KiB clusters, and GRUB then reads a 23 MB
initramfs in 23,000 pieces), and FAT16 has no FSInfo sector or backup boot sector, so one sector
alone decides whether the file system exists. UEFI firmware reads FAT12/16/32 (the specification
asks FAT32 of a fixed disk's system partition; edk2's FAT driver, OVMF's and most vendors', reads
all three: tests/boot boot OVMF from it). Names are 8.3 short names, no long-name entries: each
part of a name is all upper case or all lower case (the NT case bits keep "vmlinuz" lower case
for Linux and Windows; every reader compares short names without case).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

SECTOR = 512
CLUSTER = 4096  # default bytes per cluster
ROOT_ENTRIES = 512  # the fixed root directory: 16 KiB
ENTRY = 32
MIN_CLUSTERS, MAX_CLUSTERS = 4085, 65524  # FAT16's range (fewer is FAT12, more FAT32)
MEDIA = 0xF8
ATTR_LABEL, ATTR_DIR, ATTR_ARCHIVE = 0x08, 0x10, 0x20
LOWER_BASE, LOWER_EXT = 0x08, 0x10  # NT reserved byte: show this part of the short name in lower case
DATE = ((2024 - 1980) << 9) | (1 << 5) | 1  # 2024-01-01: fixed, so the same inputs give the same bytes
FS_TYPE = b"FAT16   "
# Boot code of the volume boot record when nothing else is installed there: ``int 0x18`` ("boot
# failed") and a halt loop (SYSLINUX replaces it on a BIOS boot partition).
NO_BOOT_CODE = b"\xcd\x18\xeb\xfe"
PART = re.compile(r"^(?:[A-Z0-9_-]{1,8}|[a-z0-9_-]{1,8})(?:\.(?:[A-Z0-9_-]{1,3}|[a-z0-9_-]{1,3}))?$")


class LayoutError(ValueError):
    """The files do not fit, or a name is not a short name (the caller's mistake: a bug or bad input)."""


@dataclass(frozen=True)
class Volume:
    """A laid-out file system: ``size`` bytes in all; ``boot`` (sector 0) and ``meta`` (FATs, root
    directory, subdirectory clusters: ``(offset, bytes)``) to write; ``files``: path → offset of its
    data (contiguous, ``sizes[path]`` bytes). Anything not covered is free space (any content)."""

    size: int
    boot: bytes
    meta: list[tuple[int, bytes]]
    files: dict[str, int]
    sizes: dict[str, int]
    cluster: int
    data_start: int  # offset of cluster 2
    clusters: int = 0
    directories: list[str] = field(default_factory=list)

    def extents(self) -> list[tuple[int, int, str | bytes]]:
        """Every region with content, sorted by offset: ``(offset, length, what)``, ``what`` the
        metadata's bytes or a file's path. Gaps between them are free space (zeros when served)."""
        out: list[tuple[int, int, str | bytes]] = [(0, SECTOR, self.boot)]
        out += [(at, len(data), data) for at, data in self.meta]
        out += [(at, self.sizes[p], p) for p, at in self.files.items() if self.sizes[p]]
        return sorted(out, key=lambda e: e[0])


def short_name(part: str) -> tuple[bytes, int]:
    """The 11-byte directory name of one path part and its NT case bits. Pure."""
    if not PART.match(part):
        raise LayoutError(f"{part!r} is not an 8.3 short name (A-Z 0-9 _ -, each part in one case)")
    base, _, ext = part.partition(".")
    case = (LOWER_BASE if base.islower() else 0) | (LOWER_EXT if ext.islower() else 0)
    return base.upper().ljust(8).encode() + ext.upper().ljust(3).encode(), case


def entry(name: bytes, attr: int, cluster: int, size: int, case: int = 0) -> bytes:
    """One 32-byte directory entry (times fixed at DATE, midnight). Pure."""
    return struct.pack("<11sBBBHHHHHHHI", name, attr, case, 0, 0, DATE, DATE, 0, 0, DATE, cluster, size)


def _geometry(total: int, spc: int) -> tuple[int, int, int]:
    """(reserved sectors, sectors per FAT, clusters) for ``total`` sectors at ``spc`` sectors per
    cluster, the data area starting on a cluster boundary of the file system."""
    root = ROOT_ENTRIES * ENTRY // SECTOR
    reserved, fat = 1, 1
    for _ in range(8):  # converges in two or three rounds
        clusters = (total - reserved - 2 * fat - root) // spc
        fat = -(-(clusters + 2) * 2 // SECTOR)
        reserved = 1 + (-(1 + 2 * fat + root)) % spc
    clusters = (total - reserved - 2 * fat - root) // spc
    return reserved, fat, clusters


def layout(files: Sequence[tuple[str, int]], *, size: int | None = None, cluster: int = CLUSTER, hidden: int = 0,
           label: str = "BLOCKPROV", serial: int = 0, boot_code: bytes = NO_BOOT_CODE) -> Volume:
    """Lay out ``files`` ((path, bytes), paths ``/``-separated short names, directories implied)
    on a file system of ``size`` bytes (a partition's size), or the smallest FAT16 that holds them
    (rounded up to whole MiB) when ``size`` is None. ``hidden``: sectors before the file system on
    its disk (the partition's start; SYSLINUX reads it). Raises LayoutError. Pure."""
    if cluster % SECTOR or not 1 <= cluster // SECTOR <= 128 or cluster & (cluster - 1):
        raise LayoutError(f"a cluster is a power of two from 512 to 64 KiB bytes, not {cluster}")
    spc = cluster // SECTOR
    paths = [p for p, _ in files]
    if len(set(p.upper() for p in paths)) != len(paths):
        raise LayoutError("a path is given twice")
    dirs: list[str] = []
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
        for part in parts:
            short_name(part)
    if set(d.upper() for d in dirs) & set(p.upper() for p in paths):
        raise LayoutError("a path is both a file and a directory")
    need = len(dirs) + sum(-(-n // cluster) for _, n in files)
    if size is None:
        n = max(need, MIN_CLUSTERS)
        fat = -(-(n + 2) * 2 // SECTOR)
        total = (spc + 2 * fat + ROOT_ENTRIES * ENTRY // SECTOR + n * spc)
        total = -(-total * SECTOR // (1 << 20)) * (1 << 20) // SECTOR
    else:
        total = size // SECTOR
    reserved, fat, clusters = _geometry(total, spc)
    if not MIN_CLUSTERS <= clusters <= MAX_CLUSTERS:
        raise LayoutError(f"{total * SECTOR} bytes at {cluster}-byte clusters make {clusters} clusters: "
                          f"not a FAT16 ({MIN_CLUSTERS}-{MAX_CLUSTERS})")
    if need > clusters:
        raise LayoutError(f"the files need {need} clusters of {cluster} bytes; the file system has {clusters}")
    root_at = (reserved + 2 * fat) * SECTOR
    data_start = root_at + ROOT_ENTRIES * ENTRY
    # clusters: directories first (one each), then the files in the order given
    first: dict[str, int] = {}
    nxt = 2
    for d in dirs:
        first[d] = nxt
        nxt += 1
    table = [0xFFF8, 0xFFFF] + [0] * clusters
    for d in dirs:
        table[first[d]] = 0xFFFF
    placed: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for p, n in files:
        count = -(-n // cluster)
        sizes[p] = n
        if count == 0:
            first[p] = 0
            placed[p] = data_start
            continue
        first[p] = nxt
        placed[p] = data_start + (nxt - 2) * cluster
        for c in range(nxt, nxt + count):
            table[c] = c + 1
        table[nxt + count - 1] = 0xFFFF
        nxt += count
    # directories' entries
    children: dict[str, list[bytes]] = {"": [entry(label.upper()[:11].ljust(11).encode(), ATTR_LABEL, 0, 0)]}
    for d in dirs:
        parent = d.rpartition("/")[0]
        name, case = short_name(d.rpartition("/")[2])
        children.setdefault(parent, []).append(entry(name, ATTR_DIR, first[d], 0, case))
        children[d] = [entry(b".".ljust(11), ATTR_DIR, first[d], 0),
                       entry(b"..".ljust(11), ATTR_DIR, first[parent] if parent else 0, 0)]
    for p, n in files:
        parent, _, leaf = p.rpartition("/")
        name, case = short_name(leaf)
        children.setdefault(parent, []).append(entry(name, ATTR_ARCHIVE, first[p], n, case))
    if len(children[""]) > ROOT_ENTRIES:
        raise LayoutError(f"more than {ROOT_ENTRIES - 1} entries in the root directory")
    meta: list[tuple[int, bytes]] = []
    fat_bytes = struct.pack(f"<{len(table)}H", *table).ljust(fat * SECTOR, b"\0")
    meta += [(reserved * SECTOR, fat_bytes), ((reserved + fat) * SECTOR, fat_bytes)]
    meta.append((root_at, b"".join(children[""]).ljust(ROOT_ENTRIES * ENTRY, b"\0")))
    for d in dirs:
        body = b"".join(children[d])
        if len(body) > cluster:
            raise LayoutError(f"directory {d} holds more entries than one cluster")
        meta.append((data_start + (first[d] - 2) * cluster, body.ljust(cluster, b"\0")))
    if reserved > 1:  # the reserved sectors after the boot sector hold nothing: zeros, not stale data
        meta.append((SECTOR, bytes((reserved - 1) * SECTOR)))
    boot = boot_sector(total, spc, reserved, fat, hidden, serial, label, boot_code)
    return Volume(size=total * SECTOR, boot=boot, meta=sorted(meta), files=placed, sizes=sizes, cluster=cluster,
                  data_start=data_start, clusters=clusters, directories=dirs)


def boot_sector(total: int, spc: int, reserved: int, fat: int, hidden: int, serial: int, label: str,
                code: bytes = NO_BOOT_CODE) -> bytes:
    """The FAT16 boot sector (BIOS parameter block, extended signature, ``code`` at 0x3E). Pure."""
    if len(code) > 448:
        raise LayoutError("volume boot code longer than 448 bytes")
    bpb = struct.pack("<3s8sHBHBHHBHHHII", b"\xeb\x3c\x90", b"BLOCKPRV", SECTOR, spc, reserved, 2, ROOT_ENTRIES,
                      total if total < 0x10000 else 0, MEDIA, fat, 63, 255, hidden, total if total >= 0x10000 else 0)
    ebpb = struct.pack("<BBBI11s8s", 0x80, 0, 0x29, serial & 0xFFFFFFFF, label.upper()[:11].ljust(11).encode(),
                       FS_TYPE)
    return (bpb + ebpb + code).ljust(510, b"\0") + b"\x55\xaa"


def is_fat16(sector: bytes) -> bool:
    """Whether ``sector`` (a partition's first 512 bytes) is a FAT16 boot sector that makes a file
    system: the signature, the file-system type and a sane parameter block. What the firmware
    needs to mount it; a zeroed sector (the loader's crash rule) is not. Pure."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa" or sector[54:62] != FS_TYPE:
        return False
    per_sector, spc, reserved, fats = struct.unpack_from("<HBHB", sector, 11)
    return per_sector == SECTOR and spc in (1, 2, 4, 8, 16, 32, 64, 128) and reserved >= 1 and fats in (1, 2)
