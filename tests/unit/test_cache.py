"""cache/device.py: the lazy, crash-safe cache as a BlockDevice."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.cache import CacheDevice, CacheSide, Data, Release, load_state, read_chunks
from blockprov.device.base import STATE_HOLE, STATE_ZERO, BlockDevice, FileSegment, ReadResult, result_bytes
from blockprov.errors import CacheError, CacheLocked, CacheMismatch, DeviceIOError, NotSupported, ReadOnlyDevice
from blockprov.manifest import Manifest, build
from blockprov.repo.local import LocalRepository
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.unit.test_cache_support import DictRepo, make_image

CS = 4096


async def read_all(dev: CacheDevice, offset: int = 0, length: int | None = None) -> bytes:
    return result_bytes(await dev.read(offset, dev.size - offset if length is None else length))


def can_punch(d: Path) -> bool:
    """The file system under ``d`` frees the blocks of a punched hole (fallocate(1), util-linux)."""
    probe = d / "punch-probe"
    probe.write_bytes(b"x" * (1 << 16))
    ok = subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(1 << 16), str(probe)],
                        capture_output=True).returncode == 0
    probe.unlink()
    return ok


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_reads_fetch_once_and_survive_reopen_without_refetch(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=32, tail=1536)

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, m)
        assert isinstance(dev, BlockDevice)
        assert dev.can_multi_conn and dev.min_block == 512 and dev.preferred_block == CS
        assert await read_all(dev) == content
        assert await read_all(dev) == content
        await dev.settle()
        calls = repo.call_count
        st = to_dict(dev.status())
        assert st["chunks_present"] + st["chunks_zero"] == st["chunks_total"] == 33
        assert st["bytes_fetched"] > 0 and st["fetch_latency_ms"]["p50"] is not None
        await dev.close()
        dev = await open_cache(tmp_path / "c", repo, m)
        assert await read_all(dev) == content
        assert repo.call_count == calls
        await dev.close()

    run(main())


def test_present_reads_are_file_segments_and_zero_reads_do_no_io(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8, zero_every=4)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        await dev.read(0, 3 * CS)
        await dev.flush()
        await asyncio.sleep(0.01)
        res = await dev.read(100, 2 * CS)
        assert len(res) == 1 and isinstance(res[0], FileSegment)
        assert result_bytes(res) == content[100:100 + 2 * CS]
        calls = repo.call_count
        res = await dev.read(3 * CS + 8, 100)  # chunk 3 is a zero chunk of the base
        assert not isinstance(res[0], FileSegment) and result_bytes(res) == bytes(100)
        assert repo.call_count == calls
        await dev.close()

    run(main())


def test_writes_trim_zero_read_back_and_persist(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=16, tail=512)
    model = bytearray(content)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        await dev.write(100, b"a" * 5000)  # partial writes into two missing chunks
        model[100:5100] = b"a" * 5000
        await dev.write(4 * CS, b"b" * (2 * CS))  # whole chunks: no fetch needed
        model[4 * CS:6 * CS] = b"b" * (2 * CS)
        await dev.trim(8 * CS, 2 * CS)
        model[8 * CS:10 * CS] = bytes(2 * CS)
        await dev.write(8 * CS + 10, b"c" * 10)  # partial write into a trimmed chunk
        model[8 * CS + 10:8 * CS + 20] = b"c" * 10
        await dev.write_zeroes(11 * CS + 7, 3000)  # partial zeroing
        model[11 * CS + 7:11 * CS + 3007] = bytes(3000)
        await dev.write(dev.size - 100, b"d" * 100)  # the short last chunk
        model[-100:] = b"d" * 100
        assert await read_all(dev) == bytes(model)
        await dev.flush()
        await dev.close()
        dev = await open_cache(tmp_path, repo)
        assert await read_all(dev) == bytes(model)
        st = to_dict(dev.status())
        assert st["chunks_modified"] >= 6
        await dev.close()

    run(main())


def test_whole_chunk_write_needs_no_fetch(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=8, zero_every=0, dup_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        await dev.write(2 * CS, b"w" * (3 * CS))
        assert repo.call_count == 0
        assert await read_all(dev, 2 * CS, 3 * CS) == b"w" * (3 * CS)
        ch = dev.chunks
        assert all(ch.present(i) and ch.modified(i) for i in (2, 3, 4))
        await dev.close()

    run(main())


def test_partial_write_fetch_is_coalesced_with_reads(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8, zero_every=0, dup_every=0)
    repo.delay = 0.05

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        reads = [asyncio.ensure_future(dev.read(5 * CS, CS)) for _ in range(5)]
        await asyncio.sleep(0.01)
        await dev.write(5 * CS + 100, b"x" * 10)
        got = [result_bytes(await r) for r in reads]
        assert all(g == content[5 * CS:6 * CS] for g in got)
        assert repo.call_count == 1
        expect = bytearray(content[5 * CS:6 * CS])
        expect[100:110] = b"x" * 10
        assert await read_all(dev, 5 * CS, CS) == bytes(expect)
        await dev.close()

    run(main())


def test_concurrent_writes_into_one_missing_or_zero_chunk_all_land(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8, zero_every=2, dup_every=0)
    repo.delay = 0.02
    model = bytearray(content)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        await dev.trim(4 * CS, CS)  # chunk 4: trimmed; chunk 1: zero in the base; chunk 2: missing
        model[4 * CS:5 * CS] = bytes(CS)
        ops = []
        for c in (1, 2, 4):
            for k in range(8):
                off = c * CS + k * 512
                data = bytes([c * 16 + k]) * 512
                model[off:off + 512] = data
                ops.append(dev.write(off, data))
        random.Random(3).shuffle(ops)
        await asyncio.gather(*ops)
        assert await read_all(dev) == bytes(model)
        await dev.close()
        dev = await open_cache(tmp_path, repo)
        assert await read_all(dev) == bytes(model)
        await dev.close()

    run(main())


def test_extents_and_fast_zero(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=8, zero_every=4)  # chunks 3 and 7 are zero

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        ext = await dev.extents(0, dev.size)
        assert [(e.length, e.flags) for e in ext] == [
            (3 * CS, 0), (CS, STATE_HOLE | STATE_ZERO), (3 * CS, 0), (CS, STATE_HOLE | STATE_ZERO)]
        assert sum(e.length for e in await dev.extents(100, 5000)) == 5000
        await dev.write_zeroes(0, CS, fast_only=True)  # whole chunk: cheap
        with pytest.raises(NotSupported):
            await dev.write_zeroes(CS + 512, 512, fast_only=True)
        ext = await dev.extents(0, 2 * CS)
        assert (ext[0].length, ext[0].flags) == (CS, STATE_HOLE | STATE_ZERO)
        assert await read_all(dev, 0, CS) == bytes(CS)
        await dev.close()

    run(main())


def test_trim_punches_holes(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=64, zero_every=0, dup_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        await dev.read(0, dev.size)
        await dev.flush()
        await asyncio.sleep(0.05)
        before = os.stat(tmp_path / "data").st_blocks
        await dev.trim(0, 32 * CS)
        after = os.stat(tmp_path / "data").st_blocks
        assert after < before or not can_punch(tmp_path)
        await dev.close()

    run(main())


def test_other_version_is_refused(tmp_path: Path) -> None:
    repo = DictRepo()
    m1, _ = make_image(repo, chunks=8, seed=1)
    m2, _ = make_image(repo, chunks=8, seed=2)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m1)
        await dev.close()
        with pytest.raises(CacheMismatch, match=m1.id) as e:
            await open_cache(tmp_path, repo, m2)
        assert m2.id in str(e.value)
        dev = await open_cache(tmp_path, repo, m1)  # still fine, and unlocked after refusal
        await dev.close()

    run(main())


def test_second_agent_is_refused_with_holder_pid(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _ = make_image(repo, chunks=8)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        with pytest.raises(CacheLocked, match=f"pid {os.getpid()}"):
            await open_cache(tmp_path, repo, m)
        await dev.close()
        dev = await open_cache(tmp_path, repo, m)
        await dev.close()

    run(main())


def test_reopen_works_offline_from_stored_manifest(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        await dev.read(0, dev.size)
        await dev.close()
        offline = DictRepo()
        offline.unreachable = True
        dev = await open_cache(tmp_path, offline)
        assert dev.manifest.id == m.id
        assert await read_all(dev) == content
        await dev.close()
        (tmp_path / "manifest.json").unlink()  # without the copy, the repository is asked
        dev = await open_cache(tmp_path, repo)
        assert dev.manifest.id == m.id and (tmp_path / "manifest.json").exists()
        await dev.close()

    run(main())


def test_empty_cache_without_manifest_is_an_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(CacheError, match="no cache"):
            await open_cache(tmp_path, DictRepo())

    run(main())


def test_read_only_and_closed(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=4)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, read_only=True)
        assert dev.read_only
        with pytest.raises(ReadOnlyDevice):
            await dev.write(0, b"x" * 512)
        with pytest.raises(ReadOnlyDevice):
            await dev.trim(0, CS)
        assert await read_all(dev) == content
        await dev.close()
        with pytest.raises(DeviceIOError):
            await dev.read(0, 512)

    run(main())


def test_unreachable_repository_gives_eio_and_keeps_serving(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8, zero_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, fetch_timeout=0.3, readahead=0)
        await dev.read(0, CS)
        await dev.flush()
        repo.unreachable = True
        with pytest.raises(DeviceIOError):
            await dev.read(3 * CS, 512)
        with pytest.raises(DeviceIOError):
            await dev.write(3 * CS + 5, b"x")  # partial write needs the chunk
        assert await read_all(dev, 0, CS) == content[:CS]  # present data still served
        await dev.write(6 * CS, b"y" * CS)  # whole chunk: no repository needed
        repo.unreachable = False
        assert await read_all(dev, 3 * CS, CS) == content[3 * CS:4 * CS]
        await dev.close()

    run(main())


def test_corrupt_chunk_is_not_served_nor_stored(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=8, zero_every=0, dup_every=0)
    repo.corrupt(m.digest_at(2))

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        with pytest.raises(DeviceIOError, match="verification"):
            await dev.read(2 * CS, CS)
        await dev.read(0, CS)
        await dev.flush()
        await asyncio.sleep(0.01)
        assert not dev.chunks.present(2)
        await dev.close()

    run(main())


def test_unclean_stop_reverifies_recent_fills(tmp_path: Path) -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=8, zero_every=0, dup_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        await dev.read(0, 4 * CS)
        await asyncio.sleep(0.05)
        await dev.flush()  # the present records are durable in the journal
        # Simulate a crash: drop the device without close (lock released by closing its fd).
        await dev.abandon()
        assert not load_state(tmp_path).clean
        # Damage chunk 1 behind the cache's back.
        with open(tmp_path / "data", "r+b") as f:
            f.seek(CS + 10)
            f.write(b"garbage")
        dev = await open_cache(tmp_path, repo)
        assert dev.verified_chunks == 4 and dev.dropped_chunks == 1
        assert not dev.chunks.present(1)
        assert await read_all(dev, 0, 4 * CS) == content[:4 * CS]
        await dev.close()
        assert load_state(tmp_path).clean

    run(main())


def test_external_data_file(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=8)
    data = tmp_path / "disk.img"

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", repo, m, data_path=data)
        await dev.write(0, b"e" * 1000)
        await dev.close()
        assert not (tmp_path / "c" / "data").exists()
        assert data.read_bytes()[:1000] == b"e" * 1000
        dev = await open_cache(tmp_path / "c", repo)
        assert dev.data_path == data.resolve()
        await dev.close()
        with pytest.raises(CacheError, match="keeps its data"):
            await open_cache(tmp_path / "c", repo, data_path=tmp_path / "other.img")

    run(main())


def test_journal_checkpoints_automatically(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=64, zero_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, checkpoint_records=8, readahead=0)
        for i in range(0, 64, 2):
            await dev.write(i * CS + 1, b"z")
        await asyncio.sleep(0.05)
        assert load_state(tmp_path).loaded.meta.seq > 0
        await dev.close()

    run(main())


def test_with_local_repository(tmp_path: Path) -> None:
    lrepo = LocalRepository(tmp_path / "repo")
    rnd = random.Random(5)
    parts = [rnd.randbytes(CS) if i % 3 else bytes(CS) for i in range(24)]
    ids = []
    for p in parts:
        cid = codec.ZERO_DIGEST if codec.is_zero(p) else codec.digest(p)
        if cid != codec.ZERO_DIGEST:
            lrepo.put_blobs([(cid, codec.encode(p))])
        ids.append(cid)
    m = build("lab", len(parts) * CS, CS, ids)
    lrepo.commit(m)
    content = b"".join(parts)

    async def main() -> None:
        dev = await open_cache(tmp_path / "c", lrepo, m)
        assert await read_all(dev) == content
        await dev.close()
        (tmp_path / "c" / "manifest.json").unlink()
        dev = await open_cache(tmp_path / "c", lrepo)  # resolved by NAME@ID
        assert await read_all(dev) == content
        await dev.close()

    try:
        run(main())
    finally:
        lrepo.close()


def test_flags_after_operations_match_states(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _content = make_image(repo, chunks=8, zero_every=0)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m, readahead=0)
        await dev.read(0, CS)
        await dev.trim(CS, CS)
        await dev.write(2 * CS, b"q" * CS)
        await dev.flush()
        await asyncio.sleep(0.01)
        ch = dev.chunks
        assert ch.present(0) and not ch.modified(0)
        assert ch.zero(1) and ch.modified(1) and not ch.present(1)
        assert ch.present(2) and ch.modified(2)
        assert not (ch.present(3) or ch.modified(3) or ch.zero(3) or ch.held(3))
        await dev.close()

    run(main())


def test_missing_data_file_is_refused_not_recreated(tmp_path: Path) -> None:
    repo = DictRepo()
    m, _ = make_image(repo, chunks=4)

    async def main() -> None:
        dev = await open_cache(tmp_path, repo, m)
        await dev.read(0, dev.size)
        await dev.close()
        (tmp_path / "data").unlink()
        with pytest.raises(CacheError, match="start over"):
            await open_cache(tmp_path, repo)

    run(main())


class ContentSource:
    """The smallest ChunkSource (cache/source.py): chunks from a bytes object, no repository."""

    stats = None

    def __init__(self, content: bytes, m: Manifest, side: CacheSide) -> None:
        self.content, self.manifest, self._side = content, m, side
        self.asked: list[int] = []

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        self.asked += indices
        cs = self.manifest.chunk_size
        return {i: self.content[i * cs:i * cs + self.manifest.chunk_length(i)] for i in indices}

    async def read(self, ranges: Sequence[tuple[int, int]]) -> list[ReadResult]:
        return await read_chunks(self, ranges)

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        await self._side.store(sorted((await self.get_many(indices)).items()))

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        return None

    def maps_below(self) -> list[object]:
        return []

    def status(self) -> dict[str, object]:
        return {}

    async def idle(self) -> None:
        pass

    async def close(self) -> None:
        pass


def test_the_layer_below_is_passed_in(tmp_path: Path) -> None:
    """A cache reads missing chunks from whatever source it is given; the repository is not asked."""
    repo = DictRepo()
    m, content = make_image(repo, chunks=8)
    repo.unreachable = True
    sources: list[ContentSource] = []

    def source(manifest: Manifest, side: CacheSide) -> ContentSource:
        sources.append(ContentSource(content, manifest, side))
        return sources[-1]

    async def main() -> None:
        dev = await CacheDevice.open(tmp_path, source, m)  # type: ignore[arg-type]
        assert await read_all(dev) == content
        await dev.write(CS + 10, b"x" * 10)  # partial: the chunk is materialized from the source first
        want = bytearray(content)
        want[CS + 10:CS + 20] = b"x" * 10
        assert await read_all(dev) == want
        st = to_dict(dev.status())
        assert st["chunks_modified"] == 1 and st["bytes_fetched"] == 0 and dev.fetch_stats is None
        await dev.close()

    run(main())
    assert repo.call_count == 0 and 1 in sources[0].asked


def test_offline_status_is_the_live_status_of_a_stopped_cache(tmp_path: Path) -> None:
    """``blockprov status`` of a cache no agent serves shows what a serving agent shows (one builder)."""
    from blockprov.agent.agent import offline_status

    repo = DictRepo()
    m, _content = make_image(repo, chunks=16)

    async def main() -> dict[str, object]:
        dev = await open_cache(tmp_path, repo, m)
        await dev.read(0, 6 * CS)
        await dev.write(9 * CS + 1, b"w" * 100)
        await dev.trim(12 * CS, CS)
        await dev.settle()
        live = to_dict(dev.status())
        await dev.close()
        return live

    live = asyncio.run(main())
    offline = to_dict(offline_status(tmp_path))
    assert offline.pop("agent") == {"running": False} and offline.pop("clean_shutdown") is True
    assert offline == {k: live[k] for k in offline}
    assert offline["chunks_modified"] == 2 and offline["totals"]["chunks_fetched"] > 0  # type: ignore[index]
