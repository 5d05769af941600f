"""Pack-file chunk store: the embedded default.

One file per chunk costs a file creation (inode, directory entry, rename) per new chunk: on
these machines that was more than half of an import's CPU time. Like Borg's segments, this store
appends blobs to large *pack* files and keeps an index in SQLite::

    ROOT/packs/00000001.pack   records [32-byte id][u32 LE length][blob], appended, never rewritten
    ROOT/index.sqlite          chunks(id → pack, offset, length, stamp); packs(id, bytes, live)

Each writing process appends to pack files of its own (a pack id is allocated in the index), so
packs need no cross-process locking; threads of one process reserve offsets under a lock and
write in parallel with ``pwrite``.

Crash rules:

- A new blob is written to its pack and remembered as *pending* (in memory, visible to this
  process: ``has``/``get_blob`` see it). ``sync()`` — run before any commit records a version,
  and whenever pending data passes ``FLUSH_BYTES`` — fdatasyncs the packs, then inserts the pending
  rows into the index in one transaction. So the index never names bytes that are not durable, and a
  version is committed only after its chunks are indexed. A crash loses only pending blobs (never
  committed, so nothing references them); their bytes are dead space in a pack.
- Records are self-describing, so the index can be rebuilt by scanning the packs (``rebuild_index``).
- ``delete`` removes index rows; ``compact`` copies the live records of mostly-dead packs into a new
  pack, fdatasyncs it, repoints the rows in one transaction, and only then unlinks the old pack.
  A reader holding an open descriptor of an unlinked pack still reads it; a reader that looked
  up an old location after the unlink retries the lookup once.
- Every read is verified by the caller (``codec.decode``); a damaged record is reported, never
  served, and replaced by the next upload of the same id (``put_blob`` re-verifies a stored copy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from blockprov import codec
from blockprov.durable import ensure_dir, fsync_dir
from blockprov.errors import ChunkCorrupt, ChunkMissing, NoSpace
from blockprov.sqlite import Database
from blockprov.store.base import ChunkStore

log = logging.getLogger("blockprov.store")

RECORD_HEAD = struct.Struct("<32sI")
PACK_TARGET_BYTES = 512 << 20  # start a new pack past this size
FLUSH_BYTES = 256 << 20  # index pending blobs once this much is waiting
COMPACT_BELOW = 0.5  # compact packs whose live fraction fell below this

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id     BLOB PRIMARY KEY,
    pack   INTEGER NOT NULL,
    offset INTEGER NOT NULL,   -- of the blob (after the record head)
    length INTEGER NOT NULL,
    stamp  REAL NOT NULL       -- last stored or re-used: gc's grace period counts from here
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
"""


IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one pwritev takes (1024 on Linux)


def _pwritev_all(fd: int, frames: Sequence[bytes], offset: int) -> None:
    """All of ``frames`` at ``offset``: in groups of at most IOV_MAX buffers (one call given more
    fails with EINVAL: 4K chunks make two frames each, issue 17), and again after a short write."""
    for g in range(0, len(frames), IOV_MAX):
        group = [memoryview(f) for f in frames[g:g + IOV_MAX]]
        k = 0
        while k < len(group):
            n = os.pwritev(fd, group[k:], offset)
            if n <= 0:
                raise OSError(28, "No space left on device")
            offset += n
            while k < len(group) and n >= len(group[k]):
                n -= len(group[k])
                k += 1
            if n:
                group[k] = group[k][n:]


def _nospace(e: OSError, where: Path) -> Exception:
    return NoSpace(msg=str(where)) if e.errno == 28 else e


class _Writer:
    """This process's current pack: offsets are reserved under a lock, bytes written outside it."""

    def __init__(self, pack: int, path: Path) -> None:
        self.pack = pack
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.end = 0  # next free offset (reserved space included)
        self.inflight = 0  # writes reserved but not yet finished
        self.dirty = False  # finished writes not yet fdatasynced


