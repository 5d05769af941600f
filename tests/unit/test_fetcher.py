"""cache/fetcher.py: coalescing, batching, read-ahead, timeouts, verification, stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from blockprov.cache import fetcher as fetcher_module
from blockprov.cache import link as link_module
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
    # Read-ahead only: a random miss fetches no region when the link is given no budget for one.
    monkeypatch.setattr(fetcher_module, "NEIGHBOURHOOD_BUDGET", 0.0)
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


def test_a_timeout_says_the_repository_s_last_error() -> None:
    """The batch's timeout can end the retries while an attempt is under way (a slow, failing
    repository): the error still says why the attempts failed, not only that time ran out."""
    repo, m, _content, sink = setup()
    repo.unreachable = True
    repo.delay = 0.3  # attempt 1 fails at 0.3 s; attempt 2 (after 0.05 s) is cut by the 0.5 s timeout

    async def main() -> None:
        f = fetcher(repo, m, sink, timeout=0.5)
        # which of the two ends it depends on the machine's load: the timeout cuts attempt 2, or the
        # retries see no time left for it and give up; either way the message names both
        with pytest.raises(DeviceIOError, match=r"gave no chunks within 0\.5 s .*last error: .*unreachable"
                                                r"|unreachable.*gave up after 0\.5 s"):
            await f.get(3)
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
    repo.delay = 0.3  # long enough that the four batches' calls overlap however loaded the machine

    async def main() -> None:
        f = fetcher(repo, m, sink, batch_bytes=4 * CS, max_inflight=4)
        got = await f.get_many(list(range(16)))  # 4 batches of 4 chunks, in parallel
        assert repo.most_at_once == 4  # not a wall-time bound: it failed under load (0.51 s at load 36)
        assert len(got) == 16
        st = f.stats.figures()
        assert st.chunks_fetched == 16 and st.bytes_fetched == 16 * CS and st.batches == 4
        assert st.fetch_latency_ms.p50 is not None and st.fetch_latency_ms.p50 >= 300
        await f.close()

    asyncio.run(main())


def test_far_repository_random_miss_fetches_its_region_near_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a slow link a random miss brings its aligned neighbourhood along; on a fast one only
    what was asked for moves. The link's assumed bandwidth is set to 20 chunks a second here, so a
    0.4 s round trip carries 8 chunks while the in-memory repository (well under 0.1 s a miss even on
    a loaded machine) carries less than 2: the region is then the miss alone."""
    monkeypatch.setattr(link_module, "DEFAULT_BANDWIDTH", 20.0 * CS)
    async def run(repo: DictRepo, m: Manifest, sink: Sink) -> None:
        f = fetcher(repo, m, sink, readahead=16 * CS)
        await f.get(3)  # the first miss measures the link
        await f.get(37)  # random: with a slow link, its region comes along
        await f.idle()
        await f.close()

    for delay, expect_more in ((0.0, False), (0.4, True)):
        repo, m, _content, sink = setup()
        repo.delay = delay
        asyncio.run(run(repo, m, sink))
        region = {i for i in sink.stored if i not in (3, 37)}
        if expect_more:
            assert region and all(32 <= i < 40 for i in region), sorted(sink.stored)
        else:
            assert not region, sorted(sink.stored)


MIB = 1 << 20


@pytest.mark.parametrize(("rtt", "bandwidth", "wire", "expect"), [
    (0.0004, 125e6, 20_000, 2),  # loopback: a 0.4 ms miss carries 50 KB at 1 Gbit/s
    (0.0006, 400e6, 24_000, 8),  # loopback measured: 0.6 ms through a proxy, decoding at 400 MB/s
    (0.0010, 125e6, 20_000, 4),  # LAN: 0.5 ms + service time, 1 Gbit/s: 125 KB
    (0.0010, 12.5e6, 20_000, 1),  # a 100 Mbit/s LAN: 12.5 KB: the miss alone
    (0.020, 125e6, 20_000, 32),  # 20 ms at 1 Gbit/s: 2.5 MB, more than the cap of 32 chunks
    (0.020, 1.25e6, 20_000, 1),  # 20 ms at 10 Mbit/s: 25 KB, one chunk: sends nothing unasked
    (0.020, 125e6, 65_548, 32),  # incompressible chunks: still capped
    (0.005, 125e6, 65_548, 8),  # 625 KB at 65.5 KB a chunk: 9 → 8 (a power of two)
])
def test_neighbourhood_span_is_what_the_link_carries_in_a_round_trip(rtt: float, bandwidth: float, wire: int,
                                                                     expect: int) -> None:
    assert fetcher_module.neighbourhood_span(rtt, bandwidth, wire, max_chunks=32) == expect


