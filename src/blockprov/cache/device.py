"""The agent's lazy, crash-safe cache of one image version: a BlockDevice over a local data file.

What a cache directory holds and how it is opened is in cache/opening.py; the file-level helpers
(lock, data file, hole punching, positioned writes) are in cache/files.py; the boot profile is
in cache/profile.py. The device is split along its responsibilities, sharing one ``Core``
(cache/core.py: state, data file, fills, checkpoints): this class is the ``BlockDevice`` face
(reads, opening, closing, status), cache/writes.py its writes, cache/steps.py its lifecycle
steps, cache/recovery.py its recovery after an unclean stop.

Where missing chunks come from is not the device's business: its caller builds the layers below
it (cache/source.py) and ``open`` requires them. A read of chunks the cache does not hold goes to
those layers in one call, whatever they are: the repository's fetcher keeps what it fetched (a
fill), an overlay's base (cache/overlay.py: a clone's disk over a shared base cache) answers with
pieces of its own data file and nothing is kept. Writes, the journal, crash rules and lifecycle
are the same for every cache.

Chunk states are in cache/maps.py. The orders of operations below are what keep the invariants
of docs/architecture.md (1: a present chunk holds the manifest's data or is marked modified;
2: the modified mark is durable before the data changes; 3: a write acknowledged before a
completed FLUSH survives a crash):

- Fill after a miss: write data → fdatasync data file → journal ``present`` (not synced: losing
  the record costs a refetch). Cold readers get the verified bytes as soon as they are decoded.
- First write to a clean present chunk: journal ``modified`` → fsync journal (group commit) →
  write data. Writers of a chunk whose ``modified`` record is not yet durable wait for it.
- Whole-chunk write to a missing chunk: no fetch; ``modified`` → fsync → write → fdatasync →
  ``present``. Until ``present`` the chunk reads the base (from its chunk source), so a crash shows
  each sector old or new, never a hole.
- Partial write to a missing chunk: fetch and fill it first (sharing any fetch in flight), then
  as for a present chunk. A chunk is never left half old, half zero.
- Write into a zero chunk (trimmed, or all-zero in the base): ``modified`` (if needed) → fsync →
  write the whole chunk (zeros + the new bytes) → fdatasync → ``unzero``. The chunk reads as
  zeros until then, so the data file's old bytes (a punch may not have reached the disk) are
  never exposed.
- TRIM / WRITE_ZEROES of whole chunks: journal ``zero`` → fsync → punch a hole (only to free
  space: zero chunks are never read from the data file, so a device that cannot punch is left
  as it is rather than written with zeros). Partial chunks get zeros written through the write
  path.
- FLUSH: fdatasync data file, then fsync journal (each shared by concurrent callers).

Concurrency (per-chunk claims, the quiesce gate) is in cache/concurrency.py.

Recovery needs no manual step: ``open`` replays the journal; after an unclean stop it re-reads
and re-hashes the chunks that replay marked present-but-not-modified (at most what was filled
since the last checkpoint) and forgets any that do not match (docs/architecture.md, invariant 1),
then checkpoints (cache/recovery.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from blockprov.align import split
from blockprov.cache.concurrency import gated
from blockprov.cache.core import Core
from blockprov.cache.fetcher import FetchStats
from blockprov.cache.files import take_lock
from blockprov.cache.maps import HELD, MODIFIED, PRESENT, ZERO, ChunkMap
from blockprov.cache.opening import Opened, open_sync
from blockprov.cache.recovery import verify
from blockprov.cache.source import SourceFactory
from blockprov.cache.status import DeviceStatus, cache_status
from blockprov.cache.steps import Pending, Reset, Steps, Switched
from blockprov.cache.view import Chunks
from blockprov.cache.writes import Writes
from blockprov.device.base import STATE_HOLE, STATE_ZERO, Extent, FileSegment, ReadResult
from blockprov.errors import CacheError, DeviceIOError
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository

CHECKPOINT_RECORDS = 65536  # ~2.5 MB of journal
CHECKPOINT_FILL_BYTES = 1 << 30  # bounds the re-verification after an unclean stop


class CacheDevice:
    """BlockDevice of one image version, backed by a cache directory (see module docstring)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        # The hot read path's names (the objects keep their identity for the device's life).
        self._flags = core.flags
        self._map = core.map
        self._seen = core.read_order.seen
        self._shift = core.shift
        self._zeros = core.zeros
        self._fd = core.fd  # -1 once closed (``close``, ``abandon``)
        self._source = core.source
        self._gate = core.gate  # entry points that may fetch or change chunks pass it (``gated``)
        self._writes = Writes(core)
        self._steps = Steps(core)
        self.cache_dir = core.cache_dir
        self.data_path = core.data_path
        self.chunks = Chunks(core.map)  # chunk states, read-only (what other packages may look at)
        self.verified_chunks = 0  # re-hashed after an unclean stop (cache/recovery.py)
        self.dropped_chunks = 0  # of which did not match and are fetched again
        self.lifecycle_lock = asyncio.Lock()  # reset, snapshot and update run one at a time
        self.last_miss = -1  # chunk after the last read the layers below answered (hydration follows it)
        self.last_miss_at = 0.0  # when (monotonic) clients last waited for the layers below

    # -- opening and closing -----------------------------------------------------------------
    @classmethod
    async def open(cls, cache_dir: str | os.PathLike[str], source: SourceFactory, manifest: Manifest | None = None,
                   *, repo: Repository | None = None, data_path: str | os.PathLike[str] | None = None,
                   create: bool = True, read_only: bool = False, verify_unclean: bool = True,
                   checkpoint_records: int = CHECKPOINT_RECORDS, checkpoint_fill_bytes: int = CHECKPOINT_FILL_BYTES,
                   base_cache: str | os.PathLike[str] | None = None) -> CacheDevice:
        """Open (or create) the cache in ``cache_dir`` for ``manifest`` over the layers ``source``
        (cache/source.py: built by the caller, instantiated here with this cache's callbacks).

        ``manifest=None`` re-opens whatever the cache holds (its stored manifest, else ``repo``'s).
        Raises CacheMismatch for a cache of another version, CacheLocked when another agent holds
        it. ``base_cache`` creates an overlay of that shared base cache (its source is then
        ``base_source``, cache/overlay.py). ``checkpoint_fill_bytes`` bounds what an open after an
        unclean stop re-verifies.
        """
        d = Path(cache_dir)
        if create:
            d.mkdir(parents=True, exist_ok=True)
        elif not d.is_dir():
            raise CacheError(f"no cache directory {d}")
        lock_fd = take_lock(d)
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blockprov-cache")
        opened: Opened | None = None
        core: Core | None = None
        try:
            loop = asyncio.get_running_loop()
            opened = await loop.run_in_executor(
                pool, open_sync, d, repo, manifest, None if data_path is None else os.fspath(data_path),
                create, pool, None if base_cache is None else str(Path(base_cache).resolve()))
            core = Core(d, opened, lock_fd, pool, read_only=read_only, checkpoint_records=checkpoint_records,
                        checkpoint_fill_bytes=checkpoint_fill_bytes)
            core.build_source(source)
            dev = cls(core)
            core.read_order.load(d)
            loaded = opened.loaded
            if loaded is not None and not loaded.meta.clean and verify_unclean and loaded.present_runs:
                dev.verified_chunks, dev.dropped_chunks = await verify(core, loaded.present_runs)
            # Fold the replayed records and mark the cache in use (clean=False) before serving.
            await core.checkpoint(clean=False)
        except BaseException:
            if core is not None and hasattr(core, "source"):
                await core.source.close()
            if opened is not None:
                opened.state.close()
                os.close(opened.fd)
            os.close(lock_fd)
            pool.shutdown(wait=False)
            raise
        return dev

    async def close(self) -> None:
        """Flush, checkpoint (marking a clean stop) and release the lock."""
        c = self._core
        if c.closed:
            return
        c.closed = True
        try:
            await c.source.close()
            if c.punches:
                await asyncio.gather(*c.punches, return_exceptions=True)
            if c.checkpoint_task is not None:
                with contextlib.suppress(Exception):
                    await c.checkpoint_task
            await c.flush()
            await c.checkpoint(clean=True)
        finally:
            c.state.close()
            os.close(c.fd)
            c.fd = self._fd = -1
            os.close(c.lock_fd)  # releases the flock
            c.pool.shutdown(wait=True)

    async def abandon(self) -> None:
        """Let go of the cache as a killed agent would: no flush, no checkpoint, journal records not
        yet synced lost, the lock released (crash tests: the next open recovers)."""
        c = self._core
        c.closed = True
        await c.source.close()
        c.state.close()
        os.close(c.fd)
        c.fd = self._fd = -1
        os.close(c.lock_fd)
        c.pool.shutdown(wait=True)

    # -- BlockDevice properties ------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._core.size

    @property
    def read_only(self) -> bool:
        return self._core.read_only

    @property
    def min_block(self) -> int:
        return 512

    @property
    def preferred_block(self) -> int:
        return self._core.cs

    @property
    def can_multi_conn(self) -> bool:
        return True  # one CacheDevice per export: a flush covers every connection's writes

    @property
    def manifest(self) -> Manifest:
        return self._core.manifest

    @property
    def chunk_map(self) -> ChunkMap:
        """The chunk states themselves: for the layers of this package (an overlay's base source)."""
        return self._map

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def overlay(self) -> bool:
        """An overlay of a base cache (a clone's disk): its metadata names its base."""
        return self.base_cache is not None

    @property
    def fetch_stats(self) -> FetchStats | None:
        """The repository's live counters (None for an overlay, which fetches nothing); read by metrics."""
        return self._core.source.stats

    # -- reads -------------------------------------------------------------------------------
    def read_now(self, offset: int, length: int) -> ReadResult | None:
        """A read of chunks the cache holds (present, or zero within one chunk): a piece of the data
        file, or zeros; None for anything else, which ``read`` answers. The NBD server calls this
        in the callback that parsed the request (device/base.py ``ImmediateReads``), so it does no
        I/O and never waits: the first-read order is recorded here, for every read."""
        a = offset >> self._shift
        b = (offset + length - 1) >> self._shift
        if not self._seen[a] or not self._seen[b]:
            self._core.read_order.record(a, b + 1)
        if a == b:
            f = self._flags[a]
            if f & PRESENT and self._fd >= 0:
                return [FileSegment(self._fd, offset, length)]
            if f & ZERO:
                return [self._zeros[:length]]
        elif self._map.all_match(PRESENT, PRESENT, a, b + 1) and self._fd >= 0:
            return [FileSegment(self._fd, offset, length)]
        return None

    async def read(self, offset: int, length: int) -> ReadResult:
        held = self.read_now(offset, length)
        if held is not None:
            return held
        a = offset >> self._shift
        b = (offset + length - 1) >> self._shift
        if not self._map.all_match(PRESENT | ZERO, 0, a, b + 1):
            return await self._read_slow(offset, length)
        # A range the cache holds none of: the layers below answer it as a whole (an overlay's every
        # read of what it did not write). It may fetch, so it passes the gate: ``gated`` written out
        # here, in the read itself, as a coroutine less per call.
        gate = self._gate
        while (closing := gate.closing) is not None:
            await asyncio.shield(closing)
        gate.active += 1
        try:
            if self._core.closed:
                raise DeviceIOError(msg="cache is closed")
            self.last_miss = b + 1  # hydration moves to where clients read
            self.last_miss_at = time.monotonic()
            return (await self._source.read(((offset, length),)))[0]
        finally:
            gate.leave()

    @gated
    async def _read_slow(self, offset: int, length: int) -> ReadResult:
        """A range the cache holds part of: its own pieces, and the rest from the layers below in
        one call (one batch and one read-ahead decision for a fetching layer)."""
        c = self._core
        c.check_open()
        fl = self._flags
        cs = c.cs
        pieces = list(split(offset, length, cs))
        ranges: list[tuple[int, int]] = []
        for p in pieces:
            if not fl[p.chunk] & (PRESENT | ZERO):
                pos = p.offset(cs)
                if ranges and ranges[-1][0] + ranges[-1][1] == pos:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + p.length)
                else:
                    ranges.append((pos, p.length))
        below: list[ReadResult] = []
        if ranges:
            self.last_miss = ((ranges[-1][0] + ranges[-1][1] - 1) >> self._shift) + 1
            self.last_miss_at = time.monotonic()
            below = await c.source.read(ranges)
        out: ReadResult = []
        k = 0
        for p in pieces:
            pos = p.offset(cs)
            if k < len(ranges) and ranges[k][0] <= pos < ranges[k][0] + ranges[k][1]:
                if pos == ranges[k][0]:
                    out += below[k]
                if pos + p.length == ranges[k][0] + ranges[k][1]:
                    k += 1
                continue
            f = fl[p.chunk]
            if f & ZERO:
                out.append(self._zeros[:p.length])
            elif f & PRESENT:
                last = out[-1] if out else None
                if isinstance(last, FileSegment) and last.fd == c.fd and last.offset + last.length == pos:
                    out[-1] = FileSegment(last.fd, last.offset, last.length + p.length)
                else:
                    out.append(FileSegment(c.fd, pos, p.length))
            else:
                out += (await c.source.read([(pos, p.length)]))[0]  # dropped meanwhile: from below again
        return out

    # -- writes ------------------------------------------------------------------------------
    @gated
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        c = self._core
        c.check_writable()
        n = len(data)
        if n:
            a = offset >> self._shift
            b = ((offset + n - 1) >> self._shift) + 1
            cmap = self._map
            if not c.pending_mod and cmap.all_match(PRESENT | MODIFIED | ZERO | HELD, PRESENT | MODIFIED, a, b):
                if cmap.unsynced:
                    cmap.touch(a, b)
                await c.pwrite_many([(offset, memoryview(data))])
            else:
                await self._writes.write(offset, memoryview(data).cast("B"))
        if fua:
            await c.flush()

    @gated
    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fua: bool = False, fast_only: bool = False) -> None:
        self._core.check_writable()
        await self._writes.zero(offset, length, fast_only=fast_only)
        if fua:
            await self._core.flush()

    @gated
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._core.check_writable()
        await self._writes.zero(offset, length, fast_only=False)
        if fua:
            await self._core.flush()

    async def flush(self) -> None:
        self._core.check_open()
        await self._core.flush()

    # -- block status ----------------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> list[Extent]:
        cs = self._core.cs
        end = offset + length
        a = offset // cs
        b = (end - 1) // cs + 1
        out: list[Extent] = []

        def add(start: int, stop: int, flags: int) -> None:
            start, stop = max(start, offset), min(stop, end)
            if stop <= start:
                return
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + stop - start, flags)
            else:
                out.append(Extent(stop - start, flags))

        pos = a
        for x, y in self._map.runs_where(ZERO, ZERO, a, b):
            add(pos * cs, x * cs, 0)
            add(x * cs, y * cs, STATE_HOLE | STATE_ZERO)
            pos = y
        add(pos * cs, b * cs, 0)
        return out

    # -- lifecycle steps (cache/steps.py) ------------------------------------------------------
    def quiesced(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Requests that may fetch or change chunks wait, those in flight finish, the layers below
        go idle; inside, chunk states change only by the caller's hand (cache/steps.py)."""
        return self._steps.quiesced()

    async def fetch_chunks(self, indices: Sequence[int], *, background: bool = False) -> int:
        """Make these chunks local; returns how many were missing (``background``: hydration,
        which client reads go before)."""
        return await self._steps.fetch_chunks(indices, background=background)

    async def settle(self) -> None:
        """Wait until fetches and fills in flight (read-ahead included) and hole punching are done."""
        await self._steps.settle()

    async def reset_chunks(self, *, eager: bool = False, punch: bool = True) -> Reset:
        """Every modified chunk back to the base (invariant 5): ``Steps.reset``."""
        return await self._steps.reset(eager=eager, punch=punch, overlay=self.overlay)

    def modified_chunks(self) -> list[int]:
        return self.chunks.modified_chunks()

    def layers_below(self) -> list[ChunkMap]:
        """The chunk maps of the base caches under this one (none for a cache over the repository)."""
        return self._steps.layers_below()

    async def begin_snapshot(self, target: str) -> Pending:
        """A snapshot's first step, quiesced (``Steps.begin_snapshot``)."""
        return await self._steps.begin_snapshot(target)

    def read_snapshot(self, pending: Pending, indices: Sequence[int]) -> list[bytes]:
        """Chunks of ``pending`` as they were when it began."""
        return self._steps.read_snapshot(pending, indices)

    def end_snapshot(self, pending: Pending) -> None:
        self._steps.end_snapshot(pending)

    async def acknowledge(self, pending: Pending, version: str, *, rebase: Manifest | None = None) -> int:
        """The repository holds ``pending`` as ``version`` (``Steps.acknowledge``); returns how many
        of its chunks were written meanwhile."""
        return await self._steps.acknowledge(pending, version, rebase=rebase)

    async def switch_base(self, new: Manifest, changed: Sequence[int], *,
                          keep_modified: bool | Callable[[int], bool] = False) -> Switched:
        """Move to ``new``, another version of the image (``Steps.switch_base``)."""
        return await self._steps.switch_base(new, changed, keep_modified=keep_modified)

    async def switch_base_cache(self, base_cache: str | os.PathLike[str], sealed: Sequence[int]) -> None:
        """Put this overlay over another base cache holding its ``sealed`` chunks (``Steps``)."""
        await self._steps.switch_base_cache(base_cache, sealed)

    async def mark_written(self, chunks: Sequence[int], *, compare: bool = True) -> list[int]:
        """Chunks written past the cache (a PC's native data path) become modified, present,
        unsynced (``Steps.mark_written``); returns those marked."""
        return await self._steps.mark_written(chunks, compare=compare)

    async def mark_rewritten(self, chunks: Sequence[int]) -> None:
        """Modified chunks written again past the cache: unsynced again (``Steps.mark_rewritten``)."""
        await self._steps.mark_rewritten(chunks)

    async def sync_fills(self) -> None:
        """Make the journal's fill records durable now (a crash then refetches none of them)."""
        await self._steps.sync_fills()

    async def record_hydrated(self) -> None:
        await self._steps.record_hydrated()

    def record_repository(self, url: str) -> None:
        """The repository this cache is attached to now (its next attach uses it)."""
        self._steps.record_repository(url)

    async def checkpoint(self) -> None:
        await self._core.checkpoint(clean=False)

    @property
    def repository(self) -> str | None:
        """The repository the cache was attached with (recorded in its metadata)."""
        return self._core.state.meta.repository

    @property
    def uuid(self) -> str:
        """The cache's own id (made at creation)."""
        return self._core.state.meta.uuid

    @property
    def base_cache(self) -> str | None:
        """The base cache an overlay reads through (None: not an overlay)."""
        return self._core.state.meta.base_cache

    # -- status -----------------------------------------------------------------------------
    def status(self) -> DeviceStatus:
        """What the cache holds (cache/status.py) and this run's figures (the layers' below too)."""
        c = self._core
        st = DeviceStatus(cache=cache_status(self.cache_dir, c.state.meta, self._map, c.state.last_seq, self.totals(),
                                             self.layers_below()),
                          verified_chunks=self.verified_chunks, dropped_chunks=self.dropped_chunks,
                          fetch=c.counters().figures())
        return replace(st, **c.source.status())

    def profile(self) -> list[int]:
        """Chunks in the order they were first read over this cache's life (the first boot's order)."""
        return self._core.read_order.order()

    def totals(self) -> dict[str, int]:
        """Fetch counters over every agent run on this cache (this run's added to the stored ones)."""
        return self._core.totals()
