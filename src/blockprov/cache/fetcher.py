"""Fetch missing chunks from a repository: coalesced, batched, read ahead, verified, bounded in time.

Why each rule:

- Coalescing: every chunk being fetched has one ``_Entry`` (a data future and a stored future)
  keyed by chunk index; a second reader or writer of the same chunk awaits the same futures, so
  ten concurrent misses on one chunk cost one ``get_blobs``.
- Batching: the misses of one request (and its read-ahead) go to the repository in batches of at
  most ``batch_bytes``; duplicate ids in a batch are asked for once.
- Read-ahead: only a stream earns it. A miss that continues the previous demand miss exactly, or
  starts where the read-ahead ended (the reader consumed it), extends a streak; from the second
  such miss on, each doubles the window, up to ``readahead`` bytes. Any other miss resets streak
  and window, so random reads never pay for neighbours — a boot's scattered reads, which a looser
  rule ("anywhere inside the window") turned into a near-full copy of the image. A read waiting on
  chunks already in flight neither grows nor resets the window, but keeps the read-ahead ahead of
  it. Present and zero chunks are skipped (``needed``). Read-ahead only uses free batch slots, so
  it never queues in front of a demand miss.
- Up to ``max_inflight`` batches talk to the repository at once.
- ``get_blobs`` (blocking, may hit the network) and ``codec.decode`` (zstd + BLAKE3, both release
  the GIL) run in a thread pool, never on the event loop.
- ``RepositoryUnavailable`` is retried with backoff (retry.py) until ``timeout`` seconds have
  passed, and the whole batch (queueing included) is bounded by ``timeout``: the read then fails
  with ``DeviceIOError`` (EIO) instead of hanging.
- (docs/architecture.md, invariant 6) A blob that fails ``codec.decode`` fails only its chunks,
  is logged, and its bytes are neither stored nor served.

Verified data is handed to ``store`` (the cache writes it to its data file) and the data futures
resolve before the store finishes, so a cold read does not wait for the fill's fdatasync; writers
that need the chunk in the data file wait for the stored future (``materialize``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockprov.cache.link import LinkEstimate, NearRegions, PeerHeld, SharedUplink
from blockprov.cache.source import CacheSide, Data, NeededFn, Ranges, Release, SourceFactory, StoreFn, read_chunks
from blockprov.codec import ZERO_DIGEST, decode_view
from blockprov.device.base import ReadResult
from blockprov.errors import (
    BlockprovError,
    CacheError,
    ChunkCorrupt,
    DeviceIOError,
    FetchFailed,
    NotHeld,
    RepositoryUnavailable,
)
from blockprov.manifest import Manifest
from blockprov.repo.base import BlobSource, BlobViews
from blockprov.retry import RetryPolicy, retry_async

if TYPE_CHECKING:
    from blockprov.cache.maps import ChunkMap

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 8 << 20
DEFAULT_READAHEAD = 32 << 20
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_TIMEOUT = 30.0
# A random miss also fetches the missing chunks of its aligned region, as many as the link carries
# in NEIGHBOURHOOD_BUDGET round trips (see neighbourhood_span), at most NEIGHBOURHOOD_MAX bytes.
NEIGHBOURHOOD_BUDGET = 1.0
# 8 MiB: over 20 ms at 1 Gbit/s one round trip carries ~110 compressed chunks, so the span is 4 MiB
# (a power of two); the first boot of the test image then waits on ~95 regions instead of ~177
# (2 MiB) for 9% more bytes (bench/RESULTS.md, issue 15 "the frontier"). The cap bounds a fast far link.
NEIGHBOURHOOD_MAX = 8 << 20
# Behind a site cache (no peers), a demand miss asks its aligned region of NEAR_REGION bytes in the
# same request (``Fetcher._widen``). A boot's reads are one at a time (the test image's trace: 8,592
# reads, never two in flight) and scattered, so its fetches are one per miss, and a fetch's fixed
# CPU (~1 ms: a request, a pool hand-off, futures, a journal record) is what thirty agents on two
# cores queue behind, not bytes. Replayed against that trace, regions of 1/2/4/8/16 chunks of
# 64 KiB cost 2,649/1,639/959/546/302 fetches for 2,840/3,334/3,856/4,384/4,864 chunks: 8 cuts the
# fetches ~5x for ~1.5x the chunks, and every agent's regions are the same aligned ones, so the
# site cache pulls each once for the site (bench/RESULTS.md, "Boot storm": egress kept).
NEAR_REGION = 512 << 10
LATENCY_SAMPLES = 4096
# Upper bounds (seconds) of the fetch latency histogram exported as Prometheus metrics (agent/metrics.py).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)



class _NotHeldMarker:
    """A speculative chunk the site's peers did not hold (``Fetcher._neighbourhood``)."""


