"""The native data path of a PC's disk (issue 24): once the disk holds the whole image, the
machine's root is the disk itself, through the kernel's device-mapper; no process serves its I/O.

While the disk lacks chunks the in-machine agent serves the root over NBD (netboot/inagent.py);
the first boot that finds it complete (after its restore, update by diff or copy before the
boot) sets up the devices below instead and the agent stays resident, out of the I/O path (for
registration, snapshots of the running PC and the console). Which targets, and why (measured:
docs/architecture.md, "The native data path"):

* ``restore`` — ``bp-root`` is a dm-snapshot of the image's range of the data partition whose
  copy-on-write store ``bp-cow`` is the golden reserve partition followed by the data
  partition's room past the image. The machine's writes land in the store; the data partition,
  the golden copy, is never written. Restore is dropping the store (zeroing its header): no
  chunk is copied, offline too, and a session's data can never be served as pristine. The
  store's table is the kernel's record of the session (netboot/cowstore.py reads it). Its chunk
  is STORE_CHUNK (1 MiB), not the cache's: the target splits every request at its chunk, and at
  64 KiB a 1 MiB read was 16 requests through it (bench/bench_fio.py); the price is a coarser
  record (a 4 KiB write to a chunk not yet in the store copies its 1 MiB there first, and the
  console counts the cache's chunks those 1 MiB cover). Its limit: a session that writes more
  than the store holds makes the kernel drop the snapshot, and the running system gets I/O
  errors (the agent warns on the console as it fills).
* ``keep`` — ``bp-root`` is dm-era straight over the data partition (its first ``image``
  sectors; no layer under it: a linear one was a bio clone and remap per request for nothing
  outside a snapshot, bench/RESULTS.md):
  writes go to the data partition in place, and era records which blocks (ERA_BLOCK) each write
  touched, committing the record before the write goes down, in ``era.meta`` on the metadata
  file system (a loop device). ``convert`` turns that record into the cache's modified map
  (``CacheDevice.mark_written``, which compares each chunk of a recorded block with its base so
  the map stays as fine as a chunk); the record of the current era becomes readable only
  through a metadata snapshot of the running target (``take_metadata_snap``). A snapshot of the
  running PC (``snapshot``) takes its point in time by moving era, for the snapshot's length
  only, onto ``bp-data``, a ``snapshot-origin`` of the partition, with a temporary ``bp-pit``
  snapshot over the reserve partition; then back onto the partition (``dm.era_onto``: a table
  swap under a suspended era, whose record stays whole: dm.py says why).

State on the metadata file system (the cache directory's, mounted by the agent):

* ``native.json``: ``era_from``, the first era not yet turned into the modified map (atomic_write);
* ``era.meta``: era's metadata (keep);
* ``native.env``: the every-day boot's plan (netboot/everyday.py): written once this path is set
  up, removed before the agent path changes the disk (``remove_plan``: a power cut in between
  leaves no plan, and the next boot takes the slow path).

Crash rules:

* restore: the golden copy is never written, and the store commits a chunk's entry before the
  write that made it completes; a dropped store (header zeroed, then a new snapshot made) is
  empty whatever the cut;
* keep: era's mark is durable before the write reaches the disk; ``convert`` journals the
  chunks as modified and syncs (``mark_written``) before it advances ``era_from``: a cut between
  converts the same blocks again (marking is idempotent). A cut during a snapshot of the running
  PC, or during a swap of era's origin, finds a record committed at the swap's suspend and every
  write since marked before it went down; the next boot makes era over the partition again (the
  temporary devices were only in the kernel) and reads the whole record;
* zero chunks: the cache never reads the data partition for a chunk it holds as zero (all zeros
  in the image, trimmed, or reset to such a base), so the partition may hold anything there —
  old bytes of a reused disk, a chunk reset after a session. A native read would see them:
  ``enter`` zeroes every such chunk's range first (BLKZEROOUT; the kernel writes zeros where the
  disk cannot zero a range itself) on each boot that enters the native path through the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from blockprov.align import runs
from blockprov.cache import CacheDevice
from blockprov.durable import atomic_write
from blockprov.errors import DeviceMapperError, NetbootError, UsageError
from blockprov.netboot import cowstore, dm, everyday
from blockprov.netboot.disk import Disk

R = TypeVar("R")
log = logging.getLogger("blockprov.netboot.native")

ROOT, COW, DATA, PIT = "bp-root", "bp-cow", "bp-data", "bp-pit"
RESTORE, KEEP = "restore", "keep"
SECTOR = 512
MIB_SECTORS = 2048
ERA_BLOCK = 1 << 20  # bytes per era block: a 1 MiB request is one bio through era (smaller blocks split it)
# bytes per chunk of the restore store (dm-snapshot splits every request at its chunk as era does
# at its block): with the cache's 64 KiB chunks a 1 MiB read was 16 requests (bench/bench_fio.py)
STORE_CHUNK = 1 << 20
ERA_FILE = "era.meta"
STATE_FILE = "native.json"
BLKZEROOUT = 0x127F
ZERO_STEP = 256 << 20  # bytes zeroed per BLKZEROOUT call
LOSETUP = "losetup"


@dataclass(frozen=True)
class Part:
    """A partition of the disk: its name (``vda4``), number (``MAJOR:MINOR``, what tables say) and size."""

    name: str
    devno: str
    sectors: int


@dataclass(frozen=True)
class Geometry:
    """Where the native path's pieces are on a disk, for an image of ``image`` sectors in chunks
    of ``chunk`` bytes: the data partition (the image from sector 0, then room) and the golden
    reserve partition. Pure."""

    data: Part
    reserve: Part
    image: int
    chunk: int

    @property
    def chunk_sectors(self) -> int:
        return self.chunk // SECTOR

    @property
    def tail(self) -> int:
        """Where the data partition's room past the image starts (the next MiB)."""
        return -(-self.image // MIB_SECTORS) * MIB_SECTORS

    def cow_pieces(self) -> list[tuple[Part, int, int]]:
        """The restore store: the reserve partition, then the data partition past the image."""
        pieces = [(self.reserve, 0, self.reserve.sectors)]
        room = (self.data.sectors - self.tail) // MIB_SECTORS * MIB_SECTORS
        if room > 0:
            pieces.append((self.data, self.tail, room))
        return pieces

    def cow_table(self) -> str:
        return dm.concat([(p.devno, off, n) for p, off, n in self.cow_pieces()])

    @property
    def store_sectors(self) -> int:
        """The restore store's chunk: STORE_CHUNK, or the cache's chunk if larger (a multiple of it)."""
        return max(self.chunk, STORE_CHUNK) // SECTOR

    @property
    def per_era_block(self) -> int:
        """Cache chunks in one era block."""
        return max(1, ERA_BLOCK // self.chunk)

    def restore_table(self, cow: str) -> str:
        return dm.snapshot(self.image, self.data.devno, cow, self.store_sectors)

    def era_table(self, meta: str) -> str:
        """keep's root: era straight over the image's range of the data partition."""
        return dm.era(self.image, meta, self.data.devno, ERA_BLOCK // SECTOR)

    def pit_table(self) -> str:
        return dm.snapshot(self.image, self.data.devno, self.reserve.devno, self.chunk_sectors, persistent=False)

    def origin_table(self) -> str:
        return dm.snapshot_origin(self.image, self.data.devno)

    def pit_on_steps(self, root_line: str) -> list[dm.Step]:
        """A point in time of the running keep root (its era table ``root_line``): ``bp-pit``
        snapshots the partition over the reserve, ``bp-data`` is its origin, era moves onto it."""
        return dm.era_onto(ROOT, root_line, dm.ref(DATA), make=[(PIT, self.pit_table()), (DATA, self.origin_table())])

    def pit_off_steps(self, root_line: str) -> list[dm.Step]:
        """Era back straight over the partition (``Native._pit_off`` then removes the point in
        time's devices, whichever are left)."""
        return dm.era_onto(ROOT, root_line, self.data.devno)

    def merge_table(self, cow: str) -> str:
        return dm.snapshot_merge(self.image, self.data.devno, cow, self.store_sectors)


def geometry(d: Disk, image_bytes: int, chunk: int, sys_block: Path = Path("/sys/class/block")) -> Geometry:
    def part(n: int) -> Part:
        name = d.part_name(n)
        return Part(name, (sys_block / name / "dev").read_text().strip(),
                    int((sys_block / name / "size").read_text().strip()))

    return Geometry(part(4), part(3), image_bytes // SECTOR, chunk)


def era_meta_bytes(image: int) -> int:
    """Room for era's metadata over an image of ``image`` bytes: its era array (4 bytes a block),
    two write sets (a bit a block) and their btrees, in 4 KiB metadata blocks; whole MiB. Pure."""
    blocks = -(-image // ERA_BLOCK)
    return max(8 << 20, -(-(blocks * 16 + (4 << 20)) // (1 << 20)) * (1 << 20))


# -- state -----------------------------------------------------------------------------------------
@dataclass
class State:
    era_from: int = 1  # the first era whose writes are not in the cache's modified map yet

    @classmethod
    def load(cls, meta_dir: Path) -> State:
        try:
            got = json.loads((meta_dir / STATE_FILE).read_text())
            return cls(era_from=int(got["era_from"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, meta_dir: Path) -> None:
        atomic_write(meta_dir / STATE_FILE, json.dumps({"era_from": self.era_from}).encode())


# -- the pieces ------------------------------------------------------------------------------------
def read_pieces(pieces: Sequence[tuple[str, int, int]], offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the concatenation of ``pieces`` (path, offset, sectors)."""
    out = bytearray()
    at = 0
    for path, off, n in pieces:
        size = n * SECTOR
        if offset < at + size and length > len(out):
            start = max(0, offset - at)
            want = min(size - start, length - len(out))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                out += os.pread(fd, want, off * SECTOR + start)
            finally:
                os.close(fd)
        at += size
    return bytes(out)


def zero_ranges(path: str, spans: Sequence[tuple[int, int]]) -> int:
    """BLKZEROOUT of byte ranges ``(offset, length)`` of block device ``path``; returns bytes zeroed."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    done = 0
    try:
        for off, n in spans:
            for at in range(off, off + n, ZERO_STEP):
                step = min(ZERO_STEP, off + n - at)
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", at, step))
                done += step
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def _losetup(*args: str) -> str:
    try:
        p = subprocess.run([LOSETUP, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeviceMapperError(msg=f"{LOSETUP}: {e}") from None
    if p.returncode:
        raise DeviceMapperError(msg=f"{LOSETUP} {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p.stdout.strip()


def loop_of(path: Path, sys_block: Path = Path("/sys/block")) -> str | None:
    """The loop device (``loopN``) ``path`` is attached to, if any."""
    for b in sorted(sys_block.glob("loop*")):
        with contextlib.suppress(OSError):
            if (b / "loop" / "backing_file").read_text().strip() == str(path):
                return b.name
    return None


@dataclass
class Absorbed:
    """What the last native session left, read before the cache opens (``absorb``)."""

    era_chunks: list[int]  # chunks of era blocks written since ``era_from`` (keep)
    era_next: int  # ``era_from`` once those are in the modified map
    store: cowstore.Store  # the restore store (the last restore session's writes)


class Native:
    """The native data path of one boot (see the module docstring). ``dev_dir``: the device
    nodes this process uses (the agent's own devtmpfs: it has no /dev after the root switch)."""

    def __init__(self, geo: Geometry, meta_dir: Path, count: int, say: Callable[[str], None], *,
                 dev_dir: str = "/dev") -> None:
        self.geo = geo
        self.meta_dir = meta_dir
        self.count = count  # the image's chunks
        self.say = say
        self.dev_dir = dev_dir
        self.dm = dm.Mapper(dev_dir)
        self.state = State.load(meta_dir)
        self.policy: str | None = None
        self.lock = asyncio.Lock()  # one conversion or snapshot at a time
        self._loop: str | None = None  # era's metadata's loop device (loopN)

    def adopt(self, policy: str) -> None:
        """Take over the devices the every-day boot made for ``policy`` (netboot/everyday.py)."""
        if not self.dm.exists(ROOT):
            raise DeviceMapperError(msg=f"the every-day boot made no {ROOT}")
        if policy == KEEP:
            self.era_loop()  # found attached, remembered
        self.policy = policy

    def path(self, p: Part) -> str:
        return f"{self.dev_dir}/{p.name}"

    def cow_paths(self) -> list[tuple[str, int, int]]:
        return [(self.path(p), off, n) for p, off, n in self.geo.cow_pieces()]

    # -- what the last session left ------------------------------------------------------------
    def absorb(self) -> Absorbed:
        """Read the kernel's records of the last native session, before the cache opens: era's
        (its devices made, or found, and kept: a keep boot goes on with them) and the restore
        store's."""
        era_chunks: list[int] = []
        era_next = self.state.era_from
        if (self.meta_dir / ERA_FILE).exists():
            self.era_stack()
            era_chunks, era_next = self._era_record(since=self.state.era_from)
        return Absorbed(era_chunks, era_next, self.read_store())

    def read_store(self) -> cowstore.Store:
        """The restore store as the disk holds it (the last restore session's record)."""
        pieces = self.cow_paths()
        head = read_pieces(pieces, 0, SECTOR)
        store = cowstore.read_store(head, lambda n: b"")
        if not store.formatted:
            return store
        cb = store.chunk_bytes
        return cowstore.read_store(head, lambda n: read_pieces(pieces, n * cb, cb))

    async def take_in(self, dev: CacheDevice, got: Absorbed, policy: str) -> dict[str, int]:
        """Make the cache's map say what the last native session did, before restore or update
        run: era's blocks (a keep session) become modified chunks; a restore session's store is
        merged into the data partition and its chunks marked when the PC now keeps its changes
        (else it is dropped when ``enter`` makes a new one)."""
        out = {"era_chunks": 0, "merged": 0, "dropped": 0}
        if got.era_chunks:
            out["era_chunks"] = len(await dev.mark_written(got.era_chunks))
        if got.era_next != self.state.era_from:
            self.state.era_from = got.era_next
            self.state.save(self.meta_dir)
        store = got.store
        if store.formatted and store.chunks:
            chunks = cowstore.cache_chunks(store, self.geo.chunk, self.count)
            if policy == KEEP and store.valid:
                await asyncio.get_running_loop().run_in_executor(None, self.merge_store)
                out["merged"] = len(await dev.mark_written(chunks))
            else:
                out["dropped"] = len(chunks)
        return out

    def merge_store(self) -> None:
        """The kernel copies a restore store's chunks back into the data partition (snapshot-merge)."""
        self.teardown()
        m = self.dm
        m.create(COW, self.geo.cow_table())
        t0 = time.monotonic()
        m.create(ROOT, self.geo.merge_table(m.devno(COW)))
        while True:
            st = dm.parse_snapshot_status(m.status(ROOT))
            if not st.valid:
                raise DeviceMapperError(msg=f"merging the restore store failed: {st.why}")
            if st.merged:
                break
            time.sleep(0.05)
        m.remove(ROOT)
        m.remove(COW)
        self.drop_store()
        self.say(f"native: the last session's store merged into the disk in {time.monotonic() - t0:.1f} s")

    def drop_store(self) -> None:
        """Zero the restore store's header: it holds nothing from now on."""
        path, off, _n = self.cow_paths()[0]
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes(4096), off * SECTOR)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- era ---------------------------------------------------------------------------------------
    def era_file(self) -> Path:
        return self.meta_dir / ERA_FILE

    def era_loop(self) -> str:
        """The loop device era's metadata file is attached to (attached now if it is not), as a
        node. Remembered: after the root switch the agent has no /sys to look it up in."""
        if self._loop is None:
            path = self.era_file()
            found = loop_of(path)
            if found is None:
                found = Path(_losetup("-f")).name
                _losetup(f"{self.dev_dir}/{found}", str(path))
            self._loop = found
        return f"{self.dev_dir}/{self._loop}"

    def era_stack(self) -> str:
        """``bp-root`` (era over the partition) made, or found made; returns its node."""
        path = self.era_file()
        if not path.exists():
            size = era_meta_bytes(self.geo.image * SECTOR)
            tmp = path.with_name(ERA_FILE + ".new")
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.state.era_from = 1  # a new record: its first era is 1
            self.state.save(self.meta_dir)
        loop = self.era_loop()
        m = self.dm
        if not m.exists(ROOT):
            meta = Path(f"/sys/class/block/{Path(loop).name}/dev").read_text().strip()
            m.create(ROOT, self.geo.era_table(meta))
        return m.node(ROOT)

    def _era_record(self, since: int) -> tuple[list[int], int]:
        """Chunks of the era blocks written in era ``since`` or later, and the era that follows
        them (writes from then on are in it or later), read through a metadata snapshot."""
        m = self.dm
        m.message(ROOT, "take_metadata_snap")
        try:
            blocks = dm.era_written_since(self.era_loop(), since, snapshot=True)
            nxt = dm.parse_era_status(m.status(ROOT)).era
        finally:
            m.message(ROOT, "drop_metadata_snap")
        return dm.chunks_of_blocks(blocks, self.geo.per_era_block, self.count), nxt

    def era_now(self) -> int:
        return dm.parse_era_status(self.dm.status(ROOT)).era

    async def convert(self, dev: CacheDevice) -> int:
        """The running keep session's writes so far into the cache's modified map; returns how
        many chunks were marked."""
        async with self.lock:
            return await self._convert(dev)

    async def _convert(self, dev: CacheDevice) -> int:
        loop = asyncio.get_running_loop()
        chunks, nxt = await loop.run_in_executor(None, self._era_record, self.state.era_from)
        marked = await dev.mark_written(chunks) if chunks else []
        if nxt != self.state.era_from:
            self.state.era_from = nxt
            await loop.run_in_executor(None, self.state.save, self.meta_dir)
        return len(marked)

    # -- the every-day boot's plan (netboot/everyday.py) ----------------------------------------------
    def write_plan(self, image: str, policy: str, d: Disk) -> None:
        """The plan the disk's own initramfs sets this path up from at the next boot, without python."""
        text = everyday.plan_text(
            image=image, policy=policy, disk=d.name, parts=[d.part_name(n) for n in (1, 2, 3, 4)],
            sectors=self.geo.image, chunk_sectors=self.geo.store_sectors,
            per_chunk=self.geo.store_sectors // self.geo.chunk_sectors,
            cow=[(p.name, off, n) for p, off, n in self.geo.cow_pieces()], era_block=ERA_BLOCK // SECTOR,
            era_file=ERA_FILE)
        everyday.write_plan(self.meta_dir, text)

    def remove_plan(self) -> None:
        everyday.remove_plan(self.meta_dir)

    # -- entering and leaving ------------------------------------------------------------------------
    async def enter(self, dev: CacheDevice, policy: str) -> str:
        """Make the root device for ``policy`` over the complete disk; returns its node."""
        loop = asyncio.get_running_loop()
        zero = [(a * self.geo.chunk, (b - a) * self.geo.chunk)
                for a, b in runs(i for i in range(self.count) if dev.chunks.zero(i))]
        t0 = time.monotonic()
        done = await loop.run_in_executor(None, zero_ranges, self.path(self.geo.data), zero)
        log.info("zeroed %d MiB of zero chunks in %.1f s", done >> 20, time.monotonic() - t0)
        node = await loop.run_in_executor(None, self._stack, policy)
        self.policy = policy
        return node

    def _stack(self, policy: str) -> str:
        if policy == KEEP:
            return self.era_stack()
        self.teardown()
        m = self.dm
        m.create(COW, self.geo.cow_table())
        self.drop_store()
        return m.create(ROOT, self.geo.restore_table(m.devno(COW)))

    def teardown(self) -> None:
        """Remove this path's devices (the root first) and detach era's loop device."""
        for name in (ROOT, PIT, DATA, COW):
            if self.dm.exists(name):
                self.dm.remove(name)
        loop = self._loop or loop_of(self.era_file())
        if loop is not None:
            _losetup("-d", f"{self.dev_dir}/{loop}")
        self._loop = None

    # -- a running keep PC's snapshot ----------------------------------------------------------------
    async def snapshot(self, dev: CacheDevice, take: Callable[..., Awaitable[R]]) -> R:
        """A point-in-time snapshot of the running keep PC: ``take(read=…, before_acknowledge=…)``
        is agent/lifecycle.py's snapshot with this path's reader and its marking of chunks written
        since the point in time."""
        if self.policy != KEEP:
            raise UsageError("this PC restores its disk at every boot (policy restore): its session lives in a "
                             "copy-on-write store dropped at the next boot; snapshot a keep PC")
        loop = asyncio.get_running_loop()
        async with self.lock:
            e_pit = await loop.run_in_executor(None, self._pit_on)
            try:
                await self._convert(dev)
                fd = os.open(self.dm.node(PIT), os.O_RDONLY | os.O_CLOEXEC)
                cs = self.geo.chunk

                async def read(indices: list[int]) -> list[bytes]:
                    return await loop.run_in_executor(None, lambda: [os.pread(fd, cs, i * cs) for i in indices])

                async def rewritten() -> None:
                    chunks, _nxt = await loop.run_in_executor(None, self._era_record, e_pit)
                    await dev.mark_rewritten(chunks)

                try:
                    return await take(read=read, before_acknowledge=rewritten)
                finally:
                    os.close(fd)
            finally:
                await loop.run_in_executor(None, self._pit_off)

    def _pit_on(self) -> int:
        """The point in time: with the root suspended (its file system frozen, nothing in
        flight, era's record committed), ``bp-pit`` snapshots the data partition over the
        reserve and era moves onto ``bp-data``, its origin; the root resumes in a new era.
        Returns that era (writes from then on are in it or later)."""
        if self.dm.exists(DATA) or self.dm.exists(PIT):  # an agent stopped mid-snapshot left them
            self._pit_off()
        self.dm.apply(self.geo.pit_on_steps(self.dm.table(ROOT)))
        return self.era_now()

    def _pit_off(self) -> None:
        m = self.dm
        line = m.table(ROOT)
        if dm.parse_era_table(line).origin != self.geo.data.devno:
            m.apply(self.geo.pit_off_steps(line))
        for name in (DATA, PIT):  # unused now (either may be gone already: an agent stopped mid-way)
            if m.exists(name):
                m.remove(name)

    # -- what the console shows ----------------------------------------------------------------------
    def store_use(self) -> tuple[int, int] | None:
        """(bytes used, bytes) of the running restore session's store; None when not restore.
        Raises NetbootError when the kernel dropped it (it overflowed)."""
        if self.policy != RESTORE:
            return None
        st = dm.parse_snapshot_status(self.dm.status(ROOT))
        if not st.valid:
            raise NetbootError(f"the kernel dropped the session's copy-on-write store ({st.why})")
        return st.used * SECTOR, st.size * SECTOR
