"""The console (``/ui/``, service/ui/) in process: its routes under the same access rules as the API,
its login, its CSRF rule, and the bad input of issue 16 (HTML in labels and host names escaped, a
host whose version was removed, the catalog unreachable, a read token trying to act). The real
browser test is tests/interop/test_console.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from blockprov.catalog import tokens as auth
from blockprov.catalog.images import Catalog
from blockprov.catalog.tokens import TokenStore
from blockprov.errors import CatalogUnavailable
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy, required_scope
from blockprov.service.app import create_app
from blockprov.service.ui.auth import COOKIE
from tests.conftest import make_image

ORIGIN = "http://testserver"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Env:
    def __init__(self, tmp: Path) -> None:
        self.repo = LocalRepository(tmp / "repo")
        self.v1, _ = import_image(self.repo, make_image(tmp / "a.raw", 1 << 20, seed=1), "lab:v1",
                                  labels={"note": EVIL})
        self.v2, _ = import_image(self.repo, make_image(tmp / "b.raw", 1 << 20, seed=2), "lab:v2")
        self.repo.assign_host("52:54:00:00:00:01", "lab:v1")
        self.repo.register_agent("pc-01", {"image": "lab", "version": self.v1, "host": EVIL,
                                           "hydration": {"percent": 42.5}, "modified_chunks": 3})
        self.tokens = TokenStore(self.repo.catalog.db)
        self.write, _ = self.tokens.create("write", "admin")
        self.read, _ = self.tokens.create("read", "viewer")

    def client(self, token: str | None = None, **policy: Any) -> TestClient:
        c = TestClient(create_app(self.repo, access=AccessPolicy(**policy)), follow_redirects=False)
        if token is not None:
            c.cookies.set(COOKIE, token)
        return c


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)
    e = Env(tmp_path)
    yield e
    e.repo.close()


def post(c: TestClient, path: str, data: dict[str, Any], origin: str | None = ORIGIN) -> Any:
    return c.post(path, data=data, headers={"origin": origin} if origin else {})


def console_routes(c: TestClient) -> list[tuple[str, str]]:
    out = []
    for r in c.app.router.routes:  # type: ignore[attr-defined]
        if r.path.startswith("/ui"):
            out.extend((m, r.path) for m in sorted(r.methods) if m != "HEAD")
    return out


def test_console_routes_have_the_api_scopes(env: Env) -> None:
    """Pages need read, forms need write; only login, logout and static files are open."""
    c = env.client()
    routes = console_routes(c)
    assert len(routes) >= 12
    open_ = {(m, p) for m, p in routes if required_scope(m, p) is None}
    assert open_ == {("GET", "/ui/login"), ("POST", "/ui/login"), ("POST", "/ui/logout"), ("GET", "/ui/static/{name}")}
    for m, p in routes:
        if (m, p) not in open_:
            assert required_scope(m, p) == ("read" if m == "GET" else "write"), (m, p)
    assert not [p for p in c.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


def test_login_with_a_token_and_refusals(env: Env) -> None:
    c = env.client()
    r = c.get("/ui/images")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    r = post(c, "/ui/login", {"token": "bpt_nonsense"})
    assert r.status_code == 401 and "not valid" in r.text
    r = post(c, "/ui/login", {"token": env.read})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "Path=/ui" in cookie
    page = c.get("/ui/images")
    assert page.status_code == 200 and "viewer · read" in page.text and "lab" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # a read token may look but not act: the page names the scope needed
    r = post(c, "/ui/images/lab/tags", {"tag": "prod", "version": env.v1})
    assert r.status_code == 403 and "<b>write</b> scope" in r.text and "<b>read</b> scope" in r.text
    assert "prod" not in env.repo.images()[0].tags
    # a revoked token: back to the login page, which says so, and the cookie is dropped
    env.tokens.revoke("viewer")
    r = c.get("/ui/machines")
    assert r.status_code == 401 and "not valid" in r.text and COOKIE in r.headers["set-cookie"]
    # the API never takes the console's cookie
    c.cookies.set(COOKIE, env.write)
    assert c.get("/v1/images").status_code == 401
    assert c.get("/ui/images").status_code == 200


def test_write_token_moves_a_tag_with_who_and_when(env: Env) -> None:
    c = env.client(env.write)
    r = post(c, "/ui/images/lab/tags", {"tag": "prod", "version": env.v1})
    assert r.status_code == 303
    r = post(c, "/ui/images/lab/tags", {"tag": "prod", "version": env.v2})
    page = c.get(r.headers["location"])
    assert "Moved lab:prod" in page.text and "(was " + env.v1[:12] in page.text
    hist = env.repo.catalog.tag_history("lab")
    assert [(h.tag, h.version, h.previous, h.who) for h in hist[:2]] == [
        ("prod", env.v2, env.v1, "admin"), ("prod", env.v1, None, "admin")]
    assert "admin" in c.get("/ui/images/lab?fragment=live").text


def test_forms_need_the_consoles_own_origin(env: Env) -> None:
    """SameSite=Strict keeps the cookie off cross-site requests; Origin covers the open console."""
    for c in (env.client(env.write), env.client(mode="off")):
        for origin in ("http://evil.example", None, "null"):
            r = post(c, "/ui/images/lab/tags", {"tag": "evil", "version": env.v1}, origin=origin)
            assert r.status_code == 403 and "own page" in r.text, origin
        r = c.post("/ui/images/lab/tags", data={"tag": "ok", "version": env.v1},
                   headers={"referer": ORIGIN + "/ui/images/lab"})
        assert r.status_code == 303
    assert "evil" not in env.repo.images()[0].tags


def test_html_in_labels_and_host_names_is_escaped(env: Env) -> None:
    c = env.client(env.read)
    for path in ("/ui/images/lab", "/ui/machines", "/ui/machines?fragment=live"):
        text = c.get(path).text
        assert "<script>alert" not in text and "<img src=x" not in text, path
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in c.get("/ui/images/lab").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in c.get("/ui/machines").text
    # a host typed into the assign form with markup in it: refused, and the message is escaped
    w = env.client(env.write)
    r = post(w, "/ui/hosts", {"new_host": "<b>pc</b>", "ref": "lab:v1"})
    page = w.get(r.headers["location"]).text
    assert "Not assigned" in page and "&lt;b&gt;pc&lt;/b&gt;" in page and "<b>pc</b>" not in page


def test_machines_assign_and_ask_an_agent(env: Env) -> None:
    c = env.client(env.write)
    r = post(c, "/ui/hosts", {"host": ["52:54:00:00:00:01"], "new_host": "pc-02", "ref": "lab:v2"})
    assert "Assigned lab:v2 to 52:54:00:00:00:01, pc-02" in c.get(r.headers["location"]).text
    assert {h.host: h.version for h in env.repo.hosts()} == {"52:54:00:00:00:01": env.v2, "pc-02": env.v2}
    r = post(c, "/ui/requests", {"instance": "pc-01", "op": "snapshot", "to": "lab:snap1"})
    page = c.get(r.headers["location"]).text
    assert "Asked for a snapshot" in page
    rid = re.search(r"request ([0-9a-f]{16})", page)
    assert rid is not None
    env.repo.complete_request("pc-01", rid.group(1), True, {"version": env.v2, "image": "lab"})
    live = c.get("/ui/machines?fragment=live").text
    assert 'data-state="done"' in live and f"new version <code>{env.v2[:12]}" in live
    assert "42.5 %" in live and "<html" not in live
    r = post(c, "/ui/requests", {"instance": "nobody", "op": "reset"})
    assert "Not asked: nobody" in c.get(r.headers["location"]).text


def test_assign_form_keeps_what_it_leaves_unchanged(env: Env) -> None:
    """Issue 27 item 1: the Assign form shows and sets the policy; an empty arguments field keeps
    each host's arguments (the "clear arguments" box clears them); "unchanged" keeps a setting."""
    mac = "52:54:00:00:00:01"
    env.repo.assign_host(mac, "lab:v1", "quiet A=1", {"policy": "restore"})
    c = env.client(env.write)
    page = c.get("/ui/machines").text
    assert 'id="assign-policy"' in page and 'id="assign-clear-args"' in page
    row = page[page.index(f'<tr data-host="{mac}"'):]
    row = row[:row.index("</tr>")]
    assert '<td class="policy">restore</td>' in row and "quiet A=1" in row
    r = post(c, "/ui/hosts", {"host": [mac], "ref": "lab:v2", "args": "", "policy": "unchanged",
                              "hydrate": "unchanged"})
    assert r.status_code == 303
    h = env.repo.hosts()[0]
    assert (h.version, h.policy, h.hydrate, h.args) == (env.v2, "restore", None, "quiet A=1")
    post(c, "/ui/hosts", {"host": [mac], "ref": "lab:v2", "args": "B=2", "hydrate": "off"})
    h = env.repo.hosts()[0]
    assert (h.policy, h.hydrate, h.args) == ("restore", "off", "B=2")
    post(c, "/ui/hosts", {"host": [mac], "ref": "lab:v2", "clear_args": "1", "policy": "keep"})
    h = env.repo.hosts()[0]
    assert (h.policy, h.hydrate, h.args) == ("keep", "off", "")
    r = post(c, "/ui/hosts", {"host": [mac], "ref": "lab:v2", "policy": "wipe"})
    assert "Not assigned" in c.get(r.headers["location"]).text and env.repo.hosts()[0].policy == "keep"
    # arguments typed and "clear" ticked: which one? (the typed ones were dropped without a word)
    r = post(c, "/ui/hosts", {"host": [mac], "ref": "lab:v1", "args": "C=3", "clear_args": "1"})
    assert "which one?" in c.get(r.headers["location"]).text
    assert (env.repo.hosts()[0].version, env.repo.hosts()[0].args) == (env.v2, "")


