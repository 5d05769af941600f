"""The golden reserve: base content of chunks kept on the local disk before their first overwrite,
so a reset (reboot-to-restore) needs no repository for them.

Why: a cache's reset (cache/device.py) forgets the modified chunks and fetches their base
content again; a PC whose repository is unreachable (netboot/inagent.py, offline boot) could not
come up pristine. With a reserve, the first write to a clean present chunk first copies the
chunk's base content into a bounded region of the disk; after the reset, the chunk source reads
it back from there (``ReserveSource``, a layer between the cache and the repository source,
nbdkit style), verified against the manifest's digest like anything fetched (invariant 6).

Layout of the region (a partition of the PC's disk, or any file)::

    0                 header: RESERVE_MAGIC, format, chunk size, slot count (one 4 KiB block)
    4 KiB             the slot table: one ENTRY-byte record per slot (chunk index, digest, crc32)
    data_start        slot s at data_start + s × chunk size

Crash rules (the order that makes a golden copy trustworthy):

1. ``keep`` writes the chunk's content into a free slot, then the slot's table record, then
   fdatasyncs the region — and only then returns, so the cache journals ``modified`` and lets
   the overwrite reach its data area (``ReserveSource.before_overwrite``, which the device calls
   before both, cache/writes.py; the slots stay pinned until then). The golden copy is
   durable before the data it preserves is changed.
2. A power cut before the fdatasync leaves the data area unchanged (the overwrite waits), so
   losing the slot costs nothing; a record that did reach the disk with a torn slot is caught
   at read: a slot is used only when its content hashes to the manifest's digest for that chunk,
   else the chunk comes from the repository (or, offline, is reported unrestorable).
3. A record is one 64-byte entry with its own crc32; rewriting it rewrites the other entries of
   its sector with their unchanged bytes, so a torn sector write harms no other slot.
4. Records name the digest they hold, so a new base version (update by diff) needs no cleanup:
   a record whose digest is not the manifest's is simply a free slot.

Bounded: the region has a fixed number of slots. A slot is free when its record is invalid or
stale, or when its chunk is present and not modified at the moment (the data area holds that
chunk's golden content itself; a modified chunk, or one reset and not yet restored, needs its
copy). When no slot is free the chunk is not kept (``full`` is counted): its reset then needs
the repository; offline, it stays missing and its reads fail with EIO — modified data is never served as pristine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from blockprov.cache.source import CacheSide, ChunkSource, Data, Filter, Ranges, Release, SourceFactory, read_chunks
from blockprov.codec import ZERO_DIGEST, digest
from blockprov.device.base import ReadResult
from blockprov.manifest import Manifest

log = logging.getLogger(__name__)

RESERVE_MAGIC = b"BLOCKPROV-RESERVE\n"
FORMAT = 1
BLOCK = 4096
ENTRY = 64
_HEADER = struct.Struct("<IIQ")  # format, chunk size, slots
_RECORD = struct.Struct("<Q32s")  # chunk index, digest; then crc32 of these 40 bytes


def slots_for(size: int, chunk_size: int) -> int:
    """How many chunk slots a region of ``size`` bytes holds (header, table, slots). Pure."""
    n = max(0, (size - BLOCK) // (chunk_size + ENTRY))
    while n and BLOCK + _table_bytes(n) + n * chunk_size > size:
        n -= 1
    return n


def _table_bytes(n: int) -> int:
    return (n * ENTRY + BLOCK - 1) // BLOCK * BLOCK


def record(chunk: int, d: bytes) -> bytes:
    body = _RECORD.pack(chunk, d)
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(ENTRY, b"\0")


def parse_record(raw: bytes) -> tuple[int, bytes] | None:
    body = raw[:_RECORD.size]
    if len(raw) < _RECORD.size + 4 or struct.unpack_from("<I", raw, _RECORD.size)[0] != zlib.crc32(body):
        return None
    chunk, d = _RECORD.unpack(body)
    return chunk, d


class Reserve:
    """A golden reserve region opened on ``path`` (see the module docstring). Thread-safe: ``keep``
    and ``read`` run in worker threads; one lock orders allocation and the table."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self._lock = threading.Lock()
        self.chunk_size = 0
        self.slots = 0
        self._data_start = 0
        self._entries: dict[int, tuple[int, bytes]] = {}  # slot → (chunk, digest)
        self._by_chunk: dict[int, int] = {}  # chunk → slot
        self._pinned: set[int] = set()  # chunks between their keep and their modified mark
        self._checked: set[int] = set()  # slots written or verified by this process
        self.kept = 0  # copies made by this process
        self.full = 0  # chunks not kept: no free slot
        self._load()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Reserve:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            return cls(os.fspath(path), fd, size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- the region ----------------------------------------------------------------------------------
    def _load(self) -> None:
        head = os.pread(self._fd, BLOCK, 0)
        if not head.startswith(RESERVE_MAGIC):
            return  # unformatted: formatted at the first keep, for the manifest's chunk size
        fmt, cs, slots = _HEADER.unpack_from(head, len(RESERVE_MAGIC))
        if fmt != FORMAT or not cs or slots != slots_for(self.size, cs):
            return
        self._set_geometry(cs, slots)
        table = os.pread(self._fd, _table_bytes(slots), BLOCK)
        for s in range(slots):
            got = parse_record(table[s * ENTRY:(s + 1) * ENTRY])
            if got is not None:
                self._entries[s] = got
                self._by_chunk[got[0]] = s

    def _set_geometry(self, cs: int, slots: int) -> None:
        self.chunk_size, self.slots = cs, slots
        self._data_start = BLOCK + _table_bytes(slots)

    def _format(self, cs: int) -> None:
        """(Re)make the region for chunks of ``cs`` bytes: the table first (all records invalid),
        then the header, each durable; a cut in between leaves a region ``_load`` ignores."""
        slots = slots_for(self.size, cs)
        os.pwrite(self._fd, bytes(BLOCK), 0)
        os.fdatasync(self._fd)
        if slots:
            os.pwrite(self._fd, bytes(_table_bytes(slots)), BLOCK)
        os.pwrite(self._fd, (RESERVE_MAGIC + _HEADER.pack(FORMAT, cs, slots)).ljust(BLOCK, b"\0"), 0)
        os.fdatasync(self._fd)
        self._entries.clear()
        self._by_chunk.clear()
        self._set_geometry(cs, slots)

    # -- keeping --------------------------------------------------------------------------------------
    def holds(self, m: Manifest, chunk: int) -> bool:
        """A record names this chunk with the manifest's digest (the content is checked at read)."""
        s = self._by_chunk.get(chunk)
        return s is not None and m.chunk_size == self.chunk_size and self._entries[s] == (chunk, m.digest_at(chunk))

    def keep(self, m: Manifest, chunks: Sequence[int], read_chunk: Callable[[int], bytes],
             at_home: Callable[[int], bool]) -> int:
        """Copy the base content of ``chunks`` (clean, present: the data area holds it) into slots,
        durably, before the caller lets them change (blocking; see the crash rules). Pins them
        until ``unpin`` so no concurrent keep reuses their slots. ``at_home(c)``: the data area holds
        chunk c's base content now (present, not modified), so its copy may be given up. Returns
        how many were copied."""
        with self._lock:
            if m.chunk_size != self.chunk_size:
                self._format(m.chunk_size)
            self._pinned.update(chunks)
            todo = [c for c in chunks if not m.is_zero(c) and not self._sound(m, c)]
            if not todo:
                return 0
            own = {c: self._by_chunk[c] for c in todo if c in self._by_chunk}  # a torn copy: its slot again
            free = iter(self._free_slots(m, len(todo) - len(own), at_home, set(own.values())))
            wrote = 0
            for c in todo:
                s = own.get(c)
                if s is None:
                    s = next(free, None)
                    if s is None:
                        break
                self._checked.discard(s)
                old = self._entries.pop(s, None)
                if old is not None and self._by_chunk.get(old[0]) == s:
                    del self._by_chunk[old[0]]
                os.pwrite(self._fd, read_chunk(c), self._data_start + s * self.chunk_size)
                os.pwrite(self._fd, record(c, m.digest_at(c)), BLOCK + s * ENTRY)
                self._entries[s] = (c, m.digest_at(c))
                self._by_chunk[c] = s
                self._checked.add(s)
                wrote += 1
            self.full += len(todo) - wrote
            if wrote:
                os.fdatasync(self._fd)
                self.kept += wrote
            return wrote

    def _sound(self, m: Manifest, c: int) -> bool:
        """The reserve holds a copy of chunk ``c`` known good: written by this process, or a record
        left by an earlier one whose slot hashes right (checked once: a torn slot is rewritten)."""
        if not self.holds(m, c):
            return False
        s = self._by_chunk[c]
        if s not in self._checked:
            data = os.pread(self._fd, m.chunk_length(c), self._data_start + s * self.chunk_size)
            if digest(data) != m.digest_at(c):
                return False
            self._checked.add(s)
        return True

    def unpin(self, chunks: Sequence[int]) -> None:
        with self._lock:
            self._pinned.difference_update(chunks)

    def _free_slots(self, m: Manifest, n: int, at_home: Callable[[int], bool], taken: set[int]) -> list[int]:
        """Up to ``n`` slots to reuse: never used first, then stale records, then records of chunks
        whose base content is in the data area now, never a pinned chunk's. (A chunk reset but not
        yet restored is not at home: its copy is the only local one.)"""
        if n <= 0:
            return []
        out = [s for s in range(self.slots) if s not in self._entries][:n]
        if len(out) < n:
            for s, (c, d) in self._entries.items():
                if len(out) == n:
                    break
                if s in taken:
                    continue
                stale = c >= m.count or d != m.digest_at(c) or self._by_chunk.get(c) != s
                if stale or (c not in self._pinned and at_home(c)):
                    out.append(s)
        return out

    # -- reading back ---------------------------------------------------------------------------------
    def read(self, m: Manifest, chunk: int) -> bytes | None:
        """The chunk's base content from its slot, verified against the manifest; None when the
        reserve does not hold it (or its slot does not match: a torn or stale copy). Blocking."""
        with self._lock:
            if not self.holds(m, chunk):
                return None
            s = self._by_chunk[chunk]
            data = os.pread(self._fd, m.chunk_length(chunk), self._data_start + s * self.chunk_size)
        if m.digest_at(chunk) == ZERO_DIGEST or digest(data) != m.digest_at(chunk):
            log.warning("golden reserve slot %d for chunk %d does not match its digest: not used", s, chunk)
            return None
        return data

    def status(self) -> dict[str, int]:
        return {"reserve_slots": self.slots, "reserve_used": len(self._entries), "reserve_kept": self.kept,
                "reserve_full": self.full}

    def source(self, below: SourceFactory) -> SourceFactory:
        """The reserve as a layer over ``below`` (usually the repository): see ``ReserveSource``."""
        def make(m: Manifest, side: CacheSide) -> ChunkSource:
            return ReserveSource(below(m, side), self, side)
        return make


class ReserveSource(Filter):
    """The golden reserve as a layer: before a chunk's first overwrite its base content is copied
    here (``before_overwrite``: kept durably, its slot pinned until the overwrite is journaled);
    after a reset the chunk is served from its verified copy before the layer below is asked."""

    def __init__(self, below: ChunkSource, reserve: Reserve, side: CacheSide) -> None:
        super().__init__(below)
        self._reserve = reserve
        self._side = side
        self.from_reserve = 0  # chunks served from the reserve

    async def _local(self, indices: Sequence[int]) -> dict[int, Data]:
        m = self.below.manifest
        hits = [i for i in indices if self._reserve.holds(m, i)]
        if not hits:
            return {}

        def read() -> dict[int, Data]:
            got = {i: self._reserve.read(m, i) for i in hits}
            return {i: d for i, d in got.items() if d is not None}

        found = await asyncio.get_running_loop().run_in_executor(None, read)
        self.from_reserve += len(found)
        return found

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        found = await self._local(indices)
        if found:
            await self._side.store(list(found.items()))  # kept, as the repository source keeps what it fetched
        rest = [i for i in indices if i not in found]
        if rest:
            found.update(await self.below.get_many(rest))
        return found

    async def read(self, ranges: Ranges) -> list[ReadResult]:
        return await read_chunks(self, ranges)

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        found = await self._local(indices)
        if found:
            await self._side.store(list(found.items()))
        rest = [i for i in indices if i not in found]
        if rest:
            await self.below.materialize(rest, background=background)

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        """Their base content into the reserve, durably (the crash rules above), before the cache
        journals their change; pinned until the release. A reserve that fails is logged and
        skipped: the chunks' reset then needs the repository."""
        r = self._reserve
        below = await self.below.before_overwrite(chunks)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, r.keep, self.below.manifest, chunks, self._side.read_local, self._side.at_home)
        except OSError as e:
            r.unpin(chunks)
            log.warning("golden reserve %s: %s; chunks %d.. not kept", r.path, e, chunks[0])
            return below
        pinned = list(chunks)

        def release() -> None:
            r.unpin(pinned)
            if below is not None:
                below()

        return release

    def status(self) -> dict[str, Any]:
        return {**self.below.status(), **self._reserve.status()}
