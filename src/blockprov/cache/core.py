"""What every part of an open cache shares: its state, its data file, its fills and checkpoints.

A ``CacheDevice`` (cache/device.py) is split along its responsibilities: the device itself (the
``BlockDevice`` face: reads, opening, closing, status), its writes (cache/writes.py), its
lifecycle steps (cache/steps.py) and its recovery after an unclean stop (cache/recovery.py). They
share one ``Core``: the replayed chunk state and journal (cache/journal.py), the data file, the
per-chunk claims and the quiesce gate (cache/concurrency.py), the chunk source built from the
caller's layers (cache/source.py), and the rules every part follows:

- Fill (``store``, called by the layers below): write data → journal ``present`` (not synced:
  losing the record costs a refetch); the data file is synced before that record can reach the
  disk, by the journal sync or checkpoint that writes it (``sync_fills``), not by each fill. Fills
  skip chunks that are local or claimed by a write meanwhile. (A sync per fill was one more trip
  to the pool and an fdatasync per fetched batch: with the pwrite, ~250 µs of an agent's CPU a
  batch, ~1,900 batches on the storm's boot trace: bench/RESULTS.md, "Boot storm".)
- FLUSH: fdatasync data file, then fsync journal (each shared by concurrent callers).
- Checkpoint: fold the journal into meta every ``checkpoint_records`` records or
  ``checkpoint_fill_bytes`` of fills (which bounds the re-verification after an unclean stop).

Nothing here is part of the cache's public face (``blockprov.cache``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockprov.align import runs
from blockprov.cache.capture import Capture
from blockprov.cache.concurrency import Claims, Gate
from blockprov.cache.fetcher import FetchStats
from blockprov.cache.files import io_error, punch, write_groups
from blockprov.cache.journal import GroupSync
from blockprov.cache.maps import MODIFIED, PRESENT, ZERO, Kind
from blockprov.cache.opening import Opened
from blockprov.cache.profile import ReadOrder
from blockprov.cache.source import CacheSide, ChunkSource, Data, SourceFactory
from blockprov.cache.status import TOTALS
from blockprov.errors import DeviceIOError, ReadOnlyDevice

log = logging.getLogger("blockprov.cache.device")

INLINE_WRITE = 64 << 10  # pwrites up to this size run on the event loop (page cache copy, ~µs)


class Core:
    """The shared state of one open cache (see the module docstring)."""

    def __init__(self, cache_dir: Path, opened: Opened, lock_fd: int, pool: ThreadPoolExecutor, *,
                 read_only: bool, checkpoint_records: int, checkpoint_fill_bytes: int) -> None:
        self.cache_dir = cache_dir
        self.manifest = opened.manifest
        self.data_path = opened.data_path
        self.state = opened.state
        self.map = opened.state.map
        self.flags = self.map.flags
        self.fd = opened.fd
        self.lock_fd = lock_fd
        self.pool = pool
        self.read_only = read_only
        self.size = self.manifest.size
        self.cs = self.manifest.chunk_size
        self.shift = self.cs.bit_length() - 1
        self.zeros = memoryview(bytes(self.cs))
        self.claims = Claims()  # per-chunk transition claims (cache/concurrency.py)
        self.pending_mod: dict[int, int] = {}  # chunk → seq of its not-yet-durable modified record
        self.data_sync = GroupSync(self.fdatasync)
        self.fills_unsynced = False  # fills written since the data file's last sync began (``sync_fills``)
        self.state.before_durable = self.sync_fills
        self.data_failed: BaseException | None = None
        self.can_punch = True
        self.closed = False
        self.checkpoint_task: asyncio.Future[None] | None = None
        self.checkpoint_records = checkpoint_records
        self.checkpoint_fill_bytes = checkpoint_fill_bytes
        self.filled_since_checkpoint = 0
        self.folded: dict[str, int] = {}  # this run's fetch counters already added to meta.totals
        self.gate = Gate()  # closed by ``Steps.quiesced``; entry points that fetch or change chunks pass it
        # A snapshot reading its chunks: old content of chunks written meanwhile (cache/capture.py).
        self.capture: Capture | None = None
        # First-read order of chunks over this cache's life (boot profiles).
        self.read_order = ReadOrder(self.manifest.count)
        self.punches: set[asyncio.Task[None]] = set()  # background hole punching after resets
        self.no_fetches = FetchStats()
        self.source: ChunkSource  # set by ``build_source`` (the layers are built with this core's callbacks)

    def build_source(self, factory: SourceFactory) -> None:
        side = CacheSide(where=str(self.cache_dir), base_cache=self.state.meta.base_cache,
                         store=self.store_fetched, needed=self.needs_fetch, read_local=self.read_chunk,
                         at_home=self.at_home)
        self.source = factory(self.manifest, side)

    # -- what the layers below call -------------------------------------------------------------
    def needs_fetch(self, i: int) -> bool:
        return not self.flags[i] & (PRESENT | ZERO) and i not in self.claims

    def at_home(self, i: int) -> bool:
        return self.flags[i] & (PRESENT | MODIFIED | ZERO) == PRESENT

    def read_chunk(self, i: int) -> bytes:
        """Chunk i as the data file holds it (blocking; a snapshot's reads, recovery, the reserve)."""
        return os.pread(self.fd, self.manifest.chunk_length(i), i * self.cs)

    async def store_fetched(self, items: list[tuple[int, Data]]) -> None:
        """Write verified chunks into the data file, then mark them present (see module doc)."""
        fl = self.flags
        take = [(i, d) for i, d in items if not fl[i] & (PRESENT | ZERO) and i not in self.claims]
        if not take or self.fd < 0:
            return
        idx = [i for i, _ in take]
        self.claims.take(idx)
        try:
            cs = self.cs
            self.check_data()
            await self.pwrite_many([(i * cs, d) for i, d in take])
            self.fills_unsynced = True  # before the records: a sync that takes them syncs the data first
            for x, y in runs(idx):
                self.state.apply(Kind.PRESENT, x, y)
            self.filled_since_checkpoint += sum(len(d) for _, d in take)
        finally:
            self.claims.release(idx)
        self.maybe_checkpoint()

    # -- the data file --------------------------------------------------------------------------
    async def pwrite_many(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write pieces at their offsets; contiguous pieces go out as one pwritev."""
        if self.fd < 0:
            raise DeviceIOError(msg="cache is closed")
        total = sum(len(d) for _, d in writes)
        try:
            if total <= INLINE_WRITE:
                write_groups(self.fd, writes)
            else:
                await self.run(write_groups, self.fd, writes)
        except OSError as e:
            raise io_error(e, f"writing {self.data_path}") from e

    async def sync_fills(self) -> None:
        """The data file's sync that a journal sync or checkpoint awaits before its records reach
        the disk (cache/journal.py, ``before_durable``), when fills were written since the last."""
        if not self.fills_unsynced:
            return
        self.fills_unsynced = False
        try:
            await self.data_sync.sync()
        except BaseException:
            self.fills_unsynced = True
            raise

    def check_data(self) -> None:
        if self.data_failed is not None:
            raise DeviceIOError(msg=f"cache data file is unusable after an earlier error: {self.data_failed}")

    async def fdatasync(self) -> None:
        self.check_data()
        try:
            await self.run(os.fdatasync, self.fd)
        except OSError as e:
            self.data_failed = e  # dirty pages may be gone: later syncs must not pretend success
            raise io_error(e, f"fdatasync {self.data_path}") from e

    async def flush(self) -> None:
        await self.data_sync.sync()
        await self.state.sync()

    def punch_runs(self, spans: list[tuple[int, int]]) -> None:
        """Free the blocks of these chunk runs (blocking; space only: zero and missing chunks are
        never read from the data file)."""
        cs = self.cs
        for x, y in spans:
            start = x * cs
            try:
                ok = punch(self.fd, start, min(y * cs, self.size) - start)
            except OSError as e:
                log.warning("cache %s: punching a hole failed: %s", self.cache_dir, e)
                ok = True  # the chunks are zero in the map either way; try again next time
            if not ok:
                self.can_punch = False
                log.info("cache data %s cannot punch holes: trimmed chunks keep their blocks", self.data_path)
                return

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- checkpoints and counters ---------------------------------------------------------------
    def counters(self) -> FetchStats:
        """This run's repository counters; all zero for a stack that fetches nothing."""
        return self.source.stats or self.no_fetches

    def totals(self) -> dict[str, int]:
        """Fetch counters over every agent run on this cache (this run's added to the stored ones)."""
        st, base = self.counters(), self.state.meta.totals
        return {k: int(base.get(k, 0)) + int(getattr(st, k)) - int(self.folded.get(k, 0))
                for k in TOTALS}

    async def checkpoint(self, *, clean: bool) -> None:
        if self.read_order.unsaved:
            await self.run(self.read_order.save, self.cache_dir)
        totals = self.totals()
        self.state.meta = replace(self.state.meta, totals=totals)
        self.folded = {k: int(getattr(self.counters(), k)) for k in TOTALS}
        await self.state.checkpoint(clean=clean)

    def maybe_checkpoint(self) -> None:
        if self.closed or self.checkpoint_task is not None:
            return
        if self.state.records_since_checkpoint < self.checkpoint_records \
                and self.filled_since_checkpoint < self.checkpoint_fill_bytes:
            return
        self.filled_since_checkpoint = 0
        task = asyncio.ensure_future(self.checkpoint(clean=False))
        self.checkpoint_task = task

        def done(t: asyncio.Future[None]) -> None:
            self.checkpoint_task = None
            if not t.cancelled() and t.exception() is not None:
                log.error("cache %s: checkpoint failed: %s", self.cache_dir, t.exception())

        task.add_done_callback(done)

    def check_open(self) -> None:
        if self.closed:
            raise DeviceIOError(msg="cache is closed")

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyDevice()
        self.check_open()