def test_default_cap_lets_a_far_fast_link_fetch_4_mib_regions() -> None:
    """Over 20 ms at 1 Gbit/s a round trip carries ~110 chunks of a boot image (22 KB compressed):
    the default cap leaves the span at 64 chunks (4 MiB), the 2 MiB cap made it 32."""
    cap = fetcher_module.NEIGHBOURHOOD_MAX // (64 << 10)
    assert fetcher_module.neighbourhood_span(0.020, 125e6, 22_000, cap) == 64
    assert fetcher_module.neighbourhood_span(0.0010, 125e6, 22_000, cap) == 4  # a LAN: unchanged
    assert fetcher_module.neighbourhood_span(1.0, 1.25e9, 22_000, cap) == cap  # still capped


def test_neighbourhood_span_edges() -> None:
    span = fetcher_module.neighbourhood_span
    assert span(0.0, 125e6, 20_000, 32) == 1  # not measured yet
    assert span(0.02, 0.0, 20_000, 32) == 1
    assert span(0.02, 125e6, 20_000, 1) == 1  # a cap of one chunk: never a region
    assert span(0.02, 125e6, 0, 32) == 32  # zero-byte chunks cannot divide by zero
    assert span(0.0004, 300e6, 20_000, 32, budget=0.5) == 2  # the budget scales it
    assert span(0.02, 125e6, 20_000, 32, budget=0.0) == 1
    for rtt in (0.0001, 0.001, 0.003, 0.01, 0.1, 1.0):  # a power of two, growing with the round trip
        n = span(rtt, 125e6, 20_000, 64)
        assert n & (n - 1) == 0 and n <= 64
        assert n <= span(rtt * 2, 125e6, 20_000, 64)


class GatedRepo(DictRepo):
    """Batches of more than one chunk (hydration's) wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.gate = threading.Event()
        self.arrived = 0  # batches that reached the repository (stuck at the gate or answered)

    def get_blobs(self, ids: list[bytes]) -> list[bytes]:  # type: ignore[override]
        self.arrived += 1
        if len(ids) > 1:
            assert self.gate.wait(10), "the test never opened the gate"
        return super().get_blobs(ids)


def gated_setup() -> tuple[GatedRepo, Manifest, bytes, Sink]:
    repo = GatedRepo()
    m, content = make_image(repo, chunks=64, zero_every=0, dup_every=0)
    return repo, m, content, Sink()


async def settle(cond: object, rounds: int = 200) -> None:
    """Let the loop and the pool run until ``cond()`` holds (bounded)."""
    for _ in range(rounds):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)


def test_client_miss_on_a_chunk_hydration_is_fetching_does_not_wait_for_the_batch() -> None:
    repo, m, content, sink = gated_setup()

    async def main() -> None:
        f = fetcher(repo, m, sink, batch_bytes=16 * CS)
        hydrating = asyncio.ensure_future(f.materialize(list(range(16)), background=True))
        await settle(lambda: repo.arrived == 1)  # the 16-chunk batch is at the repository, stuck
        got = await asyncio.wait_for(f.get(5), 5)  # a client read of a chunk in that batch
        assert got == content[5 * CS:6 * CS]
        assert not hydrating.done()  # answered while the hydration batch still waits
        repo.gate.set()
        await hydrating
        await f.idle()
        assert set(sink.stored) == set(range(16))
        await f.close()

    asyncio.run(main())


def test_hydration_leaves_a_slot_to_clients_and_waits_behind_them() -> None:
    repo, m, content, sink = gated_setup()

    async def main() -> None:
        f = fetcher(repo, m, sink, batch_bytes=4 * CS, max_inflight=2)
        hydrating = asyncio.ensure_future(f.materialize(list(range(16)), background=True))  # 4 batches
        await settle(lambda: repo.arrived >= 1)
        await asyncio.sleep(0.05)
        assert repo.arrived == 1  # one background batch out; the other slot is kept for clients
        got = await asyncio.wait_for(f.get(40), 5)  # a client miss takes the kept slot at once
        assert got == content[40 * CS:41 * CS]
        assert not hydrating.done()
        repo.gate.set()
        await hydrating
        await f.close()

    asyncio.run(main())


def test_slots_wake_client_waiters_before_background_ones() -> None:
    async def main() -> None:
        slots = fetcher_module._Slots(2)
        await slots.acquire(False)
        await slots.acquire(False)  # both taken
        order: list[str] = []

        async def take(name: str, background: bool) -> None:
            await slots.acquire(background)
            order.append(name)

        bg = asyncio.ensure_future(take("background", True))
        await asyncio.sleep(0)
        client = asyncio.ensure_future(take("client", False))
        await asyncio.sleep(0)
        slots.release()  # one free: the client, though it came second
        await asyncio.sleep(0)
        assert order == ["client"]
        slots.release()  # one free again, but a background batch never takes the last one
        await asyncio.sleep(0)
        assert order == ["client"]
        slots.release()
        await asyncio.wait_for(bg, 1)
        assert order == ["client", "background"]
        await client
        cancelled = asyncio.ensure_future(take("never", False))
        await asyncio.sleep(0)
        cancelled.cancel()  # a waiter cancelled while queued leaves no slot behind
        await asyncio.gather(cancelled, return_exceptions=True)
        assert slots.free == 0

    asyncio.run(main())


def test_slow_misses_on_a_busy_machine_do_not_make_a_near_repository_look_far(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The link's round trip is the least recent one: once a miss came back fast, later slow ones
    (a loaded machine, not a far link) fetch no region; the same slow misses from the start do."""
    monkeypatch.setattr(link_module, "DEFAULT_BANDWIDTH", 20.0 * CS)

    async def run(first_delay: float) -> set[int]:
        repo, m, _content, sink = setup()
        f = fetcher(repo, m, sink, readahead=16 * CS)
        repo.delay = first_delay
        await f.get(3)
        repo.delay = 0.4
        await f.get(37)
        await f.get(50)
        await f.idle()
        await f.close()
        return {i for i in sink.stored if i not in (3, 37, 50)}

    assert asyncio.run(run(0.0)) == set()
    assert asyncio.run(run(0.4))


