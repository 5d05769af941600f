"""The server's chunk cache (store/cached.py): hits, one store read per chunk however many requests
want it at once (single flight), a byte budget, eviction by delete and upload, errors that stay with
the request that met them, and its counters on the service's /metrics."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ChunkMissing
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from blockprov.store.cached import CachedChunkStore
from blockprov.store.pack import PackChunkStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class SlowPacks(PackChunkStore):
    """A pack store that counts the chunks it is asked for and takes its time, like a remote one."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.asked = 0
        self.delay = 0.0

    def get_blobs(self, cids: Sequence[bytes]) -> list[bytes]:
        self.asked += len(cids)
        time.sleep(self.delay)
        return super().get_blobs(cids)


def filled(tmp: Path, n: int) -> tuple[SlowPacks, list[tuple[bytes, bytes]], list[bytes]]:
    """A store holding ``n`` small chunks: the store, its (id, blob) pairs, their ids."""
    inner = SlowPacks(tmp / "chunks")
    items = []
    for i in range(n):
        data = bytes([i % 251]) * 4096 + i.to_bytes(4, "little")
        items.append((codec.digest(data), codec.encode(data)))
    inner.put_blobs(items)
    inner.sync()
    return inner, items, [c for c, _ in items]


def test_hits_single_flight_budget_and_eviction(tmp_path: Path) -> None:
    inner, items, ids = filled(tmp_path, 8)
    store = CachedChunkStore(inner, capacity=1 << 20)
    assert store.get_blobs(ids[:4] + ids[:2]) == [b for _, b in items[:4]] + [b for _, b in items[:2]]
    assert inner.asked == 4
    assert store.get_blobs(ids[:4]) == [b for _, b in items[:4]] and inner.asked == 4 and store.hits == 4

    # twelve requests for the same four chunks at once: the store is read once for them
    inner.delay = 0.3
    results: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(store.get_blobs(ids[4:]))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r == [b for _, b in items[4:]] for r in results) and len(results) == 12
    # each of the other eleven joined the read under way or, started after it ended (a loaded machine), hit
    assert inner.asked == 8 and store.joined + (store.hits - 4) == 11 * 4, (store.joined, store.hits)
    inner.delay = 0.0

    # an upload (perhaps the repair of a damaged copy) and a delete evict
    store.put_blob(ids[0], items[0][1])
    store.get_blob(ids[0])
    assert inner.asked == 9
    store.delete(ids[1])
    with pytest.raises(ChunkMissing):
        store.get_blob(ids[1])



def test_byte_budget_keeps_the_most_recent(tmp_path: Path) -> None:
    inner, items, ids = filled(tmp_path, 12)
    small = CachedChunkStore(inner, capacity=8 * max(len(b) for _, b in items))  # 8 blobs
    small.get_blobs(ids)
    assert small.cached_bytes() <= small.capacity
    before = inner.asked
    small.get_blobs(ids[4:])
    assert inner.asked == before  # the 8 most recent stayed
    small.get_blobs(ids[:1])
    assert inner.asked == before + 1  # the oldest went
    big = CachedChunkStore(inner, capacity=4 * len(items[0][1]))  # a blob over 1/8 of it is not kept
    big.get_blobs(ids[:1])
    assert big.cached_bytes() == 0


def test_an_error_stays_with_its_request(tmp_path: Path) -> None:
    """A batch that fails (a missing chunk) must not fail another request that was only waiting for
    one of its other chunks."""
    inner, items, _ids = filled(tmp_path, 2)
    store = CachedChunkStore(inner, capacity=1 << 20)
    absent = codec.digest(b"never stored")
    inner.delay = 0.3
    errors: list[BaseException] = []

    def doomed() -> None:
        try:
            store.get_blobs([items[0][0], absent])
        except ChunkMissing as e:
            errors.append(e)

    t = threading.Thread(target=doomed)
    t.start()
    time.sleep(0.1)  # the doomed batch is in flight with items[0]
    assert store.get_blob(items[0][0]) == items[0][1]
    t.join(30)
    assert len(errors) == 1


def test_service_counts_cache_hits(tmp_path: Path) -> None:
    inner, items, _ids = filled(tmp_path / "repo", 3)
    repo = LocalRepository(tmp_path / "repo", store=CachedChunkStore(inner, capacity=1 << 20))
    client = TestClient(create_app(repo))
    try:
        body = b"".join(c for c, _ in items)
        for _ in range(2):
            assert client.post("/v1/chunks/fetch", content=body).status_code == 200
        text = client.get("/metrics").text
        assert "blockprov_chunk_cache_hits_total 3.0" in text
        assert "blockprov_chunk_cache_misses_total 3.0" in text
    finally:
        client.close()
        repo.close()