class PackChunkStore(ChunkStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = ensure_dir(root)
        self.packs_dir = ensure_dir(self.root / "packs")
        self._lock = threading.Lock()
        self._writer: _Writer | None = None
        self._writers: list[_Writer] = []  # open packs of this process: the current one and full ones
        self._sync_lock = threading.Lock()  # one sync at a time: it may close full packs
        self._pending: dict[bytes, tuple[int, int, int]] = {}  # id → (pack, offset, length)
        self._pending_bytes = 0
        self._touched: set[bytes] = set()
        self._fds: dict[int, int] = {}
        self.index = Database(self.root / "index.sqlite", SCHEMA)

    # -- plumbing -----------------------------------------------------------------------------------
    def _pack_path(self, pack: int) -> Path:
        return self.packs_dir / f"{pack:08d}.pack"

    def _fd(self, pack: int) -> int:
        fd = self._fds.get(pack)
        if fd is None:
            with self._lock:
                fd = self._fds.get(pack)
                if fd is None:
                    fd = os.open(self._pack_path(pack), os.O_RDONLY)
                    self._fds[pack] = fd
        return fd

    def _locate(self, cid: bytes) -> tuple[int, int, int] | None:
        loc = self._pending.get(cid)
        if loc is not None:
            return loc
        row = self.index.conn().execute("SELECT pack, offset, length FROM chunks WHERE id=?", (cid,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    # -- ChunkStore -----------------------------------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        return self._locate(cid) is not None

    def missing(self, cids: Iterable[bytes]) -> list[bytes]:
        want = [c for c in dict.fromkeys(cids) if c != codec.ZERO_DIGEST and c not in self._pending]
        out: list[bytes] = []
        db = self.index.conn()
        for i in range(0, len(want), 500):  # one query per 500 ids, not one per id
            part = want[i:i + 500]
            q = f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            have = {bytes(r[0]) for r in db.execute(q, part)}
            out.extend(c for c in part if c not in have)
            if have:  # about to be re-used by a commit: gc's grace period must count from now
                with self._lock:
                    self._touched |= have
        return out

    def get_blob(self, cid: bytes) -> bytes:
        for attempt in range(2):
            loc = self._locate(cid)
            if loc is None:
                raise ChunkMissing(digest=cid.hex())
            pack, offset, length = loc
            try:
                data = os.pread(self._fd(pack), length, offset)
            except FileNotFoundError:  # compacted away after our lookup: look again
                with self._lock:
                    self._fds.pop(pack, None)
                if attempt:
                    raise
                continue
            if len(data) != length:
                raise ChunkCorrupt(digest=cid.hex(), why=f"pack {pack} is truncated")
            return data
        raise ChunkMissing(digest=cid.hex())

    def get_blobs(self, cids: Sequence[bytes]) -> list[bytes]:
        """Many blobs with one index query and one ``pread`` per run of adjacent records: chunks
        imported in order lie in order in a pack, so a sequential batch is usually one read."""
        locs: dict[bytes, tuple[int, int, int]] = {}
        want = []
        for c in dict.fromkeys(cids):
            loc = self._pending.get(c)
            if loc is None:
                want.append(c)
            else:
                locs[c] = loc
        db = self.index.conn()
        for i in range(0, len(want), 500):
            part = want[i:i + 500]
            q = f"SELECT id, pack, offset, length FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            for cid, pack, off, n in db.execute(q, part):
                locs[bytes(cid)] = (int(pack), int(off), int(n))
        for c in cids:
            if c not in locs:
                raise ChunkMissing(digest=c.hex())
        order = sorted(locs.items(), key=lambda kv: kv[1][:2])
        got: dict[bytes, bytes] = {}
        run: list[tuple[bytes, tuple[int, int, int]]] = []

        def read_run() -> None:
            pack, start = run[0][1][0], run[0][1][1]
            end = run[-1][1][1] + run[-1][1][2]
            try:
                buf = os.pread(self._fd(pack), end - start, start)
            except FileNotFoundError:  # compacted meanwhile: fall back to single lookups
                for c, _ in run:
                    got[c] = self.get_blob(c)
                return
            mv = memoryview(buf)
            for c, (_, off, n) in run:
                if off + n - start > len(buf):
                    raise ChunkCorrupt(digest=c.hex(), why=f"pack {pack} is truncated")
                got[c] = bytes(mv[off - start:off - start + n]) if len(run) > 1 else buf
            run.clear()

        for c, loc in order:
            if run and (loc[0] != run[-1][1][0] or loc[1] - (run[-1][1][1] + run[-1][1][2]) != RECORD_HEAD.size
                        or loc[1] + loc[2] - run[0][1][1] > 32 << 20):
                read_run()
            run.append((c, loc))
        if run:
            read_run()
        return [got[c] for c in cids]

    def _store_blob(self, cid: bytes, blob: bytes) -> bool:
        self._append([(cid, blob)])
        return True

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        """Store many blobs with one reservation and one existence query (the importer's path)."""
        if not trusted:
            return super().put_blobs(items)
        absent = set(self.missing(c for c, _ in items))
        fresh = [(c, b) for c, b in items if c in absent]
        self._append(fresh)
        return len(fresh)

    def _append(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        frames: list[bytes] = []
        for cid, blob in items:
            frames.append(RECORD_HEAD.pack(cid, len(blob)))
            frames.append(blob)
        total = sum(len(f) for f in frames)
        with self._lock:
            w = self._writer
            if w is None or w.end >= PACK_TARGET_BYTES:
                w = self._writer = self._new_writer()
                self._writers.append(w)
            start = w.end
            w.end += total
            w.inflight += 1
        try:
            _pwritev_all(w.fd, frames, start)
        except OSError as e:
            with self._lock:
                w.inflight -= 1
            raise _nospace(e, self.root) from None
        pos = start
        with self._lock:  # written: now visible, and owed an fdatasync by the next sync
            w.inflight -= 1
            w.dirty = True
            for cid, blob in items:
                self._pending[cid] = (w.pack, pos + RECORD_HEAD.size, len(blob))
                pos += RECORD_HEAD.size + len(blob)
            self._pending_bytes += total
            flush = self._pending_bytes >= FLUSH_BYTES
        if flush:
            self.sync()

    def _new_writer(self) -> _Writer:
        with self.index.tx() as db:
            pack = int(db.execute("INSERT INTO packs(created) VALUES (?)", (time.time(),)).lastrowid or 0)
        w = _Writer(pack, self._pack_path(pack))
        fsync_dir(self.packs_dir)
        return w

    def touch(self, cid: bytes) -> None:
        with self._lock:
            self._touched.add(cid)

    def put(self, cid: bytes, data: bytes | memoryview) -> tuple[bool, int]:
        if self.has(cid):
            self.touch(cid)
            return False, 0
        blob = codec.encode(data)
        self._append([(cid, blob)])
        return True, len(blob)

    def put_blob(self, cid: bytes, blob: bytes) -> bool:
        codec.decode(blob, cid)
        if self.has(cid):
            try:
                self.get(cid)
                self.touch(cid)
                return False
            except ChunkCorrupt:
                pass  # a damaged copy is replaced by this verified one
        self._append([(cid, blob)])
        return True

    def sync(self) -> None:
        """Make pending blobs durable, then index them (see the crash rules).

        A pending entry is added in the same locked step that marks its pack dirty, after its bytes
        are written, so every entry taken here belongs to a pack this sync fdatasyncs."""
        with self._sync_lock:
            with self._lock:
                dirty = [w for w in self._writers if w.dirty]
                for w in dirty:
                    w.dirty = False
                pending, self._pending = self._pending, {}
                touched, self._touched = self._touched, set()
                self._pending_bytes = 0
            try:
                for w in dirty:
                    os.fdatasync(w.fd)
                now = time.time()
                with self.index.tx() as db:
                    db.executemany("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?)",
                                   [(c, p, o, n, now) for c, (p, o, n) in pending.items()])
                    db.executemany("UPDATE chunks SET stamp=? WHERE id=?", [(now, c) for c in touched])
            except BaseException:
                with self._lock:  # keep them pending: the next sync tries again
                    for w in dirty:
                        w.dirty = True
                    self._pending = pending | self._pending
                    self._touched |= touched
                raise
            with self._lock:  # full packs with nothing in flight and nothing owed are done
                for w in [w for w in self._writers if w is not self._writer and not w.inflight and not w.dirty]:
                    os.close(w.fd)
                    self._writers.remove(w)

    def delete(self, cid: bytes) -> int:
        with self.index.tx() as db:
            row = db.execute("SELECT length FROM chunks WHERE id=?", (cid,)).fetchone()
            if row is None:
                return 0
            db.execute("DELETE FROM chunks WHERE id=?", (cid,))
        return int(row[0])

    def iter_ids(self) -> Iterator[tuple[bytes, int, float]]:
        for cid, length, stamp in self.index.conn().execute("SELECT id, length, stamp FROM chunks").fetchall():
            yield bytes(cid), int(length), float(stamp)

    # -- maintenance --------------------------------------------------------------------------------
    def compact(self, below: float = COMPACT_BELOW, *, spare: float = 0.0) -> int:
        """Rewrite packs whose live bytes fell under ``below`` of their size; returns bytes freed.
        A pack written to within ``spare`` seconds is left alone: another process may be
        appending to it (its blobs are indexed only at that process's next sync), and a pack
        holding no indexed record at all — an import that failed, say on a full disk — is simply
        removed once it is older than that."""
        self.sync()
        with self._lock:
            current = self._writer.pack if self._writer else None
        db = self.index.conn()
        live = dict(db.execute("SELECT pack, SUM(length + ?) FROM chunks GROUP BY pack", (RECORD_HEAD.size,)))
        freed = 0
        now = time.time()
        for path in sorted(self.packs_dir.glob("*.pack")):
            pack = int(path.stem)
            if pack == current:
                continue
            st = path.stat()
            if st.st_mtime > now - spare:
                continue
            size = st.st_size
            if size and live.get(pack, 0) >= below * size:
                continue
            rows = db.execute("SELECT id, offset, length FROM chunks WHERE pack=?", (pack,)).fetchall()
            moved = [(bytes(c), os.pread(self._fd(pack), int(n), int(o))) for c, o, n in rows]
            self._append(moved)
            self.sync()
            with self._lock:
                fd = self._fds.pop(pack, None)
            if fd is not None:
                os.close(fd)
            path.unlink()
            freed += size - live.get(pack, 0)
        fsync_dir(self.packs_dir)
        return freed

    def rebuild_index(self) -> tuple[int, int]:
        """Re-index every verified record of every pack (recovery after losing or damaging
        index.sqlite); returns (records indexed, damaged records skipped).

        A damaged record whose length is still whole is skipped and the scan goes on; a record
        running past the end of its pack is a torn tail, and the scan of that pack ends there.
        Records gc had dropped come back (they are still in their pack until compaction): the next
        gc drops them again. Rows already in the index are kept as they are."""
        self.sync()
        found = damaged = 0
        for path in sorted(self.packs_dir.glob("*.pack")):
            pack = int(path.stem)
            data = path.read_bytes()
            pos, rows = 0, []
            while pos + RECORD_HEAD.size <= len(data):
                cid, n = RECORD_HEAD.unpack_from(data, pos)
                blob = data[pos + RECORD_HEAD.size:pos + RECORD_HEAD.size + n]
                if pos + RECORD_HEAD.size + n > len(data):
                    break  # a torn tail: the rest of this pack was never indexed
                try:
                    codec.decode(blob, cid)
                    rows.append((cid, pack, pos + RECORD_HEAD.size, n, time.time()))
                except ChunkCorrupt:
                    damaged += 1  # bit rot inside a whole record: skip it, the next one starts after it
                pos += RECORD_HEAD.size + n
            with self.index.tx() as db:
                db.execute("INSERT OR IGNORE INTO packs(id, created) VALUES (?, ?)", (pack, time.time()))
                db.executemany("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?,?)", rows)
            found += len(rows)
        return found, damaged

    def unindexed_bytes(self) -> tuple[int, int]:
        """(bytes of pack files that hold no indexed record, packs they are in): chunks gc removed
        and not yet compacted away, or blobs an interrupted upload or import never indexed."""
        live = dict(self.index.conn().execute("SELECT pack, SUM(length + ?) FROM chunks GROUP BY pack",
                                              (RECORD_HEAD.size,)))
        dead = packs = 0
        for path in self.packs_dir.glob("*.pack"):
            extra = path.stat().st_size - live.get(int(path.stem), 0)
            if extra > 0:
                dead, packs = dead + extra, packs + 1
        return dead, packs

    def _drop_unindexed_tails(self) -> None:
        """At close, after the last sync: each of this process's packs is cut back to its last
        indexed record, and one holding none is removed. What lies past it is a write that failed
        part-way (a full disk: the pack keeps what was written before ENOSPC) or, when that sync
        failed too, blobs never indexed: dead space nobody would see (nothing committed names
        them: a commit syncs first)."""
        db = self.index.conn()
        for w in self._writers:
            if w.inflight:
                continue
            (end,) = db.execute("SELECT MAX(offset + length) FROM chunks WHERE pack=?", (w.pack,)).fetchone()
            try:
                if end:
                    os.ftruncate(w.fd, int(end))
                else:
                    os.unlink(w.path)
            except OSError as e:
                log.warning("chunk store %s: could not cut back pack %s: %s", self.root, w.path, e)
        with contextlib.suppress(OSError):
            fsync_dir(self.packs_dir)

    def close(self) -> None:
        try:
            self.sync()  # index what was uploaded but not committed yet (a later commit may want it)
        except Exception as e:  # e.g. a full disk: those blobs stay unindexed, which loses nothing committed
            log.info("chunk store %s: pending chunks not indexed at close (their space is given back): %s",
                     self.root, e)
        with self._lock:
            self._drop_unindexed_tails()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for w in self._writers:
                os.close(w.fd)
            self._writers.clear()
            self._writer = None
        self.index.close()
