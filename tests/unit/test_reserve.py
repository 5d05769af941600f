"""cache/reserve.py: the golden reserve — base content kept before the first overwrite, served back
after a reset with the repository away; bounded, verified, never serving modified data as pristine."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blockprov.cache import CacheDevice, Reserve
from blockprov.cache.reserve import BLOCK, ENTRY, parse_record, record, slots_for  # the region's format
from blockprov.device.base import result_bytes
from blockprov.errors import DeviceIOError
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.unit.test_cache_support import DictRepo, make_image

CS = 4096


def region(path: Path, slots: int, cs: int = CS) -> Path:
    """A reserve file with room for exactly ``slots`` chunks."""
    size = BLOCK + (slots * ENTRY + BLOCK - 1) // BLOCK * BLOCK + slots * cs
    with open(path, "wb") as f:
        f.truncate(size)
    assert slots_for(size, cs) == slots
    return path


async def read(dev: CacheDevice, offset: int, length: int) -> bytes:
    return result_bytes(await dev.read(offset, length))


def test_geometry_and_records_are_pure() -> None:
    assert slots_for(BLOCK, CS) == 0
    assert slots_for(BLOCK + BLOCK + 3 * CS, CS) == 3
    assert slots_for(1 << 30, 65536) == 16367  # 1 GiB: 4 KiB header, 1 MiB table
    raw = record(7, b"d" * 32)
    assert len(raw) == ENTRY and parse_record(raw) == (7, b"d" * 32)
    torn = raw[:20] + bytes(ENTRY - 20)
    assert parse_record(torn) is None and parse_record(bytes(ENTRY)) is None


def test_restore_needs_no_repository_when_the_reserve_kept_every_chunk(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=32, zero_every=4)

    async def main() -> None:
        reserve = Reserve.open(region(tmp_path / "reserve", 16))
        dev = await open_cache(tmp_path / "c", repo, m, fetch_timeout=0.3, readahead=0, reserve=reserve)
        assert await read(dev, 0, m.size) == content  # hydrated
        # a session: partial and whole-chunk writes, a trim, a write into a zero chunk
        await dev.write(1 * CS + 10, b"x" * 100)
        await dev.write(2 * CS, b"y" * (2 * CS))  # chunks 2, 3 (3 is a zero chunk: nothing to keep)
        await dev.write(5 * CS + CS - 1, b"zz")  # across chunks 5 and 6
        await dev.trim(8 * CS, CS)
        await dev.write(1 * CS, b"again")  # chunk 1 again: kept once
        await dev.flush()
        assert reserve.kept == 5 and reserve.full == 0  # chunks 1, 2, 5, 6, 8
        repo.unreachable = True
        calls = repo.call_count
        done = to_dict(await dev.reset_chunks())
        assert done["chunks_reset"] >= 5
        assert await read(dev, 0, m.size) == content  # pristine, offline
        assert repo.call_count == calls
        await dev.close()
        # a new process: the records are read back from the region; next session's first writes
        # to the same chunks find their copies there and copy nothing
        reserve.close()
        reserve = Reserve.open(tmp_path / "reserve")
        dev = await open_cache(tmp_path / "c", repo, m, fetch_timeout=0.3, readahead=0, reserve=reserve)
        await dev.write(1 * CS + 10, b"x" * 100)
        assert reserve.kept == 0
        await dev.reset_chunks()
        assert await read(dev, CS, CS) == content[CS:2 * CS]
        await dev.close()
        reserve.close()

    asyncio.run(main())


def test_a_full_reserve_falls_back_to_the_repository_and_offline_fails_with_eio(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=16, zero_every=0, dup_every=0)

    async def main() -> None:
        reserve = Reserve.open(region(tmp_path / "reserve", 2))
        dev = await open_cache(tmp_path / "c", repo, m, fetch_timeout=0.3, readahead=0, reserve=reserve)
        assert await read(dev, 0, m.size) == content
        for c in (3, 4, 5, 6):
            await dev.write(c * CS, b"user data")
        assert reserve.kept == 2 and reserve.full == 2
        assert to_dict(dev.status())["reserve_full"] == 2 and to_dict(dev.status())["reserve_slots"] == 2
        await dev.reset_chunks()
        await dev.settle()  # the reset's hole punching done: what is read back is kept again
        repo.unreachable = True
        # offline: the kept chunks come back pristine; the others are never served as they were
        # modified, nor as pristine: EIO after the fetch timeout
        assert await read(dev, 3 * CS, 2 * CS) == content[3 * CS:5 * CS]
        for c in (5, 6):
            with pytest.raises(DeviceIOError):
                await dev.read(c * CS, CS)
        # online again: fetched
        repo.unreachable = False
        assert await read(dev, 5 * CS, 2 * CS) == content[5 * CS:7 * CS]
        # chunks 3, 4 are at home again: their slots may be given to the next session's chunks
        await dev.write(9 * CS, b"u")
        await dev.write(10 * CS, b"v")
        assert reserve.full == 2 and reserve.kept == 4
        await dev.close()
        reserve.close()

    asyncio.run(main())


def test_a_reset_chunk_keeps_its_copy_until_restored_and_a_bad_copy_is_not_served(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=16, zero_every=0, dup_every=0)

    async def main() -> None:
        path = region(tmp_path / "reserve", 2)
        reserve = Reserve.open(path)
        dev = await open_cache(tmp_path / "c", repo, m, fetch_timeout=0.3, readahead=0, reserve=reserve)
        assert await read(dev, 0, m.size) == content
        await dev.write(1 * CS, b"a")
        await dev.write(2 * CS, b"b")
        await dev.reset_chunks()  # 1 and 2 are missing now: their copies are the only local ones
        await dev.write(7 * CS, b"c")  # no slot may be taken from them
        assert reserve.full == 1
        # a copy damaged on the disk (a torn slot) is caught by its digest and not served
        data_start = BLOCK + BLOCK
        s = next(s for s in range(2) if parse_record(os.pread(reserve._fd, ENTRY, BLOCK + s * ENTRY))[0] == 2)
        with open(path, "r+b") as f:
            f.seek(data_start + s * CS + 100)
            f.write(b"rot")
        repo.unreachable = True
        assert await read(dev, 1 * CS, CS) == content[CS:2 * CS]
        with pytest.raises(DeviceIOError):
            await dev.read(2 * CS, CS)
        repo.unreachable = False
        assert await read(dev, 2 * CS, CS) == content[2 * CS:3 * CS]
        assert dev.chunks.modified(7)
        await dev.close()
        reserve.close()

    asyncio.run(main())


def test_a_new_chunk_size_reformats_the_region(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _ = make_image(repo, chunks=8, zero_every=0, chunk_size=CS)
    big, _ = make_image(repo, chunks=4, zero_every=0, chunk_size=2 * CS, image="other", seed=2)
    path = region(tmp_path / "reserve", 4)
    r = Reserve.open(path)
    chunks = {i: bytes([i]) * CS for i in range(8)}
    assert r.keep(m, [0, 1], chunks.__getitem__, lambda c: True) == 2
    r.unpin([0, 1])
    assert r.holds(m, 0) and r.chunk_size == CS
    assert r.keep(big, [0], lambda i: b"q" * 2 * CS, lambda c: True) == 1
    assert r.chunk_size == 2 * CS and not r.holds(m, 0) and r.slots == slots_for(r.size, 2 * CS)
    r.close()
