"""Overlays tested like caches: clones over one shared, read-only base cache (cache/overlay.py).

Several overlays of one version share a base cache; each overlay holds only what its instance
wrote. Checked here: writes land only in their own overlay; reads of untouched chunks come from
the base (fetched once for all overlays, not copied into any); a partial write copies its chunk
first; reset, trim and reopen of one overlay leave the others and the base untouched
(docs/architecture.md, invariant 5: a reset overlay reads as the base, byte for byte).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blockprov.cache import CacheDevice
from blockprov.device.base import result_bytes
from blockprov.errors import DeviceIOError, ReadOnlyDevice
from blockprov.manifest import Manifest
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.unit.test_cache_support import DictRepo, make_image

CS = 4096
CLONES = 3


async def read_all(dev: CacheDevice, offset: int = 0, length: int | None = None) -> bytes:
    return result_bytes(await dev.read(offset, dev.size - offset if length is None else length))


class Clones:
    """A base cache and ``CLONES`` overlays of it, opened as the clones agent opens them."""

    def __init__(self, root: Path, repo: DictRepo, m: Manifest) -> None:
        self.root, self.repo, self.m = root, repo, m
        self.base: CacheDevice | None = None
        self.overlays: list[CacheDevice] = []

    def dir(self, k: int) -> Path:
        return self.root / f"o{k}"

    async def create(self) -> None:
        base = await open_cache(self.root / "base", self.repo, self.m, read_only=True)
        await base.close()
        for k in range(CLONES):
            dev = await open_cache(self.dir(k), self.repo, self.m, base_cache=self.root / "base")
            await dev.close()

    async def open(self) -> None:
        self.base = await open_cache(self.root / "base", self.repo, create=False, read_only=True)
        self.overlays = [await self.open_overlay(k) for k in range(CLONES)]

    async def open_overlay(self, k: int) -> CacheDevice:
        return await open_cache(self.dir(k), self.repo, create=False, base=self.base)

    async def close(self) -> None:
        for dev in self.overlays:
            await dev.close()
        if self.base is not None:
            await self.base.close()


def clones_test(tmp_path: Path, body: Callable[[Clones, bytes], Awaitable[None]], *, chunks: int = 16,
                tail: int = 0) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=chunks, tail=tail)

    async def main() -> None:
        c = Clones(tmp_path, repo, m)
        await c.create()
        await c.open()
        try:
            await body(c, content)
        finally:
            await c.close()

    asyncio.run(main())


def test_writes_land_only_in_their_own_overlay(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        a, b, other = c.overlays
        assert c.base is not None
        await a.write(CS + 100, b"A" * 3000)
        await b.write(CS + 100, b"B" * 3000)
        await a.write(5 * CS, b"a" * (2 * CS))  # whole chunks
        await a.flush()
        await b.flush()
        want_a = bytearray(content)
        want_a[CS + 100:CS + 3100] = b"A" * 3000
        want_a[5 * CS:7 * CS] = b"a" * (2 * CS)
        want_b = bytearray(content)
        want_b[CS + 100:CS + 3100] = b"B" * 3000
        assert await read_all(a) == want_a
        assert await read_all(b) == want_b
        assert await read_all(other) == content
        assert await read_all(c.base) == content
        assert [i for i in range(c.m.count) if a.chunks.modified(i)] == [1, 5, 6]
        assert [i for i in range(c.m.count) if b.chunks.modified(i)] == [1]
        assert not any((other.chunks.present(i) or other.chunks.modified(i)) for i in range(c.m.count))
        assert not any(c.base.chunks.modified(i) for i in range(c.m.count))

    clones_test(tmp_path, body)


def test_untouched_chunks_are_read_from_the_base_fetched_once_and_not_copied(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        assert c.base is not None
        a, b, _ = c.overlays
        assert await read_all(a) == content
        await c.base.settle()
        fetched = c.repo.chunks_requested()
        assert fetched > 0
        assert await read_all(b) == content  # the base holds every chunk now: no fetch
        assert c.repo.chunks_requested() == fetched
        for dev in c.overlays:
            assert not any(dev.chunks.present(i) for i in range(c.m.count))
            st = to_dict(dev.status())
            assert st["chunks_present"] == 0 and st["bytes_fetched"] == 0
            assert st["base_cache"] == str((c.root / "base").resolve())
            assert dev.fetch_stats is None  # an overlay fetches nothing from the repository
        assert all(c.base.chunks.local(i) for i in range(c.m.count))
        assert c.base.fetch_stats is not None and c.base.fetch_stats.chunks_fetched > 0

    clones_test(tmp_path, body, tail=1536)


def test_partial_write_copies_the_chunk_from_the_base_first(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        a = c.overlays[0]
        assert c.base is not None
        await a.write(2 * CS + 100, b"p" * 50)
        assert a.chunks.present(2) and a.chunks.modified(2)
        with open(c.dir(0) / "data", "rb") as f:  # the overlay's own copy: old bytes around the new
            f.seek(2 * CS)
            own = f.read(CS)
        want = bytearray(content[2 * CS:3 * CS])
        want[100:150] = b"p" * 50
        assert own == want
        assert await read_all(a, 2 * CS, CS) == want
        assert await read_all(c.base, 2 * CS, CS) == content[2 * CS:3 * CS]
        # a partial write of a base zero chunk needs no copy: the overlay writes it whole
        await a.write(3 * CS + 10, b"z" * 10)
        want_z = bytearray(CS)
        want_z[10:20] = b"z" * 10
        assert await read_all(a, 3 * CS, CS) == want_z

    clones_test(tmp_path, body)


def test_whole_chunk_writes_do_not_touch_the_base_or_the_repository(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        assert c.base is not None
        c.repo.unreachable = True
        a = c.overlays[0]
        await a.write(4 * CS, b"w" * (3 * CS))
        assert await read_all(a, 4 * CS, 3 * CS) == b"w" * (3 * CS)
        assert c.repo.call_count == 0
        assert not any(c.base.chunks.present(i) for i in range(c.m.count))

    clones_test(tmp_path, body)


def test_reset_of_one_overlay_leaves_the_others_untouched(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        a, b, other = c.overlays
        for k, dev in enumerate(c.overlays):
            await dev.write(k * CS + 7, bytes([0x41 + k]) * 5000)
        await b.trim(10 * CS, 2 * CS)
        wants = [await read_all(dev) for dev in c.overlays]
        assert all(w != content for w in wants)
        calls = c.repo.call_count
        out = to_dict(await b.reset_chunks(eager=True))  # eager: an overlay has nothing to fetch back
        assert out["chunks_reset"] > 0 and out["chunks_refetched"] == 0
        assert c.repo.call_count == calls
        await b.settle()
        assert await read_all(b) == content
        assert not any(b.chunks.modified(i) for i in range(c.m.count))
        assert await read_all(a) == wants[0]
        assert await read_all(other) == wants[2]
        # the reset survives a reopen, and so do the others' writes
        for dev in c.overlays:
            await dev.flush()
        for k in range(CLONES):
            await c.overlays[k].close()
            c.overlays[k] = await c.open_overlay(k)
        assert [await read_all(dev) for dev in c.overlays] == [wants[0], content, wants[2]]

    clones_test(tmp_path, body)


def test_trim_in_an_overlay_reads_zeros_there_only(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        a, b, _ = c.overlays
        assert c.base is not None
        await a.trim(CS, 2 * CS)
        await a.write_zeroes(6 * CS + 5, 100)
        want = bytearray(content)
        want[CS:3 * CS] = bytes(2 * CS)
        want[6 * CS + 5:6 * CS + 105] = bytes(100)
        assert await read_all(a) == want
        assert await read_all(b) == content
        assert await read_all(c.base) == content

    clones_test(tmp_path, body)


def test_the_base_is_read_only_and_an_overlay_without_it_fails_base_reads(tmp_path: Path) -> None:
    async def body(c: Clones, content: bytes) -> None:
        assert c.base is not None
        with pytest.raises(ReadOnlyDevice):
            await c.base.write(0, b"x" * 10)
        a = c.overlays[0]
        await a.write(0, b"o" * CS)
        await a.flush()
        await a.close()
        # reset and snapshot of a stopped instance open the overlay without its base
        alone = await open_cache(c.dir(0), c.repo, create=False)
        c.overlays[0] = alone
        assert await read_all(alone, 0, CS) == b"o" * CS  # its own chunk
        with pytest.raises(DeviceIOError):
            await read_all(alone, CS, CS)  # the base's
        with pytest.raises(DeviceIOError):
            await alone.write(CS + 1, b"x")  # a partial write would need the base's copy
        assert to_dict(alone.status())["chunks_modified"] == 1

    clones_test(tmp_path, body)
