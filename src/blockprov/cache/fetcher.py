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
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blockprov.cache.source import Data, NeededFn, SourceFactory, StoreFn
from blockprov.codec import ZERO_DIGEST, decode_view
from blockprov.errors import BlockprovError, ChunkCorrupt, DeviceIOError, FetchFailed, RepositoryUnavailable
from blockprov.manifest import Manifest
from blockprov.repo.base import BlobSource, BlobViews
from blockprov.retry import RetryPolicy, retry_async

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 8 << 20
DEFAULT_READAHEAD = 32 << 20
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_TIMEOUT = 30.0
NEIGHBOURHOOD_LATENCY = 0.005  # above this round-trip time a random miss also fetches its region
NEIGHBOURHOOD_MAX = 4 << 20  # the largest such region
LATENCY_SAMPLES = 4096
# Upper bounds (seconds) of the fetch latency histogram exported as Prometheus metrics (agent/metrics.py).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)



@dataclass
class _Entry:
    data: asyncio.Future[Data]
    stored: asyncio.Future[None]


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

    def percentiles(self) -> dict[str, float | None]:
        """Batch latency (repository round trip + decode) in milliseconds."""
        s = sorted(self.latencies)
        if not s:
            return {"p50": None, "p90": None, "p99": None}

        def pick(q: float) -> float:
            return round(s[min(len(s) - 1, int(q * len(s)))] * 1000.0, 3)

        return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_fetched": self.bytes_fetched,
            "wire_bytes": self.wire_bytes,
            "chunks_fetched": self.chunks_fetched,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "corrupt_chunks": self.corrupt_chunks,
            "readahead_chunks": self.readahead_chunks,
            "fetch_latency_ms": self.percentiles(),
        }


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
        self._policy = RetryPolicy(timeout=timeout, first_delay=retry_first_delay, max_delay=retry_max_delay)
        self._sem = asyncio.Semaphore(self._max_inflight)
        self._pool = ThreadPoolExecutor(max_workers=2 * self._max_inflight, thread_name_prefix="blockprov-fetch")
        self._inflight: dict[int, _Entry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stores: set[asyncio.Future[None]] = set()
        self._active = 0  # batches started (holding or waiting for a slot)
        self._last_end = -1  # end (exclusive) of the last demand miss
        self._ra_end = 0  # end (exclusive) of the read-ahead issued so far
        self._window = 0  # read-ahead window in chunks
        self._streak = 0  # consecutive misses that continued a stream
        self._latency_ewma = 0.0  # seconds per repository round trip, recent batches weighted most
        self._closed = False
        self.stats = FetchStats()

    # -- public ---------------------------------------------------------------------------------
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

    async def materialize(self, indices: Sequence[int]) -> None:
        """Return when these chunks were fetched and handed to ``store`` (which may have skipped
        some that changed meanwhile: the caller re-checks their state)."""
        entries = self._ensure(indices, demand=True, readahead=False)
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
    def _ensure(self, indices: Sequence[int], *, demand: bool, readahead: bool = True) -> list[_Entry]:
        if self._closed:
            raise DeviceIOError(msg="cache is closing")
        entries: list[_Entry] = []
        new: list[int] = []
        for i in indices:
            e = self._inflight.get(i)
            if e is None:
                e = self._new_entry(i)
                new.append(i)
            entries.append(e)
        if new:
            self._start(sorted(new))
        if readahead and demand and self._ra_max:
            self._readahead(min(indices), max(indices), missed=bool(new))
        return entries

    def _new_entry(self, i: int) -> _Entry:
        loop = asyncio.get_running_loop()
        e = _Entry(loop.create_future(), loop.create_future())
        e.data.add_done_callback(_swallow)
        e.stored.add_done_callback(_swallow)
        self._inflight[i] = e
        return e

    def _start(self, indices: list[int]) -> None:
        """Cut into batches of at most ``batch_bytes`` and start one task per batch."""
        step = self._batch_chunks
        for k in range(0, len(indices), step):
            batch = indices[k:k + step]
            self._active += 1
            task = asyncio.ensure_future(self._run_batch(batch))
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
        """Far from the repository, a random miss also fetches the aligned region around it.

        On a link where a round trip costs 10-20 ms and a MiB a few ms, a boot that waits on one
        round trip per scattered miss spends its time waiting; the data a guest reads next is often
        near what it just read (file systems allocate a directory's files together). So when the
        recent fetch latency is high, the other missing chunks of the miss's region (growing with
        the latency, up to ``NEIGHBOURHOOD_MAX``) go out as one speculative batch, in a free slot
        only. Near the repository (loopback, LAN) nothing changes: bytes stay as few as possible.
        A read-ahead of 0 (``attach --readahead 0``) turns this speculation off too.
        """
        lat = self._latency_ewma
        if not self._ra_max or lat < NEIGHBOURHOOD_LATENCY or self._max_inflight - self._active <= 1:
            return  # near, or no slot to spare beside the demand fetches
        span = min(NEIGHBOURHOOD_MAX // self._cs, max(2, int(lat / NEIGHBOURHOOD_LATENCY) * 8))
        span = 1 << (span.bit_length() - 1)  # a power of two: regions align to it
        a = first - first % span
        near = [k for k in range(a, min(self.manifest.count, a + span))
                if k != first and k not in self._inflight and self._needed(k)]
        if near:
            for k in near:
                self._new_entry(k)
            self.stats.readahead_chunks += len(near)
            self._start(near)

    # -- one batch ------------------------------------------------------------------------------
    async def _run_batch(self, batch: list[int]) -> None:
        entries = [self._inflight[i] for i in batch]
        active = True
        try:
            try:
                result = await asyncio.wait_for(self._fetch(batch), self.timeout)
                self._active -= 1  # the repository slot is free; storing does not hold it
                active = False
            except TimeoutError:
                err: BaseException = FetchFailed(
                    msg=f"repository {self.repo.url} gave no chunks within {self.timeout:g} s "
                        f"(chunks {batch[0]}..{batch[-1]})")
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
                if isinstance(value, BaseException):
                    self._fail([en], value)
                else:
                    en.data.set_result(value)
                    good.append((i, value))
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
                    self._fail(entries, se)
                    return
                for en in entries:
                    if not en.stored.done():
                        en.stored.set_result(None)
        finally:
            if active:
                self._active -= 1
            for i, en in zip(batch, entries, strict=True):
                if self._inflight.get(i) is en:
                    del self._inflight[i]
            self._fail(entries, DeviceIOError(msg="cache is closing"))

    @staticmethod
    def _fail(entries: list[_Entry], err: BaseException) -> None:
        for e in entries:
            for f in (e.data, e.stored):
                if not f.done():
                    f.set_exception(err)

    async def _fetch(self, batch: list[int]) -> dict[int, Data | BaseException]:
        async with self._sem:
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            m = self.manifest
            digests = [m.digest_at(i) for i in batch]
            ids = list(dict.fromkeys(d for d in digests if d != ZERO_DIGEST))
            blobs: Sequence[Data] = []
            if ids:
                # A repository that can hand out views of its answer saves a copy per blob.
                get: Callable[[Sequence[bytes]], Sequence[Data]] = (
                    self.repo.get_blob_views if isinstance(self.repo, BlobViews) else self.repo.get_blobs)

                def call() -> Awaitable[Sequence[Data]]:
                    return loop.run_in_executor(self._pool, get, ids)

                blobs = await retry_async(call, self._policy)
                if len(blobs) != len(ids):
                    raise DeviceIOError(msg=f"repository returned {len(blobs)} blobs for {len(ids)} ids")
            plain = await loop.run_in_executor(self._pool, _decode_all, ids, blobs)
            took = time.monotonic() - t0
            self.stats.observe(took)
            if len(batch) <= 4:  # a small batch's time is mostly the round trip: what the link costs
                self._latency_ewma = took if not self._latency_ewma else 0.8 * self._latency_ewma + 0.2 * took
            self.stats.batches += 1
            self.stats.wire_bytes += sum(len(b) for b in blobs)
            out: dict[int, Data | BaseException] = {}
            for i, d in zip(batch, digests, strict=True):
                if d == ZERO_DIGEST:
                    out[i] = bytes(m.chunk_length(i))
                    continue
                value = plain[d]
                if isinstance(value, ChunkCorrupt):
                    self.stats.corrupt_chunks += 1
                    log.error("chunk %d of %s@%s failed verification, not served: %s",
                              i, m.image, m.id, value)
                    out[i] = DeviceIOError(msg=f"chunk {i} from {self.repo.url} failed verification: {value}")
                else:
                    self.stats.chunks_fetched += 1
                    self.stats.bytes_fetched += len(value)
                    out[i] = value
            return out



def repository_source(repo: BlobSource, *, readahead: int = DEFAULT_READAHEAD, timeout: float = DEFAULT_TIMEOUT,
                      batch_bytes: int = DEFAULT_BATCH_BYTES,
                      max_inflight: int = DEFAULT_MAX_INFLIGHT) -> SourceFactory:
    """The layer below a cache of a version: ``Fetcher``s over ``repo`` with these settings."""

    def make(manifest: Manifest, store: StoreFn, needed: NeededFn) -> Fetcher:
        return Fetcher(manifest, repo, store, needed, readahead=readahead, batch_bytes=batch_bytes,
                       max_inflight=max_inflight, timeout=timeout)

    return make


def _decode_all(ids: list[bytes], blobs: Sequence[Data]) -> dict[bytes, Data | ChunkCorrupt]:
    """Decode and verify (runs in a worker thread; zstd and BLAKE3 release the GIL). Uncompressed
    blobs are not copied: their content is a read-only view of the blob, verified as it is."""
    out: dict[bytes, Data | ChunkCorrupt] = {}
    for cid, blob in zip(ids, blobs, strict=True):
        try:
            out[cid] = decode_view(blob, cid)
        except ChunkCorrupt as e:
            out[cid] = e
    return out