class PeeredRepo(DictRepo):
    """A source reached through a site's peers: it knows the site's uplink (cache/link.py)."""

    def __init__(self, up: link_module.LinkEstimate | None) -> None:
        super().__init__()
        self.up = up

    def uplink(self) -> link_module.LinkEstimate | None:
        return self.up


def test_through_peers_speculation_is_also_sized_by_the_uplink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow answer from the peers (a loaded machine) would fetch a region, as a far link does; when
    the uplink the site shares is near (its round trip short), the region is the miss alone, since
    every agent's speculation crosses the uplink once for the site. No uplink (a lone agent): the
    region as before; an uplink not yet measured: as before too."""
    monkeypatch.setattr(link_module, "DEFAULT_BANDWIDTH", 20.0 * CS)

    def near() -> link_module.LinkEstimate:
        up = link_module.LinkEstimate()
        up.observe(0.001, 1, 0)
        return up

    async def run(up: link_module.LinkEstimate | None) -> set[int]:
        repo = PeeredRepo(up)
        m, _content = make_image(repo, chunks=64, zero_every=0, dup_every=0)
        sink = Sink()
        repo.delay = 0.4
        f = fetcher(repo, m, sink, readahead=16 * CS)
        await f.get(3)
        await f.get(37)
        await f.idle()
        await f.close()
        return {i for i in sink.stored if i not in (3, 37)}

    assert asyncio.run(run(near())) == set()
    assert asyncio.run(run(None))
    assert asyncio.run(run(link_module.LinkEstimate()))


def test_link_estimate_round_trip_is_the_least_and_bandwidth_from_large_fetches() -> None:
    est = link_module.LinkEstimate(window=4, believe_first=True)
    assert est.rtt == 0.0
    for t in (0.05, 0.002, 0.03):
        est.observe(t, 1, 20_000)
    assert est.rtt == 0.002
    est.observe(0.102, 64, 1_000_000)  # 1 MB in 0.1 s beyond the round trip
    assert est.bandwidth_measured and est.bandwidth == pytest.approx(10e6)
    for t in (0.04, 0.04, 0.04, 0.04):  # the fast sample left the window: queueing is all that is left
        est.observe(t, 2, 40_000)
    assert est.rtt == 0.04
    smooth = link_module.LinkEstimate()  # the fetcher's own: smoothed in from the assumed 1 Gbit/s
    smooth.observe(0.002, 1, 0)
    smooth.observe(0.102, 64, 1_000_000)
    assert smooth.bandwidth == pytest.approx(0.7 * link_module.DEFAULT_BANDWIDTH + 0.3 * 10e6)


class HeldRepo(PeeredRepo):
    """Peers that hold some chunks (``held``): speculation is asked of them alone (``get_held``)."""

    def __init__(self, up: link_module.LinkEstimate, held_delay: float) -> None:
        super().__init__(up)
        self.held: set[bytes] = set()
        self.held_calls: list[list[bytes]] = []
        self.held_delay = held_delay

    def speculate_held(self) -> bool:
        return self.up is not None  # as PeerSource: while there are peers (or a site cache below)

    def get_held(self, ids: Sequence[bytes]) -> list[bytes | None]:
        self.held_calls.append(list(ids))
        time.sleep(self.held_delay)
        return [self.blobs[c] if c in self.held else None for c in ids]


def test_with_peers_speculation_takes_only_what_the_site_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random miss's neighbourhood is asked of the peers only: what they hold comes (and is stored),
    what they lack is not fetched from the repository on a guess, unless a reader joined it meanwhile:
    that chunk is then fetched for real and the read gets the right bytes."""
    monkeypatch.setattr(link_module, "DEFAULT_BANDWIDTH", 20.0 * CS)
    up = link_module.LinkEstimate()
    up.observe(0.4, 1, 0)  # a far uplink: its span is no smaller than this link's
    repo = HeldRepo(up, held_delay=1.0)
    m, content = make_image(repo, chunks=64, zero_every=0, dup_every=0)
    repo.held = {m.digest_at(i) for i in range(32, 37)}  # not 38, 39
    sink = Sink()
    repo.delay = 0.4

    async def main() -> None:
        f = fetcher(repo, m, sink, readahead=16 * CS)
        await f.get(3)
        await f.get(37)  # its region around 37 goes to the peers (in flight for 1 s)
        assert repo.held_calls and 38 not in sink.stored
        assert await f.get(38) == chunk(content, m, 38)  # joined the speculative entry: fetched for real
        await f.idle()
        await f.close()

    asyncio.run(main())
    asked = {c for call in repo.calls for c in call}
    region = {m.digest_at(i) for i in range(32, 40)}
    assert asked & region == {m.digest_at(37), m.digest_at(38)}, "nothing else of the region from the repository"
    [speculated] = repo.held_calls  # the region around 37 (its size: the links'), 38 and 39 in it
    idx = {m.digest_at(i): i for i in range(64)}
    got = sorted(idx[c] for c in speculated if c in repo.held)
    assert got and all(sink.stored[i] == chunk(content, m, i) for i in got)
    assert 39 not in sink.stored  # the peers lacked it and nobody asked


