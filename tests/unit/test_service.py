"""The HTTP service at the status-code and header level, in-process (no sockets)."""

from __future__ import annotations

import json
import logging
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov import codec
from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from blockprov.service.rawview import RangeNotSatisfiable, parse_range
from tests.conftest import corrupt_chunk, make_image

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; httpx is what we ship with
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SIZE = 4 << 20
CS = 65536


class Env:
    def __init__(self, tmp: Path, max_body: int = 256 << 20) -> None:
        self.src = make_image(tmp / "src.img", SIZE, seed=11, data_fraction=0.75, pattern_every=256 << 10)
        self.data = self.src.read_bytes()
        self.repo = LocalRepository(tmp / "repo")
        self.vid, _ = import_image(self.repo, self.src, "lab:v1")
        self.m = self.repo.resolve("lab:v1")
        self.stored = [i for i in range(self.m.count) if not self.m.is_zero(i)]
        self.zero = [i for i in range(self.m.count) if self.m.is_zero(i)]
        self.c = TestClient(create_app(self.repo, max_body=max_body))

    def cid(self, i: int) -> bytes:
        return self.m.digest_at(i)

    def corrupt(self, i: int) -> None:
        corrupt_chunk(self.repo, self.cid(i))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.c.close()
    e.repo.close()


def err(r: Any) -> str:
    return str(r.json()["error"])


# -- documents -------------------------------------------------------------------------------------
def test_openapi_and_docs(env: Env) -> None:
    doc = env.c.get("/openapi.json").json()
    for path in ("/v1/chunks/fetch", "/v1/chunks/{cid}", "/v1/images/{name}/raw/{ref}", "/v1/gc"):
        assert path in doc["paths"]
    assert env.c.get("/docs").status_code == 200
    assert env.c.get("/v1/health").json()["status"] == "ok"


# -- chunks ----------------------------------------------------------------------------------------
def test_chunk_get_etag_304_head(env: Env) -> None:
    cid = env.cid(env.stored[0])
    r = env.c.get(f"/v1/chunks/{cid.hex()}")
    assert r.status_code == 200
    assert r.headers["etag"] == f'"{cid.hex()}"'
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert codec.decode(r.content, cid) == env.data[env.stored[0] * CS:(env.stored[0] + 1) * CS]
    assert env.c.get(f"/v1/chunks/{cid.hex()}", headers={"if-none-match": r.headers["etag"]}).status_code == 304
    assert env.c.get(f"/v1/chunks/{cid.hex()}", headers={"if-none-match": '"other"'}).status_code == 200
    h = env.c.head(f"/v1/chunks/{cid.hex()}")
    assert h.status_code == 200 and h.headers["content-length"] == str(len(r.content)) and h.content == b""
    absent = codec.digest(b"absent").hex()
    r = env.c.get(f"/v1/chunks/{absent}")
    assert r.status_code == 404 and err(r) == "ChunkMissing"
    assert env.c.get(f"/v1/chunks/{absent}", headers={"if-none-match": f'"{absent}"'}).status_code == 404
    r = env.c.get("/v1/chunks/xyz")
    assert r.status_code == 400 and err(r) == "InvalidName"


