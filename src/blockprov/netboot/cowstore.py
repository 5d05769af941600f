"""dm-snapshot's persistent exception store, read (pure): which chunks a session wrote.

Under ``restore`` the native data path (netboot/native.py) runs the machine on a dm-snapshot of
the image whose copy-on-write store holds every chunk the session wrote; the golden copy on the
data partition is never written. The store's table is the kernel's record of those writes: this
module reads it, for the console ("dropped N chunks") and for a policy change to ``keep`` (the
kernel merges the store back, netboot/native.py marks those chunks modified).

Format (Linux, drivers/md/dm-snap-persistent.c), in chunks of the snapshot's chunk size:

    chunk 0          header: magic "SnAp" (0x70416e53, LE), valid, version (1), chunk size (sectors)
    chunk 1          metadata area 0: exceptions_per_area = chunk bytes / 16 entries of
                     (old chunk, new chunk), both u64 LE
    chunks 2 …       the data chunks of area 0
    then             metadata area 1, its data chunks, …

An entry whose new chunk is 0 (chunk 0 is the header, never data) ends the table. The kernel
writes an exception's entry only after its data chunk is on disk, and completes the write that
caused it only after the entry is (a persistent snapshot survives a power cut), so the entries
read here name chunks whose copy is complete. ``valid`` is 0 once the snapshot overflowed (its
store filled up) or failed: the kernel then dropped it, and the table says only what was written
before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = 0x70416E53
HEADER = struct.Struct("<IIII")  # magic, valid, version, chunk size in sectors
ENTRY = struct.Struct("<QQ")  # old chunk, new chunk
SECTOR = 512


@dataclass(frozen=True)
class Store:
    """What a store holds: ``formatted`` False for a zeroed (new or dropped) store."""

    formatted: bool
    valid: bool = False
    chunk_sectors: int = 0
    chunks: tuple[int, ...] = ()  # the origin's chunks the session wrote, in the order written

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR


def read_store(header: bytes, read_chunk: Callable[[int], bytes], *, limit: int = 1 << 24) -> Store:
    """The store whose first bytes are ``header``; ``read_chunk(n)`` returns its chunk n (the
    caller's reads). ``limit`` bounds the entries read (a store is never that large: a corrupt
    one must not loop). Pure, given ``read_chunk``."""
    if len(header) < HEADER.size:
        return Store(formatted=False)
    magic, valid, _version, chunk_sectors = HEADER.unpack_from(header)
    if magic != MAGIC or chunk_sectors == 0 or chunk_sectors & (chunk_sectors - 1):
        return Store(formatted=False)
    per_area = chunk_sectors * SECTOR // ENTRY.size
    chunks: list[int] = []
    area = 0
    while len(chunks) < limit:
        raw = read_chunk(1 + area * (per_area + 1))
        for k in range(min(per_area, len(raw) // ENTRY.size)):
            old, new = ENTRY.unpack_from(raw, k * ENTRY.size)
            if new == 0:
                return Store(True, bool(valid), chunk_sectors, tuple(chunks))
            chunks.append(old)
        if len(raw) < per_area * ENTRY.size:
            break
        area += 1
    return Store(True, bool(valid), chunk_sectors, tuple(chunks))


def cache_chunks(store: Store, cache_chunk: int, count: int) -> list[int]:
    """The cache's chunks (of ``cache_chunk`` bytes; ``count`` of them) the store's chunks cover,
    sorted. Pure."""
    out: set[int] = set()
    cb = store.chunk_bytes
    for c in store.chunks:
        first, last = c * cb // cache_chunk, ((c + 1) * cb - 1) // cache_chunk
        out.update(i for i in range(first, last + 1) if i < count)
    return sorted(out)
