"""Local-directory chunk store: the embedded default.

Layout: ``ROOT/ab/cd/<64 hex digits>`` — two levels of fan-out keep directories small.

Crash rules: a blob is written to a temporary name and renamed into place, so a reader sees the
whole blob or none. Individual blobs are *not* fsynced (an import writes tens of thousands);
``sync()`` (one ``syncfs`` of the store's file system) runs before any commit records a version
that references them, so a committed version only names durable chunks. A crash before that can
leave an empty or torn blob under its final name: ``has`` treats a blob shorter than its header
as absent, every read verifies the digest, and a corrupt blob is replaced by the next upload of
the same id (``put_blob`` verifies the new copy and overwrites the bad one).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from pathlib import Path

from .. import codec
from ..durable import ensure_dir
from ..errors import ChunkCorrupt, ChunkMissing, NoSpace
from .base import ChunkStore

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LocalChunkStore(ChunkStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = ensure_dir(root)

    def _path(self, cid: bytes) -> Path:
        h = cid.hex()
        return self.root / h[:2] / h[2:4] / h

    def has(self, cid: bytes) -> bool:
        try:
            return self._path(cid).stat().st_size >= codec.HEADER_SIZE
        except FileNotFoundError:
            return False

    def get_blob(self, cid: bytes) -> bytes:
        try:
            with open(self._path(cid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ChunkMissing(digest=cid.hex()) from None

    def _store_blob(self, cid: bytes, blob: bytes) -> bool:
        p = self._path(cid)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                p.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, blob)
            finally:
                os.close(fd)
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == 28:
                raise NoSpace(msg=f"chunk store {self.root}") from None
            raise
        return True

    def put_blob(self, cid: bytes, blob: bytes) -> bool:
        codec.decode(blob, cid)
        if self.has(cid):
            try:
                self.get(cid)
                self.touch(cid)
                return False
            except ChunkCorrupt:
                pass  # a damaged copy is replaced by this verified one
        return self._store_blob(cid, blob)

    def touch(self, cid: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._path(cid))

    def delete(self, cid: bytes) -> int:
        p = self._path(cid)
        try:
            n = p.stat().st_size
            p.unlink()
            return n
        except FileNotFoundError:
            return 0

    def iter_ids(self) -> Iterator[tuple[bytes, int, float]]:
        for d1 in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not d1.is_dir() or len(d1.name) != 2:
                continue
            for d2 in os.scandir(d1.path):
                if not d2.is_dir():
                    continue
                for e in os.scandir(d2.path):
                    if len(e.name) == 64 and not e.name.startswith("."):
                        st = e.stat()
                        yield bytes.fromhex(e.name), st.st_size, st.st_mtime

    def sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)
