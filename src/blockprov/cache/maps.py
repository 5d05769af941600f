"""Per-chunk state of a cache as one compact array. Pure: no files, no sockets, no event loop.

One byte of flags per chunk (a 100 GiB image at 64 KiB chunks is 1.6 M chunks: 1.6 MB)::

    bit 0  PRESENT    the data file holds the chunk's current content
    bit 1  MODIFIED   the content may differ from the base version (set before the data changes)
    bit 2  ZERO       the chunk reads as zeros; the data file is not read (trimmed, written as
                      zeros, or an all-zero chunk of the base)
    bit 3  BASE_ZERO  the base version's chunk is all zeros (the manifest's zero marker); lets a
                      ``reset`` be replayed without the manifest
    bit 4  HELD       a snapshot target may hold this chunk's current content (set by ``synced``
                      records and by a snapshot in progress): the next write must journal ``dirty``
                      durably before the data changes, so that a crash cannot make the target look
                      up to date (docs/architecture.md, invariant 4). Cleared by every record that journals a write.
    bits 5..7         reserved (0)

Why a byte and not nbdkit's 2 bits: a byte is one index away on the hot read path
(``flags[i] & PRESENT``), and every change of a range is a single ``bytes.translate`` with a
256-entry table, so marking a million chunks runs at memcpy speed. Every journal record kind is
such a per-byte function (``TABLES``), which makes replay and live updates the same code.

Room for snapshots (not used by the cache itself): ``gens`` holds a 32-bit write generation per
chunk (bumped by ``touch``), and ``unsynced`` one bit per chunk for each snapshot target, named in
``targets`` (its index is the ``target`` field of ``synced`` records). Both are allocated only when
asked for, so an agent without snapshot targets pays nothing.

States a chunk can be in (P = PRESENT, M = MODIFIED, Z = ZERO)::

    0        missing: fetch from the repository before use
    P        filled from the repository, equal to the base
    P|M      written here
    Z        the base chunk is all zeros and nobody wrote it (with BASE_ZERO)
    Z|M      trimmed / zeroed here
    M        marked for a write that may not have reached the data file; reads fetch the base
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from enum import IntEnum
from functools import lru_cache

PRESENT = 0x01
MODIFIED = 0x02
ZERO = 0x04
BASE_ZERO = 0x08
HELD = 0x10
KNOWN_BITS = PRESENT | MODIFIED | ZERO | BASE_ZERO | HELD
MAX_TARGETS = 255
GEN_MASK = 0xFFFFFFFF


class Kind(IntEnum):
    """Journal record kinds. Range kinds act on chunks ``a .. b-1``."""

    PRESENT = 1  # a..b: the data file now holds the base content (fill), or a whole written chunk
    MODIFIED = 2  # a..b: about to be written; durable before the data changes (docs/architecture.md, invariant 2)
    ZERO = 3  # a..b: reads as zeros from now on (trim / write-zeroes of whole chunks)
    UNZERO = 4  # a..b: a zero chunk was rewritten whole (zeros + new data) in the data file
    DROP = 5  # a..b: forget the data (failed verification): fetch again on next use
    RESET = 6  # a..b: back to the base version, lazily (data dropped, modified cleared)
    DIRTY = 7  # a..b: unsynced again for every snapshot target
    SYNCED = 8  # target, chunk a, generation c: the target holds the chunk's write generation c
    REBASE = 9  # c = new base version id (as an integer); always followed by a checkpoint


def _table(fn: Callable[[int], int]) -> bytes:
    return bytes(fn(x) & 0xFF for x in range(256))


TABLES: dict[Kind, bytes] = {
    Kind.PRESENT: _table(lambda x: (x | PRESENT) & ~ZERO),
    Kind.MODIFIED: _table(lambda x: (x | MODIFIED) & ~HELD),
    Kind.ZERO: _table(lambda x: (x & ~(PRESENT | HELD)) | ZERO | MODIFIED),
    Kind.UNZERO: _table(lambda x: (x | PRESENT) & ~ZERO),
    Kind.DROP: _table(lambda x: x & ~PRESENT),
    Kind.RESET: _table(lambda x: (ZERO | BASE_ZERO) if x & BASE_ZERO else 0),
    Kind.DIRTY: _table(lambda x: x & ~HELD),
}
RANGE_KINDS = frozenset(TABLES)
# Record kinds that mean "this chunk was written": they bump write generations.
WRITE_KINDS = frozenset({Kind.MODIFIED, Kind.ZERO, Kind.UNZERO, Kind.DIRTY})


@lru_cache(maxsize=64)
def _match_table(mask: int, value: int) -> bytes:
    """Translate table: 1 where ``flags & mask == value``, else 0."""
    return bytes(1 if x & mask == value else 0 for x in range(256))


@lru_cache(maxsize=64)
def _values_with(mask: int, value: int) -> bytes:
    """All byte values with ``flags & mask == value`` (a ``translate`` delete set)."""
    return bytes(x for x in range(256) if x & mask == value)


def base_zero_flags(chunk_ids: bytes, digest_size: int = 32) -> bytearray:
    """Initial flags of a fresh cache: ``ZERO | BASE_ZERO`` for the manifest's zero markers."""
    zero = bytes(digest_size)
    n = len(chunk_ids) // digest_size
    flags = bytearray(n)
    pos = chunk_ids.find(zero)
    while pos >= 0:
        if pos % digest_size == 0:
            flags[pos // digest_size] = ZERO | BASE_ZERO
            pos = chunk_ids.find(zero, pos + digest_size)
        else:  # a match straddling two ids: realign to the next id boundary
            pos = chunk_ids.find(zero, pos + digest_size - pos % digest_size)
    return flags


class ChunkMap:
    """Flags for ``count`` chunks plus optional snapshot bookkeeping.

    ``flags`` is public on purpose: the cache's hot read path indexes it directly.
    """

    __slots__ = ("count", "flags", "gens", "targets", "unsynced")

    def __init__(self, count: int, flags: bytearray | None = None, *, gens: array[int] | None = None,
                 targets: Iterable[str] = (), unsynced: Iterable[bytearray] | None = None) -> None:
        self.count = count
        self.flags = flags if flags is not None else bytearray(count)
        if len(self.flags) != count:
            raise ValueError(f"{len(self.flags)} flags for {count} chunks")
        if gens is not None and len(gens) != count:
            raise ValueError(f"{len(gens)} generations for {count} chunks")
        self.gens = gens
        self.targets = list(targets)
        nbytes = (count + 7) // 8
        self.unsynced = list(unsynced) if unsynced is not None else [bytearray(nbytes) for _ in self.targets]
        if len(self.unsynced) != len(self.targets) or any(len(u) != nbytes for u in self.unsynced):
            raise ValueError("unsynced bitsets do not match targets")

    # -- updates --------------------------------------------------------------------------------
    def apply(self, kind: Kind, a: int, b: int, c: int = 0, target: int = 0) -> None:
        """Apply one journal record (the same code runs live and at replay)."""
        if kind == Kind.SYNCED:
            self._synced(target, a, c)
            return
        if kind == Kind.REBASE:
            raise ValueError("a rebase is applied by a checkpoint, not by replay")
        if not 0 <= a < b <= self.count:
            raise ValueError(f"chunk range {a}..{b} outside 0..{self.count}")
        if kind in WRITE_KINDS:
            self.touch(a, b)
        table = TABLES[kind]
        fl = self.flags
        if b == a + 1:
            fl[a] = table[fl[a]]
        else:
            fl[a:b] = fl[a:b].translate(table)

    def touch(self, a: int, b: int) -> None:
        """A write to chunks a..b-1: bump write generations, unsynced for every target."""
        gens = self.gens
        if gens is not None:
            for i in range(a, b):
                gens[i] = (gens[i] + 1) & GEN_MASK
        for bits in self.unsynced:
            _set_bits(bits, a, b, True)

    # -- queries --------------------------------------------------------------------------------
    def has(self, i: int, bits: int) -> bool:
        return self.flags[i] & bits == bits

    def all_match(self, mask: int, value: int, a: int, b: int) -> bool:
        """True when every chunk in a..b-1 has ``flags & mask == value`` (one C call)."""
        if b == a + 1:
            return self.flags[a] & mask == value
        return not self.flags[a:b].translate(None, _values_with(mask, value))

    def count_where(self, mask: int, value: int | None = None, a: int = 0, b: int | None = None) -> int:
        v = mask if value is None else value
        return self.flags[a:self.count if b is None else b].translate(_match_table(mask, v)).count(1)

    def runs_where(self, mask: int, value: int | None = None, a: int = 0,
                   b: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(start, end)`` within a..b-1 whose flags match."""
        v = mask if value is None else value
        end = self.count if b is None else b
        bits = self.flags[a:end].translate(_match_table(mask, v))
        pos = bits.find(1)
        while pos >= 0:
            stop = bits.find(0, pos)
            if stop < 0:
                stop = len(bits)
            yield a + pos, a + stop
            pos = bits.find(1, stop)

    def missing_bits(self, a: int = 0, b: int | None = None) -> int:
        """Chunks a..b-1 that hold no data here (neither present nor zero), as an integer with bit
        ``8 * (i - a)`` set for each: layers of overlays AND theirs to find what none holds."""
        end = self.count if b is None else b
        return int.from_bytes(self.flags[a:end].translate(_match_table(PRESENT | ZERO, 0)), "little")

    def first_where(self, mask: int, value: int | None = None, start: int = 0, end: int | None = None) -> int:
        """First chunk >= start matching, or -1 (windowed, so early hits cost little)."""
        v = mask if value is None else value
        stop = self.count if end is None else end
        table = _match_table(mask, v)
        window = 1 << 16
        pos = start
        while pos < stop:
            upto = min(stop, pos + window)
            hit = self.flags[pos:upto].translate(table).find(1)
            if hit >= 0:
                return pos + hit
            pos = upto
            window = min(window * 4, 1 << 22)
        return -1

    def first_missing(self, start: int = 0) -> int:
        """First chunk >= start that needs data from the repository, or -1 (for hydration)."""
        return self.first_where(PRESENT | ZERO, 0, start)

    def counts(self) -> dict[str, int]:
        fl = self.flags
        return {
            "total": self.count,
            "present": fl.translate(_match_table(PRESENT, PRESENT)).count(1),
            "modified": fl.translate(_match_table(MODIFIED, MODIFIED)).count(1),
            "zero": fl.translate(_match_table(ZERO, ZERO)).count(1),
            "missing": fl.translate(_match_table(PRESENT | ZERO, 0)).count(1),
        }

    # -- snapshot bookkeeping ------------------------------------------------------------------
    def enable_gens(self) -> None:
        if self.gens is None:
            self.gens = array("I", bytes(4 * self.count))

    def add_target(self, name: str) -> int:
        """A new snapshot target: everything modified is unsynced for it. Returns its index."""
        if name in self.targets:
            return self.targets.index(name)
        if len(self.targets) >= MAX_TARGETS:
            raise ValueError(f"at most {MAX_TARGETS} snapshot targets")
        bits = bytearray((self.count + 7) // 8)
        for a, b in self.runs_where(MODIFIED):
            _set_bits(bits, a, b, True)
        self.targets.append(name)
        self.unsynced.append(bits)
        self.enable_gens()
        return len(self.targets) - 1

    def is_unsynced(self, target: int, i: int) -> bool:
        return bool(self.unsynced[target][i >> 3] >> (i & 7) & 1)

    def count_unsynced(self, target: int) -> int:
        return int.from_bytes(self.unsynced[target], "little").bit_count()

    def _synced(self, target: int, i: int, gen: int) -> None:
        if not 0 <= target < len(self.targets) or not 0 <= i < self.count:
            raise ValueError(f"synced record for unknown target {target} or chunk {i}")
        if self.gens is None or self.gens[i] == gen & GEN_MASK:
            _set_bits(self.unsynced[target], i, i + 1, False)
            self.flags[i] |= HELD

    # -- bulk copies ----------------------------------------------------------------------------
    def copy(self) -> ChunkMap:
        return ChunkMap(self.count, bytearray(self.flags),
                        gens=array("I", self.gens) if self.gens is not None else None,
                        targets=self.targets, unsynced=[bytearray(u) for u in self.unsynced])


def _set_bits(bits: bytearray, a: int, b: int, value: bool) -> None:
    """Set or clear bits a..b-1 of a little-endian bitset, whole bytes at a time in the middle."""
    while a < b and a & 7:
        _set_bit(bits, a, value)
        a += 1
    full_end = b & ~7
    if a < full_end:
        bits[a >> 3:full_end >> 3] = (b"\xff" if value else b"\x00") * ((full_end - a) >> 3)
        a = full_end
    while a < b:
        _set_bit(bits, a, value)
        a += 1


def _set_bit(bits: bytearray, i: int, value: bool) -> None:
    if value:
        bits[i >> 3] |= 1 << (i & 7)
    else:
        bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
