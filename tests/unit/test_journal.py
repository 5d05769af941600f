"""cache/journal.py: records, replay (torn tail, corrupt record, gaps), metadata, group commit,
checkpoint crash windows."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from blockprov.cache import journal as jn
from blockprov.cache.journal import (
    JOURNAL_HEADER_SIZE,
    JOURNAL_NAME,
    META_NAME,
    RECORD_SIZE,
    CacheMeta,
    CacheState,
    GroupSync,
    encode_meta,
    load,
)
from blockprov.cache.maps import MODIFIED, PRESENT, ZERO, ChunkMap, Kind
from blockprov.durable import atomic_write
from blockprov.errors import CacheError, DeviceIOError

N = 64


def new_state(d: Path) -> CacheState:
    meta = CacheMeta(image="lab", version="0123456789abcdef", manifest_digest="00" * 32,
                     chunk_size=4096, size=N * 4096, count=N)
    return CacheState.create(d, meta, ChunkMap(N))


def journal_bytes(d: Path) -> bytes:
    return (d / JOURNAL_NAME).read_bytes()


async def fill(st: CacheState, k: int) -> None:
    for i in range(k):
        st.apply(Kind.PRESENT, i, i + 1)
    await st.sync()


def test_records_replay_after_sync(tmp_path: Path) -> None:
    async def main() -> None:
        st = new_state(tmp_path)
        st.apply(Kind.PRESENT, 0, 10)
        st.apply(Kind.MODIFIED, 2, 4)
        st.apply(Kind.ZERO, 8, 9)
        await st.sync()
        st.apply(Kind.PRESENT, 20, 30)  # never synced: lost in a crash, costs a refetch only
        st.close()

    asyncio.run(main())
    lo = load(tmp_path)
    assert lo.replayed == 3 and lo.seq == 3 and lo.tail_problem is None
    assert lo.map.count_where(PRESENT) == 9 and lo.map.count_where(MODIFIED) == 3
    assert lo.map.flags[8] == ZERO | MODIFIED
    assert lo.present_runs == [(0, 10)]


@pytest.mark.parametrize("cut", [1, RECORD_SIZE // 2, RECORD_SIZE - 1])
def test_torn_tail_is_dropped(tmp_path: Path, cut: int) -> None:
    async def main() -> None:
        st = new_state(tmp_path)
        await fill(st, 5)
        st.close()

    asyncio.run(main())
    raw = journal_bytes(tmp_path)
    (tmp_path / JOURNAL_NAME).write_bytes(raw[:len(raw) - cut])
    lo = load(tmp_path)
    assert lo.replayed == 4 and lo.map.count_where(PRESENT) == 4
    assert lo.tail_problem is not None and "torn" in lo.tail_problem


def test_corrupt_record_drops_it_and_everything_after(tmp_path: Path) -> None:
    async def main() -> None:
        st = new_state(tmp_path)
        await fill(st, 6)
        st.close()

    asyncio.run(main())
    raw = bytearray(journal_bytes(tmp_path))
    raw[JOURNAL_HEADER_SIZE + 2 * RECORD_SIZE + 20] ^= 0x40  # inside record 3
    (tmp_path / JOURNAL_NAME).write_bytes(bytes(raw))
    lo = load(tmp_path)
    assert lo.replayed == 2 and list(lo.map.runs_where(PRESENT)) == [(0, 2)]
    assert lo.tail_problem is not None and "checksum" in lo.tail_problem
    assert lo.dropped_bytes == 4 * RECORD_SIZE


def test_sequence_gap_stops_replay(tmp_path: Path) -> None:
    async def main() -> None:
        st = new_state(tmp_path)
        await fill(st, 4)
        st.close()

    asyncio.run(main())
    raw = journal_bytes(tmp_path)
    rec = lambda k: raw[JOURNAL_HEADER_SIZE + k * RECORD_SIZE:JOURNAL_HEADER_SIZE + (k + 1) * RECORD_SIZE]  # noqa: E731
    (tmp_path / JOURNAL_NAME).write_bytes(raw[:JOURNAL_HEADER_SIZE] + rec(0) + rec(2) + rec(3))
    lo = load(tmp_path)
    assert lo.replayed == 1 and lo.tail_problem is not None and "gap" in lo.tail_problem


def test_journal_of_another_cache_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    new_state(a).close()
    new_state(b).close()
    (a / JOURNAL_NAME).write_bytes(journal_bytes(b))
    with pytest.raises(CacheError, match="another cache"):
        load(a)


def test_meta_roundtrip_and_corruption(tmp_path: Path) -> None:
    cmap = ChunkMap(N)
    cmap.apply(Kind.PRESENT, 1, 9)
    cmap.add_target("offsite")
    cmap.touch(3, 5)
    meta = CacheMeta(image="lab", version="0123456789abcdef", manifest_digest="ab" * 32,
                     chunk_size=4096, size=N * 4096, count=N, seq=7, clean=True)
    atomic_write(tmp_path / META_NAME, encode_meta(meta, cmap))
    atomic_write(tmp_path / JOURNAL_NAME, jn.journal_header(meta.uuid))
    lo = load(tmp_path)
    assert lo.meta.seq == 7 and lo.meta.clean and lo.meta.targets == ["offsite"]
    assert lo.map.flags == cmap.flags and lo.map.gens == cmap.gens and lo.map.unsynced == cmap.unsynced
    raw = bytearray((tmp_path / META_NAME).read_bytes())
    raw[len(raw) // 2] ^= 1
    (tmp_path / META_NAME).write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum"):
        load(tmp_path)


def test_meta_of_a_large_map_is_fast(tmp_path: Path) -> None:
    n = 1_600_000
    cmap = ChunkMap(n)
    cmap.apply(Kind.PRESENT, 0, n // 3)
    meta = CacheMeta(image="big", version="0123456789abcdef", manifest_digest="ab" * 32,
                     chunk_size=65536, size=n * 65536, count=n)
    t0 = time.perf_counter()
    atomic_write(tmp_path / META_NAME, encode_meta(meta, cmap))
    atomic_write(tmp_path / JOURNAL_NAME, jn.journal_header(meta.uuid))
    lo = load(tmp_path)
    assert time.perf_counter() - t0 < 2.0
    assert (tmp_path / META_NAME).stat().st_size < 2 * n
    assert lo.map.count_where(PRESENT) == n // 3


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.05)
        real_fsync(fd)

    monkeypatch.setattr(jn.os, "fsync", slow_fsync)

    async def main() -> None:
        st = new_state(tmp_path)
        calls.clear()

        async def writer(i: int) -> None:
            await asyncio.sleep(0.001 * (i % 5))
            seq = st.apply(Kind.MODIFIED, i, i + 1)
            await st.sync(seq)
            assert st.durable_seq >= seq

        await asyncio.gather(*(writer(i) for i in range(40)))
        st.close()

    asyncio.run(main())
    assert 1 <= len(calls) <= 4  # 40 waiters, a handful of fsyncs
    assert load(tmp_path).map.count_where(MODIFIED) == 40


def test_group_sync_runs_again_for_late_callers() -> None:
    runs = []

    async def main() -> None:
        async def work() -> None:
            runs.append(1)
            await asyncio.sleep(0.02)

        g = GroupSync(work)
        t1 = asyncio.ensure_future(g.sync())
        await asyncio.sleep(0.005)  # t2 arrives while the first sync runs: it needs a new one
        t2 = asyncio.ensure_future(g.sync())
        t3 = asyncio.ensure_future(g.sync())
        await asyncio.gather(t1, t2, t3)

    asyncio.run(main())
    assert len(runs) == 2


def test_failed_fsync_poisons_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        st = new_state(tmp_path)

        def bad_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(jn.os, "fsync", bad_fsync)
        st.apply(Kind.MODIFIED, 0, 1)
        with pytest.raises(DeviceIOError):
            await st.sync()
        monkeypatch.undo()
        st.apply(Kind.MODIFIED, 1, 2)
        with pytest.raises(DeviceIOError, match="earlier error"):
            await st.sync()
        st.close()

    asyncio.run(main())


def test_checkpoint_folds_and_keeps_later_records(tmp_path: Path) -> None:
    async def main() -> None:
        st = new_state(tmp_path)
        await fill(st, 5)
        ck = asyncio.ensure_future(st.checkpoint())
        await asyncio.sleep(0)  # the checkpoint snapshot is taken; these come after it
        st.apply(Kind.MODIFIED, 10, 12)
        await ck
        await st.sync()
        st.close()

    asyncio.run(main())
    lo = load(tmp_path)
    assert lo.meta.seq == 5 and lo.replayed == 1
    assert lo.map.count_where(PRESENT) == 5 and lo.map.count_where(MODIFIED) == 2
    assert len(journal_bytes(tmp_path)) == JOURNAL_HEADER_SIZE + RECORD_SIZE


def test_checkpoint_crash_windows(tmp_path: Path) -> None:
    """Crash before the new meta, between meta and journal replacement, and after both."""
    async def main() -> tuple[bytes, bytes]:
        st = new_state(tmp_path)
        await fill(st, 5)
        st.apply(Kind.MODIFIED, 1, 3)
        await st.sync()
        old_meta, old_journal = (tmp_path / META_NAME).read_bytes(), journal_bytes(tmp_path)
        await st.checkpoint()
        st.close()
        return old_meta, old_journal

    old_meta, old_journal = asyncio.run(main())
    new_meta, new_journal = (tmp_path / META_NAME).read_bytes(), journal_bytes(tmp_path)
    expected = load(tmp_path).map.flags
    for meta, journal in [(old_meta, old_journal), (new_meta, old_journal), (new_meta, new_journal)]:
        (tmp_path / META_NAME).write_bytes(meta)
        (tmp_path / JOURNAL_NAME).write_bytes(journal)
        lo = load(tmp_path)
        assert lo.map.flags == expected and lo.seq == 6 and lo.tail_problem is None


def test_recover_then_checkpoint_discards_torn_tail_before_appending(tmp_path: Path) -> None:
    async def first() -> None:
        st = new_state(tmp_path)
        await fill(st, 3)
        st.close()

    asyncio.run(first())
    with open(tmp_path / JOURNAL_NAME, "ab") as f:
        f.write(b"\x07" * 17)  # a torn record

    async def second() -> None:
        st, lo = CacheState.recover(tmp_path)
        assert lo.replayed == 3 and lo.tail_problem
        await st.checkpoint()
        st.apply(Kind.PRESENT, 40, 41)
        await st.sync()
        st.close()

    asyncio.run(second())
    lo = load(tmp_path)
    assert lo.tail_problem is None and lo.map.count_where(PRESENT) == 4


def test_before_durable_runs_after_the_records_are_taken_and_before_they_are_written(tmp_path: Path) -> None:
    """The cache's data sync (``before_durable``) starts after every record it covers was appended
    and ends before any reaches the disk; a record appended while it runs waits for the next sync;
    when it fails nothing is written and the records stay buffered for the next sync (a fill's
    ``present`` record is never durable before its data: cache/core.py)."""
    async def main() -> None:
        st = new_state(tmp_path)
        seen: list[tuple[int, int]] = []  # (records appended, journal bytes) at each call
        fail = [True]

        async def data_sync() -> None:
            seen.append((st.last_seq, len(journal_bytes(tmp_path))))
            st.apply(Kind.PRESENT, 40, 41)  # a fill that lands while the data sync runs
            await asyncio.sleep(0)
            if fail[0]:
                fail[0] = False
                raise DeviceIOError(msg="fdatasync: EIO")

        st.before_durable = data_sync
        st.apply(Kind.PRESENT, 0, 4)
        with pytest.raises(DeviceIOError):
            await st.sync()
        assert len(journal_bytes(tmp_path)) == JOURNAL_HEADER_SIZE and st.durable_seq == 0
        await st.sync()  # the first record and the one appended meanwhile are still there
        assert seen[1] == (2, JOURNAL_HEADER_SIZE)
        assert st.durable_seq == 2 and st.last_seq == 3  # the third came during the second data sync
        await st.checkpoint()
        assert seen[2][0] == 3 and st.last_seq == 4
        st.close()

    asyncio.run(main())
    lo = load(tmp_path)
    assert lo.seq == 3 and lo.map.flags[0] & PRESENT and lo.map.flags[40] & PRESENT
