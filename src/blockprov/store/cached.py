"""A memory cache of blobs in front of a remote chunk store (S3), in the repository server.

Why: a lab or a CI fleet boots many machines from one version at once, so every agent asks the
server for the same chunks within seconds. Over S3, each of those asks is a GET, and botocore's CPU
per GET bounds the server (bench/RESULTS.md, Scale): sixteen agents reading one image cost sixteen
GETs per chunk. With this cache they cost one.

* **Immutable content needs no invalidation.** A chunk id names its bytes forever, so a cached
  blob is right for as long as the store has the chunk. ``delete``/``delete_many`` drop it, and
  so does an upload, which may be the repair of a damaged copy.
* **Single flight.** A chunk being fetched for one request is waited for by the others, not
  fetched again. When the herd arrives together, this is what turns sixteen GETs into one.
* **Bounded by bytes**, least recently used out first. Blobs larger than an eighth of the budget
  are not kept.
* Blobs are cached as the store returned them, unverified. Whoever consumes them verifies, as
  before: the agent on arrival, the server before a single GET. A damaged blob is therefore served
  no more and no less than without the cache, and an upload that repairs it also evicts it.

Not used for the embedded pack store: the page cache already keeps its packs, and a pread costs
microseconds, not a request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future

from blockprov.store.base import ChunkStore


class CachedChunkStore(ChunkStore):
    def __init__(self, inner: ChunkStore, capacity: int) -> None:
        self.inner = inner
        self.capacity = capacity
        self._blobs: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._flight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0  # blobs fetched from the store
        self.joined = 0  # blobs another request was already fetching

    # -- the cache ------------------------------------------------------------------------------
    def _keep(self, cid: bytes, blob: bytes) -> None:
        """Under the lock."""
        if len(blob) > self.capacity >> 3 or cid in self._blobs:
            return
        self._blobs[cid] = blob
        self._bytes += len(blob)
        while self._bytes > self.capacity:
            _, old = self._blobs.popitem(last=False)
            self._bytes -= len(old)

    def _forget(self, cids: Iterable[bytes]) -> None:
        with self._lock:
            for c in cids:
                blob = self._blobs.pop(c, None)
                if blob is not None:
                    self._bytes -= len(blob)

    def cached_bytes(self) -> int:
        return self._bytes

    def get_blobs(self, cids: Sequence[bytes]) -> list[bytes]:
        got: dict[bytes, bytes] = {}
        mine: dict[bytes, Future[bytes]] = {}  # this call fetches these
        theirs: dict[bytes, Future[bytes]] = {}  # another call is fetching these
        with self._lock:
            for c in dict.fromkeys(cids):
                blob = self._blobs.get(c)
                if blob is not None:
                    self._blobs.move_to_end(c)
                    got[c] = blob
                    self.hits += 1
                elif c in self._flight:
                    theirs[c] = self._flight[c]
                    self.joined += 1
                else:
                    mine[c] = self._flight[c] = Future()
                    self.misses += 1
        if mine:
            want = list(mine)
            try:
                blobs = self.inner.get_blobs(want)
            except BaseException as e:
                with self._lock:
                    for c in want:
                        del self._flight[c]
                for f in mine.values():
                    f.set_exception(e)
                raise
            with self._lock:
                for c, b in zip(want, blobs, strict=True):
                    self._keep(c, b)
                    del self._flight[c]
            for (c, f), b in zip(mine.items(), blobs, strict=True):
                f.set_result(b)
                got[c] = b
        for c, f in theirs.items():
            try:
                got[c] = f.result()
            except Exception:  # the other call's batch failed, perhaps for another chunk: ask for ours
                got[c] = self.inner.get_blob(c)
        return [got[c] for c in cids]

    def get_blob(self, cid: bytes) -> bytes:
        return self.get_blobs([cid])[0]

    # -- everything else is the store's -----------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        with self._lock:
            if cid in self._blobs:
                return True
        return self.inner.has(cid)

    def missing(self, cids: Iterable[bytes]) -> list[bytes]:
        return self.inner.missing(cids)

    def _store_blob(self, cid: bytes, blob: bytes) -> bool:
        self._forget([cid])
        return self.inner._store_blob(cid, blob)

    def put_blob(self, cid: bytes, blob: bytes) -> bool:
        self._forget([cid])
        return self.inner.put_blob(cid, blob)

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        self._forget(c for c, _ in items)
        return self.inner.put_blobs(items, trusted=trusted)

    def put(self, cid: bytes, data: bytes | memoryview) -> tuple[bool, int]:
        return self.inner.put(cid, data)

    def delete(self, cid: bytes) -> int:
        self._forget([cid])
        return self.inner.delete(cid)

    def delete_many(self, cids: Sequence[bytes]) -> int:
        self._forget(cids)
        return self.inner.delete_many(cids)

    def iter_ids(self) -> Iterator[tuple[bytes, int, float]]:
        return self.inner.iter_ids()

    def sync(self) -> None:
        self.inner.sync()

    def touch(self, cid: bytes) -> None:
        self.inner.touch(cid)

    def compact(self, *, spare: float = 0.0) -> int:
        return self.inner.compact(spare=spare)

    def close(self) -> None:
        self.inner.close()