_NOT_HELD = _NotHeldMarker()
_Result = dict[int, "Data | BaseException | _NotHeldMarker"]


@dataclass
class _Entry:
    data: asyncio.Future[Data]
    stored: asyncio.Future[None]
    background: bool = False  # fetched for hydration: a client that needs it fetches it itself
    speculative: bool = False  # a neighbourhood asked of the site's peers only (``_neighbourhood``)
    wanted: bool = False  # a reader or a hydration joined it: fetched for real if the peers lack it


class _Slots:
    """The ``max_inflight`` repository slots, client fetches first.

    A background (hydration) batch takes a slot only while another stays free, and waits behind
    every waiting client batch; a client batch waits only for a slot, never behind background
    work that has not started. (asyncio.Semaphore is first come, first served.)"""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    def _can(self, background: bool) -> bool:
        return self.free > 1 if background else self.free > 0

    async def acquire(self, background: bool) -> None:
        demand, bg = self._waiting
        if self._can(background) and not demand and not (background and bg):
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (bg if background else demand).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # woken, then cancelled: hand the slot on
            else:
                with contextlib.suppress(ValueError):
                    (bg if background else demand).remove(fut)
            raise

    def release(self) -> None:
        self.free += 1
        for q, background in ((self._waiting[0], False), (self._waiting[1], True)):
            while q and self._can(background):
                f = q.popleft()
                if not f.done():
                    self.free -= 1
                    f.set_result(None)


@dataclass
class FetchStats:
    bytes_fetched: int = 0  # plain bytes of verified chunks
    wire_bytes: int = 0  # stored (compressed) bytes received
    chunks_fetched: int = 0
    batches: int = 0
    failed_batches: int = 0
    corrupt_chunks: int = 0
    readahead_chunks: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # every batch since start, for a Prometheus histogram (the deque above keeps only recent ones)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        """One batch's latency: per batch, not per NBD request, so a bisect here costs nothing."""
        self.latencies.append(seconds)
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def percentiles(self) -> FetchLatency:
        """Batch latency (repository round trip + decode) in milliseconds."""
        s = sorted(self.latencies)
        if not s:
            return FetchLatency()

        def pick(q: float) -> float:
            return round(s[min(len(s) - 1, int(q * len(s)))] * 1000.0, 3)

        return FetchLatency(p50=pick(0.50), p90=pick(0.90), p99=pick(0.99))

    def figures(self) -> FetchFigures:
        """This run's counters, as ``status`` shows them."""
        return FetchFigures(bytes_fetched=self.bytes_fetched, wire_bytes=self.wire_bytes,
                            chunks_fetched=self.chunks_fetched, batches=self.batches,
                            failed_batches=self.failed_batches, corrupt_chunks=self.corrupt_chunks,
                            readahead_chunks=self.readahead_chunks, fetch_latency_ms=self.percentiles())


@dataclass(frozen=True)
class FetchLatency:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class FetchFigures:
    """A run's repository counters (``FetchStats``) as ``status`` shows them."""

    bytes_fetched: int = 0
    wire_bytes: int = 0
    chunks_fetched: int = 0
    batches: int = 0
    failed_batches: int = 0
    corrupt_chunks: int = 0
    readahead_chunks: int = 0
    fetch_latency_ms: FetchLatency = field(default_factory=FetchLatency)


