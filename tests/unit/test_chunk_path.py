"""service/routes/chunks.py ``LeanChunkPath``: the agents' chunk reads answered without FastAPI,
behind the same access rules, body bound, metrics and verification as every other route."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from blockprov import codec
from blockprov.catalog.tokens import TokenStore
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.app import create_app
from blockprov.service.routes.chunks import LeanChunkPath
from blockprov.service.state import Service
from tests.conftest import corrupt_chunk, make_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[LocalRepository]:
    r = LocalRepository(tmp_path / "repo")
    import_image(r, make_image(tmp_path / "src.img", 1 << 20, seed=5), "lab:v1")
    yield r
    r.close()


def stored_ids(repo: LocalRepository) -> list[bytes]:
    m = repo.resolve("lab:v1")
    return [m.digest_at(i) for i in range(m.count) if not m.is_zero(i)]


def split_answer(body: bytes, ids: list[bytes]) -> list[bytes]:
    pos, out = 0, []
    for cid in ids:
        (n,) = struct.unpack_from("<I", body, pos)
        out.append(codec.decode(body[pos + 4:pos + 4 + n], cid))
        pos += 4 + n
    assert pos == len(body)
    return out


def test_answers_chunk_reads_itself_and_passes_everything_else_on(repo: LocalRepository) -> None:
    passed: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        passed.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    svc = Service(repo, 2)
    ids = stored_ids(repo)[:3]
    c = TestClient(LeanChunkPath(inner, svc))  # not as a context manager: no lifespan for ``inner``
    try:
        r = c.post("/v1/chunks/fetch", content=b"".join(ids))
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert len(split_answer(r.content, ids)) == 3
        g = c.get(f"/v1/chunks/{ids[0].hex()}")
        assert g.status_code == 200 and codec.decode(g.content, ids[0])
        h = c.head(f"/v1/chunks/{ids[0].hex()}")
        assert h.status_code == 200 and h.headers["content-length"] == str(len(g.content))
        assert c.get(f"/v1/chunks/{ids[0].hex()}", headers={"if-none-match": g.headers["etag"]}).status_code == 304
        absent = codec.digest(b"absent")
        r = c.post("/v1/chunks/fetch", content=ids[0] + absent)
        assert r.status_code == 404 and r.json()["missing"] == [absent.hex()]
        assert c.post("/v1/chunks/fetch", content=b"x" * 31).status_code == 400
        # not the hot path: the framework answers
        assert c.post("/v1/chunks/missing", content=ids[0]).status_code == 204
        assert c.put(f"/v1/chunks/{ids[0].hex()}", content=b"").status_code == 204
        assert c.get("/v1/chunks/short").status_code == 204
    finally:
        c.close()
    assert passed == ["POST /v1/chunks/missing", f"PUT /v1/chunks/{ids[0].hex()}", "GET /v1/chunks/short"]
    assert svc.metrics.chunks_served == 3 + 1  # the fetch's three and one GET (not the HEAD, not the 304)
    svc.close()


def test_a_corrupt_blob_is_not_served_by_get(repo: LocalRepository) -> None:
    ids = stored_ids(repo)
    corrupt_chunk(repo, ids[0])
    with TestClient(create_app(repo)) as c:
        r = c.get(f"/v1/chunks/{ids[0].hex()}")
        assert r.status_code == 422 and r.json()["error"] == "ChunkCorrupt"
        # the batch fetch sends blobs as stored: its caller verifies (and fails) them
        r = c.post("/v1/chunks/fetch", content=ids[0])
        assert r.status_code == 200
        with pytest.raises(codec.ChunkCorrupt):
            split_answer(r.content, ids[:1])


def test_tokens_are_enforced_on_the_lean_routes(repo: LocalRepository) -> None:
    tokens = TokenStore(repo.catalog.db)
    read, _ = tokens.create("read", "viewer")
    ids = stored_ids(repo)[:2]
    with TestClient(create_app(repo)) as c:
        for method, path, body in (("POST", "/v1/chunks/fetch", b"".join(ids)),
                                   ("GET", f"/v1/chunks/{ids[0].hex()}", b""),
                                   ("HEAD", f"/v1/chunks/{ids[0].hex()}", b"")):
            r = c.request(method, path, content=body)
            assert r.status_code == 401, (method, path)
            r = c.request(method, path, content=body, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401, (method, path)
            r = c.request(method, path, content=body, headers={"authorization": f"Bearer {read}"})
            assert r.status_code == 200, (method, path)
    with TestClient(create_app(repo, access=AccessPolicy(anonymous_read=True))) as c:
        assert c.post("/v1/chunks/fetch", content=b"".join(ids)).status_code == 200


def test_body_bound_and_metrics_still_apply(repo: LocalRepository) -> None:
    ids = stored_ids(repo)[:2]
    app = create_app(repo, max_body=32, access=AccessPolicy(mode="off"))
    with TestClient(app) as c:
        assert c.post("/v1/chunks/fetch", content=ids[0]).status_code == 200
        assert c.post("/v1/chunks/fetch", content=b"".join(ids)).status_code == 413
        assert c.get(f"/v1/chunks/{ids[0].hex()}").status_code == 200
        text = c.get("/metrics").text
    svc = Service.of_app(app)
    assert svc.metrics.requests[("POST", "/v1/chunks/fetch", "200")] == 1
    assert sum(n for (_, _, status), n in svc.metrics.requests.items() if status == "413") == 1
    assert svc.metrics.requests[("GET", "/v1/chunks/{cid}", "200")] == 1
    assert "/v1/chunks/fetch" in text