def test_corrupt_chunk_is_never_served(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    i = env.stored[0]
    env.corrupt(i)
    with caplog.at_level(logging.WARNING, logger="blockprov.service"):
        r = env.c.get(f"/v1/chunks/{env.cid(i).hex()}")
    assert r.status_code == 422 and err(r) == "ChunkCorrupt"
    assert "corrupt" in caplog.text
    # the raw view refuses a range that touches it, before sending a status line
    r = env.c.get("/v1/images/lab/raw/v1", headers={"range": f"bytes={i * CS}-{i * CS + 99}"})
    assert r.status_code == 422 and err(r) == "ChunkCorrupt"
    # a re-upload of the right content repairs it
    good = codec.encode(env.data[i * CS:(i + 1) * CS])
    assert env.c.put(f"/v1/chunks/{env.cid(i).hex()}", content=good).status_code == 201
    assert env.c.get(f"/v1/chunks/{env.cid(i).hex()}").status_code == 200


def test_put_chunk_checks_digest(env: Env) -> None:
    data = b"brand new" * 1000
    cid = codec.digest(data).hex()
    r = env.c.put(f"/v1/chunks/{cid}", content=codec.encode(data))
    assert r.status_code == 201 and r.json() == {"new": True}
    assert env.c.put(f"/v1/chunks/{cid}", content=codec.encode(data)).status_code == 200
    other = codec.digest(b"other").hex()
    r = env.c.put(f"/v1/chunks/{other}", content=codec.encode(data))
    assert r.status_code == 422 and err(r) == "ChunkCorrupt"
    assert env.c.get(f"/v1/chunks/{other}").status_code == 404
    r = env.c.put(f"/v1/chunks/{other}", content=b"junk")
    assert r.status_code == 422


def frame(cid: bytes, blob: bytes) -> bytes:
    return cid + struct.pack("<I", len(blob)) + blob


def test_batch_upload_and_truncated_frames(env: Env) -> None:
    items = [(codec.digest(d), codec.encode(d)) for d in (b"a" * 5000, b"b" * 7000, b"c" * 9000)]
    body = b"".join(frame(c, b) for c, b in items)
    for cut in (len(body) - 1, len(body) - len(items[2][1]) - 2, 10):
        r = env.c.post("/v1/chunks", content=body[:cut])
        assert r.status_code == 400 and err(r) == "UsageError", cut
        assert env.repo.missing([c for c, _ in items]) == [c for c, _ in items]  # nothing stored
    r = env.c.post("/v1/chunks", content=body)
    assert r.status_code == 200 and r.json() == {"received": 3, "new": 3}
    assert env.c.post("/v1/chunks", content=body).json() == {"received": 3, "new": 0}
    assert env.c.post("/v1/chunks", content=b"").json() == {"received": 0, "new": 0}
    bad = frame(codec.digest(b"zzz"), items[0][1])
    assert env.c.post("/v1/chunks", content=bad).status_code == 422


def test_fetch_many(env: Env) -> None:
    ids = [env.cid(i) for i in env.stored] + [env.cid(env.stored[0])]
    r = env.c.post("/v1/chunks/fetch", content=b"".join(ids))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    pos, out = 0, []
    for cid in ids:
        (n,) = struct.unpack_from("<I", r.content, pos)
        out.append(codec.decode(r.content[pos + 4:pos + 4 + n], cid))
        pos += 4 + n
    assert pos == len(r.content)
    assert out[0] == out[-1]
    absent = [codec.digest(bytes([k])) for k in range(3)]
    r = env.c.post("/v1/chunks/fetch", content=b"".join([ids[0], absent[0], ids[1], absent[1], absent[2]]))
    assert r.status_code == 404 and err(r) == "ChunkMissing"
    assert r.json()["missing"] == [a.hex() for a in absent]
    assert env.c.post("/v1/chunks/fetch", content=b"x" * 33).status_code == 400
    r = env.c.post("/v1/chunks/fetch", content=b"")
    assert r.status_code == 200 and r.content == b""


def test_missing_binary_and_json(env: Env) -> None:
    have = env.cid(env.stored[0])
    absent = codec.digest(b"absent")
    r = env.c.post("/v1/chunks/missing", content=have + absent + codec.ZERO_DIGEST)
    assert r.status_code == 200 and r.content == absent
    r = env.c.post("/v1/chunks/missing", json={"ids": [have.hex(), absent.hex()]})
    assert r.json() == {"missing": [absent.hex()]}
    assert env.c.post("/v1/chunks/missing", json={"ids": ["nothex"]}).status_code == 400
    assert env.c.post("/v1/chunks/missing", json={"nope": 1}).status_code == 400
    assert env.c.post("/v1/chunks/missing", content=b"short").status_code == 400


def test_body_limit_413(tmp_path: Path) -> None:
    e = Env(tmp_path, max_body=1000)
    try:
        cid = codec.digest(b"x").hex()
        r = e.c.put(f"/v1/chunks/{cid}", content=b"y" * 1001)  # declared Content-Length
        assert r.status_code == 413 and err(r) == "TooLarge"

        def trickle() -> Iterator[bytes]:  # no Content-Length: enforced while reading
            for _ in range(20):
                yield b"z" * 100

        r = e.c.post("/v1/chunks", content=trickle())
        assert r.status_code == 413 and err(r) == "TooLarge"
        assert e.c.put(f"/v1/chunks/{cid}", content=codec.encode(b"x")).status_code == 201
    finally:
        e.c.close()
        e.repo.close()


def test_answer_before_the_body_is_read_closes_the_connection(tmp_path: Path) -> None:
    """Issue 17: an answer that leaves before its request's body was read says ``Connection:
    close`` (the server then closes instead of reading the rest: forever, for an endless chunked
    body); answers to requests whose body was read, or that had none, keep the connection."""
    e = Env(tmp_path, max_body=1000)
    try:
        cid = codec.digest(b"x").hex()
        r = e.c.put(f"/v1/chunks/{cid}", content=b"y" * 1001)  # declared too large: refused unread
        assert r.status_code == 413 and r.headers.get("connection") == "close"
        # (An endless chunked body over a real socket: tests/interop/test_http_raw.py; the test
        # client hands the app a streamed body in one piece, so here it is never left unread.)
        r = e.c.put(f"/v1/chunks/{cid}", content=b"1", headers={"content-length": "1" + "0" * 5000})
        assert r.status_code == 413 and r.headers.get("connection") == "close"
        r = e.c.put(f"/v1/chunks/{cid}", content=codec.encode(b"x"))  # read whole: keep-alive
        assert r.status_code == 201 and "connection" not in r.headers
        assert "connection" not in e.c.get("/v1/images").headers
    finally:
        e.c.close()
        e.repo.close()


@pytest.mark.parametrize("path", ["/v1/chunks/missing", "/v1/images/lab/versions", "/v1/agents/i-abc",
                                  "/v1/agents/i-abc/requests", "/v1/agents/i-abc/requests/0123456789abcdef/result",
                                  "/v1/hosts/h1", "/v1/images/lab/versions/VID/boot",
                                  "/v1/images/lab/versions/VID/profile"])
def test_json_nested_too_deeply_is_4xx(env: Env, path: str) -> None:
    """Issue 17: RecursionError is no ValueError; it escaped every "not JSON" handler as a 500."""
    method = "PUT" if path.endswith(("boot", "profile", "h1", "i-abc")) else "POST"
    for body in (b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000):
        r = env.c.request(method, path.replace("VID", env.vid), content=body,
                          headers={"content-type": "application/json"})
        # a version commit's body is a manifest: refused by the manifest parser (422) before the route
        expected = (422, "ManifestError") if path.endswith("versions") else (400, "UsageError")
        assert (r.status_code, err(r)) == expected and "nested too deeply" in r.json()["message"]


# -- catalog ---------------------------------------------------------------------------------------
def test_manifest_bytes_hash_to_id(env: Env) -> None:
    r = env.c.get("/v1/images/lab/manifest", params={"ref": "v1"})
    assert r.status_code == 200 and r.content == env.m.to_json()
    assert Manifest.from_json(r.content).id == env.vid == r.headers["x-blockprov-version"]
    assert r.headers["cache-control"] == "no-cache"
    r = env.c.get("/v1/images/lab/manifest", params={"ref": f"@{env.vid}"})
    assert r.content == env.m.to_json() and "immutable" in r.headers["cache-control"]
    assert env.c.get("/v1/images/lab/manifest", params={"ref": "@" + env.vid},
                     headers={"if-none-match": f'"{env.vid}"'}).status_code == 304


def test_names_and_not_found(env: Env) -> None:
    for url in ("/v1/images/Bad!/versions", "/v1/images/lab/manifest?ref=bad%20tag",
                "/v1/images/lab/manifest?ref=@xyz", "/v1/images/..%2E/versions", "/v1/images/lab/raw/@12"):
        r = env.c.get(url)
        assert r.status_code in (400, 404), url
        if r.status_code == 400:
            assert err(r) == "InvalidName", url
    assert env.c.get("/v1/images/Bad!/versions").status_code == 400
    r = env.c.get("/v1/images/nope/versions")
    assert r.status_code == 404 and err(r) == "ImageNotFound"
    assert env.c.get("/v1/images/nope/manifest").status_code == 404
    assert env.c.get("/v1/images/lab/raw/nope").status_code == 404
    r = env.c.get("/v1/images/lab/diff", params={"a": "v1"})  # b missing: a validation error
    assert r.status_code == 400 and err(r) == "UsageError"
    r = env.c.get("/v1/no/such/route")
    assert r.status_code == 404 and err(r) == "NotFound"


def test_commit_rules(env: Env) -> None:
    body = env.m.to_json()
    r = env.c.post("/v1/images/other/versions", content=body)
    assert r.status_code == 400 and err(r) == "UsageError"
    r = env.c.post("/v1/images/lab/versions", content=b"{not json")
    assert r.status_code == 422 and err(r) == "ManifestError"
    d = json.loads(body)
    chunks = bytearray(env.m.chunks)
    absent = codec.digest(b"absent")
    chunks[:32] = absent
    from blockprov.manifest import Manifest

    bad = Manifest(image="lab", size=env.m.size, chunk_size=env.m.chunk_size, chunks=bytes(chunks))
    r = env.c.post("/v1/images/lab/versions", params={"tag": "v2"}, content=bad.to_json())
    assert r.status_code == 409 and r.json()["missing"] == [absent.hex()] and err(r) == "MissingChunks"
    d["labels"] = {"os": "debian"}
    r = env.c.post("/v1/images/lab/versions", params={"tag": "v3"}, content=json.dumps(d).encode())
    assert r.status_code == 201 and r.json()["id"] == env.c.get(
        "/v1/images/lab/manifest", params={"ref": "v3"}).headers["x-blockprov-version"]
    assert env.c.post("/v1/images/lab/versions", params={"tag": "bad tag"}, content=body).status_code == 400


def test_tags_delete_diff_gc(env: Env) -> None:
    r = env.c.put("/v1/images/lab/tags/stable", json={"version": env.vid})
    assert r.status_code == 200
    assert env.c.put("/v1/images/lab/tags/x", json={"version": "0123456789abcdef"}).status_code == 404
    assert env.c.put("/v1/images/lab/tags/x", json={"version": "nothex"}).status_code == 400
    assert env.c.put("/v1/images/lab/tags/x", json={"wrong": 1}).status_code == 400
    r = env.c.get("/v1/images/lab/diff", params={"a": "v1", "b": "stable"})
    assert r.json() == {"a": env.vid, "b": env.vid, "chunk_size": CS, "changed": []}
    assert env.c.delete("/v1/images/lab/tags/stable").json() == {"removed": ["lab:stable"]}
    assert env.c.delete("/v1/images/lab/tags/stable").status_code == 404
    r = env.c.delete(f"/v1/images/lab/versions/{env.vid}")
    assert sorted(r.json()["removed"]) == sorted(["lab:v1", f"lab@{env.vid}"])
    assert env.c.get(f"/v1/images/lab/raw/@{env.vid}").status_code == 404
    st = env.c.post("/v1/gc", params={"grace": 0}).json()
    assert st["chunks_removed"] == len(env.m.unique_digests()) and st["chunks_kept"] == 0


def test_unexpected_error_is_500_and_server_lives(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(env.repo, "images", boom)
    with caplog.at_level(logging.ERROR, logger="blockprov.service"):
        r = env.c.get("/v1/images")
    # issue 27: the body names a reference, never the exception's text; the log has both
    assert r.status_code == 500 and err(r) == "InternalError" and "kaboom" not in r.text
    ref = r.json()["details"]["ref"]
    assert "kaboom" in caplog.text and ref in caplog.text and ref in r.json()["message"]
    assert env.c.get("/v1/images/lab/versions").status_code == 200


# -- raw view --------------------------------------------------------------------------------------
def test_raw_head_and_full_body(env: Env) -> None:
    h = env.c.head("/v1/images/lab/raw/v1")
    assert h.status_code == 200 and h.content == b""
    assert h.headers["content-length"] == str(SIZE) and h.headers["accept-ranges"] == "bytes"
    assert h.headers["etag"] == f'"{env.vid}"'
    r = env.c.get("/v1/images/lab/raw/v1")
    assert r.status_code == 200 and r.content == env.data
    r = env.c.get(f"/v1/images/lab/raw/@{env.vid}")
    assert r.content == env.data and "immutable" in r.headers["cache-control"]


@pytest.mark.parametrize("spec", ["0-0", "0-511", "100-70000", f"{CS - 1}-{3 * CS + 1}", "4000000-",
                                  "-1", "-70000", f"0-{SIZE * 2}", f"{SIZE - 1}-"])
def test_raw_ranges(env: Env, spec: str) -> None:
    r = env.c.get("/v1/images/lab/raw/v1", headers={"range": f"bytes={spec}"})
    assert r.status_code == 206
    start, _, end = spec.partition("-")
    if not start:
        lo, hi = SIZE - int(end), SIZE
    else:
        lo, hi = int(start), min(SIZE, int(end) + 1 if end else SIZE)
    assert r.content == env.data[lo:hi]
    assert r.headers["content-range"] == f"bytes {lo}-{hi - 1}/{SIZE}"
    assert r.headers["content-length"] == str(hi - lo)


def test_raw_ranges_over_zero_and_stored_chunks(env: Env) -> None:
    for i in (env.zero[0], env.stored[0], env.zero[-1], env.stored[-1]):
        r = env.c.get("/v1/images/lab/raw/v1", headers={"range": f"bytes={i * CS + 7}-{i * CS + CS + 1000}"})
        assert r.content == env.data[i * CS + 7:i * CS + CS + 1001]


def test_raw_unsatisfiable_and_ignored_ranges(env: Env) -> None:
    for spec in (f"{SIZE}-", f"{SIZE}-{SIZE + 10}", "-0"):
        r = env.c.get("/v1/images/lab/raw/v1", headers={"range": f"bytes={spec}"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{SIZE}", spec
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=5-3", "bytes=x-y"):
        r = env.c.get("/v1/images/lab/raw/v1", headers={"range": header})
        assert r.status_code == 200 and len(r.content) == SIZE, header
    r = env.c.get("/v1/images/lab/raw/v1", headers={"range": "bytes=0-9", "if-range": '"stale"'})
    assert r.status_code == 200
    r = env.c.get("/v1/images/lab/raw/v1", headers={"range": "bytes=0-9", "if-range": f'"{env.vid}"'})
    assert r.status_code == 206 and r.content == env.data[:10]
    assert env.c.get("/v1/images/lab/raw/v1", headers={"if-none-match": f'"{env.vid}"'}).status_code == 304


def test_parse_range_pure() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=-1000", 100) == (0, 100)
    assert parse_range("bytes= 5 - 6 ", 100) == (5, 7)
    assert parse_range("bytes=0-1,3-4", 100) is None
    for bad in ("bytes=100-", "bytes=-0", "bytes=200-300"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


@pytest.mark.parametrize("spec", ["²-", "0-²", "-²", "¹²-³", "٣-", "0-٣", "-٣", "+5-", "0x10-", "1_0-", "-",
                                  " - ", "1e3-"])
def test_parse_range_ignores_what_is_not_ascii_digits(spec: str) -> None:
    """Issue 17: "²" passed ``isdigit`` and broke ``int`` (500); "٣" was read as 3."""
    assert parse_range(f"bytes={spec}", 100) is None


def test_parse_range_numbers_longer_than_any_disk() -> None:
    """Issue 17: more than 4,300 digits broke ``int`` (500). They mean "past the end"."""
    huge = "9" * 5000
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={huge}-", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={huge}-{huge}", 100)
    assert parse_range(f"bytes=10-{huge}", 100) == (10, 100)
    assert parse_range(f"bytes=-{huge}", 100) == (0, 100)
    assert parse_range(f"bytes={'0' * 5000}5-{'0' * 5000}9", 100) == (5, 10)
