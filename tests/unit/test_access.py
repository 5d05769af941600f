"""Access control, in-process: tokens in the catalog, and every route of the OpenAPI document
checked against every kind of caller (table-driven, so a route added later is covered too)."""

from __future__ import annotations

import re
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blockprov import errors
from blockprov.catalog import tokens as auth
from blockprov.catalog.tokens import TokenStore
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.repo.remote import RemoteRepository
from blockprov.service.access import AccessPolicy, required_scope
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

# Where the rule is independent of the middleware's tables: what a read token may do besides GET/HEAD.
READ_POSTS = {("POST", "/v1/chunks/fetch"), ("POST", "/v1/chunks/missing"), ("POST", "/v1/sites/{site}/join")}
LEASING_GETS = {("GET", "/v1/agents/{instance}/requests/next")}  # a GET that changes state
OPEN = {("GET", "/v1/health"), ("GET", "/v1/whoami"), ("GET", "/openapi.json"), ("GET", "/docs")}
BOOT = {("GET", "/v1/boot/{host}"), ("GET", "/v1/images/{name}/versions/{vid}/boot/{which}"),
        ("HEAD", "/v1/images/{name}/versions/{vid}/boot/{which}"), ("GET", "/v1/boot/{host}/boot.img"),
        ("HEAD", "/v1/boot/{host}/boot.img"),
        ("POST", "/v1/boot/{host}/disk")}  # the every-day boot's question: the disk's initramfs, as iPXE


class Env:
    def __init__(self, tmp: Path) -> None:
        self.repo = LocalRepository(tmp / "repo")
        src = make_image(tmp / "src.img", 1 << 20, seed=3)
        self.vid, _ = import_image(self.repo, src, "lab:v1")
        self.tokens = TokenStore(self.repo.catalog.db)
        self.write, _ = self.tokens.create("write", "admin")
        self.agent, _ = self.tokens.create("agent", "kiosk-agent")
        self.read, _ = self.tokens.create("read", "viewer")
        self.clients: list[TestClient] = []

    def client(self, **policy: Any) -> TestClient:
        c = TestClient(create_app(self.repo, access=AccessPolicy(**policy)))
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.repo.close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)  # see revocations at once
    e = Env(tmp_path)
    yield e
    e.close()


