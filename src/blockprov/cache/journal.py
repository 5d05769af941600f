"""The cache's state on disk: a metadata file written at checkpoints plus an append-only journal.

Files in the cache directory::

    meta      written only by durable.atomic_write (temp → fsync → rename → fsync dir)
    journal   32-byte header, then fixed-size 40-byte records, appended; replaced (atomically)
              by a fresh header at each checkpoint

``meta`` layout::

    0   8  magic b"BPCMETA\\0"
    8   4  format version (1), little endian
    12  4  length J of the JSON header
    16  J  JSON: image, version, manifest_digest, chunk_size, size, count, seq, uuid, clean,
           data_path, created, targets, totals (fetch counters), snapshots (target → version id),
           hydrated, repository, base_cache, sections = [[name, offset, length], ...]
    ..     sections, offsets relative to the end of the JSON: "flags" (count bytes),
           "gens" (count × u32, when snapshot generations are on), "unsynced:<target>"
           ((count + 7) // 8 bytes each)
    end-32 BLAKE3 of everything before it

``journal`` header: magic b"BPJRNL\\0\\0", version u32, reserved u32, the cache's 16-byte uuid
(a journal from another cache is refused). A record is ``<QBBHQQQ`` = seq, kind, target, reserved,
a, b, c, followed by the CRC32 of those 36 bytes (see ``maps.Kind`` for what each kind means).

Crash rules:

- Records are applied to the in-memory map and appended in one step on the event-loop thread, so
  the map always equals "meta + every appended record"; records get consecutive sequence numbers.
- Appending only buffers in memory. ``sync()`` writes the buffer and fsyncs (in a thread, never
  on the event loop); callers that wait at the same moment share one fsync (group commit). A
  record that was never synced may be lost; only ``present`` records are appended without a
  sync by their writer, and losing one costs a refetch.
- ``before_durable`` (the cache's data-file sync, cache/core.py): awaited by every sync and
  checkpoint after it took the records it will write and before they reach the disk. A fill
  appends its ``present`` record once its data is written but not yet synced, so this is what
  keeps "a durable ``present`` record's data is durable": the data sync starts after every
  write whose record it is about to make durable.
- Replay applies records with seq > meta.seq in order and stops at the first record that is torn
  (short), fails its checksum, or does not carry the next sequence number: that record and
  everything after it are dropped. Records with seq <= meta.seq are already in meta and skipped.
- Checkpoint: (1) write meta with seq S = last appended record, atomically; (2) replace the
  journal with an empty one, atomically. A crash before (1) completes leaves the old meta and the
  old journal; between (1) and (2) the new meta and a journal of records <= S, all skipped;
  after (2) the new meta and an empty journal. Records appended during the checkpoint stay in
  the buffer and go to the new journal. Nothing is ever lost or applied twice.
- ``clean`` in meta is true only when the last writer closed the cache; a cache opened after an
  unclean stop may re-verify chunks that replay marked present (``Loaded.present_runs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
import uuid as uuidlib
import zlib
from array import array
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import blake3

from blockprov.cache.maps import ChunkMap, Kind
from blockprov.durable import atomic_write
from blockprov.errors import CacheError, DeviceIOError

META_NAME = "meta"
JOURNAL_NAME = "journal"
META_MAGIC = b"BPCMETA\0"
META_VERSION = 1
JOURNAL_MAGIC = b"BPJRNL\0\0"
JOURNAL_VERSION = 1

_META_HEAD = struct.Struct("<8sII")
_JOURNAL_HEAD = struct.Struct("<8sII16s")
_REC = struct.Struct("<QBBHQQQ")
_CRC = struct.Struct("<I")
JOURNAL_HEADER_SIZE = _JOURNAL_HEAD.size  # 32
RECORD_SIZE = _REC.size + _CRC.size  # 40
_TRAILER = 32

T = TypeVar("T")


@dataclass
class CacheMeta:
    """What a cache holds and the checkpoint it was last folded at."""

    image: str
    version: str
    manifest_digest: str  # BLAKE3 (hex) of the manifest's canonical JSON
    chunk_size: int
    size: int
    count: int
    seq: int = 0  # the last journal record folded into this file
    uuid: str = field(default_factory=lambda: uuidlib.uuid4().hex)
    clean: bool = False
    data_path: str | None = None  # None: "data" inside the cache directory
    created: float = field(default_factory=time.time)
    targets: list[str] = field(default_factory=list)
    # Counters kept across agent runs (bytes_fetched, wire_bytes, chunks_fetched), as of this
    # checkpoint: figures for ``status``, never used for correctness.
    totals: dict[str, int] = field(default_factory=dict)
    # Per snapshot target, the version its last acknowledged snapshot made.
    snapshots: dict[str, str] = field(default_factory=dict)
    hydrated: float | None = None  # when every chunk last became local (hydration's record)
    repository: str | None = None  # URL of the repository the cache was last attached with
    base_cache: str | None = None  # an overlay's shared base cache directory (cache/overlay.py)

    def describe(self) -> str:
        return f"{self.image}@{self.version}"


@dataclass(frozen=True)
class Record:
    seq: int
    kind: Kind
    a: int
    b: int
    c: int = 0
    target: int = 0


@dataclass
class Loaded:
    """The state found on disk: meta + replayed journal (nothing written)."""

    meta: CacheMeta
    map: ChunkMap
    seq: int  # the last record applied
    replayed: int  # records applied from the journal
    dropped_bytes: int  # journal bytes ignored at the tail
    tail_problem: str | None  # why replay stopped early, if it did
    present_runs: list[tuple[int, int]]  # ranges made present by replayed records


# -- metadata file -------------------------------------------------------------------------------
def encode_meta(meta: CacheMeta, cmap: ChunkMap) -> list[bytes]:
    """The metadata file as a list of parts (no big concatenation; the digest comes last)."""
    sections: list[tuple[str, bytes]] = [("flags", bytes(cmap.flags))]
    if cmap.gens is not None:
        gens = array("I", cmap.gens)
        if struct.pack("=I", 1) != struct.pack("<I", 1):
            gens.byteswap()
        sections.append(("gens", gens.tobytes()))
    for name, bits in zip(cmap.targets, cmap.unsynced, strict=True):
        sections.append((f"unsynced:{name}", bytes(bits)))
    table: list[list[Any]] = []
    pos = 0
    for name, data in sections:
        table.append([name, pos, len(data)])
        pos += len(data)
    head = asdict(replace(meta, targets=list(cmap.targets)))
    head["sections"] = table
    js = json.dumps(head, sort_keys=True).encode()
    parts = [_META_HEAD.pack(META_MAGIC, META_VERSION, len(js)), js, *(d for _, d in sections)]
    h = blake3.blake3()
    for p in parts:
        h.update(p)
    parts.append(h.digest())
    return parts


def decode_meta(raw: bytes, where: str = META_NAME) -> tuple[CacheMeta, ChunkMap]:
    def bad(why: str) -> CacheError:
        return CacheError(f"cache metadata {where} is unusable: {why}")

    if len(raw) < _META_HEAD.size + _TRAILER:
        raise bad("too short")
    magic, version, jlen = _META_HEAD.unpack_from(raw)
    if magic != META_MAGIC:
        raise bad("bad magic")
    if version != META_VERSION:
        raise bad(f"unknown format version {version}")
    if blake3.blake3(memoryview(raw)[:-_TRAILER]).digest() != raw[-_TRAILER:]:
        raise bad("checksum mismatch")
    try:
        head = json.loads(raw[_META_HEAD.size:_META_HEAD.size + jlen])
        sections = {name: (off, n) for name, off, n in head.pop("sections")}
        meta = CacheMeta(**head)
    except (ValueError, TypeError, KeyError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    body = memoryview(raw)[_META_HEAD.size + jlen:-_TRAILER]

    def section(name: str, length: int) -> bytes:
        off, n = sections[name]
        if n != length or off + n > len(body):
            raise bad(f"section {name} has {n} bytes, expected {length}")
        return bytes(body[off:off + n])

    try:
        flags = bytearray(section("flags", meta.count))
        gens = None
        if "gens" in sections:
            gens = array("I")
            gens.frombytes(section("gens", 4 * meta.count))
            if struct.pack("=I", 1) != struct.pack("<I", 1):
                gens.byteswap()
        nbits = (meta.count + 7) // 8
        unsynced = [bytearray(section(f"unsynced:{t}", nbits)) for t in meta.targets]
    except KeyError as e:
        raise bad(f"missing section {e}") from None
    return meta, ChunkMap(meta.count, flags, gens=gens, targets=meta.targets, unsynced=unsynced)


# -- journal records ----------------------------------------------------------------------------
def journal_header(cache_uuid: str) -> bytes:
    return _JOURNAL_HEAD.pack(JOURNAL_MAGIC, JOURNAL_VERSION, 0, bytes.fromhex(cache_uuid))


def encode_record(seq: int, kind: Kind, a: int, b: int, c: int = 0, target: int = 0) -> bytes:
    body = _REC.pack(seq, kind, target, 0, a, b, c)
    return body + _CRC.pack(zlib.crc32(body))


def parse_journal(raw: bytes, cache_uuid: str, after_seq: int) -> tuple[list[Record], int, str | None]:
    """Records with seq > after_seq, in order; plus bytes dropped and why replay stopped."""
    if len(raw) < JOURNAL_HEADER_SIZE:
        # A journal is only ever replaced atomically, so a short header means nothing was
        # appended to it yet (or it never existed).
        return [], len(raw), ("short journal header" if raw else None)
    magic, version, _res, juuid = _JOURNAL_HEAD.unpack_from(raw)
    if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION:
        raise CacheError(f"cache journal has bad magic or unknown version {version}")
    if juuid.hex() != cache_uuid:
        raise CacheError("cache journal belongs to another cache (uuid mismatch)")
    out: list[Record] = []
    expected = after_seq + 1
    pos = JOURNAL_HEADER_SIZE
    n = len(raw)
    problem: str | None = None
    while pos < n:
        if n - pos < RECORD_SIZE:
            problem = f"torn record at byte {pos}"
            break
        body = raw[pos:pos + _REC.size]
        (crc,) = _CRC.unpack_from(raw, pos + _REC.size)
        if zlib.crc32(body) != crc:
            problem = f"bad checksum at byte {pos}"
            break
        seq, kind, target, _r, a, b, c = _REC.unpack(body)
        if seq <= after_seq:
            pos += RECORD_SIZE
            continue
        if seq != expected:
            problem = f"sequence gap at byte {pos}: {seq} after {expected - 1}"
            break
        try:
            k = Kind(kind)
        except ValueError:
            problem = f"unknown record kind {kind} at byte {pos}"
            break
        out.append(Record(seq, k, a, b, c, target))
        expected += 1
        pos += RECORD_SIZE
    return out, n - pos, problem


def load(cache_dir: str | os.PathLike[str]) -> Loaded:
    """Read meta and replay the journal. Writes nothing (tests inspect crashed caches with it)."""
    d = Path(cache_dir)
    try:
        raw = (d / META_NAME).read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{d} holds no cache metadata") from None
    meta, cmap = decode_meta(raw, str(d / META_NAME))
    try:
        jraw = (d / JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        jraw = b""
    records, dropped, problem = parse_journal(jraw, meta.uuid, meta.seq)
    seq = meta.seq
    present: list[tuple[int, int]] = []
    for i, r in enumerate(records):
        try:
            cmap.apply(r.kind, r.a, r.b, r.c, r.target)
        except ValueError as e:
            dropped += (len(records) - i) * RECORD_SIZE
            problem = f"record {r.seq} cannot be applied: {e}"
            records = records[:i]
            break
        if r.kind in (Kind.PRESENT, Kind.UNZERO):
            present.append((r.a, r.b))
        seq = r.seq
    return Loaded(meta, cmap, seq, len(records), dropped, problem, present)


# -- group commit ------------------------------------------------------------------------------
class GroupSync:
    """Callers that want "everything done before my call is durable" share one sync.

    A sync that started before a caller arrived may not cover its work, so the caller waits for
    the running one (if any) and then for the next; everyone who arrived meanwhile shares it.
    """

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        self._run = run
        self._task: asyncio.Future[None] | None = None
        self._started = 0
        self._done = 0

    async def sync(self) -> None:
        ticket = self._started + 1
        while self._done < ticket:
            task = self._task
            if task is None:
                self._started += 1
                task = self._task = asyncio.ensure_future(self._one(self._started))
            await asyncio.shield(task)

    async def _one(self, n: int) -> None:
        try:
            await self._run()
            self._done = max(self._done, n)
        finally:
            self._task = None


# -- the live state ------------------------------------------------------------------------------
class CacheState:
    """The map plus its journal and metadata: the only code that changes either."""

    def __init__(self, cache_dir: Path, meta: CacheMeta, cmap: ChunkMap, seq: int,
                 executor: Executor | None = None) -> None:
        self.dir = cache_dir
        self.meta = meta
        self.map = cmap
        self.last_seq = seq  # last record applied (in memory)
        self.durable_seq = seq  # every record <= this is on stable storage (as of open: replayed)
        self.records_since_checkpoint = 0
        self._executor = executor
        self._buf: list[bytes] = []
        self._fd = -1
        self._io_lock = asyncio.Lock()
        self._sync_task: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self.before_durable: Callable[[], Awaitable[None]] | None = None  # see the module doc

    # -- construction (blocking; call from a thread) ---------------------------------------
    @classmethod
    def create(cls, cache_dir: str | os.PathLike[str], meta: CacheMeta, cmap: ChunkMap,
               executor: Executor | None = None) -> CacheState:
        """Write a new cache's journal and then its meta (meta last: its presence means "made")."""
        d = Path(cache_dir)
        atomic_write(d / JOURNAL_NAME, journal_header(meta.uuid))
        atomic_write(d / META_NAME, encode_meta(meta, cmap))
        st = cls(d, meta, cmap, meta.seq, executor)
        st._open_journal()
        return st

    @classmethod
    def recover(cls, cache_dir: str | os.PathLike[str],
                executor: Executor | None = None) -> tuple[CacheState, Loaded]:
        """Meta + journal replay. The journal is not opened for appends until ``checkpoint``
        folds the replayed records (a torn tail must never have records appended after it)."""
        loaded = load(cache_dir)
        st = cls(Path(cache_dir), loaded.meta, loaded.map, loaded.seq, executor)
        st.records_since_checkpoint = loaded.replayed
        return st, loaded

    def _open_journal(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.dir / JOURNAL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # -- records ----------------------------------------------------------------------------
    def apply(self, kind: Kind, a: int, b: int, c: int = 0, target: int = 0) -> int:
        """Change the map and append the record, in one step. Returns the record's seq."""
        self.map.apply(kind, a, b, c, target)
        self.last_seq += 1
        self.records_since_checkpoint += 1
        self._buf.append(encode_record(self.last_seq, kind, a, b, c, target))
        return self.last_seq

    async def sync(self, upto: int | None = None) -> None:
        """Return when records up to ``upto`` (default: all appended so far) are durable."""
        target = self.last_seq if upto is None else upto
        while self.durable_seq < target:
            if self._failed is not None:
                raise DeviceIOError(msg=f"cache journal is unusable after an earlier error: {self._failed}")
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(task)

    async def _sync_once(self) -> None:
        try:
            async with self._io_lock:
                n = len(self._buf)
                data = b"".join(self._buf)
                end = self.last_seq
                if self.before_durable is not None:
                    await self.before_durable()  # if it fails, the records stay buffered
                del self._buf[:n]  # what was appended meanwhile waits for the next sync
                try:
                    await self._run(self._write_fsync, data)
                except OSError as e:
                    # After a failed fsync the kernel may have dropped dirty pages: nothing
                    # written since can be trusted to be durable, so refuse from now on.
                    self._failed = e
                    raise DeviceIOError(msg=f"cache journal: {e}") from e
                self.durable_seq = max(self.durable_seq, end)
        finally:
            self._sync_task = None

    def _write_fsync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    async def checkpoint(self, *, clean: bool = False) -> None:
        """Fold every appended record into meta and start an empty journal (see module doc)."""
        if self._failed is not None:
            raise DeviceIOError(msg=f"cache journal is unusable after an earlier error: {self._failed}")
        async with self._io_lock:
            seq = self.last_seq
            before = self.meta
            self.meta = replace(self.meta, seq=seq, clean=clean, targets=list(self.map.targets))
            parts = encode_meta(self.meta, self.map)
            n, folded = len(self._buf), self.records_since_checkpoint
            if self.before_durable is not None:
                try:
                    await self.before_durable()
                except BaseException:
                    self.meta = before  # nothing written: the journal goes on as it was
                    raise
            del self._buf[:n]  # every record buffered by S is folded into meta; later ones stay
            self.records_since_checkpoint -= folded
            try:
                await self._run(self._write_checkpoint, parts)
            except OSError as e:
                self.records_since_checkpoint += folded
                self._failed = e
                raise DeviceIOError(msg=f"cache checkpoint: {e}") from e
            self.durable_seq = max(self.durable_seq, seq)

    def _write_checkpoint(self, parts: list[bytes]) -> None:
        atomic_write(self.dir / META_NAME, parts)
        atomic_write(self.dir / JOURNAL_NAME, journal_header(self.meta.uuid))
        self._open_journal()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
