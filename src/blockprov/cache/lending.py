"""What a cache lends the peers of its site: its present, unmodified chunks, checked before they go.

The peer server (agent/peerserve.py) asks by chunk id; a chunk is lent when the cache's version has
it at some index whose state is present and neither modified nor zero, and the bytes read from the
data file hash to that id. The hash is what makes a loan safe without any lock against the cache:
a write, a reset or an update that changes the chunk between the state check and the read makes
the bytes not match, and the chunk is simply not lent (invariant 1 says a present, unmodified
chunk matches; this checks it where a peer would otherwise rely on it).

Reads go through a descriptor of our own on the data file (a file or the PC's partition), opened
read-only, in the caller's thread (the peer server runs this in a worker thread).
"""

from __future__ import annotations

import os
import threading

from blockprov.cache.device import CacheDevice
from blockprov.cache.maps import MODIFIED, PRESENT, ZERO
from blockprov.codec import ZERO_DIGEST, digest

# a chunk state byte → 1 if the chunk can be lent (present, not modified, not zero), else 0
_LENDABLE = bytes(int(f & (PRESENT | MODIFIED | ZERO) == PRESENT) for f in range(256))


class Lender:
    def __init__(self, dev: CacheDevice) -> None:
        self.dev = dev
        self._fd = -1
        self._index: dict[bytes, int] = {}
        self._indexed = ""  # the manifest id ``_index`` was built for
        self._lock = threading.Lock()

    def index_of(self, cid: bytes) -> int | None:
        """An index of the cache's version holding chunk ``cid`` (None: the version has no such chunk)."""
        m = self.dev.manifest
        with self._lock:
            if self._indexed != m.id:
                index: dict[bytes, int] = {}
                for i in range(m.count):
                    index.setdefault(m.digest_at(i), i)
                index.pop(ZERO_DIGEST, None)
                self._index, self._indexed = index, m.id
            return self._index.get(cid)

    def lend(self, cids: list[bytes]) -> list[bytes | None]:
        """The content of each chunk this cache can lend, else None (blocking: run in a thread)."""
        flags = self.dev.chunk_map.flags
        m = self.dev.manifest
        out: list[bytes | None] = []
        for cid in cids:
            i = self.index_of(cid)
            if i is None or flags[i] & (PRESENT | MODIFIED | ZERO) != PRESENT:
                out.append(None)
                continue
            data = os.pread(self._data_fd(), m.chunk_length(i), i * m.chunk_size)
            out.append(data if digest(data) == cid else None)
        return out

    def have_vector(self, also: list[bytes]) -> tuple[str, bytes]:
        """The cache's version and, per chunk index, 1 where that chunk can be lent (present,
        neither modified nor zero), else 0; ``also``: ids held elsewhere (the owner's memory of
        what it fetched for the site), marked at their first index. What a peer's speculation
        consults before asking (cache/peers.py, ``HAVE_HEADER``); a chunk marked may still fail
        its hash when lent, and is then simply not lent."""
        m = self.dev.manifest
        vector = self.dev.chunk_map.flags[:m.count].translate(_LENDABLE)
        for cid in also:
            i = self.index_of(cid)
            if i is not None:
                vector[i] = 1
        return m.id, bytes(vector)

    def present(self, cid: bytes) -> bool:
        i = self.index_of(cid)
        return i is not None and self.dev.chunk_map.flags[i] & (PRESENT | MODIFIED | ZERO) == PRESENT

    def _data_fd(self) -> int:
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.dev.data_path, os.O_RDONLY | os.O_CLOEXEC)
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
