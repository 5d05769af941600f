"""The machine's own disk as the agent's cache: which disk, and how it is laid out.

Layout (an MBR partition table blockprov writes, so the kernel itself finds the two parts)::

    sector 0        MBR: disk signature "BPRV", partition 1 (type 0x83) and partition 2 (type 0xDA)
    sector 1        blockprov label: LABEL_MAGIC, format version, then JSON (written last at setup)
    1 MiB           partition 1: META_BYTES, an ext4 file system holding the cache directory
                    (meta, journal, manifest.json, profile: cache/opening.py)
    1 MiB + META    partition 2, to the end of the disk: the cache's data, chunk i at byte
                    i × chunk_size (the cache opens a block device as its data file: cache/files.py)

Why a partition for the metadata and the raw rest for the data, rather than one file system
holding a data file: the data is the bulk of the disk and gains nothing from a file system (the
cache addresses it by offset; a file system would only add its own metadata writes to every
fill), while the metadata needs exactly what a journaled file system gives — atomic renames and
fsync'd appends that survive a power cut, the crash rules the cache already states for a
directory (cache/journal.py). So the metadata keeps the cache's proven on-disk format unchanged,
on an ext4 of its own (made with the initramfs's mke2fs), and a power cut is survived exactly as
kill -9 is on a host agent. MBR limits the disk to 2 TiB (GPT: later).

Crash rules: ``initialize`` first erases the label sector, then writes the partition table and
makes the file system, and writes the label last (fsync'd): a disk whose label is absent is not
trusted and is initialized again at the next boot (it held nothing anyone relied on).

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
META_BYTES = 64 << 20
DISK_SIGNATURE = b"BPRV"
LABEL_MAGIC = b"BLOCKPROV-NETBOOT-DISK\n"
LABEL_VERSION = 1
TYPE_META, TYPE_DATA = 0x83, 0xDA
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

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    def part(self, n: int) -> str:
        return f"/dev/{self.name}{'p' if self.name[-1].isdigit() else ''}{n}"

    @property
    def meta(self) -> str:
        return self.part(1)

    @property
    def data(self) -> str:
        return self.part(2)

    @property
    def data_bytes(self) -> int:
        return min(self.size, MBR_LIMIT) - START - META_BYTES


def identify(head: bytes) -> str:
    """'blockprov', 'blank' (also: blockprov's own partition table without its label) or the name
    of the first foreign signature found in ``head`` (the disk's first bytes, at least 68 KiB). Pure."""
    if head[SECTOR:SECTOR + len(LABEL_MAGIC)] == LABEL_MAGIC:
        return "blockprov"
    if head[440:444] == DISK_SIGNATURE and head[510:512] == b"\x55\xaa":
        return "blank"  # our own setup, cut short before its label: nothing anyone relies on
    for name, off, magic in SIGNATURES:
        if head[off:off + len(magic)] == magic:
            return name
    return "blank"


def mbr(size: int) -> bytes:
    """The partition table sector for a disk of ``size`` bytes. Pure."""
    total = min(size, MBR_LIMIT) // SECTOR
    first, meta = START // SECTOR, META_BYTES // SECTOR

    def entry(ptype: int, lba: int, count: int) -> bytes:
        return struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba, count)

    table = entry(TYPE_META, first, meta) + entry(TYPE_DATA, first + meta, total - first - meta) + bytes(32)
    return bytes(440) + DISK_SIGNATURE + bytes(2) + table + b"\x55\xaa"


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
            raise DiskRefused(f"disk {d.name} has {d.size} bytes; the image needs {need + START + META_BYTES}")
        kind = identify(head_of(d.path))
        return d, "blockprov" if kind == "blockprov" else "blank"
    candidates = []
    for d in found:
        kind = identify(head_of(d.path))
        if d.data_bytes < need:
            reasons.append(f"{d.name}: too small ({d.size} bytes; the image needs {need + START + META_BYTES})")
        elif kind not in ("blockprov", "blank"):
            reasons.append(f"{d.name}: holds {kind} data blockprov did not write (name it with blockprov.disk=)")
        else:
            candidates.append((kind != "blockprov", d, kind))
    if not candidates:
        raise DiskRefused("no usable disk: " + ("; ".join(reasons) or "the machine has none"))
    _, d, kind = min(candidates, key=lambda c: c[0])
    return d, kind


def initialize(d: Disk, info: dict[str, object], mkfs: list[str]) -> None:
    """Write blockprov's layout on ``d`` (see the crash rules above); ``mkfs`` is the command
    that makes the metadata file system, the partition's path appended."""
    import subprocess

    fd = os.open(d.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(SECTOR), SECTOR)  # the label first: a half-made disk is not trusted
        os.pwrite(fd, bytes(64 << 10), START)  # the old metadata file system's superblock
        os.fsync(fd)
        os.pwrite(fd, mbr(d.size), 0)
        os.fsync(fd)
        reread(fd)
    finally:
        os.close(fd)
    wait_for(d.meta)
    wait_for(d.data)
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
