"""The narrow chunk-store interface every backend implements (the pack store, S3).

A store keeps *blobs* (``codec`` format) under their 32-byte chunk id. It never trusts itself:
``get`` decodes and verifies, ``put_blob`` verifies before storing, so a corrupt object is
reported (``ChunkCorrupt``) and never served. ``missing`` is the batched existence query the
importer, snapshots and the HTTP service use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence

from blockprov import codec


class ChunkStore(ABC):
    @abstractmethod
    def has(self, cid: bytes) -> bool: ...

    @abstractmethod
    def get_blob(self, cid: bytes) -> bytes:
        """The stored blob, unverified (raises ChunkMissing)."""

    @abstractmethod
    def _store_blob(self, cid: bytes, blob: bytes) -> bool:
        """Write a blob already verified; True if it was new."""

    @abstractmethod
    def delete(self, cid: bytes) -> int:
        """Remove a chunk; returns the bytes freed (0 if absent)."""

    @abstractmethod
    def iter_ids(self) -> Iterator[tuple[bytes, int, float]]:
        """Every stored chunk as (id, stored size, modification time)."""

    def sync(self) -> None:
        """Make every blob written so far durable (called before a commit records a version)."""

    def touch(self, cid: bytes) -> None:
        """Mark an existing chunk as recently wanted, so gc's grace period protects a re-use of it."""

    def get(self, cid: bytes) -> bytes:
        """Plain chunk bytes, verified against the id (docs/architecture.md, invariant 6)."""
        return codec.decode(self.get_blob(cid), cid)

    def put(self, cid: bytes, data: bytes | memoryview) -> tuple[bool, int]:
        """Store plain bytes already hashed to ``cid``; returns (new, stored size)."""
        if self.has(cid):
            self.touch(cid)
            return False, 0
        blob = codec.encode(data)
        return self._store_blob(cid, blob), len(blob)

    def put_blob(self, cid: bytes, blob: bytes) -> bool:
        """Store a blob received from elsewhere: verified on arrival, rejected if corrupt."""
        codec.decode(blob, cid)
        if self.has(cid):
            self.touch(cid)
            return False
        return self._store_blob(cid, blob)

    def missing(self, cids: Iterable[bytes]) -> list[bytes]:
        seen: set[bytes] = set()
        out = []
        for c in cids:
            if c == codec.ZERO_DIGEST or c in seen:
                continue
            seen.add(c)
            if not self.has(c):
                out.append(c)
        return out

    def get_blobs(self, cids: Sequence[bytes]) -> list[bytes]:
        return [self.get_blob(c) for c in cids]

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        """Store (id, blob) pairs; returns how many were new. ``trusted``: the caller encoded these
        blobs from bytes it hashed itself, so re-verifying them would only repeat its work."""
        new = 0
        for cid, blob in items:
            if trusted:
                if self.has(cid):
                    self.touch(cid)
                    continue
                new += self._store_blob(cid, blob)
            else:
                new += self.put_blob(cid, blob)
        return new

    def delete_many(self, cids: Sequence[bytes]) -> int:
        """Remove many chunks (gc); returns the bytes freed. Backends with a batch request override it."""
        return sum(self.delete(c) for c in cids)

    def compact(self, *, spare: float = 0.0) -> int:
        """Reclaim the space of deleted chunks where the backend needs a pass for it; bytes freed.
        ``spare``: leave alone what was written within that many seconds (uploads in progress)."""
        return 0

    def close(self) -> None:
        """Release files and connections (and make pending writes durable where a store has any)."""
