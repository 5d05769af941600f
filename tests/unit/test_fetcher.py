"""cache/fetcher.py: coalescing, batching, read-ahead, timeouts, verification, stats."""

from __future__ import annotations

import asyncio
import time

import pytest

from blockprov.cache import fetcher as fetcher_module
from blockprov.cache.fetcher import Fetcher
from blockprov.errors import DeviceIOError
from blockprov.manifest import Manifest
from tests.unit.test_cache_support import DictRepo, make_image

CS = 4096


class Sink:
    """A stand-in for the cache: remembers stored chunks; a chunk is needed until stored."""

    def __init__(self) -> None:
        self.stored: dict[int, bytes] = {}

    async def store(self, items: list[tuple[int, bytes]]) -> None:
        await asyncio.sleep(0)
        for i, d in items:
            self.stored[i] = d

    def needed(self, i: int) -> bool:
        return i not in self.stored


def chunk(content: bytes, m: Manifest, i: int) -> bytes:
    return content[i * CS:i * CS + m.chunk_length(i)]


def setup(**kw: object) -> tuple[DictRepo, Manifest, bytes, Sink]:
    repo = DictRepo()
    m, content = make_image(repo, chunks=64, zero_every=0, dup_every=0)
    return repo, m, content, Sink()


def fetcher(repo: DictRepo, m: Manifest, sink: Sink, **kw: float) -> Fetcher:
    opts: dict[str, float] = {"readahead": 0, "timeout": 5.0}
    opts.update(kw)
    return Fetcher(m, repo, sink.store, sink.needed, **opts)  # type: ignore[arg-type]


def test_concurrent_misses_on_one_chunk_cost_one_call() -> None:
    repo, m, content, sink = setup()
    repo.delay = 0.05

    async def main() -> None:
        f = fetcher(repo, m, sink)
        results = await asyncio.gather(*(f.get(7) for _ in range(10)))
        assert all(r == chunk(content, m, 7) for r in results)
        await f.materialize([7])
        await f.close()

    asyncio.run(main())
    assert repo.call_count == 1 and repo.chunks_requested() == 1
    assert sink.stored[7] == chunk(content, m, 7)


def test_misses_of_one_request_are_batched_within_batch_bytes() -> None:
    repo, m, content, sink = setup()

    async def main() -> None:
        f = fetcher(repo, m, sink, batch_bytes=4 * CS)
        got = await f.get_many(list(range(10)))
        assert [got[i] for i in range(10)] == [chunk(content, m, i) for i in range(10)]
        await f.close()

    asyncio.run(main())
    assert sorted(len(c) for c in repo.calls) == [2, 4, 4]


def test_duplicate_ids_in_a_batch_are_asked_once() -> None:
    repo = DictRepo()
    m, content = make_image(repo, chunks=20, zero_every=0, dup_every=2)
    sink = Sink()

    async def main() -> None:
        f = Fetcher(m, repo, sink.store, sink.needed, readahead=0)
        got = await f.get_many(list(range(20)))
        assert b"".join(got[i] for i in range(20)) == content
        await f.close()

    asyncio.run(main())
    assert repo.chunks_requested() == len(set(m.digests()))


def test_readahead_grows_on_sequential_misses_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read-ahead only: a loaded machine can make the in-memory repository look slower than the
    # neighbourhood threshold, and a random miss would then fetch its region too.
    monkeypatch.setattr(fetcher_module, "NEIGHBOURHOOD_LATENCY", float("inf"))
    repo, m, _content, sink = setup()

    async def main() -> None:
        f = fetcher(repo, m, sink, readahead=16 * CS)
        await f.get(10)
        await f.get(40)  # random: no read-ahead
        await asyncio.sleep(0.05)
        assert set(sink.stored) == {10, 40}
        await f.get(41)  # continues 40: one step of a stream is not a stream yet
        await asyncio.sleep(0.05)
        assert set(sink.stored) == {10, 40, 41}
        await f.get(42)  # the second step: reads ahead
        await asyncio.sleep(0.05)
        first_window = {i for i in sink.stored if i > 42}
        assert first_window
        nxt = max(sink.stored) + 1
        await f.get(nxt)  # lands right after the window: the window doubles
        await asyncio.sleep(0.05)
        second_window = {i for i in sink.stored if i > nxt}
        assert len(second_window) > len(first_window)
        assert f.stats.readahead_chunks == len(first_window) + len(second_window)
        await f.close()

    asyncio.run(main())


