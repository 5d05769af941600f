"""The partition table of a disk image (MBR with its logical partitions, or GPT), and which of an
instance's modified chunks may be kept when it moves to another version. Pure: no I/O.

Why this exists (docs/architecture.md, invariant 8). An instance that keeps its session's
modified chunks over another version's base gets a block-level merge of two file systems: both
versions' file systems allocated blocks independently, so a block the session wrote may be a
block the new version uses for something else, and the result is cross-linked (issue 27 item 0
saw a file that v2 added read back the content of a file the v1 session wrote). No file system
survives that in general. What is sound is per partition: a partition the new version leaves
exactly as the old one had it (same place, same size, same type, every byte the same) holds one
file system that nobody but the session changed, so the session's chunks of it can be kept; the
session's chunks anywhere else must go (back to the new version), after being kept as a version
where they matter (agent/keep.py). A disk without a partition table (a whole-disk file system)
has nothing that can be kept.

Reading a table needs bytes at offsets that the table itself gives (the GPT's entry array, the
chain of extended boot records), so ``parse_table`` is a generator in the style of a sans-I/O
protocol: it yields ``(offset, length)`` requests and is sent the bytes; ``read_table`` drives it
with a plain function, agent/keep.py with an asynchronous one. Anything malformed — a bad CRC, a
partition outside the disk, overlapping partitions, a loop of extended records — reads as
"no table": nothing is kept, which is always safe.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import uuid
import zlib
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

SECTOR = 512
MBR_ENTRIES = 446  # byte offset of the four 16-byte entries in sector 0 (and in each EBR)
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sectors
EXTENDED = (0x05, 0x0F, 0x85)
PROTECTIVE = 0xEE
MAX_LOGICAL = 128  # logical partitions followed in an extended partition's chain
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # signature … entry array CRC32 (92 bytes)
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # type, unique GUID, first LBA, last LBA, attributes, name
MAX_GPT_ARRAY = 1 << 20  # bytes of entry array read (128 × 128 is the usual 16 KiB)

Request = tuple[int, int]  # (offset, length) of bytes the parser needs next
Parser = Generator[Request, bytes, "Table"]


@dataclass(frozen=True)
class Partition:
    number: int  # MBR: 1–4 primary, 5… logical; GPT: the entry's index + 1
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # MBR: "0x83"; GPT: the type GUID
    uid: str = ""  # GPT: the partition's unique GUID

    @property
    def end(self) -> int:
        return self.start + self.size

    def same_place(self, other: Partition) -> bool:
        return (self.start, self.size, self.type, self.uid) == (other.start, other.size, other.type, other.uid)

    def label(self) -> str:
        return f"partition {self.number} ({self.size >> 20} MiB at {self.start >> 20} MiB, type {self.type})"


@dataclass(frozen=True)
class Table:
    kind: str  # "mbr", "gpt", or "none" (no table: a whole-disk file system, or unreadable)
    partitions: tuple[Partition, ...] = ()
    why: str = ""  # for "none": why no table was read

    def find(self, p: Partition) -> Partition | None:
        return next((q for q in self.partitions if q.same_place(p)), None)


NONE = Table("none", why="no partition table")


def parse_table(disk_size: int) -> Parser:
    """The table of a disk of ``disk_size`` bytes; yields the byte ranges it needs."""
    sector0 = yield (0, SECTOR)
    if len(sector0) < SECTOR or sector0[510:512] != b"\x55\xaa":
        return NONE
    entries = [MBR_ENTRY.unpack_from(sector0, MBR_ENTRIES + 16 * n) for n in range(4)]
    if any(e[2] == PROTECTIVE for e in entries):
        return (yield from _gpt(disk_size))
    if any(status not in (0x00, 0x80) for status, *_ in entries):  # boot code, not a table (a FAT boot sector)
        return Table("none", why="sector 0 ends in 55 AA but holds no partition table")
    parts: list[Partition] = []
    for n, (_status, _c1, ptype, _c2, lba, count) in enumerate(entries, 1):
        if ptype == 0 or count == 0:
            continue
        if ptype in EXTENDED:
            logical = yield from _logical(lba * SECTOR, count * SECTOR, disk_size)
            if logical is None:
                return Table("none", why=f"the chain of logical partitions in partition {n} is malformed")
            parts += logical
            continue
        parts.append(Partition(n, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
    return _checked("mbr", parts, disk_size)


def _logical(ext_start: int, ext_size: int, disk_size: int) -> Generator[Request, bytes, list[Partition] | None]:
    """Logical partitions: a chain of extended boot records, each holding one partition (relative
    to the record) and a link to the next (relative to the extended partition)."""
    out: list[Partition] = []
    at, seen = ext_start, set()
    while len(out) < MAX_LOGICAL:
        if at in seen or not ext_start <= at < min(ext_start + ext_size, disk_size):
            return None
        seen.add(at)
        ebr = yield (at, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            return None
        _s, _c1, ptype, _c2, lba, count = MBR_ENTRY.unpack_from(ebr, MBR_ENTRIES)
        if ptype and count:
            out.append(Partition(5 + len(out), at + lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
        _s, _c1, ntype, _c2, nlba, _n = MBR_ENTRY.unpack_from(ebr, MBR_ENTRIES + 16)
        if ntype not in EXTENDED:  # the chain's end (a link back to a record read is a loop: None above)
            return out
        at = ext_start + nlba * SECTOR
    return None


def _gpt(disk_size: int) -> Generator[Request, bytes, Table]:
    why = ""
    for lba in (1, disk_size // SECTOR - 1):  # the primary header, else the backup
        header = yield (lba * SECTOR, SECTOR)
        fields = _gpt_header(header, lba, disk_size)
        if isinstance(fields, str):
            why = why or fields
            continue
        array_lba, count, size = fields
        array = yield (array_lba * SECTOR, count * size)
        if len(array) != count * size or zlib.crc32(array) != GPT_HEADER.unpack_from(header)[13]:
            why = why or "the GPT's entry array fails its CRC32"
            continue
        parts = []
        for n in range(count):
            ptype, uid, first, last, _attrs, _name = GPT_ENTRY.unpack_from(array, n * size)
            if ptype == bytes(16):
                continue
            if last < first:
                return Table("none", why=f"GPT entry {n + 1} ends before it starts")
            parts.append(Partition(n + 1, first * SECTOR, (last - first + 1) * SECTOR,
                                   str(uuid.UUID(bytes_le=ptype)), str(uuid.UUID(bytes_le=uid))))
        return _checked("gpt", parts, disk_size)
    return Table("none", why=why)


def _gpt_header(header: bytes, lba: int, disk_size: int) -> tuple[int, int, int] | str:
    """(entry array LBA, entries, entry size) of a valid GPT header at ``lba``, else why not."""
    if len(header) < GPT_HEADER.size or header[:8] != b"EFI PART":
        return "no GPT header"
    f = list(GPT_HEADER.unpack_from(header))
    hsize, crc = f[2], f[3]
    if not GPT_HEADER.size <= hsize <= SECTOR:
        return "a GPT header of a size no header has"
    f[3] = 0
    raw = GPT_HEADER.pack(*f) + header[GPT_HEADER.size:hsize]
    if zlib.crc32(raw) != crc or f[5] != lba:
        return "the GPT header fails its CRC32"
    array_lba, count, size = f[10], f[11], f[12]
    if size < GPT_ENTRY.size or size % 8 or count * size > MAX_GPT_ARRAY or count == 0:
        return "a GPT entry array of an unusual size"
    if array_lba * SECTOR + count * size > disk_size:
        return "the GPT's entry array lies past the disk's end"
    return array_lba, count, size


def _checked(kind: str, parts: list[Partition], disk_size: int) -> Table:
    if not parts:  # also a whole-disk FAT file system's boot sector (55 AA, zeros where entries would be)
        return Table("none", why=f"sector 0 holds no partition ({kind} form)")
    parts.sort(key=lambda p: p.start)
    for a, b in itertools.pairwise(parts):
        if b.start < a.end:
            return Table("none", why=f"partitions {a.number} and {b.number} overlap")
    for p in parts:
        if p.start < SECTOR or p.end > disk_size:
            return Table("none", why=f"partition {p.number} lies outside the disk")
    return Table(kind, tuple(parts))


def read_table(read: Callable[[int, int], bytes], disk_size: int) -> Table:
    """``parse_table`` driven by ``read(offset, length)`` (which may return fewer bytes at the end)."""
    gen = parse_table(disk_size)
    try:
        req = next(gen)
        while True:
            req = gen.send(read(*req))
    except StopIteration as stop:
        table: Table = stop.value
        return table


# -- what may be kept --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartitionPlan:
    partition: Partition
    modified: int  # the session's chunks that touch it
    kept: bool
    why: str  # why it is kept, or why not


@dataclass(frozen=True)
class KeepPlan:
    """Which modified chunks an instance keeps when it moves from one version to another."""

    kind: str  # the new version's table: "mbr", "gpt", "none"
    partitions: tuple[PartitionPlan, ...]
    keep: frozenset[int]  # modified chunks kept over the new version
    drop: tuple[int, ...]  # modified chunks that go back to the new version
    why: str = ""  # for a table of kind "none", why none was read
    kept_partitions: tuple[int, ...] = field(default=())

    def summary(self) -> str:
        """One line for a console: what was kept, what was not, and why."""
        if self.kind == "none":
            return f"no partition can be kept ({self.why}): a whole-disk file system can only be reset"
        parts = "; ".join(f"{p.partition.label()}: {p.modified} modified chunk(s), "
                          f"{'kept' if p.kept else 'reset'} ({p.why})" for p in self.partitions)
        return parts or "the disk has no partitions"


def plan_keep(old: Table, new: Table, session: Table, chunk_size: int, size: int, changed: Iterable[int],
              modified: Iterable[int]) -> KeepPlan:
    """Which of ``modified`` may be kept when the instance moves from the version with table
    ``old`` to the one with ``new`` (``changed``: the chunks whose content differs between them;
    ``session``: the table as the instance's disk holds it now). A partition is kept when the new
    version leaves it unchanged (the same place, size and type in old, new and the session's own
    table, and no changed chunk touches it) and every modified chunk touching it lies wholly in
    kept partitions (a chunk shared with a partition that is reset would revert part of this
    one). Kept: the modified chunks lying wholly in kept partitions; every other one is dropped."""
    mods = sorted(set(modified))
    if new.kind == "none" or old.kind == "none":
        none = new.why if new.kind == "none" else f"the version it leaves has none: {old.why}"
        return KeepPlan("none", (), frozenset(), tuple(mods), why=none)
    changed_sorted = sorted(set(changed))

    def chunks_of(p: Partition) -> tuple[int, int]:
        return p.start // chunk_size, -(-p.end // chunk_size)

    def count_in(sorted_chunks: list[int], p: Partition) -> int:
        a, b = chunks_of(p)
        return bisect.bisect_left(sorted_chunks, b) - bisect.bisect_left(sorted_chunks, a)

    why: dict[int, str] = {}
    kept: dict[int, Partition] = {}
    for p in new.partitions:
        n = count_in(changed_sorted, p)
        if old.find(p) is None:
            why[p.number] = "the version it leaves has no partition at that place, of that size and type"
        elif session.find(p) is None:
            why[p.number] = "the session changed the partition table"
        elif n:
            why[p.number] = f"the new version changes {n} chunk(s) of it"
        else:
            kept[p.number] = p
            why[p.number] = "the new version leaves it unchanged"

    def wholly_kept(c: int, order: list[Partition], starts: list[int]) -> bool:
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, size)
        first = max(0, bisect.bisect_right(starts, lo) - 1)  # partitions do not overlap: sorted by start
        inside = 0
        for p in order[first:bisect.bisect_left(starts, hi)]:
            inside += max(0, min(hi, p.end) - max(lo, p.start))
        return inside == hi - lo

    while True:  # drop partitions that share a modified chunk with something reset, until none does
        order = sorted(kept.values(), key=lambda p: p.start)
        starts = [p.start for p in order]
        spoiled = [p for p in order if any(not wholly_kept(c, order, starts) for c in _in(mods, *chunks_of(p)))]
        if not spoiled:
            break
        for p in spoiled:
            del kept[p.number]
            why[p.number] = "a modified chunk it shares with a region that is reset"
    keep = frozenset(c for c in mods if wholly_kept(c, order, starts))
    plans = tuple(PartitionPlan(p, count_in(mods, p), p.number in kept, why[p.number]) for p in new.partitions)
    return KeepPlan(new.kind, plans, keep, tuple(c for c in mods if c not in keep),
                    kept_partitions=tuple(sorted(kept)))


def _in(sorted_chunks: list[int], a: int, b: int) -> list[int]:
    return sorted_chunks[bisect.bisect_left(sorted_chunks, a):bisect.bisect_left(sorted_chunks, b)]
