"""The machine's own disk as the agent's cache: which disk, and how it is laid out.

Layout (a partition table blockprov writes, so the kernel itself finds the parts). A disk of up
to 2 TiB (MBR_LIMIT) gets an MBR::

    sector 0        MBR: syslinux's boot code (netboot/loader.py), disk signature "BPRV", four entries
    sector 1        blockprov label: LABEL_MAGIC, LABEL_VERSION, then JSON (written last at setup)
    1 MiB           partition 1, BOOT_BYTES (type 0xEF, an EFI System Partition, FAT16): the disk's own
                    boot loaders — SYSLINUX for a BIOS, shim and GRUB for UEFI — with the kernel and
                    the blockprov initramfs (netboot/loader.py); *active* only while it is complete
    + BOOT          partition 2, META_BYTES (0x83): an ext4 file system holding the cache directory
                    (meta, journal, manifest.json, profile: cache/opening.py) and loader.json
    + META          partition 3, the golden reserve (0xDA, size chosen at setup: ``blockprov.reserve``,
                    default RESERVE_SHARE of the image, less if the disk is short): cache/reserve.py
    + RESERVE       partition 4, to the end of the disk: the cache's data, chunk i at byte
                    i × chunk_size (the cache opens a block device as its data file: cache/files.py)

A larger disk gets a GPT (UEFI spec, chapter 5), the same four partitions at the same offsets in
the same roles, partition 4 ending where the backup table begins::

    sector 0        protective MBR (one 0xEE entry over the disk), syslinux's gptmbr.bin as boot
                    code, disk signature "BPRV"
    sector 1        primary GPT header (CRC32s of itself and of the entry array)
    sectors 2–33    the entry array: 128 entries of 128 bytes, four used
    sector 34       blockprov label (as sector 1 of the MBR form; written last at setup)
    1 MiB …         partitions 1–4 as above; partition 1's "legacy BIOS bootable" attribute
                    (bit 2, which gptmbr.bin looks for) plays the active flag's part
    … end           partition 4 ends on the last MiB boundary before the backup GPT: the disk's
                    last 33 sectors, the backup entry array then the backup header

Type GUIDs: the standard ones where the role is standard — "EFI System" for the FAT boot
partition and "Linux filesystem data" for the ext4 metadata, what 0xEF and 0x83 say in the MBR
form — and blockprov's own (GPT_RESERVE, GPT_DATA) for the raw reserve and data, which hold
no file system: 0xDA ("non-FS data") has no standard GPT counterpart, and a type of our own tells
every partitioning tool "raw, somebody's" rather than a file system to probe or free space. Each
partition is named (blockprov-boot, -meta, -reserve, -data: lsblk's PARTLABEL). The disk GUID is
random per disk; the partition GUIDs derive from it (uuid5), so they are unique per disk too.
The form follows what the disk holds, not its size, once it holds ours: a disk over 2 TiB made
before the GPT form keeps its MBR (used up to 2 TiB) until it is initialized again.

Why a partition for the metadata and the raw rest for the data, rather than one file system
holding a data file: the data is the bulk of the disk and gains nothing from a file system (the
cache addresses it by offset; a file system would only add its own metadata writes to every
fill), while the metadata needs exactly what a journaled file system gives — atomic renames and
fsync'd appends that survive a power cut, the crash rules the cache already states for a
directory (cache/journal.py). So the metadata keeps the cache's proven on-disk format unchanged,
on an ext4 of its own (made with the initramfs's mke2fs), and a power cut is survived exactly as
kill -9 is on a host agent. The reserve and the data are raw for the same reason as the data.

Crash rules: ``initialize`` first erases the label sectors (1 and 34: either form's), then
writes the partition table (boot partition *not* active; GPT: the backup first, then the
protective MBR and the primary) and makes the file system, and writes the label last (fsync'd):
a disk whose label is absent is not trusted and is initialized again at the next boot (it held
nothing anyone relied on). The boot partition's own rules (the active flag is set only after
the loader is complete, cleared before it is rewritten) are in netboot/loader.py; the reserve's
in cache/reserve.py. MBR: sector 0 is rewritten whole each time (one sector: written atomically
by the disk), its partition entries unchanged but for the boot partition's type (an EFI System
Partition, which an older disk's boot partition becomes at its next loader write). GPT
(``boot_writes``): the flag lives in the primary entry array's first sector (LBA 2), written
first and fsync'd — from then on gptmbr.bin sees the new state — then sector 0 and the primary
header, then the backup's copies, each fsync'd. A cut between those leaves a primary header
whose entry CRC does not match, or a stale backup; the kernel ignores a GPT whose primary
header fails its CRC, so ``mend`` (run by the agent on a disk of ours before it uses the
partitions) rebuilds both headers and the backup from the primary entry array — the one truth —
and has the kernel re-read the table.

Older layouts: a disk labelled with LABEL_VERSION 1 (two partitions, no boot partition, no
reserve: the first network-boot layout) is recognised as ``blockprov-old`` and re-initialized,
knowingly and saying so on the console — its cache is fetched again (the layout cannot grow a
boot partition in front of its metadata without moving it, and such disks only ever held a copy
of an image the repository has).

Recognition (``examine``): a disk is ours when its label sector says so; blank when its first
and last MiB hold no known signature; otherwise foreign, and then refused unless the operator
named it with ``blockprov.disk=``. In the GPT form the label is in sector 34 (sector 1 is the
header), so a GPT without it is somebody else's ("gpt"). A disk with 4096-byte logical sectors
(4Kn) is not set up (refused, saying why): both forms are laid out in 512-byte sectors (not
built yet); one already holding blockprov's layout is used as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import uuid
import zlib
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
TYPE_BOOT, TYPE_META, TYPE_RESERVE, TYPE_DATA = 0xEF, 0x83, 0xDA, 0xDA
# Disks made before the UEFI loader (issue 25) typed their boot partition "FAT16, LBA"; the loader's
# next write types it an EFI System Partition (``boot_writes``), which the firmware looks into.
OLD_TYPE_BOOT = 0x0E
ACTIVE = 0x80
FIXED = START + BOOT_BYTES + META_BYTES  # where the reserve starts
# Boot code of a disk without its loader: ``int 0x18`` (the BIOS's "boot failed: try the next
# device") then a halt loop, so the firmware moves on (to the network) rather than run zeros.
NO_LOADER = b"\xcd\x18\xeb\xfe"
BLKRRPART = 0x125F
MBR_LIMIT = 0xFFFFFFFF * SECTOR  # a larger disk gets the GPT form
# GPT (UEFI spec 5.3): 128 entries of 128 bytes = 32 sectors, after the header (LBA 1), mirrored at the end
GPT_ENTRIES, GPT_ENTRY = 128, 128
GPT_ARRAY = GPT_ENTRIES * GPT_ENTRY // SECTOR
GPT_HEAD = (2 + GPT_ARRAY) * SECTOR  # protective MBR, primary header, entry array: sectors 0–33
GPT_TAIL = (GPT_ARRAY + 1) * SECTOR  # backup entry array and header: the disk's last 33 sectors
GPT_LABEL = GPT_HEAD  # the label's place in the GPT form: sector 34, the first after the entry array
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes, through the entry array's CRC32
GPT_PART = struct.Struct("<16s16sQQQ72s")
PROTECTIVE = 0xEE
LEGACY_BOOTABLE = 1 << 2  # the entry attribute syslinux's gptmbr.bin boots (the GPT's "active flag")
GPT_BOOT = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")  # EFI System: the firmware's FAT partition
OLD_GPT_BOOT = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")  # Microsoft basic data: older disks (as 0x0E)
GPT_META = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # Linux filesystem data
GPT_RESERVE = uuid.UUID("63fe88bb-25eb-402f-a9a7-825635efd510")  # blockprov's own: the raw golden reserve
GPT_DATA = uuid.UUID("253c0599-6e4f-4794-9530-5ad6b613e59d")  # blockprov's own: the raw cache data
GPT_TYPES = (GPT_BOOT, GPT_META, GPT_RESERVE, GPT_DATA)
GPT_NAMES = ("blockprov-boot", "blockprov-meta", "blockprov-reserve", "blockprov-data")

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
    logical: int = SECTOR  # the disk's logical sector: both forms are laid out in 512-byte sectors

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
    def gpt(self) -> bool:
        """Whether ``initialize`` gives this disk the GPT form (it is larger than an MBR can address)."""
        return self.size > MBR_LIMIT

    @property
    def data_bytes(self) -> int:
        """Room for the image when the reserve is left out (the reserve takes what is left over)."""
        return data_end(self.size) - FIXED - MIB


def tail_at(total: int) -> int:
    """Byte offset of the backup GPT (entry array, then header) on a disk of ``total`` sectors. Pure."""
    return (total - GPT_ARRAY - 1) * SECTOR


def data_end(size: int) -> int:
    """Where partition 4 of a disk of ``size`` bytes, set up now, ends: the disk's end in the MBR
    form (at most 2 TiB); in the GPT form the last whole MiB before the backup GPT (aligned, as
    partitioning tools want every partition). Pure."""
    return tail_at(size // SECTOR) // MIB * MIB if size > MBR_LIMIT else size


def reserve_bytes(disk_size: int, image: int, wanted: int | None) -> int:
    """The golden reserve for an image of ``image`` bytes on a disk of ``disk_size``: ``wanted``
    (default: 1/RESERVE_SHARE of the image), less when the disk has no room for it; whole MiB. Pure."""
    want = image // RESERVE_SHARE if wanted is None else wanted
    room = data_end(disk_size) - FIXED - image
    return max(MIB, min(want, room) // MIB * MIB)  # at least 1 MiB: partition 3 always exists


def label_at(head: bytes) -> int:
    """Where the label of the disk whose first bytes are ``head`` is: sector 34 when sector 1
    holds a GPT header, else sector 1. Pure."""
    return GPT_LABEL if head[SECTOR:SECTOR + len(GPT_SIGNATURE)] == GPT_SIGNATURE else SECTOR


def identify(head: bytes) -> str:
    """'blockprov', 'blockprov-old' (an older layout: re-initialized), 'blank' (also: blockprov's
    own partition table, MBR or GPT, without its label) or the name of the first foreign
    signature found in ``head`` (the disk's first bytes, at least 68 KiB): a GPT without
    blockprov's label in sector 34 is 'gpt', somebody else's. Pure."""
    at = label_at(head)
    if head[at:at + len(LABEL_MAGIC)] == LABEL_MAGIC:
        (version,) = struct.unpack_from("<I", head, at + len(LABEL_MAGIC))
        return "blockprov" if version == LABEL_VERSION else "blockprov-old"
    if head[440:444] == DISK_SIGNATURE and head[510:512] == b"\x55\xaa":
        return "blank"  # our own setup (either form), cut short before its label: nothing anyone relies on
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


def protective_mbr(total: int, code: bytes) -> bytes:
    """Sector 0 of the GPT form on a disk of ``total`` sectors: boot ``code`` (syslinux's
    gptmbr.bin, or NO_LOADER), the signature, one 0xEE entry from sector 1 over the disk (its
    size capped at 2^32 - 1 sectors, as the UEFI spec says). Pure."""
    _check_code(code)
    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", PROTECTIVE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF))
    return code.ljust(440, b"\0") + DISK_SIGNATURE + bytes(2) + entry + bytes(48) + b"\x55\xaa"


def _gpt_header(total: int, disk_guid: uuid.UUID, entries: bytes, *, backup: bool) -> bytes:
    """One GPT header sector (primary at LBA 1, backup in the last sector), CRC32s filled in."""
    mine, other = (total - 1, 1) if backup else (1, total - 1)
    array = tail_at(total) // SECTOR if backup else 2
    fields = [GPT_SIGNATURE, GPT_REVISION, GPT_HEADER.size, 0, 0, mine, other, 2 + GPT_ARRAY,
              total - GPT_ARRAY - 2, disk_guid.bytes_le, array, GPT_ENTRIES, GPT_ENTRY, zlib.crc32(entries)]
    fields[3] = zlib.crc32(GPT_HEADER.pack(*fields))
    return GPT_HEADER.pack(*fields).ljust(SECTOR, b"\0")


def _gpt_sectors(total: int, disk_guid: uuid.UUID, sector0: bytes, entries: bytes) -> tuple[bytes, bytes]:
    head = sector0 + _gpt_header(total, disk_guid, entries, backup=False) + entries
    return head, entries + _gpt_header(total, disk_guid, entries, backup=True)


def gpt(size: int, reserve: int, disk_guid: uuid.UUID, *, code: bytes = NO_LOADER,
        active: bool = False) -> tuple[bytes, bytes]:
    """The GPT form for a disk of ``size`` bytes with a reserve of ``reserve``: (head, tail) —
    sectors 0–33 (protective MBR with boot ``code``, primary header, entry array) and the disk's
    last 33 sectors (backup entry array and header, at ``tail_at``). The four partitions at the
    MBR form's offsets, partition 4 to ``data_end``; the boot one legacy-BIOS-bootable
    when ``active``. Partition GUIDs derive from ``disk_guid``. Pure."""
    total = size // SECTOR
    spans = [(START, BOOT_BYTES), (START + BOOT_BYTES, META_BYTES), (FIXED, reserve),
             (FIXED + reserve, data_end(size) - FIXED - reserve)]
    entries = b"".join(
        GPT_PART.pack(ptype.bytes_le, uuid.uuid5(disk_guid, f"partition {n + 1}").bytes_le, at // SECTOR,
                      (at + length) // SECTOR - 1, LEGACY_BOOTABLE if n == 0 and active else 0,
                      name.encode("utf-16-le"))
        for n, (ptype, name, (at, length)) in enumerate(zip(GPT_TYPES, GPT_NAMES, spans, strict=True)))
    return _gpt_sectors(total, disk_guid, protective_mbr(total, code), entries.ljust(GPT_ENTRIES * GPT_ENTRY, b"\0"))


def is_gpt(head: bytes) -> bool:
    """Whether ``head`` (a disk's first bytes) starts with a protective MBR and a GPT header. Pure."""
    return len(head) >= 2 * SECTOR and head[450] == PROTECTIVE and head[SECTOR:SECTOR + 8] == GPT_SIGNATURE


def _gpt_geometry(head: bytes) -> tuple[int, uuid.UUID]:
    """(the disk's sectors, by the backup header's place; the disk GUID) from a primary header.
    Read whatever its CRC: blockprov's flag writes change only the CRC fields."""
    fields = GPT_HEADER.unpack_from(head, SECTOR)
    return fields[6] + 1, uuid.UUID(bytes_le=fields[9])


def gpt_valid(head: bytes) -> bool:
    """Whether the primary GPT in ``head`` (at least GPT_HEAD bytes) passes both its CRC32s. Pure."""
    fields = list(GPT_HEADER.unpack_from(head, SECTOR))
    crc, fields[3] = fields[3], 0
    return (is_gpt(head) and zlib.crc32(GPT_HEADER.pack(*fields)) == crc
            and zlib.crc32(head[2 * SECTOR:GPT_HEAD]) == fields[13])


def partitions(head: bytes) -> list[tuple[int | uuid.UUID, int, int, bool]]:
    """(type, byte offset, bytes, active) of the four partitions of the disk whose first bytes
    are ``head``: an MBR's entries (type a byte), or, when ``head`` holds a GPT (then at least
    GPT_HEAD bytes), its first four entries (type a GUID; active: legacy BIOS bootable). Pure."""
    out: list[tuple[int | uuid.UUID, int, int, bool]] = []
    if is_gpt(head):
        for n in range(4):
            ptype, _guid, first, last, attrs, _name = GPT_PART.unpack_from(head, 2 * SECTOR + GPT_ENTRY * n)
            out.append((uuid.UUID(bytes_le=ptype), first * SECTOR, (last - first + 1) * SECTOR,
                        bool(attrs & LEGACY_BOOTABLE)))
        return out
    for n in range(4):
        flag, _c, ptype, _c2, lba, count = struct.unpack_from("<B3sB3sII", head, 446 + 16 * n)
        out.append((ptype, lba * SECTOR, count * SECTOR, flag == ACTIVE))
    return out


def _check_code(code: bytes) -> None:
    if len(code) > 440:
        raise NetbootError("MBR boot code longer than 440 bytes")


def with_boot(sector0: bytes, *, code: bytes, active: bool) -> bytes:
    """``sector0`` with new boot code and the boot partition's active flag, the boot partition
    typed an EFI System Partition (an older disk's 0x0E becomes 0xEF), entries otherwise
    unchanged. Pure."""
    _check_code(code)
    s = bytearray(sector0[:SECTOR])
    s[:440] = code.ljust(440, b"\0")
    s[446] = ACTIVE if active else 0
    s[446 + 4] = TYPE_BOOT
    return bytes(s)


def boot_writes(head: bytes, *, code: bytes, active: bool) -> list[tuple[int, bytes]]:
    """The writes, (byte offset, bytes) in the order the crash rules above want them, that give
    the disk whose first bytes are ``head`` (at least GPT_HEAD) new boot code and the boot
    partition's flag: sector 0 alone for an MBR; for a GPT the primary entry array's first
    sector (the attribute) first, then sector 0 with the primary header, then the backup's
    entries and header. The boot partition is typed an EFI System Partition (``with_boot``);
    partitions otherwise unchanged. Pure."""
    if not is_gpt(head):
        return [(0, with_boot(head, code=code, active=active))]
    _check_code(code)
    total, disk_guid = _gpt_geometry(head)
    entries = bytearray(head[2 * SECTOR:GPT_HEAD])
    entries[:16] = GPT_BOOT.bytes_le
    (attrs,) = struct.unpack_from("<Q", entries, 48)
    struct.pack_into("<Q", entries, 48, attrs | LEGACY_BOOTABLE if active else attrs & ~LEGACY_BOOTABLE)
    new, tail = _gpt_sectors(total, disk_guid, code.ljust(440, b"\0") + head[440:SECTOR], bytes(entries))
    at = tail_at(total)
    return [(2 * SECTOR, new[2 * SECTOR:3 * SECTOR]), (0, new[:2 * SECTOR]), (at, tail[:SECTOR]),
            (at + GPT_ARRAY * SECTOR, tail[-SECTOR:])]


def gpt_repairs(head: bytes, tail: bytes) -> list[tuple[int, bytes]]:
    """The writes that make a GPT whole again after a cut in ``boot_writes`` or ``initialize``:
    the primary header and the backup rebuilt from the primary entry array (the first thing
    ``boot_writes`` changes, so the newest truth), only the sectors that differ; none when
    ``head`` holds no GPT or the table is whole. ``tail``: the disk's last GPT_TAIL bytes. Pure."""
    if not is_gpt(head):
        return []
    total, disk_guid = _gpt_geometry(head)
    want, want_tail = _gpt_sectors(total, disk_guid, head[:SECTOR], head[2 * SECTOR:GPT_HEAD])
    out = [(SECTOR, want[SECTOR:2 * SECTOR])] if head[SECTOR:2 * SECTOR] != want[SECTOR:2 * SECTOR] else []
    at = tail_at(total)
    for n in range(GPT_ARRAY + 1):
        sector = want_tail[n * SECTOR:(n + 1) * SECTOR]
        if tail[n * SECTOR:(n + 1) * SECTOR] != sector:
            out.append((at + n * SECTOR, sector))
    return out


def label(info: dict[str, object]) -> bytes:
    body = LABEL_MAGIC + struct.pack("<I", LABEL_VERSION) + json.dumps(info, sort_keys=True).encode()
    if len(body) > SECTOR:
        raise NetbootError("disk label too long")
    return body.ljust(SECTOR, b"\0")


def read_label(head: bytes) -> dict[str, object]:
    at = label_at(head)
    body = head[at + len(LABEL_MAGIC) + 4:at + SECTOR].rstrip(b"\0")
    try:
        d = json.loads(body)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def disks(sys_block: Path = Path("/sys/block")) -> list[Disk]:
    """Whole disks the kernel found, in name order (no loop, ram, nbd, device-mapper), with their
    size (/sys counts 512-byte units whatever the disk's sector) and logical sector size."""
    out = []
    for p in sorted(sys_block.iterdir()) if sys_block.exists() else []:
        if p.name.startswith(("loop", "ram", "nbd", "dm-", "sr", "zram", "md")):
            continue
        try:
            sectors = int((p / "size").read_text())
        except (OSError, ValueError):
            continue
        try:
            logical = int((p / "queue" / "logical_block_size").read_text())
        except (OSError, ValueError):
            logical = SECTOR
        if sectors:
            out.append(Disk(p.name, sectors * SECTOR, logical=logical))
    return out


def read_head(path: str, n: int = 68 << 10) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def unfit(d: Disk, need: int, kind: str) -> str | None:
    """Why ``d``, holding ``kind`` (``identify``), cannot hold an image of ``need`` bytes, or None.
    A disk whose logical sectors are not 512 bytes (4Kn) is not set up: both forms address
    512-byte sectors (sector 1, LBAs), which such a disk reads eight times too far; one that
    already holds blockprov's layout is used as before, not refused. Pure."""
    if d.logical != SECTOR and kind != "blockprov":
        return (f"{d.name}: {d.logical}-byte logical sectors (4Kn): blockprov's disk layout needs 512-byte "
                "ones (not built yet)")
    if d.data_bytes < need:
        return f"{d.name}: too small ({d.size} bytes; the image needs {need + FIXED + MIB})"
    return None


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
        kind = identify(head_of(d.path))
        if (why := unfit(d, need, kind)) is not None:
            raise DiskRefused(f"blockprov.disk={named}: {why}")
        return d, kind if kind in ("blockprov", "blockprov-old") else "blank"
    candidates = []
    for d in found:
        kind = identify(head_of(d.path))
        if (why := unfit(d, need, kind)) is not None:
            reasons.append(why)
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
        for at in (SECTOR, GPT_LABEL) if d.gpt else (SECTOR,):  # the label first: a half-made disk is not trusted
            os.pwrite(fd, bytes(SECTOR), at)
        for at in (START, START + BOOT_BYTES, FIXED):  # old file systems' and the reserve's headers
            os.pwrite(fd, bytes(64 << 10), at)
        os.fsync(fd)
        if d.gpt:  # the backup first: a primary the kernel reads always has its backup behind it
            head, tail = gpt(d.size, reserve, uuid.uuid4())
            os.pwrite(fd, tail, tail_at(d.size // SECTOR))
            os.fsync(fd)
            os.pwrite(fd, head, 0)  # no loader, nothing bootable: the firmware moves on
        else:
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
        os.pwrite(fd, label(info), GPT_LABEL if d.gpt else SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)


def mend(d: Disk) -> bool:
    """Make a GPT of blockprov's whole again after a power cut (``gpt_repairs``; the crash rules
    above) and have the kernel read it again, before anything uses the partitions. True when
    something was rewritten; an MBR, or a disk that is not ours, is left alone."""
    fd = os.open(d.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        head = os.pread(fd, GPT_LABEL + SECTOR, 0)
        if not is_gpt(head) or identify(head) != "blockprov":
            return False
        total, _ = _gpt_geometry(head)
        writes = gpt_repairs(head, os.pread(fd, GPT_TAIL, tail_at(total)))
        for at, data in writes:
            os.pwrite(fd, data, at)
            os.fsync(fd)
        if writes:
            reread(fd)
    finally:
        os.close(fd)
    for part in (d.boot, d.meta, d.reserve, d.data) if writes else ():
        wait_for(part)
    return bool(writes)


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
