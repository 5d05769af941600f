"""A sparse in-memory BlockDevice: the reference device for tests and property tests.

Pages of 64 KiB live in a dict: a missing page is a hole that reads as zeros
(``STATE_HOLE | STATE_ZERO``), a page zeroed with ``may_trim=False`` stays allocated and reads as
zeros (``STATE_ZERO``), any other page holds data (flags 0). Trim and write_zeroes make ranges read
as zeros; whole pages are dropped (or marked allocated-zero), partial pages are zeroed in place.

Every operation runs without awaiting, so each one is atomic with respect to the others. Reads
return snapshots without copying: views of pages that are copied on the next write to them
(copy-on-write, tracked per page), or of one shared immutable zero page. So a caller holding a
read result never sees later writes, and a READ reply costs no copy in Python.
"""

from __future__ import annotations

from blockprov.align import is_power_of_two, split
from blockprov.device.base import STATE_HOLE, STATE_ZERO, Extent, ReadResult
from blockprov.errors import InvalidRequest, NotSupported, ReadOnlyDevice

PAGE = 64 * 1024
_ZERO_PAGE = bytes(PAGE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)
_ALLOCATED_ZERO = None  # value of an allocated page that reads as zeros


class MemoryDevice:
    def __init__(self, size: int, min_block: int = 512, preferred: int = 4096, read_only: bool = False,
                 *, can_multi_conn: bool = True, fast_zero: bool = True) -> None:
        """``fast_zero=False`` makes ``write_zeroes(fast_only=True)`` raise ``NotSupported``
        (to exercise NBD_CMD_FLAG_FAST_ZERO)."""
        if size < 0:
            raise ValueError("size must not be negative")
        if not is_power_of_two(min_block) or not is_power_of_two(preferred) or preferred < min_block:
            raise ValueError("block sizes must be powers of two with preferred >= min_block")
        if size % min_block:
            raise ValueError(f"size {size} is not a multiple of min_block {min_block}")
        self._size = size
        self._min_block = min_block
        self._preferred = preferred
        self._read_only = read_only
        self._can_multi_conn = can_multi_conn
        self._fast_zero = fast_zero
        self._pages: dict[int, bytearray | None] = {}
        self._shared: set[int] = set()  # pages a read result may still view: copy before writing
        self.closed = False
        self.flushes = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def min_block(self) -> int:
        return self._min_block

    @property
    def preferred_block(self) -> int:
        return self._preferred

    @property
    def can_multi_conn(self) -> bool:
        return self._can_multi_conn

    @property
    def allocated_pages(self) -> int:
        """Pages that hold data (for tests of sparseness)."""
        return sum(1 for p in self._pages.values() if p is not None)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidRequest(f"range [{offset}, +{length}) outside a device of {self._size} bytes")

    def _check_write(self, offset: int, length: int) -> None:
        if self._read_only:
            raise ReadOnlyDevice()
        self._check(offset, length)

    async def read(self, offset: int, length: int) -> ReadResult:
        return self.read_now(offset, length)

    def read_now(self, offset: int, length: int) -> ReadResult:
        """Every read is at hand (device/base.py ``ImmediateReads``: the NBD server's fast path)."""
        self._check(offset, length)
        out: ReadResult = []
        pages = self._pages
        for piece in split(offset, length, PAGE):
            page = pages.get(piece.chunk)
            if page is None:
                out.append(_ZERO_VIEW[:piece.length])
            else:
                out.append(memoryview(page)[piece.start:piece.start + piece.length])
                self._shared.add(piece.chunk)
        return out

    def _writable(self, chunk: int) -> bytearray | None:
        """The page to modify in place (copied first if a read result may view it)."""
        page = self._pages.get(chunk)
        if page is not None and chunk in self._shared:
            self._shared.discard(chunk)
            page = self._pages[chunk] = bytearray(page)
        return page

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        pages = self._pages
        pos = 0
        for piece in split(offset, len(view), PAGE):
            if piece.whole:
                pages[piece.chunk] = bytearray(view[pos:pos + PAGE])
                self._shared.discard(piece.chunk)
                pos += PAGE
                continue
            page = self._writable(piece.chunk)
            if page is None:
                page = pages[piece.chunk] = bytearray(PAGE)
            page[piece.start:piece.start + piece.length] = view[pos:pos + piece.length]
            pos += piece.length

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fua: bool = False, fast_only: bool = False) -> None:
        self._check_write(offset, length)
        if fast_only and not self._fast_zero:
            raise NotSupported("fast zeroing is not supported by this device")
        self._zero(offset, length, may_trim)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length)
        self._zero(offset, length, True)

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        pages = self._pages
        for piece in split(offset, length, PAGE):
            if piece.whole:
                if punch:
                    pages.pop(piece.chunk, None)
                else:
                    pages[piece.chunk] = _ALLOCATED_ZERO
                self._shared.discard(piece.chunk)
                continue
            page = self._writable(piece.chunk)
            if page is None:
                continue  # a hole or an allocated zero page already reads as zeros
            page[piece.start:piece.start + piece.length] = _ZERO_VIEW[:piece.length]
            if page == _ZERO_PAGE:
                if punch:
                    del pages[piece.chunk]
                else:
                    pages[piece.chunk] = _ALLOCATED_ZERO

    async def flush(self) -> None:
        self.flushes += 1

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        out: list[Extent] = []
        pages = self._pages
        for piece in split(offset, length, PAGE):
            if piece.chunk not in pages:
                flags = STATE_HOLE | STATE_ZERO
            elif pages[piece.chunk] is None:
                flags = STATE_ZERO
            else:
                flags = 0
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + piece.length, flags)
            else:
                out.append(Extent(piece.length, flags))
        return out

    async def close(self) -> None:
        self.closed = True
