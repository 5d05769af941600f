"""The embedded repository end to end: dedup, corrupt chunks, commits, gc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ChunkCorrupt, ImageNotFound, MissingChunks
from blockprov.imaging.exporter import export_image
from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from tests.conftest import corrupt_chunk, make_image


def test_second_version_stores_only_changed_chunks(tmp_path: Path, repo: LocalRepository) -> None:
    src = make_image(tmp_path / "a.img", 32 << 20, seed=3, data_fraction=0.9)
    _, _s1 = import_image(repo, src, "lab:v1")
    with open(src, "r+b") as f:  # change 5 scattered 64 KiB chunks with fresh random data
        for k in range(5):
            f.seek(k * (5 << 20) + 12345)
            f.write(os.urandom(1000))
    _, s2 = import_image(repo, src, "lab:v2")
    assert s2.new_chunks == 5
    assert s2.new_bytes_stored < 6 * 65536 + 1000
    assert len(repo.diff("lab:v1", "lab:v2")) == 5
    v1 = repo.resolve("lab:v1").id
    assert repo.resolve("lab:v2").parent == v1  # a new tag descends from the image's newest version
    _, s3 = import_image(repo, src, "lab:v2")
    v2 = repo.resolve("lab:v2")
    assert s3.new_chunks == 0 and v2.parent is not None and v2.parent != v1  # the tag's previous version


def test_corrupt_chunk_on_disk_is_reported_never_served(tmp_path: Path, repo: LocalRepository) -> None:
    src = make_image(tmp_path / "a.img", 4 << 20, seed=4, data_fraction=1.0)
    import_image(repo, src, "c:v")
    m = repo.resolve("c:v")
    cid = next(iter(m.unique_digests()))
    corrupt_chunk(repo, cid)
    with pytest.raises(ChunkCorrupt):
        repo.store.get(cid)
    with pytest.raises(ChunkCorrupt):
        export_image(repo, "c:v", tmp_path / "out")
    # a verified upload of the same chunk repairs it
    good = codec.encode(_plain_of(src, m, cid))
    assert repo.put_blobs([(cid, good)]) == 1
    export_image(repo, "c:v", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


def _plain_of(src: Path, m: Manifest, cid: bytes) -> bytes:
    data = src.read_bytes()
    for i in range(m.count):
        if m.digest_at(i) == cid:
            return data[i * m.chunk_size:(i + 1) * m.chunk_size]
    raise AssertionError


def test_corrupt_upload_rejected_store_unharmed(repo: LocalRepository) -> None:
    data = b"x" * 5000
    cid = codec.digest(data)
    with pytest.raises(ChunkCorrupt):
        repo.put_blobs([(cid, codec.encode(b"y" * 5000))])
    assert repo.missing([cid]) == [cid]


def test_commit_with_missing_chunks_is_rejected(repo: LocalRepository) -> None:
    ids = [codec.digest(b"a"), codec.ZERO_DIGEST, codec.digest(b"b")]
    m = Manifest(image="m", size=3 * 4096, chunk_size=4096, chunks=b"".join(ids))
    with pytest.raises(MissingChunks) as e:
        repo.commit(m, "v")
    assert sorted(e.value.missing) == sorted(c.hex() for c in (ids[0], ids[2]))
    with pytest.raises(ImageNotFound):
        repo.resolve("m:v")


def test_rm_and_gc(tmp_path: Path, repo: LocalRepository) -> None:
    a = make_image(tmp_path / "a.img", 8 << 20, seed=5, data_fraction=1.0)
    b = make_image(tmp_path / "b.img", 8 << 20, seed=6, data_fraction=1.0)
    import_image(repo, a, "g:a")
    import_image(repo, b, "g:b")
    vb = repo.resolve("g:b").id
    assert repo.gc(grace=0).chunks_removed == 0
    removed = repo.remove(f"g@{vb}")
    assert "g:b" in removed
    st = repo.gc(grace=3600)  # fresh chunks are protected by the grace period (uploads in progress)
    assert st.chunks_removed == 0
    st = repo.gc(grace=0)
    assert st.chunks_removed > 0
    export_image(repo, "g:a", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == a.read_bytes()


def test_concurrent_writers_two_processes(tmp_path: Path) -> None:
    """Two repository objects (as two processes would) committing at once: both versions land."""
    from concurrent.futures import ThreadPoolExecutor

    imgs = [make_image(tmp_path / f"{i}.img", 4 << 20, seed=10 + i, data_fraction=1.0) for i in range(4)]

    def work(i: int) -> str:
        r = LocalRepository(tmp_path / "repo")
        try:
            return import_image(r, imgs[i], f"cw{i}:v")[0]
        finally:
            r.close()

    with ThreadPoolExecutor(4) as pool:
        vids = list(pool.map(work, range(4)))
    r = LocalRepository(tmp_path / "repo")
    assert sorted(i.name for i in r.images()) == [f"cw{i}" for i in range(4)]
    assert [r.resolve(f"cw{i}:v").id for i in range(4)] == vids
