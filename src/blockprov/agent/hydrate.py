"""Background hydration: copy every missing chunk into the cache while clients are served.

Seed 000 claims 13–15: the instance keeps working from the repository and becomes fully local
by itself, then stops needing the repository at all. Rules, and why:

- Client reads go first: hydration asks for one batch at a time; past the boot profile (whose
  chunks the guest reads next, so they are fetched as a client's are) it is background work
  (``fetch_chunks(background=True)``): the fetcher gives its batches a repository slot only while
  another stays free and only when no client batch waits for one, and a client that needs a chunk
  of a hydration batch in flight fetches that chunk itself instead of waiting for the batch. While
  clients are missing chunks (the last miss less than a second ago) the batch is 256 KiB, not
  8 MiB, and after each batch hydration rests as long as the batch took (at most 50 ms), so the
  link and the CPUs a client shares with it are busy at most half the time: what a cold read still
  shares with hydration is a small slice (bench/RESULTS.md, issue 15).
- A client miss moves hydration to where the client reads (``CacheDevice.last_miss``): what a
  client reads next is most likely near what it just read.
- A boot profile (the order a first boot read its chunks) is followed first, then the rest in
  disk order; with ``profile_only`` only the profile is fetched (prefetch for a boot).
- ``profile_parallel``: the profile's batches may be fetched that many at a time (default one). A
  resumed VM's memory (vm/vms.py) reads its resume profile's chunks next, in that order, so for it
  the profile *is* the client's demand, fetched ahead of the page faults; the rest stays one batch
  at a time. With ``hold_rest`` the rest waits, after the profile, until the clients have missed
  a chunk since hydration began and then not for a second (at most ``hold_rest`` seconds): the
  resumed guests' own faults go first, even when the profile was in before the guests started.
- Optional rate limit in bytes per second, so a lab of 30 machines does not saturate its uplink.
- Faults whose class is transient (errors.py: a full cache disk, ``NoSpace``, or an unreachable
  repository, ``FetchFailed``) pause it instead of ending it: the batch is tried again after a
  pause growing from 5 s to 30 s (retry.py, for ever), with the reason in ``status``; any other
  fault ends it (``failed``, with the reason). Serving is unaffected either way.
- Completion is recorded in the cache's metadata (``hydrated``) by a checkpoint. A crash loses
  nothing: fills are journaled as they land, so a new run continues with what is still missing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from blockprov.cache import CacheDevice
from blockprov.errors import DeviceError, NoSpace, UsageError
from blockprov.retry import RetryPolicy, retry_async

log = logging.getLogger("blockprov.hydrate")

BATCH_BYTES = 8 << 20
BUSY_BATCH_BYTES = 256 << 10
PROFILE_BUSY_BATCH_BYTES = 1 << 20  # profile prefetch while clients miss: the guest reads these next
BUSY_SECONDS = 1.0
BUSY_PAUSE_MAX = 0.05  # the longest rest after a batch while clients miss
PAUSE_SECONDS = 5.0
PAUSE_MAX = 30.0  # the longest pause while a fault lasts
MIN_RATE = 4096.0  # bytes a second: a rate limit below one small chunk a second never finishes (issue 27)
MAX_HOLD_REST = 3600.0


class Hydrator:
    def __init__(self, dev: CacheDevice, *, order: Sequence[int] = (), rate: float | None = None,
                 profile_only: bool = False, batch_bytes: int = BATCH_BYTES,
                 pause_seconds: float = PAUSE_SECONDS, profile_parallel: int = 1, hold_rest: float = 0.0) -> None:
        if dev.overlay:
            raise UsageError("an overlay instance reads through its shared base: hydrate the base cache instead")
        if rate is not None and not (rate == 0 or rate >= MIN_RATE):  # also refuses NaN and negative rates
            raise UsageError(f"a hydration rate is at least {MIN_RATE:g} bytes a second (or none), not {rate}")
        if not 0 <= hold_rest <= MAX_HOLD_REST:
            raise UsageError(f"hold_rest is 0 to {MAX_HOLD_REST:g} seconds, not {hold_rest}")
        self.dev = dev
        self.rate = rate if rate and rate > 0 else None
        self.profile_only = profile_only
        self.pause_seconds = pause_seconds
        self.profile_parallel = max(1, profile_parallel)
        self.hold_rest = max(0.0, hold_rest)
        cs = dev.manifest.chunk_size
        self._per_idle = max(1, batch_bytes // cs)
        self._per_busy = max(1, min(batch_bytes, BUSY_BATCH_BYTES) // cs)
        self._per_busy_profile = max(1, min(batch_bytes, PROFILE_BUSY_BATCH_BYTES) // cs)
        self._from_profile = False  # the last batch came from the boot profile
        self._order = deque(i for i in order if 0 <= i < dev.manifest.count)
        self._cursor = 0
        self._seen_miss = dev.last_miss
        self.state = "starting"
        self.message = ""
        self.bytes = 0
        self.chunks = 0
        self.started = time.time()
        self._begun = time.monotonic()  # client misses from then on count for hold_rest
        self.finished: float | None = None
        # what paused or stopped it last (a one-shot run gives up on it: cli hydrate)
        self.fault: DeviceError | None = None
        # Faults the error's class calls transient (the repository away, a full disk) pause it,
        # for ever: the pause grows from ``pause_seconds`` to PAUSE_MAX (retry.py).
        self._retry = RetryPolicy(timeout=None, first_delay=pause_seconds, max_delay=max(pause_seconds, PAUSE_MAX),
                                  jitter=False)
        self._window: deque[tuple[float, int]] = deque(maxlen=64)
        self._task: asyncio.Task[None] | None = None

    # -- control --------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())
        return self._task

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self.state = "stopped"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        self.state = "running"
        while True:
            if self.hold_rest and not self._order and not self.profile_only:
                await self._hold_rest()
            batches = [self._next_batch()]
            while self._order and len(batches) < self.profile_parallel and batches[-1]:
                batches.append(self._next_batch())
            batch = [i for b in batches for i in b]
            if not batch:
                break
            t0 = time.monotonic()
            try:
                n = await retry_async(functools.partial(self._fetch, batch, batches), self._retry,
                                      f"hydration of {self.dev.cache_dir}", on_retry=self._paused)
            except DeviceError as e:
                self.fault = e
                if self.dev.closed:
                    self.state = "stopped"
                    return
                # not transient (errors.py): no pause can fix it, so hydration ends, saying why
                self.state, self.message = "failed", f"{e}; hydration stopped"
                log.error("cache %s: %s", self.dev.cache_dir, self.message)
                return
            if self.state != "running":
                log.info("hydration of %s resumed", self.dev.cache_dir)
                self.state, self.message = "running", ""
            got = sum(self.dev.manifest.chunk_length(i) for i in batch) if n else 0
            self.bytes += got
            self.chunks += n
            now = time.monotonic()
            self._window.append((now, self.bytes))
            if self.rate and got:
                await asyncio.sleep(max(0.0, got / self.rate - (now - t0)))
            elif n and not self._from_profile and now - self.dev.last_miss_at < BUSY_SECONDS:
                # Clients are missing chunks: rest as long as the batch took, so hydration holds the
                # link and the CPUs (2 here, shared with the guest) at most half the time.
                await asyncio.sleep(min(BUSY_PAUSE_MAX, now - t0))
        if self.profile_only:
            self.state = "done"
            self.message = "profile prefetched"
        else:
            await self.dev.record_hydrated()
            self.state = "done"
            self.message = "every chunk is local"
        self.finished = time.time()
        log.info("hydration of %s done: %d chunks, %d bytes", self.dev.cache_dir, self.chunks, self.bytes)

    async def _fetch(self, batch: list[int], batches: list[list[int]]) -> int:
        # The profile's chunks are what the booting guest reads next: they race ahead of it as
        # client fetches do; the rest is background work that yields to clients.
        bg = not self._from_profile
        if len(batches) == 1:
            n = await self.dev.fetch_chunks(batch, background=bg)
        else:
            n = sum(await asyncio.gather(*(self.dev.fetch_chunks(b, background=bg) for b in batches if b)))
        if n:
            # Journal the fills now (they are only buffered otherwise): a crash then costs no
            # refetch of what hydration already copied.
            await self.dev.sync_fills()
        return n

    def _paused(self, e: BaseException, attempt: int, delay: float) -> None:
        """A transient fault (retry.py): the batch is tried again after ``delay``."""
        self.fault = e if isinstance(e, DeviceError) else None
        why = f"cache disk full ({e})" if isinstance(e, NoSpace) else str(e)
        self._pause(f"{why}; hydration paused, retrying in {delay:g} s")

    async def _hold_rest(self) -> None:
        """After the profile: wait (once, at most ``hold_rest`` s) until the clients have missed a
        chunk since this hydration began, and then not for a second. A resumed VM's memory is
        prefetched from before its qemu starts, when no client has missed yet: the rest must not
        take the link and the cores the moment the profile is in, just as the guest resumes."""
        deadline = time.monotonic() + self.hold_rest
        self.hold_rest = 0.0
        while time.monotonic() < deadline:
            last = self.dev.last_miss_at
            if last >= self._begun and time.monotonic() - last >= BUSY_SECONDS:
                return
            await asyncio.sleep(0.1)

    def _pause(self, why: str) -> None:
        if self.message != why:
            log.warning("cache %s: %s", self.dev.cache_dir, why)
        self.state, self.message = "paused", why

    def _next_batch(self) -> list[int]:
        """Up to one batch of missing chunks: profile order first, then from the cursor on."""
        chunks = self.dev.chunks
        busy = time.monotonic() - self.dev.last_miss_at < BUSY_SECONDS
        per = self._per_busy_profile if busy else self._per_idle
        out: list[int] = []
        while self._order and len(out) < per:
            i = self._order.popleft()
            if not chunks.local(i):
                out.append(i)
        self._from_profile = bool(out)
        if out or self.profile_only:
            return out
        per = self._per_busy if busy else self._per_idle
        if self.dev.last_miss != self._seen_miss:
            self._seen_miss = self.dev.last_miss
            if 0 <= self._seen_miss < chunks.count:
                self._cursor = self._seen_miss
        start = chunks.first_missing(self._cursor)
        if start < 0:
            start = chunks.first_missing(0)
            if start < 0:
                return []
        for a, b in chunks.missing_runs(start, min(chunks.count, start + 4 * per)):
            out.extend(range(a, min(b, a + per - len(out))))
            if len(out) >= per:
                break
        self._cursor = out[-1] + 1
        return out

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> HydrationStatus:
        counts = self.dev.chunks.counts()
        total = counts["total"] or 1
        local = counts["total"] - counts["missing"]
        rate = 0.0
        if len(self._window) >= 2:
            (t0, b0), (t1, b1) = self._window[0], self._window[-1]
            if t1 > t0:
                rate = (b1 - b0) / (t1 - t0)
        missing_bytes = counts["missing"] * self.dev.manifest.chunk_size
        eta = missing_bytes / rate if rate > 0 and self.state == "running" else None
        return HydrationStatus(state=self.state, message=self.message, profile_only=self.profile_only,
                               percent=round(100.0 * local / total, 2), chunks_fetched=self.chunks,
                               bytes_fetched=self.bytes, rate_bytes_per_s=round(rate, 1),
                               eta_seconds=None if eta is None else round(eta, 1), rate_limit=self.rate,
                               started=self.started, finished=self.finished)


@dataclass(frozen=True)
class HydrationStatus:
    """Where a hydration is (``status``'s ``hydration``, ``blockprov hydrate``)."""

    state: str = "starting"  # starting, running, paused, failed, stopped, done
    message: str = ""
    profile_only: bool = False
    percent: float = 0.0  # of the chunks local
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    rate_bytes_per_s: float = 0.0
    eta_seconds: float | None = None
    rate_limit: float | None = None
    started: float | None = None
    finished: float | None = None
