"""FailoverRepository's rules, in-process: reads spread and move past a dead endpoint, which is marked
down for a back-off; writes go to the first healthy endpoint; answers (not found) are not failures."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ImageNotFound, RepositoryUnavailable
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.repo.multi import FailoverRepository
from blockprov.repo.remote import RemoteRepository
from blockprov.service.app import create_app
from tests.conftest import make_image
from tests.procs import free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def test_reads_spread_skip_dead_and_writes_go_first_healthy(repo: LocalRepository, tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", 1 << 20, seed=2, data_fraction=1.0, pattern_every=256 << 10)
    import_image(repo, img, "lab:v1")
    dead = RemoteRepository(f"http://127.0.0.1:{free_port()}", timeout=2)
    with TestClient(create_app(repo)) as c1, TestClient(create_app(repo)) as c2:
        live1 = RemoteRepository("http://testserver", client=c1)
        live2 = RemoteRepository("http://testserver", client=c2)
        f = FailoverRepository([dead, live1, live2])
        m = f.resolve("lab:v1")  # tried the dead one first, moved on
        assert f.endpoints[0].failures == 1 and f.healthy() == ["http://testserver"] * 2
        ids = sorted(m.unique_digests() - {codec.ZERO_DIGEST})
        for _ in range(4):
            assert len([codec.decode(b, i) for b, i in zip(f.get_blob_views(ids), ids, strict=True)]) == len(ids) > 0
        assert f.endpoints[1].calls >= 2 and f.endpoints[2].calls >= 2  # spread
        assert f.endpoints[0].calls == 0
        with pytest.raises(ImageNotFound):  # an answer: no endpoint is marked down for it
            f.resolve("lab:nope")
        assert len(f.healthy()) == 2
        data = b"new chunk" * 1000
        before = f.endpoints[1].calls
        assert f.put_blobs([(codec.digest(data), codec.encode(data))]) == 1
        assert f.endpoints[1].calls == before + 1  # the first healthy endpoint took the write
        f.close()
    only_dead = FailoverRepository([RemoteRepository(f"http://127.0.0.1:{free_port()}", timeout=2)])
    with pytest.raises(RepositoryUnavailable):
        only_dead.images()
    only_dead.close()
