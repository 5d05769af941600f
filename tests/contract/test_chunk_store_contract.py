"""One suite, every chunk store: the pack store and the S3 store (on a real SeaweedFS) keep the same rules.

Corruption is made where each store keeps its bytes: a flipped byte in a pack record, an object
overwritten behind the store's back with boto3. Either way it is reported (ChunkCorrupt), never
returned as data, and a verified re-upload replaces it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ChunkCorrupt, ChunkMissing, RepositoryUnavailable, StoreMisconfigured
from blockprov.store.base import ChunkStore
from blockprov.store.pack import PackChunkStore
from blockprov.store.s3 import S3ChunkStore
from tests.s3fixture import ACCESS_KEY, SeaweedFS


def chunk(i: int, n: int = 5000) -> tuple[bytes, bytes, bytes]:
    data = (f"chunk {i} ".encode() * (n // 8 + 1))[:n]
    return codec.digest(data), codec.encode(data), data


@dataclass
class Under:
    store: ChunkStore
    corrupt: Callable[[bytes], None]  # damage the stored copy of a chunk


def _pack(tmp: Path) -> Under:
    s = PackChunkStore(tmp / "chunks")

    def corrupt(cid: bytes) -> None:
        s.sync()
        loc = s._locate(cid)
        assert loc is not None
        pack, offset, length = loc
        with open(s._pack_path(pack), "r+b") as f:
            f.seek(offset + length - 1)
            last = f.read(1)
            f.seek(offset + length - 1)
            f.write(bytes([last[0] ^ 0xFF]))

    return Under(s, corrupt)


def _s3(sw: SeaweedFS) -> Under:
    bucket = sw.new_bucket()
    s = S3ChunkStore(f"s3://{bucket}/some/prefix", timeout=5)
    raw = sw.client()

    def corrupt(cid: bytes) -> None:
        body = raw.get_object(Bucket=bucket, Key=s.key(cid))["Body"].read()
        raw.put_object(Bucket=bucket, Key=s.key(cid), Body=body[:-1] + bytes([body[-1] ^ 0xFF]))

    return Under(s, corrupt)


@pytest.fixture(params=["pack", "s3"])
def under(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Under]:
    if request.param == "pack":
        u = _pack(tmp_path)
    else:
        request.getfixturevalue("s3_env")
        u = _s3(request.getfixturevalue("seaweed"))
    yield u
    u.store.close()


def test_put_get_has(under: Under) -> None:
    s = under.store
    cid, blob, data = chunk(1)
    assert not s.has(cid)
    new, size = s.put(cid, data)
    assert new and size == len(blob)
    assert s.put(cid, data) == (False, 0)
    s.sync()
    assert s.has(cid) and s.get(cid) == data
    assert codec.decode(s.get_blob(cid), cid) == data
    with pytest.raises(ChunkMissing):
        s.get(chunk(2)[0])


def test_get_blobs_in_order_with_repeats_and_missing(under: Under) -> None:
    s = under.store
    items = [chunk(i)[:2] for i in range(40)]
    assert s.put_blobs(items) == 40
    assert s.put_blobs(items) == 0
    ids = [c for c, _ in items]
    order = [*ids[::-1], ids[0], ids[0]]
    got = s.get_blobs(order)
    assert [codec.decode(b, c) for b, c in zip(got, order, strict=True)] == [chunk(i)[2] for i in
                                                                             [*range(39, -1, -1), 0, 0]]
    assert s.get_blobs([]) == []
    with pytest.raises(ChunkMissing):
        s.get_blobs([ids[0], chunk(99)[0]])


def test_missing(under: Under) -> None:
    s = under.store
    have = [chunk(i)[:2] for i in range(5)]
    s.put_blobs(have, trusted=True)
    absent = [chunk(i)[0] for i in range(100, 104)]
    asked = [*absent[:2], have[0][0], codec.ZERO_DIGEST, absent[0], *[c for c, _ in have], *absent[2:]]
    assert s.missing(asked) == absent
    assert s.missing([]) == []


def test_upload_verified_on_arrival(under: Under) -> None:
    s = under.store
    cid, _blob, _ = chunk(1)
    evil = codec.encode(b"not what the id says" * 100)
    with pytest.raises(ChunkCorrupt):
        s.put_blob(cid, evil)
    with pytest.raises(ChunkCorrupt):
        s.put_blobs([(cid, evil)])
    assert s.missing([cid]) == [cid]


def test_corrupt_object_reported_never_served_and_replaced_by_upload(under: Under) -> None:
    s = under.store
    cid, blob, data = chunk(7)
    s.put_blob(cid, blob)
    s.sync()
    under.corrupt(cid)
    with pytest.raises(ChunkCorrupt):
        s.get(cid)
    damaged = s.get_blobs([cid])[0]  # blobs come unverified (consumers verify): this one fails
    with pytest.raises(ChunkCorrupt):
        codec.decode(damaged, cid)
    assert s.put_blob(cid, blob) is True  # a verified upload replaces the damaged copy
    s.sync()
    assert s.get(cid) == data


def test_delete_and_iter_ids(under: Under) -> None:
    s = under.store
    items = [chunk(i)[:2] for i in range(6)]
    t0 = time.time()
    s.put_blobs(items)
    s.sync()
    listed = {cid: (size, mtime) for cid, size, mtime in s.iter_ids()}
    assert set(listed) == {c for c, _ in items}
    for cid, b in items:
        size, mtime = listed[cid]
        assert size == len(b)
        assert t0 - 5 <= mtime <= time.time() + 5
    assert s.delete(items[0][0]) == len(items[0][1])
    assert s.delete(items[0][0]) == 0
    assert s.missing([items[0][0]]) == [items[0][0]]
    with pytest.raises(ChunkMissing):
        s.get(items[0][0])
    assert {c for c, _, _ in s.iter_ids()} == {c for c, _ in items[1:]}
    # many at once (gc): sizes whether or not a listing came first, absent ones free nothing
    gone = [items[1][0], items[2][0], items[0][0], items[1][0]]
    assert s.delete_many(gone) == len(items[1][1]) + len(items[2][1])
    list(s.iter_ids())
    assert s.delete_many([items[3][0], items[4][0]]) == len(items[3][1]) + len(items[4][1])
    assert s.delete_many([]) == 0
    assert {c for c, _, _ in s.iter_ids()} == {items[5][0]}
    assert s.missing([c for c, _ in items]) == [c for c, _ in items[:5]]


# -- S3 only ------------------------------------------------------------------------------------------
def test_s3_layout_and_batch_with_a_bad_blob_stores_nothing(seaweed: SeaweedFS, s3_env: dict[str, str]) -> None:
    bucket = seaweed.new_bucket()
    s = S3ChunkStore(f"s3://{bucket}/p", timeout=5)
    try:
        cid, blob, _ = chunk(1)
        s.put_blobs([(cid, blob)])
        keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"p/chunks/{cid.hex()[:2]}/{cid.hex()}"]
        good = chunk(2)[:2]
        with pytest.raises(ChunkCorrupt):
            s.put_blobs([good, (chunk(3)[0], chunk(4)[1])])
        assert s.missing([good[0]]) == [good[0]]
    finally:
        s.close()


def test_s3_reuse_refreshes_old_chunks_for_gc(seaweed: SeaweedFS, s3_env: dict[str, str]) -> None:
    bucket = seaweed.new_bucket()
    s = S3ChunkStore(f"s3://{bucket}", timeout=5, touch_after=0.5)
    try:
        cid, blob, data = chunk(1)
        s.put_blobs([(cid, blob)])
        (_, _, m0), = list(s.iter_ids())
        time.sleep(1.2)  # LastModified has one-second resolution
        assert s.missing([cid]) == []  # an uploader asking counts as a re-use
        (_, _, m1), = list(s.iter_ids())
        assert m1 > m0
        assert s.get(cid) == data
    finally:
        s.close()


def test_s3_missing_bucket_is_a_clear_error_unless_asked_to_create(seaweed: SeaweedFS,
                                                                    s3_env: dict[str, str]) -> None:
    name = f"bp-absent-{int(time.time() * 1000) % 10**9}"
    with pytest.raises(StoreMisconfigured, match=r"does not exist.*--s3-create-bucket"):
        S3ChunkStore(f"s3://{name}/x", timeout=2)
    s = S3ChunkStore(f"s3://{name}/x", timeout=2, create_bucket=True, endpoint=seaweed.endpoint)
    try:
        cid, blob, data = chunk(1)
        s.put_blob(cid, blob)
        assert s.get(cid) == data
    finally:
        s.close()


def test_s3_bad_credentials_are_a_clear_error(seaweed: SeaweedFS, s3_env: dict[str, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = seaweed.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    t0 = time.monotonic()
    with pytest.raises(StoreMisconfigured, match="access denied"):
        S3ChunkStore(f"s3://{bucket}/x", timeout=5)
    assert time.monotonic() - t0 < 4  # not retried: waiting cannot fix it


def test_s3_unreachable_endpoint_is_unavailable_after_the_timeout(s3_env: dict[str, str]) -> None:
    from tests.procs import free_port

    t0 = time.monotonic()
    with pytest.raises(RepositoryUnavailable, match="unreachable"):
        S3ChunkStore("s3://bucket/x", endpoint=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    assert 0.3 < time.monotonic() - t0 < 5
