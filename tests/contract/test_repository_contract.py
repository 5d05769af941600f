"""One suite, every repository: LocalRepository and RemoteRepository must be indistinguishable.

The remote one talks to ``create_app(LocalRepository(tmp))`` in-process through Starlette's
TestClient (an ``httpx.Client`` over ASGI): the real client, the real app, no sockets.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov import codec
from blockprov.catalog.db import open_database
from blockprov.errors import ChunkCorrupt, ChunkMissing, ImageNotFound, InvalidName, MissingChunks
from blockprov.imaging.exporter import export_image
from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from blockprov.repo.remote import RemoteRepository
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; httpx is what we ship with
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SIZE = 4 << 20


class Backend:
    """A repository under test plus the LocalRepository behind it (for gc with grace 0 and tampering)."""

    def __init__(self, kind: str, tmp: Path, catalog: str | None = None) -> None:
        self.kind = kind
        self.local = LocalRepository(tmp / "repo", catalog=open_database(catalog, tmp / "repo"))
        self.client: TestClient | None = None
        self.repo: Any
        if kind == "local":
            self.repo = self.local
        else:
            self.client = TestClient(create_app(self.local))
            self.repo = RemoteRepository("http://testserver", client=self.client)

    def gc_now(self) -> Any:
        return self.repo.gc(grace=0.0)

    def close(self) -> None:
        if self.client is not None:
            self.repo.close()
            self.client.close()
        self.local.close()


@pytest.fixture(params=["local", "remote"])
def be(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "src.img", SIZE, seed=7, data_fraction=0.75, pattern_every=256 << 10)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_import_resolve_export_roundtrip(be: Backend, image: Path, tmp_path: Path) -> None:
    vid, stats = import_image(be.repo, image, "lab:v1")
    m = be.repo.resolve("lab:v1")
    assert m.id == vid and m.size == SIZE and m.image == "lab"
    assert be.repo.resolve(f"lab@{vid}").to_json() == m.to_json()
    assert stats.new_chunks == len(m.unique_digests()) > 0
    out = tmp_path / "out.img"
    export_image(be.repo, "lab:v1", out)
    assert sha(out) == sha(image)
    # a second import of the same bytes stores nothing new and records the parent
    _, stats2 = import_image(be.repo, image, "lab:v1")
    assert stats2.new_chunks == 0
    assert be.repo.resolve("lab:v1").parent == vid


def test_images_and_versions(be: Backend, image: Path) -> None:
    v1, _ = import_image(be.repo, image, "lab:v1")
    with open(image, "r+b") as f:
        f.write(b"changed")
    v2, _ = import_image(be.repo, image, "lab:v2")
    imgs = {i.name: i for i in be.repo.images()}
    assert imgs["lab"].versions == 2 and imgs["lab"].tags == {"v1": v1, "v2": v2}
    vs = be.repo.versions("lab")
    assert [v.id for v in vs] == [v1, v2] and vs[0].tags == ["v1"] and vs[0].size == SIZE
    with pytest.raises(ImageNotFound):
        be.repo.versions("nope")
    with pytest.raises(ImageNotFound):
        be.repo.resolve("lab:nope")
    with pytest.raises(ImageNotFound):
        be.repo.resolve("lab@0123456789abcdef")
    with pytest.raises(InvalidName):
        be.repo.resolve("Bad/Name")


def test_get_blobs_in_order_and_verified(be: Backend, image: Path) -> None:
    import_image(be.repo, image, "lab:v1")
    m = be.repo.resolve("lab:v1")
    ids = [m.digest_at(i) for i in range(m.count) if not m.is_zero(i)]
    ids = ids + ids[:3]  # repeats come back repeated, in order
    blobs = be.repo.get_blobs(ids)
    assert len(blobs) == len(ids)
    data = [codec.decode(b, cid) for b, cid in zip(blobs, ids, strict=True)]
    assert all(len(d) == m.chunk_size for d in data)
    assert be.repo.get_blobs([]) == []
    absent = codec.digest(b"never stored")
    with pytest.raises(ChunkMissing):
        be.repo.get_blobs([ids[0], absent])


def test_missing(be: Backend, image: Path) -> None:
    import_image(be.repo, image, "lab:v1")
    m = be.repo.resolve("lab:v1")
    have = sorted(m.unique_digests())
    absent = [codec.digest(bytes([i]) * 100) for i in range(5)]
    got = be.repo.missing([*have, codec.ZERO_DIGEST, *absent, absent[0]])
    assert got == absent
    assert be.repo.missing([]) == []


def test_put_blobs_verifies_and_corrupt_upload_harms_nothing(be: Backend, image: Path) -> None:
    import_image(be.repo, image, "lab:v1")
    m = be.repo.resolve("lab:v1")
    existing = sorted(m.unique_digests())[0]
    good_blob = be.repo.get_blobs([existing])[0]
    fresh = b"fresh chunk " * 5000
    fid = codec.digest(fresh)
    assert be.repo.put_blobs([(fid, codec.encode(fresh))]) == 1
    assert be.repo.put_blobs([(fid, codec.encode(fresh))]) == 0  # already there
    # a blob under the wrong id (for an existing chunk and for a new one) is rejected
    evil = codec.encode(b"not what the id says" * 100)
    with pytest.raises(ChunkCorrupt):
        be.repo.put_blobs([(existing, evil)])
    other = codec.digest(b"other")
    with pytest.raises(ChunkCorrupt):
        be.repo.put_blobs([(other, evil)])
    assert be.repo.get_blobs([existing]) == [good_blob]
    assert be.repo.missing([other]) == [other]
    assert codec.decode(be.repo.get_blobs([fid])[0], fid) == fresh


def test_commit_with_missing_chunks_is_refused_listing_them(be: Backend, image: Path) -> None:
    import_image(be.repo, image, "lab:v1")
    m = be.repo.resolve("lab:v1")
    absent = [codec.digest(bytes([i]) * 4096) for i in range(3)]
    chunks = bytearray(m.chunks)
    for k, cid in enumerate(absent):
        chunks[k * 32:(k + 1) * 32] = cid
    bad = Manifest(image="lab", size=m.size, chunk_size=m.chunk_size, chunks=bytes(chunks))
    with pytest.raises(MissingChunks) as ei:
        be.repo.commit(bad, "v2")
    assert sorted(ei.value.missing) == sorted(c.hex() for c in absent)
    with pytest.raises(ImageNotFound):
        be.repo.resolve("lab:v2")
    # upload them and the same commit goes through; its answer is the version id
    be.repo.put_blobs([(cid, codec.encode(bytes([i]) * 4096)) for i, cid in enumerate(absent)])
    assert be.repo.commit(bad, "v2") == bad.id
    assert be.repo.resolve("lab:v2").id == bad.id


def test_tags_diff_remove_gc(be: Backend, image: Path) -> None:
    v1, _ = import_image(be.repo, image, "lab:v1")
    with open(image, "r+b") as f:
        f.seek(3 * 65536 + 5)
        f.write(b"\xff" * 10)
        f.seek(SIZE - 100)
        f.write(b"tail change")
    v2, _ = import_image(be.repo, image, "lab:v2")
    assert be.repo.diff("lab:v1", "lab:v2") == [3, SIZE // 65536 - 1]
    assert be.repo.diff(f"lab@{v1}", "lab:v1") == []
    be.repo.set_tag("lab", "stable", v1)
    assert be.repo.resolve("lab:stable").id == v1
    with pytest.raises(ImageNotFound):
        be.repo.set_tag("lab", "x", "0123456789abcdef")
    with pytest.raises(InvalidName):
        be.repo.set_tag("lab", "bad tag", v1)
    assert be.repo.remove("lab:stable") == ["lab:stable"]
    with pytest.raises(ImageNotFound):
        be.repo.remove("lab:stable")
    assert sorted(be.repo.remove(f"lab@{v2}")) == sorted(["lab:v2", f"lab@{v2}"])
    with pytest.raises(ImageNotFound):
        be.repo.resolve(f"lab@{v2}")
    only_v2 = be.repo.resolve("lab:v1").unique_digests()
    st = be.gc_now()
    assert st.chunks_removed == 2 and st.bytes_removed > 0
    assert be.repo.missing(sorted(only_v2)) == []  # v1 is intact
    assert be.gc_now().chunks_removed == 0


def test_raw_url(be: Backend) -> None:
    url = be.repo.raw_url("lab:v1")
    if be.kind == "local":
        assert url is None
    else:
        assert url == "http://testserver/v1/images/lab/raw/v1"
        assert be.repo.raw_url("lab@0123456789abcdef").endswith("/raw/@0123456789abcdef")