class NearRepo(DictRepo):
    """A source whose site cache is near (cache/link.py, ``NearRegions``), or not."""

    def __init__(self, near: bool) -> None:
        super().__init__()
        self.near = near

    def near_regions(self) -> bool:
        return self.near


def test_near_site_cache_demand_miss_asks_its_aligned_region_in_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a near site cache a demand miss brings its aligned region in the same request (one
    fetch, not one per later miss); the chunks come verified and stored. Not for a far source, not
    for hydration or a writer's ``materialize``, not with read-ahead off."""
    monkeypatch.setattr(fetcher_module, "NEAR_REGION", 8 * CS)

    async def run(near: bool, readahead: int, materialize: bool = False) -> tuple[NearRepo, Sink, bytes, Manifest]:
        repo = NearRepo(near)
        m, content = make_image(repo, chunks=64, zero_every=0, dup_every=0)
        sink = Sink()
        f = fetcher(repo, m, sink, readahead=readahead)
        if materialize:
            await f.materialize([37])
        else:
            assert await f.get(37) == chunk(content, m, 37)
        await f.idle()
        await f.close()
        return repo, sink, content, m

    repo, sink, content, m = asyncio.run(run(True, 16 * CS))
    idx = {m.digest_at(i): i for i in range(m.count)}
    assert [[idx[c] for c in call] for call in repo.calls] == [list(range(32, 40))], "the region in the miss's request"
    assert {i: sink.stored[i] for i in range(32, 40)} == {i: chunk(content, m, i) for i in range(32, 40)}
    for near, readahead, mat in ((False, 16 * CS, False), (True, 0, False), (True, 16 * CS, True)):
        repo, sink, _c, m = asyncio.run(run(near, readahead, mat))
        assert [m.digest_at(37)] in repo.calls, (near, readahead, mat)
        assert 36 not in sink.stored and 39 not in sink.stored, (near, readahead, mat)
