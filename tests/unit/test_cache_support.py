"""Helpers shared by the cache, fetcher and crash tests (no tests here).

``DictRepo`` is the smallest Repository the agent needs: ``get_blobs`` over a dict, with a
switchable unreachable mode, optional delay, blob corruption, and a log of calls.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

from blockprov import codec
from blockprov.errors import ChunkMissing, ImageNotFound, RepositoryUnavailable
from blockprov.manifest import Manifest, build
from blockprov.names import Ref


class DictRepo:
    url = "memory://test"

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.manifests: dict[str, Manifest] = {}
        self.calls: list[list[bytes]] = []
        self.unreachable = False
        self.delay = 0.0
        self.at_once = 0  # calls under way now, and the most there ever were (batches in parallel)
        self.most_at_once = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> bytes:
        if codec.is_zero(data):
            return codec.ZERO_DIGEST
        cid = codec.digest(data)
        self.blobs[cid] = codec.encode(data)
        return cid

    def corrupt(self, cid: bytes) -> None:
        blob = bytearray(self.blobs[cid])
        blob[-1] ^= 0xFF
        self.blobs[cid] = bytes(blob)

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def chunks_requested(self) -> int:
        return sum(len(c) for c in self.calls)

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        with self._lock:
            self.calls.append(list(ids))
            unreachable, delay = self.unreachable, self.delay
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            if delay:
                time.sleep(delay)
        finally:
            with self._lock:
                self.at_once -= 1
        if unreachable:
            raise RepositoryUnavailable(url=self.url, why="switched off by the test")
        out = []
        for cid in ids:
            blob = self.blobs.get(cid)
            if blob is None:
                raise ChunkMissing(digest=cid.hex())
            out.append(blob)
        return out

    def resolve(self, ref: Ref | str) -> Manifest:
        m = self.manifests.get(str(ref))
        if m is None:
            raise ImageNotFound(ref=str(ref))
        return m


def make_image(repo: DictRepo, *, chunks: int = 16, chunk_size: int = 4096, tail: int = 0, seed: int = 1,
               image: str = "lab", zero_every: int = 4, dup_every: int = 5) -> tuple[Manifest, bytes]:
    """A manifest whose chunks are in ``repo``: random data, some all-zero and some repeated
    chunks, and a short last chunk of ``tail`` bytes when tail > 0. Returns (manifest, content)."""
    rnd = random.Random(seed)
    parts: list[bytes] = []
    n = chunks + (1 if tail else 0)
    for i in range(n):
        length = tail if (tail and i == n - 1) else chunk_size
        if zero_every and i % zero_every == zero_every - 1:
            parts.append(bytes(length))
        elif dup_every and i % dup_every == dup_every - 1 and i >= dup_every and length == chunk_size:
            parts.append(parts[0])
        else:
            parts.append(rnd.randbytes(length))
    ids = [repo.add(p) for p in parts]
    content = b"".join(parts)
    m = build(image, len(content), chunk_size, ids, created=1.0)
    repo.manifests[f"{image}@{m.id}"] = m
    return m, content