def test_readahead_skips_chunks_not_needed() -> None:
    repo, m, _content, sink = setup()
    for i in range(3, 8):
        sink.stored[i] = b"already here"

    async def main() -> None:
        f = fetcher(repo, m, sink, readahead=8 * CS)
        await f.get(0)
        await f.get(1)
        await asyncio.sleep(0.05)
        await f.close()

    asyncio.run(main())
    asked = {cid for call in repo.calls for cid in call}
    assert not asked & {m.digest_at(i) for i in range(3, 8)}


def test_unreachable_repository_fails_within_timeout_then_recovers() -> None:
    repo, m, content, sink = setup()
    repo.unreachable = True

    async def main() -> None:
        f = fetcher(repo, m, sink, timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(DeviceIOError, match="unreachable"):
            await f.get(3)
        assert time.monotonic() - t0 < 1.0
        assert repo.call_count > 1  # it retried
        assert 3 not in sink.stored
        repo.unreachable = False
        assert await f.get(3) == chunk(content, m, 3)
        await f.close()

    asyncio.run(main())


def test_retry_succeeds_when_repository_comes_back() -> None:
    repo, m, content, sink = setup()
    repo.unreachable = True

    async def main() -> None:
        f = fetcher(repo, m, sink, timeout=5.0)
        task = asyncio.ensure_future(f.get(5))
        await asyncio.sleep(0.2)
        repo.unreachable = False
        assert await task == chunk(content, m, 5)
        await f.close()

    asyncio.run(main())


def test_hung_repository_call_is_bounded_by_timeout() -> None:
    repo, m, _content, sink = setup()
    repo.delay = 2.0

    async def main() -> None:
        f = fetcher(repo, m, sink, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(DeviceIOError, match="within"):
            await f.get(1)
        assert time.monotonic() - t0 < 0.8
        await f.close()

    asyncio.run(main())


def test_corrupt_blob_is_never_served_or_stored(caplog: pytest.LogCaptureFixture) -> None:
    repo, m, content, sink = setup()
    repo.corrupt(m.digest_at(4))

    async def main() -> None:
        f = fetcher(repo, m, sink)
        with pytest.raises(DeviceIOError, match="verification"):
            await f.get_many([3, 4, 5])
        with pytest.raises(DeviceIOError):
            await f.materialize([4])
        await asyncio.sleep(0.01)
        assert f.stats.corrupt_chunks >= 1
        await f.close()

    asyncio.run(main())
    assert 4 not in sink.stored
    assert sink.stored[3] == chunk(content, m, 3) and sink.stored[5] == chunk(content, m, 5)
    assert "failed verification" in caplog.text


def test_zero_chunks_need_no_repository() -> None:
    repo = DictRepo()
    m, _ = make_image(repo, chunks=8, zero_every=2)
    sink = Sink()

    async def main() -> None:
        f = Fetcher(m, repo, sink.store, sink.needed, readahead=0)
        assert await f.get(1) == bytes(CS)
        await f.close()

    asyncio.run(main())
    assert repo.call_count == 0


def test_several_batches_in_flight_and_stats() -> None:
    repo, m, _content, sink = setup()
    repo.delay = 0.1

    async def main() -> None:
        f = fetcher(repo, m, sink, batch_bytes=4 * CS, max_inflight=4)
        t0 = time.monotonic()
        got = await f.get_many(list(range(16)))  # 4 batches of 4 chunks, in parallel
        assert time.monotonic() - t0 < 0.3
        assert len(got) == 16
        st = f.stats.to_dict()
        assert st["chunks_fetched"] == 16 and st["bytes_fetched"] == 16 * CS and st["batches"] == 4
        assert st["fetch_latency_ms"]["p50"] >= 100
        await f.close()

    asyncio.run(main())


def test_far_repository_random_miss_fetches_its_region_near_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a slow link (round trips above the threshold) a random miss brings its aligned
    neighbourhood along; on a fast one only what was asked for moves. The threshold is raised to
    50 ms here so that a loaded test machine cannot make the in-memory repository look far."""
    monkeypatch.setattr(fetcher_module, "NEIGHBOURHOOD_LATENCY", 0.05)
    async def run(repo: DictRepo, m: Manifest, sink: Sink) -> None:
        f = fetcher(repo, m, sink, readahead=16 * CS)
        await f.get(3)  # the first miss measures the link
        await f.get(37)  # random: with a slow link, its region comes along
        await f.idle()
        await f.close()

    for delay, expect_more in ((0.0, False), (0.2, True)):
        repo, m, _content, sink = setup()
        repo.delay = delay
        asyncio.run(run(repo, m, sink))
        region = {i for i in sink.stored if i not in (3, 37)}
        if expect_more:
            assert region and all(32 <= i < 64 for i in region), sorted(sink.stored)
        else:
            assert not region, sorted(sink.stored)
