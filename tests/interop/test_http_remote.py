"""RemoteRepository over a real socket: the importer's worker threads, the exporter, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ChunkCorrupt, ChunkMissing, ImageNotFound, MissingChunks, RepositoryUnavailable, TooLarge
from blockprov.imaging.exporter import export_image
from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.remote import RemoteRepository
from tests import procs
from tests.conftest import make_image
from tests.interop.test_http_raw import Server, start_server

pytestmark = pytest.mark.interop


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "repo")
    yield s
    assert s.stop() == 0


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_import_export_over_http(server: Server, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 40 << 20, seed=5, data_fraction=0.7)
    with RemoteRepository(server.url) as repo:
        vid, stats = import_image(repo, src, "net:v1")
        assert stats.new_chunks > 0
        m = repo.resolve(f"net@{vid}")
        assert m.id == vid
        out = tmp_path / "out.img"
        export_image(repo, "net:v1", out)
        assert sha(out) == sha(src)
        _, again = import_image(repo, src, "net:v1")
        assert again.new_chunks == 0
        # error classes survive the trip
        with pytest.raises(ImageNotFound):
            repo.resolve("net:nope")
        with pytest.raises(MissingChunks) as ei:
            repo.commit(Manifest(image="net", size=65536, chunk_size=65536, chunks=codec.digest(b"x")))
        assert ei.value.missing == [codec.digest(b"x").hex()]
        with pytest.raises(ChunkCorrupt):
            repo.put_blobs([(codec.digest(b"y"), codec.encode(b"z"))])
        assert repo.raw_url("net:v1") == f"{server.url}/v1/images/net/raw/v1"


def test_body_limit_maps_to_too_large(tmp_path: Path) -> None:
    s = start_server(tmp_path / "repo", "--max-body", "100000")
    try:
        with RemoteRepository(s.url) as repo:
            data = os.urandom(200_000)  # incompressible: the blob stays over the limit
            with pytest.raises(TooLarge):
                repo.put_blobs([(codec.digest(data), codec.encode(data))])
            small = b"fits" * 1000
            assert repo.put_blobs([(codec.digest(small), codec.encode(small))]) == 1  # still serving
    finally:
        assert s.stop() == 0


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def test_unreachable_repository(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with RemoteRepository(url, timeout=2.0) as repo:
        with pytest.raises(RepositoryUnavailable) as ei:
            repo.images()
        assert url in str(ei.value)


def test_server_killed_midway(tmp_path: Path) -> None:
    s = start_server(tmp_path / "repo")
    with RemoteRepository(s.url, timeout=2.0) as repo:
        assert repo.images() == []
        s.stop(signal.SIGKILL)
        with pytest.raises(RepositoryUnavailable):
            repo.missing([codec.digest(b"a")])


def test_fetch_path_keeps_errors_and_survives_a_restart(tmp_path: Path) -> None:
    """get_blobs / get_blob_views use raw keep-alive connections: same errors as httpx, and a
    connection the server closed meanwhile (restart on the same port) is replaced transparently."""
    port = free_port()
    data = tmp_path / "repo"
    s, _ = procs.start_server(data, port=port)
    a, b = os.urandom(70000), b"compressible " * 5000
    ids = [codec.digest(a), codec.digest(b)]
    try:
        with RemoteRepository(s.url, timeout=5.0) as repo:
            assert repo._raw is not None  # the fast path is in use for a plain http:// URL
            repo.put_blobs([(ids[0], codec.encode(a)), (ids[1], codec.encode(b))])
            views = repo.get_blob_views([ids[1], ids[0], ids[1]])
            assert [codec.decode(v, c) for v, c in zip(views, [ids[1], ids[0], ids[1]], strict=True)] == [b, a, b]
            blobs = repo.get_blobs(ids)
            assert all(type(x) is bytes for x in blobs)
            assert codec.decode(blobs[0], ids[0]) == a
            with pytest.raises(ChunkMissing):
                repo.get_blobs([ids[0], codec.digest(b"absent")])
            assert s.stop() == 0
            s, _ = procs.start_server(data, port=port)
            assert codec.decode(repo.get_blobs([ids[0]])[0], ids[0]) == a  # stale connection replaced
            assert s.stop(signal.SIGKILL) != 0
            with pytest.raises(RepositoryUnavailable):
                repo.get_blobs([ids[0]])
    finally:
        s.stop()