def test_pools_and_clones_reports(env: Env) -> None:
    """What pool and clones agents report is on the Pools page (escaped; malformed fields shown as
    missing, never a 500) and not among the machines; a host's last boot is on Machines."""
    env.repo.register_agent("pool-p-h1", {
        "kind": "pool", "host": "h1", "dir": "/srv/pool",
        "pools": [{"name": EVIL, "base": f"lab@{env.v1}", "size": 3, "ready": 2, "in_use": 1, "error": "disk full"},
                  "not a pool", {"name": "odd", "ready": "many", "in_use": None}],
        "clones": [{"name": "p-1", "image": "lab", "version": env.v1, "modified_chunks": 5, "state": "in-use",
                    "host": EVIL}, 7], "clones_total": 250})
    env.repo.register_agent("clones-x-h2", {"kind": "clones", "clones": "garbage", "clones_total": "x"})
    c = env.client(env.read)
    live = c.get("/ui/pools?fragment=live").text
    assert "<script>alert" not in live and "<img src=x" not in live and "&lt;script&gt;" in live
    row = live[live.index('<tr data-pool="&lt;script'):]
    row = row[:row.index("</tr>")]
    assert f"lab@{env.v1}" in row and '"num ready">2<' in row and '"num in-use">1<' in row and "disk full" in row
    assert 'data-pool="odd"' in live and "p-1" in live and "and 249 more" in live
    assert 'data-clones-agent="clones-x-h2"' in live and "No clone served." in live
    machines = c.get("/ui/machines").text
    assert "pool-p-h1" not in machines and "clones-x-h2" not in machines and "pc-01" in machines
    env.repo.set_boot_files("lab:v1", b"k", b"i")
    assert "never booted" in machines
    env.repo.registry.record_boot("52:54:00:00:00:01", env.v1)
    assert f"sent <code>{env.v1[:12]}</code>" in c.get("/ui/machines").text


