"""The one interface every block device of an export implements (like nbdkit's plugin table).

The NBD server serves one ``BlockDevice`` per export. What stands behind it:

- an agent: a ``CacheDevice`` (cache/device.py), a lazy local cache of one image version whose
  missing chunks come from the repository through a ``Fetcher`` (cache/fetcher.py), its
  ``ChunkSource`` (cache/source.py): repository → cache → NBD server;
- a clones agent: per instance an *overlay*, which is a ``CacheDevice`` too, over a read-only base
  ``CacheDevice`` shared by the version's instances: repository → base cache → overlay → NBD
  server. The overlay is not a separate device class: it is a cache whose layer below is the
  base (cache/overlay.py), which answers its reads of untouched chunks with pieces of the base's
  data file instead of filling it;
- tests and the development NBD server (nbd/__main__.py): a ``MemoryDevice`` (device/memory.py), the
  reference device.

The repository and the chunk sources below the caches are not BlockDevices: they speak in chunks. The
NBD server validates range and flags before any device sees a request, so devices may assume
``0 <= offset``, ``offset + length <= size`` and ``length > 0``.

Errors are raised as ``blockprov.errors.DeviceError`` subclasses (each names its errno);
the NBD server maps them to NBD errors at the edge.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

# Flags of a block-status extent (identical to NBD's base:allocation flags).
STATE_HOLE = 1
STATE_ZERO = 2


class Extent(NamedTuple):
    length: int
    flags: int  # STATE_HOLE | STATE_ZERO


class FileSegment(NamedTuple):
    """Part of a read reply that lives in a file: the server may send it with ``os.sendfile``."""

    fd: int
    offset: int
    length: int


# A read result: pieces in order, together exactly ``length`` bytes.
ReadResult = list[bytes | memoryview | FileSegment]


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def min_block(self) -> int:
        """Smallest I/O granularity (advertised as NBD minimum block size)."""
        ...

    @property
    def preferred_block(self) -> int:
        """Advertised preferred block size: writes smaller than this cost a read-modify-write."""
        ...

    @property
    def can_multi_conn(self) -> bool:
        """True when a flush on any connection covers the writes of all connections."""
        ...

    async def read(self, offset: int, length: int) -> ReadResult: ...

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fua: bool = False, fast_only: bool = False) -> None:
        """Make the range read as zeros. With ``fast_only`` raise ``NotSupported`` unless it is
        cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO)."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advisory discard. blockprov's devices make trimmed ranges read as zeros."""
        ...

    async def flush(self) -> None:
        """Every write completed before this call is on stable storage when it returns."""
        ...

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation of [offset, offset+length): at least one extent, covering a prefix."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ImmediateReads(Protocol):
    """A device that can answer some reads without waiting: the NBD server's fast path.

    A cached read's reply costs a guest ~60 µs through the export against a few from a local
    file, and a boot makes thousands of them one at a time (issue 26), so the server answers a
    read the device has at hand in the callback that parsed it: no task, no coroutine, no hop
    through the loop (nbd/server.py). A device offers what needs nothing but a look at its own
    state; everything else keeps going through ``read``."""

    def read_now(self, offset: int, length: int) -> ReadResult | None:
        """What ``read(offset, length)`` would return, if it is at hand now (data in memory or
        in a local file; no fetch, no lock, no await), else None. It has the same side effects
        as ``read`` for a read it answers, and none that ``read`` would repeat for one it does not."""
        ...


def result_bytes(result: ReadResult) -> bytes:
    """Join a read result into bytes (tests and callers that do not sendfile)."""
    import os

    out = bytearray()
    for part in result:
        if isinstance(part, FileSegment):
            out += os.pread(part.fd, part.length, part.offset)
        else:
            out += part
    return bytes(out)
