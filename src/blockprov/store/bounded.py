"""A bounded store of chunk blobs on local disk, least recently used out: the site cache's store.

The site cache (service/sitecache.py) keeps what its site's machines asked for, within a byte
budget (``serve --upstream … --cache-size``). One file per blob (``ROOT/ab/abcdef….blob``): the
site cache fills at the speed of the site's uplink, where a file per chunk costs nothing that
matters, and a file can be dropped on its own when it is evicted or found damaged (a pack file
would need compaction). The index (id → size, in use order) lives in memory and is rebuilt from the
directory at start, oldest file first.

Crash rules: a blob is written to a temporary name and renamed into place, without fsync. A crash
may leave a temporary file (removed at start) or, after a power cut, a renamed file whose content
never reached the disk; that is harmless because every blob is verified against its id before it is
served (the caller does it with ``codec.decode``) and one that fails is dropped and fetched again.
Nothing here is the only copy of anything: the upstream repository holds every chunk.

Thread-safe: one lock around the index; file I/O outside it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import OrderedDict
from pathlib import Path

from blockprov.codec import hexid

SUFFIX = ".blob"


class BoundedStore:
    def __init__(self, root: str | os.PathLike[str], capacity: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.evicted = 0
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._bytes = 0
        self._seq = itertools.count()
        self._load()

    def _load(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if not f.name.endswith(SUFFIX):
                    f.unlink(missing_ok=True)  # a temporary file a crash left behind
                    continue
                try:
                    cid = bytes.fromhex(f.name[:-len(SUFFIX)])
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime, cid, st.st_size))
        for _mtime, cid, size in sorted(found):
            self._index[cid] = size
            self._bytes += size
        self._evict()

    def _path(self, cid: bytes) -> Path:
        h = hexid(cid)
        return self.root / h[:2] / (h + SUFFIX)

    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._index

    def get(self, cid: bytes) -> bytes | None:
        """The blob as stored (unverified), or None; it becomes the most recently used."""
        with self._lock:
            if cid not in self._index:
                return None
            self._index.move_to_end(cid)
        try:
            return self._path(cid).read_bytes()
        except FileNotFoundError:  # evicted meanwhile
            self.drop(cid)
            return None

    def put(self, cid: bytes, blob: bytes | memoryview) -> None:
        """Keep a blob the caller verified; older blobs go while the store is over its budget."""
        if len(blob) > self.capacity:
            return
        with self._lock:
            if cid in self._index:
                self._index.move_to_end(cid)
                return
        path = self._path(cid)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{next(self._seq)}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        with self._lock:
            if cid not in self._index:
                self._index[cid] = len(blob)
                self._bytes += len(blob)
        self._evict()

    def drop(self, cid: bytes) -> None:
        """Forget a blob (evicted, or found damaged)."""
        with self._lock:
            size = self._index.pop(cid, None)
            if size is None:
                return
            self._bytes -= size
        with contextlib.suppress(FileNotFoundError):
            self._path(cid).unlink()

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.capacity or not self._index:
                    return
                cid, size = self._index.popitem(last=False)
                self._bytes -= size
                self.evicted += 1
            with contextlib.suppress(FileNotFoundError):
                self._path(cid).unlink()

    def usage(self) -> tuple[int, int]:
        """(blobs, bytes) held now."""
        with self._lock:
            return len(self._index), self._bytes