def neighbourhood_span(rtt: float, bandwidth: float, wire_per_chunk: float, max_chunks: int,
                       budget: float = NEIGHBOURHOOD_BUDGET) -> int:
    """How many chunks (a power of two; 1: the miss alone) the aligned region of a random miss has.

    A miss costs one round trip ``rtt`` (seconds, as measured: link, server and decode) whatever
    its size; in that time the link could have carried ``rtt × bandwidth`` bytes. The region is
    what fits in ``budget`` round trips of the link at ``wire_per_chunk`` bytes a chunk (chunks
    travel compressed), so its cost is bounded by the round trip it may save: on loopback and on
    a LAN (0.5 ms, 1 Gbit/s) a few chunks, over 20 ms the cap. A pure function: unit-tested with
    the figures of each link.
    """
    if rtt <= 0 or bandwidth <= 0 or max_chunks < 2:
        return 1
    n = int(budget * rtt * bandwidth / max(1.0, wire_per_chunk))
    n = min(n, max_chunks)
    return 1 << (n.bit_length() - 1) if n >= 2 else 1


def _swallow(f: asyncio.Future[Any]) -> None:
    """Read-ahead futures may fail with nobody waiting: mark the exception as retrieved."""
    if not f.cancelled():
        f.exception()


class Fetcher:
    """The ``ChunkSource`` of a cache of a version: the repository (see the module docstring)."""

    def __init__(self, manifest: Manifest, repo: BlobSource, store: StoreFn,
                 needed: NeededFn, *, readahead: int = DEFAULT_READAHEAD,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 timeout: float = DEFAULT_TIMEOUT, retry_first_delay: float = 0.05,
                 retry_max_delay: float = 1.0) -> None:
        self.manifest = manifest
        self.repo = repo
        self._store = store
        self._needed = needed
        self._cs = manifest.chunk_size
        self._batch_chunks = max(1, batch_bytes // self._cs)
        self._ra_max = readahead // self._cs
        self._ra_min = min(2, self._ra_max)
        self._max_inflight = max(1, max_inflight)
        self.timeout = timeout
        self._last_failure: BaseException | None = None  # the repository's last failed attempt, if the last failed
        self._policy = RetryPolicy(timeout=timeout, first_delay=retry_first_delay, max_delay=retry_max_delay)
        self._slots = _Slots(self._max_inflight)
        # A repository that can hand out views of its answer saves a copy per blob. (Checked once:
        # a runtime Protocol check costs more than the rest of a miss's planning.)
        self._get: Callable[[Sequence[bytes]], Sequence[Data | BlockprovError]] = (
            repo.get_blob_views if isinstance(repo, BlobViews) else repo.get_blobs)
        self._pool = ThreadPoolExecutor(max_workers=2 * self._max_inflight, thread_name_prefix="blockprov-fetch")
        self._inflight: dict[int, _Entry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stores: set[asyncio.Future[None]] = set()
        self._active = 0  # batches started (holding or waiting for a slot)
        self._last_end = -1  # end (exclusive) of the last demand miss
        self._ra_end = 0  # end (exclusive) of the read-ahead issued so far
        self._window = 0  # read-ahead window in chunks
        self._streak = 0  # consecutive misses that continued a stream
        self.link = LinkEstimate()  # the link to ``repo``: round trip and bandwidth (cache/link.py)
        # a source reached through the site's peers also knows the site's uplink (cache/peers.py)
        self._uplink = repo.uplink if isinstance(repo, SharedUplink) else None
        self._held = repo.get_held if isinstance(repo, PeerHeld) else None
        self._speculate_held = repo.speculate_held if isinstance(repo, PeerHeld) else None
        self._near = repo.near_regions if isinstance(repo, NearRegions) else None
        self._region = max(1, NEAR_REGION // self._cs)
        self._closed = False
        self.stats = FetchStats()

    # -- public ---------------------------------------------------------------------------------
    @property
    def rtt(self) -> float:
        """The link's round trip (seconds; 0 until measured): the least of the recent small
        batches' times (cache/link.py). A mean would count the time a busy machine kept the agent
        or the server from running, and on a loaded loopback make a random miss look as far as a
        WAN's and fetch a region; the minimum is the link's own cost."""
        return self.link.rtt

    async def get_many(self, indices: Sequence[int]) -> dict[int, Data]:
        """Verified content of these chunks (fetched, or shared with a fetch in flight)."""
        if not indices:
            return {}
        entries = self._ensure(indices, demand=True)
        out: dict[int, Data] = {}
        for i, e in zip(indices, entries, strict=True):
            out[i] = await asyncio.shield(e.data)
        return out

    async def get(self, index: int) -> Data:
        return (await self.get_many([index]))[index]

    async def read(self, ranges: Ranges) -> list[ReadResult]:
        return await read_chunks(self, ranges)

    async def before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        return None  # the repository keeps every version: nothing to save

    def maps_below(self) -> list[ChunkMap]:
        return []

    def status(self) -> dict[str, Any]:
        return {}  # its counters are ``stats``, which the device shows for every stack

    async def materialize(self, indices: Sequence[int], *, background: bool = False) -> None:
        """Return when these chunks were fetched and handed to ``store`` (which may have skipped
        some that changed meanwhile: the caller re-checks their state). ``background``
        (hydration): these batches yield slots to client fetches, and a client that needs one of
        these chunks meanwhile fetches it itself instead of waiting for the whole batch."""
        entries = self._ensure(indices, demand=not background, readahead=False, background=background)
        for e in entries:
            await asyncio.shield(e.stored)

    async def idle(self) -> None:
        """Wait until no fetch or store is in flight (tests, hydration, orderly shutdown)."""
        while self._tasks or self._stores:
            await asyncio.gather(*self._tasks, *self._stores, return_exceptions=True)

    async def close(self) -> None:
        """Cancel fetches, but let stores that already started finish (they hold the data fd)."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stores:
            await asyncio.gather(*self._stores, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- planning -------------------------------------------------------------------------------
    def _ensure(self, indices: Sequence[int], *, demand: bool, readahead: bool = True,
                background: bool = False) -> list[_Entry]:
        if self._closed:
            raise DeviceIOError(msg="cache is closing")
        entries: list[_Entry] = []
        new: list[int] = []
        promote: list[int] = []
        for i in indices:
            e = self._inflight.get(i)
            if e is None:
                e = self._new_entry(i)
                e.background = background
                new.append(i)
            elif e.speculative:
                e.wanted = True  # if the peers lack it, it is fetched for real (``_run_batch``)
            elif demand and e.background:
                # A client needs a chunk a hydration batch is fetching: it waits for its own
                # round trip, not for the rest of that batch (the chunk may arrive twice).
                e.background = False
                promote.append(i)
            entries.append(e)
        if new and readahead and demand and self._ra_max and self._near is not None and self._near():
            new = self._widen(new)
        if new:
            self._start(sorted(new), background=background)
        if promote:
            self._start(promote)
        if readahead and demand and self._ra_max:
            self._readahead(min(indices), max(indices), missed=bool(new))
        return entries

    def _widen(self, new: list[int]) -> list[int]:
        """The missing chunks of the aligned ``NEAR_REGION`` around each of a demand miss's chunks,
        fetched with them in one request (see ``NEAR_REGION`` for why; only while the source says
        the site cache is near: ``near_regions``). They are fetched for real, not held-only: the
        regions are aligned, so thirty agents reading the same boot ask the same ones and the site
        cache pulls each once. A read-ahead of 0 turns this off too."""
        r = self._region
        if r < 2:
            return new
        out = set(new)
        extra = 0
        for i in new:
            a = i - i % r
            for k in range(a, min(self.manifest.count, a + r)):
                if k not in out and k not in self._inflight and self._needed(k):
                    self._new_entry(k)
                    out.add(k)
                    extra += 1
        self.stats.readahead_chunks += extra
        return sorted(out)

    def _new_entry(self, i: int) -> _Entry:
        loop = asyncio.get_running_loop()
        e = _Entry(loop.create_future(), loop.create_future())
        e.data.add_done_callback(_swallow)
        e.stored.add_done_callback(_swallow)
        self._inflight[i] = e
        return e

    def _start(self, indices: list[int], *, background: bool = False, speculative: bool = False) -> None:
        """Cut into batches of at most ``batch_bytes`` and start one task per batch."""
        step = self._batch_chunks
        for k in range(0, len(indices), step):
            batch = indices[k:k + step]
            self._active += 1
            task = asyncio.ensure_future(self._run_batch(batch, background, speculative))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _readahead(self, first: int, last: int, *, missed: bool) -> None:
        if missed:
            if first == self._last_end or (self._ra_end and first == self._ra_end):
                self._streak += 1
                if self._streak >= 2:
                    self._window = min(self._ra_max, max(self._ra_min, self._window * 2))
                self._last_end = max(last + 1, self._last_end)
            elif not (self._last_end - 1 <= first < self._last_end):  # not a re-read of the last chunk
                self._streak = 0
                self._window = 0
                self._ra_end = 0
                self._last_end = last + 1
                self._neighbourhood(first)
        elif self._window and self._last_end <= first < self._ra_end:
            self._last_end = max(last + 1, self._last_end)  # consuming the read-ahead
        else:
            return
        if not self._window:
            return
        if self._ra_end - (last + 1) > self._window // 2:
            return  # still far enough ahead: read ahead in big steps, not a sliver per request
        free = self._max_inflight - self._active
        if free <= 0:
            return
        start = max(last + 1, self._ra_end)
        end = min(self.manifest.count, last + 1 + self._window, start + free * self._batch_chunks)
        ahead = [k for k in range(start, end) if k not in self._inflight and self._needed(k)]
        self._ra_end = max(self._ra_end, end)
        if ahead:
            for k in ahead:
                self._new_entry(k)
            self.stats.readahead_chunks += len(ahead)
            self._start(ahead)

    def _neighbourhood(self, first: int) -> None:
        """A random miss also fetches the aligned region around it, sized by the link.

        A boot that waits on one round trip per scattered miss spends its time waiting; the data a
        guest reads next is often near what it just read (file systems allocate a directory's files
        together). So the other missing chunks of the miss's region go out as one speculative
        batch, in a free slot only, the region as large as the link carries in a round trip
        (``neighbourhood_span``, from the measured round trip and bandwidth): nothing on a link
        whose round trip is only CPU, a few chunks on a LAN, ``NEIGHBOURHOOD_MAX`` far away. A
        read-ahead of 0 (``attach --readahead 0``) turns this speculation off too.

        Through the site's peers (the source offers an uplink: ``SharedUplink``), the region is no
        larger than the uplink carries either. With peers or behind a site cache (``PeerHeld``,
        ``speculate_held``) it is asked only of what the site holds (peers, site cache): a guess
        that no agent of the site has read yet is not pulled over the uplink, since thirty agents'
        guesses made the site pull their union (bench/RESULTS.md, "Boot storm"). A reader that
        joins such a chunk meanwhile (``wanted``) has it fetched for real if the site lacks it.
        """
        rtt = self.rtt
        if not self._ra_max or not rtt or self._max_inflight - self._active <= 1:
            return  # the link is not measured yet, or no slot to spare beside the demand fetches
        st = self.stats
        per_chunk = st.wire_bytes / st.chunks_fetched if st.chunks_fetched and st.wire_bytes else self._cs / 2
        cap = NEIGHBOURHOOD_MAX // self._cs
        span = neighbourhood_span(rtt, self.link.bandwidth, per_chunk, cap, budget=NEIGHBOURHOOD_BUDGET)
        up = self._uplink() if self._uplink is not None and span >= 2 else None
        if up is not None and up.rtt:
            # Through the site's peers: what nobody reads still crosses the uplink once for the site,
            # and the site pulls the union of its agents' speculation, so the region must also be
            # cheap there (cache/link.py). Until an owner's fetch measured the uplink, its bandwidth
            # is taken as no more than this link's.
            bw = up.bandwidth if up.bandwidth_measured else min(up.bandwidth, self.link.bandwidth)
            span = min(span, neighbourhood_span(up.rtt, bw, per_chunk, cap, budget=NEIGHBOURHOOD_BUDGET))
        if span < 2:
            return
        a = first - first % span
        near = [k for k in range(a, min(self.manifest.count, a + span))
                if k != first and k not in self._inflight and self._needed(k)]
        if near:
            # with peers or a site cache (an uplink to share), only what the site already holds
            speculative = self._held is not None and self._speculate_held is not None and self._speculate_held()
            for k in near:
                self._new_entry(k).speculative = speculative
            self.stats.readahead_chunks += len(near)
            self._start(near, speculative=speculative)

    # -- one batch ------------------------------------------------------------------------------
    async def _run_batch(self, batch: list[int], background: bool = False, speculative: bool = False) -> None:
        entries = [self._inflight[i] for i in batch]
        active = True
        handed: set[int] = set()  # speculative chunks the peers lacked that someone waits for: fetched again
        dropped: set[int] = set()  # speculative chunks the peers lacked that nobody waits for
        try:
            try:
                async with asyncio.timeout(self.timeout):  # no extra task per batch, as wait_for makes
                    result = await (self._guess(batch) if speculative else self._fetch(batch, background))
                self._active -= 1  # the repository slot is free; storing does not hold it
                active = False
            except TimeoutError:
                err: BaseException = FetchFailed(
                    msg=f"repository {self.repo.url} gave no chunks within {self.timeout:g} s "
                        f"(chunks {batch[0]}..{batch[-1]})"
                        + (f"; last error: {self._last_failure}" if self._last_failure is not None else ""))
                self._fail(entries, err)
                return
            except RepositoryUnavailable as e:
                self._fail(entries, FetchFailed(msg=f"{e} (gave up after {self.timeout:g} s)"))
                return
            except BlockprovError as e:
                log.error("fetching chunks %d..%d failed: %s", batch[0], batch[-1], e)
                self._fail(entries, DeviceIOError(msg=str(e)))
                return
            except asyncio.CancelledError:
                self._fail(entries, DeviceIOError(msg="cache is closing"))
                raise
            except Exception as e:
                log.exception("fetching chunks %d..%d failed", batch[0], batch[-1])
                self._fail(entries, DeviceIOError(msg=f"fetch failed: {type(e).__name__}: {e}"))
                return
            good: list[tuple[int, Data]] = []
            for i, en in zip(batch, entries, strict=True):
                value = result[i]
                if isinstance(value, _NotHeldMarker):
                    # decided now, before any await: a reader joining later must find the entry
                    # either gone (it starts its own fetch) or handed over, never one about to fail
                    if en.wanted:
                        en.speculative = False
                        handed.add(i)
                    else:
                        dropped.add(i)
                        if self._inflight.get(i) is en:
                            del self._inflight[i]
                        self._fail([en], DeviceIOError(msg="not held by the site"))
                    continue
                if isinstance(value, BaseException):
                    self._fail([en], value)
                else:
                    if not en.data.done():  # a promoted chunk may have come with the other batch
                        en.data.set_result(value)
                    good.append((i, value))
            if handed and not self._closed:
                self._start(sorted(handed))  # the same entries, fetched for real now
            if good:
                store = asyncio.ensure_future(self._store(good))
                self._stores.add(store)
                store.add_done_callback(self._stores.discard)
                try:
                    await asyncio.shield(store)
                except asyncio.CancelledError:
                    raise
                except BaseException as se:
                    log.error("storing fetched chunks %d..%d failed: %s", good[0][0], good[-1][0], se)
                    self._fail([en for i, en in zip(batch, entries, strict=True) if i not in handed], se)
                    return
                for i, en in zip(batch, entries, strict=True):
                    if i not in handed and not en.stored.done():
                        en.stored.set_result(None)
        finally:
            if active:
                self._active -= 1
            for i, en in zip(batch, entries, strict=True):
                if i not in handed and self._inflight.get(i) is en:
                    del self._inflight[i]
            rest = [en for i, en in zip(batch, entries, strict=True) if i not in handed and i not in dropped]
            if not all(en.data.done() and en.stored.done() for en in rest):
                self._fail(rest, DeviceIOError(msg="cache is closing"))

    @staticmethod
    def _fail(entries: list[_Entry], err: BaseException) -> None:
        for e in entries:
            for f in (e.data, e.stored):
                if not f.done():
                    f.set_exception(err)

    async def _fetch(self, batch: list[int], background: bool = False, speculative: bool = False) -> _Result:
        await self._slots.acquire(background)
        try:
            return await self._fetch_in_slot(batch, speculative)
        finally:
            self._slots.release()

    async def _guess(self, batch: list[int]) -> _Result:
        """A speculative batch from the peers: a failure is no fault, its chunks count as not held."""
        try:
            return await self._fetch(batch, speculative=True)
        except BlockprovError as e:
            log.info("speculative chunks %d..%d from the peers failed: %s", batch[0], batch[-1], e)
            return dict.fromkeys(batch, _NOT_HELD)

    async def _fetch_in_slot(self, batch: list[int], speculative: bool = False) -> _Result:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        m = self.manifest
        digests = [m.digest_at(i) for i in batch]
        ids = list(dict.fromkeys(d for d in digests if d != ZERO_DIGEST))
        blobs: Sequence[Data | BlockprovError] = []
        plain: dict[bytes, Data | BlockprovError] = {}
        if ids:
            get = self._get
            if speculative:
                assert self._held is not None
                get = _held_or_marker(self._held)

            def get_and_decode() -> tuple[Sequence[Data | BlockprovError], dict[bytes, Data | BlockprovError]]:
                # one trip to the pool per batch, not two: near the repository a thread hand-off
                # is a visible part of a miss (bench/RESULTS.md, "where a miss goes")
                try:
                    got = get(ids)
                except Exception as e:
                    self._last_failure = e  # said when the batch's timeout ends the retries first
                    raise
                self._last_failure = None
                if len(got) != len(ids):
                    raise DeviceIOError(msg=f"repository returned {len(got)} blobs for {len(ids)} ids")
                return got, _decode_all(ids, got)

            def call() -> Awaitable[tuple[Sequence[Data | BlockprovError], dict[bytes, Data | BlockprovError]]]:
                return loop.run_in_executor(self._pool, get_and_decode)

            blobs, plain = await retry_async(call, self._policy, f"fetching chunks from {self.repo.url}")
        took = time.monotonic() - t0
        self.stats.observe(took)
        wire = sum(len(b) for b in blobs if not isinstance(b, BlockprovError))
        self.link.observe(took, len(batch), wire)
        self.stats.batches += 1
        self.stats.wire_bytes += wire
        out: _Result = {}
        for i, d in zip(batch, digests, strict=True):
            if d == ZERO_DIGEST:
                out[i] = bytes(m.chunk_length(i))
                continue
            value = plain[d]
            if speculative and isinstance(value, BlockprovError):
                out[i] = _NOT_HELD  # not held by the peers (or a bad blob): fetched for real if wanted
            elif isinstance(value, ChunkCorrupt):
                self.stats.corrupt_chunks += 1
                log.error("chunk %d of %s@%s failed verification, not served: %s",
                          i, m.image, m.id, value)
                out[i] = DeviceIOError(msg=f"chunk {i} from {self.repo.url} failed verification: {value}")
            elif isinstance(value, BlockprovError):  # a partial answer: this chunk alone did not come
                out[i] = DeviceIOError(msg=f"chunk {i}: {value}")
            else:
                self.stats.chunks_fetched += 1
                self.stats.bytes_fetched += len(value)
                out[i] = value
        return out



def repository_source(repo: BlobSource, *, readahead: int = DEFAULT_READAHEAD, timeout: float = DEFAULT_TIMEOUT,
                      batch_bytes: int = DEFAULT_BATCH_BYTES,
                      max_inflight: int = DEFAULT_MAX_INFLIGHT) -> SourceFactory:
    """The bottom layer of a cache of a version: a ``Fetcher`` over ``repo`` with these settings.
    An overlay is refused: it reads its base, and filling it from the repository would copy into
    every instance what the base holds once."""

    def make(manifest: Manifest, side: CacheSide) -> Fetcher:
        if side.base_cache is not None:
            raise CacheError(f"{side.where} is an overlay of {side.base_cache}: open it over its base cache")
        return Fetcher(manifest, repo, side.store, side.needed, readahead=readahead, batch_bytes=batch_bytes,
                       max_inflight=max_inflight, timeout=timeout)

    return make


def _held_or_marker(held: Callable[[Sequence[bytes]], Sequence[bytes | memoryview | None]]
                    ) -> Callable[[Sequence[bytes]], Sequence[Data | BlockprovError]]:
    """``get_held`` in the shape of ``get_blob_views``: a chunk not held is a partial answer's error."""
    def get(ids: Sequence[bytes]) -> list[Data | BlockprovError]:
        return [NotHeld() if b is None else b for b in held(ids)]
    return get


def _decode_all(ids: list[bytes], blobs: Sequence[Data | BlockprovError]) -> dict[bytes, Data | BlockprovError]:
    """Decode and verify (runs in a worker thread; zstd and BLAKE3 release the GIL). Uncompressed
    blobs are not copied: their content is a read-only view of the blob, verified as it is. The
    error a partial answer gave in place of a blob stays that chunk's."""
    out: dict[bytes, Data | BlockprovError] = {}
    for cid, blob in zip(ids, blobs, strict=True):
        if isinstance(blob, BlockprovError):
            out[cid] = blob
            continue
        try:
            out[cid] = decode_view(blob, cid)
        except ChunkCorrupt as e:
            out[cid] = e
    return out