def test_a_host_whose_version_was_removed(env: Env) -> None:
    env.repo.assign_host("pc-03", f"lab@{env.v2}")
    env.repo.remove(f"lab@{env.v2}")
    c = env.client(env.write)
    assert "no longer exists: re-assign it" in c.get("/ui/machines").text
    r = post(c, "/ui/hosts", {"host": ["pc-03"], "ref": f"lab@{env.v2}"})  # a form made before the removal
    page = c.get(r.headers["location"]).text
    assert "Not assigned" in page and env.v2 in page


def test_catalog_unreachable_is_said_without_a_stack_trace(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    c = env.client(env.read)
    assert c.get("/ui/images").status_code == 200  # the token is known (and cached) before the outage

    def down(*a: Any, **k: Any) -> Any:
        raise CatalogUnavailable(url="postgresql://db/blockprov", why="connection refused")

    monkeypatch.setattr(auth, "CACHE_SECONDS", 60.0)
    c.get("/ui/images")
    monkeypatch.setattr(Catalog, "images", down)
    r = c.get("/ui/images")
    assert r.status_code == 503 and "catalog is unreachable" in r.text and "connection refused" in r.text
    assert "Traceback" not in r.text and "File " not in r.text
    r = c.get("/ui/images?fragment=live")
    assert r.status_code == 503 and "connection refused" in r.text
    health = c.get("/ui/health")
    assert health.status_code == 200 and "reachable" in health.text


def test_open_console_without_tokens(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "open")
    try:
        c = TestClient(create_app(repo), follow_redirects=False)
        page = c.get("/ui/images")
        assert page.status_code == 200 and "open console" in page.text
        for p in ("/ui/machines", "/ui/pools", "/ui/health", "/ui/static/console.css", "/ui/static/console.js"):
            assert c.get(p).status_code == 200, p
        assert "No agent reports a pool" in c.get("/ui/pools").text
        r = c.post("/ui/login", data={"token": "bpt_anything"}, headers={"origin": ORIGIN})
        assert r.status_code == 303 and "no tokens yet" in c.get(r.headers["location"]).text
        assert c.get("/ui/static/../app.py").status_code == 404
    finally:
        repo.close()


def test_every_page_over_a_postgresql_catalog(tmp_path: Path, pg_url: str) -> None:
    """The console's queries (tag history, latest requests, failures) in PostgreSQL's dialect too."""
    from blockprov.catalog.db import open_database

    repo = LocalRepository(tmp_path / "pg", catalog=open_database(pg_url, tmp_path / "pg"))
    try:
        vid, _ = import_image(repo, make_image(tmp_path / "p.raw", 1 << 20, seed=3), "pg:v1")
        repo.assign_host("pc-01", "pg:v1")
        repo.register_agent("pc-01", {"image": "pg", "version": vid})
        rid = repo.post_request("pc-01", "reset", {})
        repo.registry.try_next_request("pc-01")
        repo.complete_request("pc-01", rid, False, None, "the repository may ask for snapshot, status, not 'reset'")
        c = TestClient(create_app(repo), follow_redirects=False)
        r = post(c, "/ui/images/pg/tags", {"tag": "prod", "version": vid})
        assert "Moved pg:prod" in c.get(r.headers["location"]).text
        assert "open console" in c.get("/ui/images").text
        machines = c.get("/ui/machines").text
        assert 'data-state="failed"' in machines and "not &#39;reset&#39;" in machines
        for p in ("/ui/pools", "/ui/health", f"/ui/images/pg?a={vid}&b={vid}"):
            assert c.get(p).status_code == 200, p
    finally:
        repo.close()
