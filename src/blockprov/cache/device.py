"""The agent's lazy, crash-safe cache of one image version: a BlockDevice over a local data file.

What a cache directory holds and how it is opened is in cache/opening.py; the file-level helpers
(lock, data file, hole punching, positioned writes) are in cache/files.py; the boot profile is
in cache/profile.py; where missing chunks come from is a ``ChunkSource`` (cache/source.py).

An *overlay* (a clone's disk) is this same class over a shared, read-only base cache instead of
the repository: its ``ChunkSource`` is the base (cache/overlay.py), and where a cache fills a
missing chunk on a read, an overlay reads it through from the base without keeping it (the
``overlay`` branches below). Writes, the journal, crash rules and lifecycle are the same for both.

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
then checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockprov.align import Piece, runs, split
from blockprov.cache.capture import Capture
from blockprov.cache.concurrency import Claims, Gate, gated
from blockprov.cache.fetcher import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_READAHEAD,
    DEFAULT_TIMEOUT,
    FetchStats,
    repository_source,
)
from blockprov.cache.files import io_error, punch, take_lock, write_groups
from blockprov.cache.journal import CacheState, GroupSync
from blockprov.cache.maps import BASE_ZERO, HELD, MODIFIED, PRESENT, ZERO, ChunkMap, Kind
from blockprov.cache.opening import MANIFEST_NAME, Opened, manifest_digest, next_manifest_name, open_sync
from blockprov.cache.overlay import base_source
from blockprov.cache.profile import ReadOrder
from blockprov.cache.reserve import Reserve
from blockprov.cache.source import ChunkSource, SourceFactory
from blockprov.cache.status import TOTALS, cache_status, layers_below, needs_repository
from blockprov.codec import ZERO_DIGEST, digest, is_zero
from blockprov.device.base import STATE_HOLE, STATE_ZERO, Extent, FileSegment, ReadResult
from blockprov.durable import atomic_write, fsync_dir
from blockprov.errors import CacheError, CacheMismatch, DeviceIOError, NotSupported, ReadOnlyDevice
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository

log = logging.getLogger(__name__)

INLINE_WRITE = 64 << 10  # pwrites up to this size run on the event loop (page cache copy, ~µs)
CHECKPOINT_RECORDS = 65536  # ~2.5 MB of journal
CHECKPOINT_FILL_BYTES = 1 << 30  # bounds the re-verification after an unclean stop


class CacheDevice:
    """BlockDevice of one image version, backed by a cache directory (see module docstring)."""

    def __init__(self, cache_dir: Path, repo: Repository, opened: Opened, lock_fd: int,
                 pool: ThreadPoolExecutor, *, source: SourceFactory, read_only: bool, checkpoint_records: int,
                 checkpoint_fill_bytes: int, base: CacheDevice | None = None,
                 reserve: Reserve | None = None) -> None:
        self.cache_dir = cache_dir
        self.repo = repo
        self.manifest = opened.manifest
        self.data_path = opened.data_path
        self._state = opened.state
        self._map = opened.state.map
        self._flags = self._map.flags
        self._fd = opened.fd
        self._lock_fd = lock_fd
        self._pool = pool
        self._read_only = read_only
        self._size = self.manifest.size
        self._cs = self.manifest.chunk_size
        self._shift = self._cs.bit_length() - 1
        self._zeros = memoryview(bytes(self._cs))
        self._claims = Claims()  # per-chunk transition claims (cache/concurrency.py)
        self._pending_mod: dict[int, int] = {}  # chunk → seq of its not-yet-durable modified record
        self._data_sync = GroupSync(self._fdatasync)
        self._data_failed: BaseException | None = None
        self._can_punch = True
        self._closed = False
        self._checkpoint_task: asyncio.Future[None] | None = None
        self._checkpoint_records = checkpoint_records
        self._checkpoint_fill_bytes = checkpoint_fill_bytes
        self._filled_since_checkpoint = 0
        self.verified_chunks = 0
        self.dropped_chunks = 0
        self._folded: dict[str, int] = {}  # this run's fetch counters already added to meta.totals
        self._gate = Gate()  # closed by ``quiesced``; entry points that fetch or change chunks pass it
        # A snapshot reading its chunks: old content of chunks written meanwhile (cache/capture.py).
        self._capture: Capture | None = None
        # First-read order of chunks over this cache's life (boot profiles).
        self._read_order = ReadOrder(self.manifest.count)
        self._seen = self._read_order.seen
        self.lifecycle_lock = asyncio.Lock()  # reset, snapshot and update run one at a time
        self.last_miss = -1  # chunk after the last demand miss (hydration follows it)
        self.last_miss_at = 0.0  # when (monotonic) clients last waited for the repository
        self._punches: set[asyncio.Task[None]] = set()  # background hole punching after resets
        # An overlay (this class over a shared base cache, cache/overlay.py) reads the chunks it
        # does not hold through its base instead of filling them: ``overlay`` is that mode.
        self.overlay = opened.state.meta.base_cache is not None
        self._base = base
        self._source: ChunkSource = source(self.manifest, self._store_fetched, self._needs_fetch)
        self._no_fetches = FetchStats()
        self.reserve = reserve  # golden copies kept before first overwrites (cache/reserve.py)

    # -- opening and closing -----------------------------------------------------------------
    @classmethod
    async def open(cls, cache_dir: str | os.PathLike[str], repo: Repository, manifest: Manifest | None = None,
                   *, data_path: str | os.PathLike[str] | None = None, readahead: int = DEFAULT_READAHEAD,
                   fetch_timeout: float = DEFAULT_TIMEOUT, create: bool = True, read_only: bool = False,
                   batch_bytes: int = DEFAULT_BATCH_BYTES, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                   verify_unclean: bool = True, checkpoint_records: int = CHECKPOINT_RECORDS,
                   checkpoint_fill_bytes: int = CHECKPOINT_FILL_BYTES, base: CacheDevice | None = None,
                   base_cache: str | os.PathLike[str] | None = None,
                   source: SourceFactory | None = None, reserve: Reserve | None = None) -> CacheDevice:
        """Open (or create) the cache in ``cache_dir`` for ``manifest``.

        ``manifest=None`` re-opens whatever the cache holds (its stored manifest, else the
        repository's). Raises CacheMismatch for a cache of another version, CacheLocked when
        another agent holds it. ``base_cache`` creates an overlay of that shared base cache
        (cache/overlay.py); ``base`` is the opened base device an overlay reads through.

        The layer below, where missing chunks come from (cache/source.py), is ``source`` when
        given; else, for an overlay, its ``base``, and for any other cache the repository, fetched
        from with ``readahead``, ``fetch_timeout``, ``batch_bytes`` and ``max_inflight``.

        ``reserve`` (not for an overlay): a golden reserve (cache/reserve.py) that keeps the base
        content of each chunk before its first overwrite and serves it back after a reset.
        """
        d = Path(cache_dir)
        if create:
            d.mkdir(parents=True, exist_ok=True)
        elif not d.is_dir():
            raise CacheError(f"no cache directory {d}")
        lock_fd = take_lock(d)
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blockprov-cache")
        opened: Opened | None = None
        dev: CacheDevice | None = None
        try:
            loop = asyncio.get_running_loop()
            opened = await loop.run_in_executor(
                pool, open_sync, d, repo, manifest, None if data_path is None else os.fspath(data_path),
                create, pool, None if base_cache is None else str(Path(base_cache).resolve()))
            held_base = opened.state.meta.base_cache
            if held_base is not None and base is not None and (
                    base.manifest.id != opened.manifest.id or str(base.cache_dir.resolve()) != held_base):
                raise CacheMismatch(path=str(d), held=f"an overlay of {held_base}",
                                    wanted=f"an overlay of {base.cache_dir} ({base.manifest.id})")
            if source is None:
                source = base_source(base, str(d)) if held_base is not None else repository_source(
                    repo, readahead=readahead, timeout=fetch_timeout, batch_bytes=batch_bytes,
                    max_inflight=max_inflight)
            if held_base is not None:
                reserve = None
            if reserve is not None:
                source = reserve.source(source)
            dev = cls(d, repo, opened, lock_fd, pool, source=source, base=base, read_only=read_only,
                      checkpoint_records=checkpoint_records, checkpoint_fill_bytes=checkpoint_fill_bytes,
                      reserve=reserve)
            dev._read_order.load(d)
            loaded = opened.loaded
            if loaded is not None and not loaded.meta.clean and verify_unclean and loaded.present_runs:
                await dev._verify(loaded.present_runs)
            # Fold the replayed records and mark the cache in use (clean=False) before serving.
            await dev._checkpoint(clean=False)
        except BaseException:
            if dev is not None:
                await dev._source.close()
            if opened is not None:
                opened.state.close()
                os.close(opened.fd)
            os.close(lock_fd)
            pool.shutdown(wait=False)
            raise
        return dev

    async def close(self) -> None:
        """Flush, checkpoint (marking a clean stop) and release the lock."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._source.close()
            if self._punches:
                await asyncio.gather(*self._punches, return_exceptions=True)
            if self._checkpoint_task is not None:
                with contextlib.suppress(Exception):
                    await self._checkpoint_task
            await self._flush()
            await self._checkpoint(clean=True)
        finally:
            self._state.close()
            os.close(self._fd)
            self._fd = -1
            os.close(self._lock_fd)  # releases the flock
            self._pool.shutdown(wait=True)

    # -- BlockDevice properties ------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def min_block(self) -> int:
        return 512

    @property
    def preferred_block(self) -> int:
        return self._cs

    @property
    def can_multi_conn(self) -> bool:
        return True  # one CacheDevice per export: a flush covers every connection's writes

    @property
    def chunk_map(self) -> ChunkMap:
        return self._map

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fetch_stats(self) -> FetchStats | None:
        """The source's live repository counters (None for an overlay, which fetches nothing); read by metrics."""
        return self._source.stats

    # -- reads -------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> ReadResult:
        a = offset >> self._shift
        b = (offset + length - 1) >> self._shift
        if not self._seen[a] or not self._seen[b]:
            self._read_order.record(a, b + 1)
        if a == b:
            f = self._flags[a]
            if f & PRESENT and self._fd >= 0:
                return [FileSegment(self._fd, offset, length)]
            if f & ZERO:
                return [self._zeros[:length]]
        elif self._map.all_match(PRESENT, PRESENT, a, b + 1) and self._fd >= 0:
            return [FileSegment(self._fd, offset, length)]
        if self._base is not None and self._map.all_match(PRESENT | ZERO, 0, a, b + 1):
            return await self._base.read(offset, length)  # an overlay's unmodified data: the shared base's
        return await self._read_slow(offset, length)

    @gated
    async def _read_slow(self, offset: int, length: int) -> ReadResult:
        self._check_open()
        fl = self._flags
        cs = self._cs
        pieces = list(split(offset, length, cs))
        if self.overlay:
            return await self._read_through(offset, pieces)
        need = sorted({p.chunk for p in pieces if not fl[p.chunk] & (PRESENT | ZERO)})
        if need:
            self.last_miss = need[-1] + 1  # hydration moves to where clients read
            self.last_miss_at = time.monotonic()
        got = await self._source.get_many(need) if need else {}
        out: ReadResult = []
        for p in pieces:
            data = got.get(p.chunk)
            if data is None:
                f = fl[p.chunk]
                if f & ZERO:
                    out.append(self._zeros[:p.length])
                    continue
                if f & PRESENT:
                    off = p.offset(cs)
                    last = out[-1] if out else None
                    if isinstance(last, FileSegment) and last.offset + last.length == off:
                        out[-1] = FileSegment(last.fd, last.offset, last.length + p.length)
                    else:
                        out.append(FileSegment(self._fd, off, p.length))
                    continue
                data = await self._source.get(p.chunk)  # dropped meanwhile: fetch it again
            out.append(memoryview(data)[p.start:p.start + p.length])
        return out

    async def _read_through(self, offset: int, pieces: list[Piece]) -> ReadResult:
        """An overlay's read: its own chunks from its data file, the others from the base (not copied)."""
        fl = self._flags
        cs = self._cs
        out: ReadResult = []
        base_from = base_to = -1
        for p in pieces:
            pos = p.offset(cs)
            f = fl[p.chunk]
            if not f & (PRESENT | ZERO):
                if base_to != pos:
                    if base_to > base_from >= 0:
                        out += await self._base_read(base_from, base_to - base_from)
                    base_from = pos
                base_to = pos + p.length
                continue
            if base_to > base_from >= 0:
                out += await self._base_read(base_from, base_to - base_from)
                base_from = base_to = -1
            out.append(self._zeros[:p.length] if f & ZERO else FileSegment(self._fd, pos, p.length))
        if base_to > base_from >= 0:
            out += await self._base_read(base_from, base_to - base_from)
        return out

    async def _base_read(self, offset: int, length: int) -> ReadResult:
        if self._base is None:
            raise DeviceIOError(msg=f"overlay {self.cache_dir} is open without its base cache")
        return await self._base.read(offset, length)

    # -- writes ------------------------------------------------------------------------------
    @gated
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        n = len(data)
        if n:
            a = offset >> self._shift
            b = ((offset + n - 1) >> self._shift) + 1
            cmap = self._map
            if not self._pending_mod and cmap.all_match(PRESENT | MODIFIED | ZERO | HELD, PRESENT | MODIFIED, a, b):
                if cmap.unsynced:
                    cmap.touch(a, b)
                await self._pwrite_many([(offset, memoryview(data))])
            else:
                await self._write_slow(offset, memoryview(data).cast("B"))
        if fua:
            await self._flush()

    async def _write_slow(self, offset: int, mv: memoryview) -> None:
        fl = self._flags
        cs = self._cs
        state = self._state
        pieces = list(split(offset, len(mv), cs))
        chunks = sorted({p.chunk for p in pieces})
        while True:
            need = [p.chunk for p in pieces if not p.whole and not fl[p.chunk] & (PRESENT | ZERO)]
            if need:
                await self._claims.wait_unclaimed(need)
                await self._source.materialize(need)
                continue
            claimed = [c for c in chunks if not fl[c] & PRESENT]
            if claimed:
                await self._claims.claim(claimed)
                if any(not p.whole and not fl[p.chunk] & (PRESENT | ZERO) for p in pieces):
                    self._claims.release(claimed)
                    continue
            break
        kept: list[int] = []
        try:
            kept = await self._keep_golden(chunks)
            # The journal: modified marks (durable before any data changes), then present marks
            # for whole chunks written into missing ones.
            # A chunk a snapshot target may hold gets ``dirty`` first (maps.HELD).
            # ``modified`` records clear HELD, so the second pass sees only the remaining ones.
            seq = 0
            for kind, pick in ((Kind.MODIFIED, lambda f: not f & MODIFIED), (Kind.DIRTY, lambda f: f & HELD)):
                for x, y in runs(c for c in chunks if pick(fl[c])):
                    seq = state.apply(kind, x, y)
                    for c in range(x, y):
                        self._pending_mod[c] = seq
            missing = [c for c in claimed if not fl[c] & (PRESENT | ZERO)]
            if self._pending_mod:
                seq = max(seq, max((self._pending_mod.get(c, 0) for c in chunks), default=0))
            if seq > state.durable_seq:
                await state.sync(seq)
            for c in chunks:
                s = self._pending_mod.get(c)
                if s is not None and s <= state.durable_seq:
                    del self._pending_mod[c]
            if self._map.unsynced:
                self._map.touch(chunks[0], chunks[-1] + 1)
            # The data. A claimed zero chunk is rewritten whole (zeros around the new bytes);
            # anything else gets just its piece.
            zero_claimed = {c for c in claimed if fl[c] & ZERO}
            writes: list[tuple[int, bytes | bytearray | memoryview]] = []
            for p in pieces:
                pos = p.offset(cs)
                src = mv[pos - offset:pos - offset + p.length]
                if p.chunk in zero_claimed and not p.whole:
                    buf = bytearray(self.manifest.chunk_length(p.chunk))
                    buf[p.start:p.start + p.length] = src
                    writes.append((p.chunk * cs, buf))
                else:
                    writes.append((pos, src))
            if self._capture is not None:
                self._capture.save_old(chunks)
            await self._pwrite_many(writes)
            if claimed:
                # The chunk's new content must be on disk before the journal may say it is
                # there: otherwise a crash could show a hole instead of old or new data.
                await self._data_sync.sync()
                for x, y in runs(missing):
                    state.apply(Kind.PRESENT, x, y)
                for x, y in runs(sorted(zero_claimed)):
                    state.apply(Kind.UNZERO, x, y)
        finally:
            if claimed:
                self._claims.release(claimed)
            if kept and self.reserve is not None:
                self.reserve.unpin(kept)
        self._maybe_checkpoint()

    @gated
    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fua: bool = False, fast_only: bool = False) -> None:
        self._check_writable()
        await self._zero(offset, length, fast_only=fast_only)
        if fua:
            await self._flush()

    @gated
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        await self._zero(offset, length, fast_only=False)
        if fua:
            await self._flush()

    async def _zero(self, offset: int, length: int, *, fast_only: bool) -> None:
        fl = self._flags
        pieces = list(split(offset, length, self._cs))
        partial = [p for p in pieces if not p.whole and not fl[p.chunk] & ZERO]
        if fast_only and partial:
            raise NotSupported(msg="zeroing part of a chunk means writing zeros; not fast")
        whole = [p.chunk for p in pieces if p.whole and not fl[p.chunk] & ZERO]
        if whole:
            await self._zero_chunks(whole)
        for p in partial:
            await self._write_slow(p.offset(self._cs), self._zeros[:p.length])

    async def _zero_chunks(self, chunks: list[int]) -> None:
        fl = self._flags
        await self._claims.claim(chunks)
        kept: list[int] = []
        try:
            todo = [c for c in chunks if not fl[c] & ZERO]
            kept = await self._keep_golden(todo)
            if self._capture is not None:
                self._capture.save_old(todo)
            seq = 0
            spans = runs(todo)
            for x, y in spans:
                seq = self._state.apply(Kind.ZERO, x, y)
            if seq:
                await self._state.sync(seq)
            if spans and self._can_punch:
                await self._run(self._punch_runs, spans)
        finally:
            self._claims.release(chunks)
            if kept and self.reserve is not None:
                self.reserve.unpin(kept)
        self._maybe_checkpoint()

    async def _keep_golden(self, chunks: Sequence[int]) -> list[int]:
        """Before the first change of clean present chunks: their base content into the golden
        reserve, durably (cache/reserve.py's crash rules). Returns the chunks it pinned there
        (unpinned by the caller once their ``modified``/``zero`` records are applied). A reserve
        that fails is logged and skipped: the chunk's reset then needs the repository."""
        r = self.reserve
        fl = self._flags
        first = [c for c in chunks if fl[c] & (PRESENT | MODIFIED | ZERO) == PRESENT] if r is not None else []
        if r is None or not first:
            return []

        def at_home(c: int) -> bool:
            return fl[c] & (PRESENT | MODIFIED | ZERO) == PRESENT

        try:
            await self._run(r.keep, self.manifest, first, self._read_chunk, at_home)
        except OSError as e:
            r.unpin(first)
            log.warning("golden reserve %s: %s; chunks %d.. not kept", r.path, e, first[0])
            return []
        return first

    def _punch_runs(self, spans: list[tuple[int, int]]) -> None:
        cs = self._cs
        for x, y in spans:
            start = x * cs
            try:
                ok = punch(self._fd, start, min(y * cs, self._size) - start)
            except OSError as e:
                log.warning("cache %s: punching a hole failed: %s", self.cache_dir, e)
                ok = True  # the chunks are zero in the map either way; try again next time
            if not ok:
                self._can_punch = False
                log.info("cache data %s cannot punch holes: trimmed chunks keep their blocks", self.data_path)
                return

    async def settle(self) -> None:
        """Wait until fetches and fills in flight (read-ahead included) and hole punching are done."""
        await self._source.idle()
        while self._punches:
            await asyncio.gather(*self._punches, return_exceptions=True)

    # -- lifecycle primitives (agent/lifecycle.py and agent/hydrate.py compose them) -----------
    @contextlib.asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Hold new reads that would fetch and every change back, wait for those in flight and for
        the chunk source to go idle: inside, the map changes only by the caller's hand.

        Reads of local chunks go on (they only look at the map); a read that was handed a piece of
        the data file just before may still be sending it (see ``reset`` on hole punching).
        """
        self._check_open()
        async with self._gate.closed():
            await self._source.idle()
            yield

    @property
    def state(self) -> CacheState:
        return self._state

    @gated
    async def fetch_chunks(self, indices: Sequence[int], *, background: bool = False) -> int:
        """Make these chunks local (missing ones fetched and stored); returns how many were missing.
        ``background`` (hydration): client reads go first (``ChunkSource.materialize``)."""
        fl = self._flags
        need = [i for i in indices if not fl[i] & (PRESENT | ZERO)]
        if need:
            await self._source.materialize(need, background=background)
        return len(need)

    async def reset(self, *, eager: bool = False, punch: bool = True) -> dict[str, int]:
        """Every modified chunk back to the base (docs/architecture.md, invariant 5); cost ∝ modified chunks.

        Order: journal ``reset`` of the modified runs → fsync; that is the reset. Holes are
        punched afterwards in the background (space only: a reset chunk is missing or zero, so its
        old bytes are never read again; punching a flushed extent costs ~0.2 ms a chunk, which
        clients should not wait for). ``punch=False`` when a client may still be sending a piece
        of the data file it was handed before the reset. Eager: fetch the reset chunks now
        (outside the quiesce: clients are served meanwhile), which reuses their blocks instead.
        """
        fl = self._flags
        async with self.quiesced():
            spans = list(self._map.runs_where(MODIFIED))
            for x, y in spans:
                self._state.apply(Kind.RESET, x, y)
            if spans:
                await self._state.sync()
            self._pending_mod.clear()
        if spans and punch and not eager and self._can_punch:
            task = asyncio.ensure_future(self._punch_reset(spans))
            self._punches.add(task)
            task.add_done_callback(self._punches.discard)
        n = sum(y - x for x, y in spans)
        # An overlay's reset chunks read through the shared base again: nothing to fetch.
        refetch = [i for x, y in spans for i in range(x, y)
                   if not fl[i] & (PRESENT | ZERO)] if eager and not self.overlay else []
        if refetch:
            await self.fetch_chunks(refetch)
        self._maybe_checkpoint()
        # Until the reset chunks are local again their reads need the repository: say how many
        # (and how many chunks in all), so a reset before going offline is not a silent trap.
        below = self.layers_below()
        again = sum(needs_repository(self._map, below, x, y) for x, y in spans)
        return {"chunks_reset": n, "chunks_refetched": len(refetch), "reset_from_repository": again,
                "chunks_from_repository": needs_repository(self._map, below)}

    def layers_below(self) -> list[ChunkMap]:
        """The chunk maps of the base caches under this one (none for a cache over the repository):
        the open ones, or their files' when this overlay was opened without its base."""
        if not self.overlay:
            return []
        if self._base is None:
            return layers_below(self._state.meta)
        out: list[ChunkMap] = []
        base: CacheDevice | None = self._base
        while base is not None:
            out.append(base.chunk_map)
            base = base._base
        return out

    async def _punch_reset(self, spans: list[tuple[int, int]]) -> None:
        """Free the blocks of reset chunks, a group at a time under the chunks' claims, so a fill
        or a write of one of them (it is missing now) cannot land between the check and the punch."""
        fl = self._flags
        for x, y in spans:
            for a in range(x, y, 64):
                group = list(range(a, min(y, a + 64)))
                await self._claims.claim(group)
                try:
                    free = runs(c for c in group if not fl[c] & PRESENT)
                    if free and self._can_punch and self._fd >= 0:
                        await self._run(self._punch_runs, free)
                finally:
                    self._claims.release(group)

    def begin_capture(self, chunks: Iterable[int], hold: Iterable[int] = ()) -> Capture:
        """Start saving the old content of ``chunks`` for a snapshot reading them (call quiesced).
        They and ``hold`` (the snapshot's other chunks) get HELD: a later write journals ``dirty``
        first, so its generation bump survives a crash (docs/architecture.md, invariant 4)."""
        cap = self._capture = Capture(chunks, self._read_chunk)
        fl = self._flags
        for i in (*cap.pending, *hold):
            fl[i] |= HELD
        return cap

    def end_capture(self) -> None:
        self._capture = None

    def read_captured(self, cap: Capture, indices: Sequence[int]) -> list[bytes]:
        """Content of chunks as they were when the capture began (on the event loop; see Capture)."""
        if self._fd < 0:
            raise DeviceIOError(msg="cache is closed")
        try:
            return cap.read(indices)
        except OSError as e:
            raise io_error(e, f"reading {self.data_path}") from e

    def _read_chunk(self, i: int) -> bytes:
        """Chunk i as the data file holds it (blocking; a snapshot's reads and the recovery's)."""
        return os.pread(self._fd, self.manifest.chunk_length(i), i * self._cs)

    async def switch_base(self, new: Manifest, flags: bytearray) -> None:
        """Make ``new`` the base version with these chunk flags, in one atomic checkpoint (call
        quiesced; the caller computed ``flags`` so that every present chunk holds ``new``'s data
        or is modified).

        Crash rules: the new manifest is written as manifest-<id>.json first, then the checkpoint
        switches meta (version, digest, flags) atomically, then the file is renamed to
        manifest.json; ``open`` finds either name. A crash before the checkpoint leaves the old base.
        """
        if (new.size, new.chunk_size) != (self._size, self._cs):
            raise CacheError(f"{new.image}@{new.id} has another size or chunk size than the cache")
        nxt = self.cache_dir / next_manifest_name(new.id)
        await self._run(atomic_write, nxt, new.to_json())
        fl = self._flags
        fl[:] = flags
        self._pending_mod.clear()
        self._state.meta = replace(self._state.meta, version=new.id, manifest_digest=manifest_digest(new))
        self.manifest = new
        self._source.manifest = new
        await self._checkpoint(clean=False)

        def install() -> None:
            os.replace(nxt, self.cache_dir / MANIFEST_NAME)
            fsync_dir(self.cache_dir)

        await self._run(install)

    async def switch_overlay_base(self, base_cache: str | os.PathLike[str], flags: bytearray) -> None:
        """Put this overlay over another base cache of the same version, with these chunk flags,
        in one atomic checkpoint (call quiesced; the caller computed ``flags`` so that every chunk
        reads the same before and after). A crash before the checkpoint leaves the old base and
        flags. The open base device is not swapped: close the overlay and open it over the new one.

        Used to seal a clone's customization into its pristine state (clones/clones.py)."""
        if not self.overlay:
            raise CacheError(f"{self.cache_dir} is not an overlay: it has no base cache to switch")
        self._flags[:] = flags
        self._pending_mod.clear()
        self._state.meta = replace(self._state.meta, base_cache=str(Path(base_cache).resolve()))
        await self._checkpoint(clean=False)

    def base_flags(self, new: Manifest, i: int) -> int:
        """Flags of a chunk that holds no data and equals ``new``'s chunk i."""
        return ZERO | BASE_ZERO if new.is_zero(i) else 0

    async def checkpoint(self) -> None:
        await self._checkpoint(clean=False)

    # -- flush ------------------------------------------------------------------------------
    async def flush(self) -> None:
        self._check_open()
        await self._flush()

    async def _flush(self) -> None:
        await self._data_sync.sync()
        await self._state.sync()

    async def _fdatasync(self) -> None:
        if self._data_failed is not None:
            raise DeviceIOError(msg=f"cache data file is unusable after an earlier error: {self._data_failed}")
        try:
            await self._run(os.fdatasync, self._fd)
        except OSError as e:
            self._data_failed = e  # dirty pages may be gone: later syncs must not pretend success
            raise io_error(e, f"fdatasync {self.data_path}") from e

    # -- block status ----------------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> list[Extent]:
        cs = self._cs
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

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What the cache holds (cache/status.py) and this run's figures."""
        return {
            **cache_status(self.cache_dir, self._state.meta, self._map, self._state.last_seq, self.totals(),
                           self.layers_below()),
            "verified_chunks": self.verified_chunks,
            "dropped_chunks": self.dropped_chunks,
            **self._counters().to_dict(),
            **(self.reserve.status() if self.reserve is not None else {}),
        }

    # -- fills (called by the chunk source) ---------------------------------------------------
    def _needs_fetch(self, i: int) -> bool:
        return not self._flags[i] & (PRESENT | ZERO) and i not in self._claims

    async def _store_fetched(self, items: list[tuple[int, bytes | memoryview]]) -> None:
        """Write verified chunks into the data file, then mark them present (see module doc)."""
        fl = self._flags
        take = [(i, d) for i, d in items if not fl[i] & (PRESENT | ZERO) and i not in self._claims]
        if not take or self._fd < 0:
            return
        idx = [i for i, _ in take]
        self._claims.take(idx)
        try:
            cs = self._cs
            await self._pwrite_many([(i * cs, d) for i, d in take], inline=False)
            await self._data_sync.sync()
            for x, y in runs(idx):
                self._state.apply(Kind.PRESENT, x, y)
            self._filled_since_checkpoint += sum(len(d) for _, d in take)
        finally:
            self._claims.release(idx)
        self._maybe_checkpoint()

    async def _verify(self, present: list[tuple[int, int]]) -> None:
        """After an unclean stop: re-hash chunks that replay marked present and not modified."""
        fl = self._flags
        todo = sorted({i for a, b in present for i in range(a, b) if fl[i] & (PRESENT | MODIFIED | ZERO) == PRESENT})
        if not todo:
            return
        step = max(1, len(todo) // 8 + 1)
        groups = [todo[k:k + step] for k in range(0, len(todo), step)]
        results = await asyncio.gather(*(self._run(self._verify_group, g) for g in groups))
        bad = sorted(i for r in results for i in r)
        self.verified_chunks = len(todo)
        self.dropped_chunks = len(bad)
        for x, y in runs(bad):
            self._state.apply(Kind.DROP, x, y)
        if bad:
            log.warning("cache %s: %d of %d recently filled chunk(s) did not match the manifest after an "
                        "unclean stop; they will be fetched again", self.cache_dir, len(bad), len(todo))

    def _verify_group(self, chunks: Sequence[int]) -> list[int]:
        m = self.manifest
        bad = []
        for i in chunks:
            data = self._read_chunk(i)
            want = m.digest_at(i)
            ok = is_zero(data) if want == ZERO_DIGEST else digest(data) == want
            if not ok:
                bad.append(i)
        return bad

    # -- helpers ----------------------------------------------------------------------------
    async def _pwrite_many(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]], *,
                           inline: bool = True) -> None:
        """Write pieces at their offsets; contiguous pieces go out as one pwritev."""
        if self._fd < 0:
            raise DeviceIOError(msg="cache is closed")
        total = sum(len(d) for _, d in writes)
        try:
            if inline and total <= INLINE_WRITE:
                write_groups(self._fd, writes)
            else:
                await self._run(write_groups, self._fd, writes)
        except OSError as e:
            raise io_error(e, f"writing {self.data_path}") from e

    def profile(self) -> list[int]:
        """Chunks in the order they were first read over this cache's life (the first boot's order)."""
        return self._read_order.order()

    def _counters(self) -> FetchStats:
        """This run's repository counters; all zero for a source that fetches nothing."""
        return self._source.stats or self._no_fetches

    def totals(self) -> dict[str, int]:
        """Fetch counters over every agent run on this cache (this run's added to the stored ones)."""
        st, base = self._counters(), self._state.meta.totals
        return {k: int(base.get(k, 0)) + int(getattr(st, k)) - int(self._folded.get(k, 0))
                for k in TOTALS}

    async def _checkpoint(self, *, clean: bool) -> None:
        if self._read_order.unsaved:
            await self._run(self._read_order.save, self.cache_dir)
        totals = self.totals()
        self._state.meta = replace(self._state.meta, totals=totals)
        self._folded = {k: int(getattr(self._counters(), k)) for k in TOTALS}
        await self._state.checkpoint(clean=clean)

    def _maybe_checkpoint(self) -> None:
        if self._closed or self._checkpoint_task is not None:
            return
        if self._state.records_since_checkpoint < self._checkpoint_records \
                and self._filled_since_checkpoint < self._checkpoint_fill_bytes:
            return
        self._filled_since_checkpoint = 0
        task = asyncio.ensure_future(self._checkpoint(clean=False))
        self._checkpoint_task = task

        def done(t: asyncio.Future[None]) -> None:
            self._checkpoint_task = None
            if not t.cancelled() and t.exception() is not None:
                log.error("cache %s: checkpoint failed: %s", self.cache_dir, t.exception())

        task.add_done_callback(done)

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceIOError(msg="cache is closed")

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyDevice()
        self._check_open()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