def operations(c: TestClient, vid: str) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) for every operation the OpenAPI document lists."""
    values = {"name": "lab", "vid": vid, "tag": "t1", "cid": "00" * 32, "host": "pc-1", "instance": "i-1",
              "rid": "0123456789abcdef", "which": "kernel", "ref": "v1", "site": "s1"}
    out = []
    for template, ops in c.get("/openapi.json").json()["paths"].items():
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)
        out.extend((method.upper(), template, path) for method in ops)
    out.append(("GET", "/openapi.json", "/openapi.json"))
    return out


def call(c: TestClient, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return c.request(method, path, headers=headers, content=b"{}")


def mutating(method: str, template: str) -> bool:
    return ((method not in ("GET", "HEAD") and (method, template) not in READ_POSTS)
            or (method, template) in LEASING_GETS)


def test_every_route_by_caller(env: Env) -> None:
    c = env.client(mode="on")
    ops = operations(c, env.vid)
    assert len(ops) > 30
    assert sum(mutating(m, t) for m, t, _ in ops) >= 15
    for method, template, path in ops:
        what = f"{method} {template}"
        if (method, template) in OPEN:
            assert call(c, method, path, None).status_code not in (401, 403), what
            continue
        r = call(c, method, path, None)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), what
        assert call(c, method, path, "bpt_not-a-token").status_code == 401, what
        r = call(c, method, path, env.read)
        if mutating(method, template):
            assert r.status_code == 403, what
            if method != "HEAD":
                assert r.json()["error"] == "Forbidden" and "read token cannot" in r.json()["message"], what
        else:
            assert r.status_code not in (401, 403), what
        r = call(c, method, path, env.agent)
        if required_scope(method, template) == "write":
            assert r.status_code == 403, what
        else:
            assert r.status_code not in (401, 403), what
        assert call(c, method, path, env.write).status_code not in (401, 403), what


def test_scopes_are_in_the_openapi_document(env: Env) -> None:
    doc = env.client().get("/openapi.json").json()
    for template, ops in doc["paths"].items():
        for method, op in ops.items():
            want = "write" if mutating(method.upper(), template) else "read"
            got = op["x-blockprov-scope"]
            assert got == want or (got == "agent" and want == "write") or (
                got == "none" and template in ("/v1/health", "/v1/whoami"))


def test_anonymous_read_and_boot(env: Env) -> None:
    c = env.client(mode="on", anonymous_read=True)
    for method, template, path in operations(c, env.vid):
        if (method, template) in OPEN:
            continue
        r = call(c, method, path, None)
        if mutating(method, template) or required_scope(method, template) == "agent":
            assert r.status_code == 401, (method, template)
        else:
            assert r.status_code not in (401, 403), (method, template)
    # a bad token is refused even where anonymous callers are let in
    assert call(c, "GET", "/v1/images", "wrong").status_code == 401
    b = env.client(mode="on", anonymous_boot=True)
    for method, template, path in operations(b, env.vid):
        if (method, template) in OPEN:
            continue
        r = call(b, method, path, None)
        assert (r.status_code != 401) == ((method, template) in BOOT), (method, template)


def test_modes_and_revocation(env: Env, tmp_path: Path) -> None:
    assert env.client(mode="off").get("/v1/images").status_code == 200
    auto = env.client()
    assert auto.get("/v1/images").status_code == 401  # tokens exist: auto enforces
    # a fresh repository without tokens runs open until the first token is created
    other = LocalRepository(tmp_path / "other")
    try:
        c = TestClient(create_app(other))
        env.clients.append(c)
        assert c.get("/v1/images").status_code == 200
        store = TokenStore(other.catalog.db)
        token, info = store.create("read")
        assert c.get("/v1/images").status_code == 401
        assert c.get("/v1/images", headers={"authorization": f"Bearer {token}"}).status_code == 200
        store.revoke(info.id)
        assert c.get("/v1/images", headers={"authorization": f"Bearer {token}"}).status_code == 401
        assert c.get("/v1/images").status_code == 401  # revoking the last token does not reopen it
    finally:
        other.close()
    h = {"authorization": f"Bearer {env.read}"}
    assert auto.get("/v1/images", headers=h).status_code == 200
    env.tokens.revoke("viewer")
    assert auto.get("/v1/images", headers=h).status_code == 401


def test_token_store(env: Env) -> None:
    infos = env.tokens.tokens()
    assert [(i.name, i.scope) for i in infos] == [("admin", "write"), ("kiosk-agent", "agent"), ("viewer", "read")]
    assert env.write.startswith("bpt_") and len(env.write) > 40
    # only hashes are kept
    db = sqlite3.connect(env.repo.data_dir / "catalog.sqlite")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    for t in (env.write, env.agent, env.read):
        assert t not in dump and auth.token_hash(t) in dump
    with pytest.raises(errors.UsageError):
        env.tokens.create("admin")
    with pytest.raises(errors.UsageError):
        env.tokens.create("read", "viewer")  # names are unique
    with pytest.raises(errors.InvalidName):
        env.tokens.create("read", "bad name")
    with pytest.raises(errors.NotFound):
        env.tokens.revoke("nobody")
    assert env.tokens.lookup(env.read) is not None
    assert env.tokens.revoke("viewer").revoked is not None
    assert env.tokens.revoke("viewer").revoked is not None  # again: still revoked, no error
    assert env.tokens.lookup(env.read) is None


def test_remote_client_errors(env: Env) -> None:
    """The client sends its token on every path and rebuilds 401/403 as their own error classes."""
    c = env.client(mode="on")
    for token, ok_read, ok_write in ((None, False, False), ("bpt_wrong", False, False), (env.read, True, False),
                                     (env.write, True, True)):
        r = RemoteRepository("http://testserver", client=c, token=token)
        if ok_read:
            assert r.images()[0].name == "lab"
            m = r.resolve("lab:v1")
            assert len(r.get_blobs(sorted(m.unique_digests())[:3])) == 3
        else:
            with pytest.raises(errors.Unauthorized) as e:
                r.images()
            assert e.value.exit_code == 10 and "--token" in str(e.value)
        if ok_write:
            r.set_tag("lab", "stable", env.vid)
        elif ok_read:
            with pytest.raises(errors.Forbidden) as f:
                r.set_tag("lab", "stable", env.vid)
            assert f.value.exit_code == 11 and "write" in str(f.value)
    with pytest.raises(errors.UsageError):
        RemoteRepository("http://testserver", client=c, token="two words")


def test_catalog_outage_keeps_known_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the catalog cannot be read, known tokens (and "tokens exist") keep their last answer for
    STALE_SECONDS; a token never seen is a 503 from the middleware, not a 500."""
    from blockprov.sqlite import Database

    class Flaky(Database):
        down = False

        def one(self, sql: str, params: Any = ()) -> Any:
            if self.down:
                raise errors.CatalogUnavailable(url="test", why="down for the test")
            return super().one(sql, params)

    db = Flaky(tmp_path / "catalog.sqlite")
    repo = LocalRepository(tmp_path / "repo", catalog=db)
    store = TokenStore(db)
    read, _ = store.create("read", "viewer")
    client = TestClient(create_app(repo, access=AccessPolicy("auto")))
    try:
        h = {"authorization": f"Bearer {read}"}
        assert client.get("/v1/chunks/" + "00" * 32, headers=h).status_code == 404  # learned: tokens on, valid
        monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)
        Flaky.down = True
        assert client.get("/v1/chunks/" + "00" * 32, headers=h).status_code == 404  # still let through
        assert client.get("/v1/chunks/" + "00" * 32).status_code == 401  # still enforced
        r = client.get("/v1/chunks/" + "00" * 32, headers={"authorization": "Bearer bpt_never-seen"})
        assert r.status_code == 503 and r.json()["error"] == "CatalogUnavailable"
        monkeypatch.setattr(auth, "STALE_SECONDS", 0.0)
        assert client.get("/v1/chunks/" + "00" * 32, headers=h).status_code == 503  # too old to trust
        Flaky.down = False
        assert client.get("/v1/chunks/" + "00" * 32, headers=h).status_code == 404
    finally:
        Flaky.down = False
        client.close()
        repo.close()
