"""Sites and tickets: the catalog's sites, the join route's scopes, and tickets a peer checks alone."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import errors, tickets
from blockprov.catalog import tokens as auth
from blockprov.catalog.sites import ONLINE_SECONDS, online
from blockprov.catalog.tokens import TokenStore
from blockprov.repo.local import LocalRepository
from blockprov.repo.remote import RemoteRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SECRET = b"s" * 32


def test_ticket_round_trip_and_refusals() -> None:
    now = 1_000_000.0
    t = tickets.issue(SECRET, "cafe", "pc-1", now)
    keys = tickets.site_keys(SECRET, "cafe", now)
    got = tickets.check(t, "cafe", keys, now + 1)
    assert (got.site, got.instance) == ("cafe", "pc-1")
    with pytest.raises(errors.Unauthorized, match="expired"):
        tickets.check(t, "cafe", keys, now + tickets.TICKET_SECONDS + 1)
    # another site's ticket, checked with this site's keys: refused as another site (403)
    other = tickets.issue(SECRET, "school", "pc-9", now)
    with pytest.raises(errors.Forbidden, match="school"):
        tickets.check(other, "cafe", keys, now)
    # made with another secret (another repository, a guess): not this site's repository
    forged = tickets.issue(b"x" * 32, "cafe", "pc-1", now)
    with pytest.raises(errors.Unauthorized, match="not made by"):
        tickets.check(forged, "cafe", keys, now)
    # a changed payload keeps no valid MAC
    body, mac = t.split(".")
    evil = tickets.issue(SECRET, "cafe", "pc-evil", now).split(".")[0]
    with pytest.raises(errors.Unauthorized):
        tickets.check(f"{evil}.{mac}", "cafe", keys, now)
    for bad in ("", "x", "a.b.c", "!!!.???", body, "x" * 5000):
        with pytest.raises(errors.Unauthorized):
            tickets.check(bad, "cafe", keys, now)
    # keys of the previous, current and next hour: a ticket made just before the hour turns checks
    # with keys fetched just after it, and the other way round
    late = now - now % tickets.EPOCH_SECONDS + tickets.EPOCH_SECONDS - 1
    t_late = tickets.issue(SECRET, "cafe", "pc-1", late)
    tickets.check(t_late, "cafe", tickets.site_keys(SECRET, "cafe", late + 2), late + 2)
    tickets.check(tickets.issue(SECRET, "cafe", "pc-1", late + 2), "cafe", tickets.site_keys(SECRET, "cafe", late),
                  late + 3)
    # keys two hours on no longer check it
    with pytest.raises(errors.Unauthorized, match="another hour"):
        tickets.check(t_late, "cafe", tickets.site_keys(SECRET, "cafe", late + 3 * tickets.EPOCH_SECONDS), late + 5)


def test_online_peers_filter() -> None:
    rows = [
        {"instance": "a", "seen_ago": 1.0, "info": {"site": "cafe", "peer_url": "http://10.0.0.1:7624"}},
        {"instance": "b", "seen_ago": ONLINE_SECONDS + 1, "info": {"site": "cafe", "peer_url": "http://10.0.0.2:7624"}},
        {"instance": "c", "seen_ago": 1.0, "info": {"site": "school", "peer_url": "http://10.0.0.3:7624"}},
        {"instance": "d", "seen_ago": 1.0, "info": {"site": "cafe"}},  # serves no peers
        {"instance": "e", "seen_ago": 1.0, "info": {"site": "cafe", "peer_url": "http://x y/?a=$"}},  # not a URL
        {"instance": "me", "seen_ago": 1.0, "info": {"site": "cafe", "peer_url": "http://10.0.0.9:7624"}},
    ]
    assert [p["instance"] for p in online(rows, "cafe", exclude="me")] == ["a"]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.repo = LocalRepository(tmp / "repo")
        self.tokens = TokenStore(self.repo.catalog.db)
        self.repo.add_site("cafe")
        self.repo.add_site("school", "http://10.1.0.5:8420")
        self.write, _ = self.tokens.create("write", "admin")
        self.read, _ = self.tokens.create("read", "viewer")
        self.cafe_pc, _ = self.tokens.create("agent", "cafe-pc", site="cafe")
        self.client = TestClient(create_app(self.repo, access=AccessPolicy(mode="on")))

    def remote(self, token: str) -> RemoteRepository:
        return RemoteRepository("http://testserver", client=self.client, token=token)  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.close()
        self.repo.close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)
    e = Env(tmp_path)
    yield e
    e.close()


def test_sites_over_http(env: Env) -> None:
    admin = env.remote(env.write)
    assert [(s.name, s.cache) for s in admin.sites()] == [("cafe", None), ("school", "http://10.1.0.5:8420")]
    assert admin.add_site("cafe", "http://10.0.0.5:8420").cache == "http://10.0.0.5:8420"
    assert admin.add_site("cafe").cache == "http://10.0.0.5:8420"  # None keeps it
    assert admin.add_site("cafe", "").cache is None  # "" removes it
    with pytest.raises(errors.InvalidName):
        admin.add_site("Bad Site")
    with pytest.raises(errors.InvalidName):
        admin.add_site("x", "ftp://nope")
    with pytest.raises(errors.Forbidden):
        env.remote(env.read).add_site("y")  # a write route
    admin.remove_site("school")
    with pytest.raises(errors.SiteNotFound):
        admin.remove_site("school")


def test_join_follows_scopes_and_site_binding(env: Env) -> None:
    now = time.time()
    # the read scope is enough to join, and the answer lets the agent check its peers' tickets
    got = env.remote(env.read).join_site("cafe", "pc-1")
    keys = {int(e): bytes.fromhex(k) for e, k in got["keys"].items()}
    assert tickets.check(got["ticket"], "cafe", keys, now).instance == "pc-1"
    assert got["peers"] == [] and got["cache"] is None and got["refresh"] > 0
    # a token bound to the site joins it, not another one
    env.remote(env.cafe_pc).join_site("cafe", "pc-2")
    env.repo.add_site("school")
    with pytest.raises(errors.Forbidden, match="cafe"):
        env.remote(env.cafe_pc).join_site("school", "pc-2")
    # no token, a bad one: nothing (tickets are the way into peers: they need the read scope)
    r = env.client.post("/v1/sites/cafe/join", json={"instance": "pc-3"})
    assert r.status_code == 401
    with pytest.raises(errors.Unauthorized):
        env.remote("bpt_nonsense").join_site("cafe", "pc-3")
    with pytest.raises(errors.SiteNotFound):
        env.remote(env.read).join_site("nowhere", "pc-1")
    # the school's keys do not check the cafe's tickets
    school = env.remote(env.write).join_site("school", "pc-9")
    skeys = {int(e): bytes.fromhex(k) for e, k in school["keys"].items()}
    with pytest.raises(errors.Forbidden):
        tickets.check(got["ticket"], "school", skeys, now)
    # rotating the secret voids every key and ticket handed out
    env.remote(env.write).rotate_site_secret()
    fresh = env.remote(env.read).join_site("cafe", "pc-1")
    fkeys = {int(e): bytes.fromhex(k) for e, k in fresh["keys"].items()}
    with pytest.raises(errors.Unauthorized, match="not made by"):
        tickets.check(got["ticket"], "cafe", fkeys, now)


def test_join_lists_online_peers(env: Env) -> None:
    agent = env.remote(env.cafe_pc)
    agent.register_agent("pc-1", {"site": "cafe", "peer_url": "http://127.0.0.1:7001", "image": "lab", "version": "v"})
    agent.register_agent("pc-2", {"site": "cafe", "peer_url": "http://127.0.0.1:7002", "image": "lab", "version": "v"})
    agent.register_agent("pc-3", {"site": "school", "peer_url": "http://127.0.0.1:7003"})
    got = agent.join_site("cafe", "pc-1")
    assert [(p["instance"], p["url"]) for p in got["peers"]] == [("pc-2", "http://127.0.0.1:7002")]
    env.repo.catalog.db.write("UPDATE agents SET last_seen=? WHERE instance='pc-2'", (time.time() - 120,))
    assert agent.join_site("cafe", "pc-1")["peers"] == []  # stale agents are no peers


def test_a_hosts_site_is_a_field_and_its_cache_serves_the_boot(tmp_path: Path) -> None:
    from blockprov import boot
    from blockprov.imaging.importer import import_image
    from blockprov.names import parse_ref
    from tests.conftest import make_image

    repo = LocalRepository(tmp_path / "repo")
    try:
        import_image(repo, make_image(tmp_path / "a.raw", 1 << 20, seed=4), "lab:v1")
        (tmp_path / "k").write_bytes(b"k" * 1000)
        (tmp_path / "i").write_bytes(b"i" * 1000)
        repo.set_boot_files("lab:v1", tmp_path / "k", tmp_path / "i")
        with pytest.raises(errors.SiteNotFound):
            repo.assign_host("52:54:00:00:00:01", parse_ref("lab:v1"), None, {"site": "cafe"})
        with pytest.raises(errors.InvalidName):
            repo.assign_host("52:54:00:00:00:01", parse_ref("lab:v1"), None, {"site": "Not A Site"})
        repo.add_site("cafe")
        h = repo.assign_host("52:54:00:00:00:01", parse_ref("lab:v1"), "quiet", {"policy": "restore", "site": "cafe"})
        assert (h.site, h.policy) == ("cafe", "restore")
        h = repo.assign_host("52:54:00:00:00:01", parse_ref("lab:v1"), "")  # only the args change
        assert (h.site, h.policy, h.args) == ("cafe", "restore", "")
        got = boot.parse_script(repo.boot_script("52:54:00:00:00:01", "http://10.0.0.1:8420"))
        assert got["params"]["blockprov.site"] == "cafe" and got["params"]["blockprov.repo"] == "http://10.0.0.1:8420"
        repo.add_site("cafe", "http://10.9.0.5:8420")  # the site got a site cache: its hosts boot from it
        got = boot.parse_script(repo.boot_script("52:54:00:00:00:01", "http://10.0.0.1:8420"))
        assert got["params"]["blockprov.repo"] == "http://10.9.0.5:8420"
        assert got["kernel"].startswith("http://10.9.0.5:8420/v1/images/lab/versions/")
        h = repo.assign_host("52:54:00:00:00:01", parse_ref("lab:v1"), None, {"site": ""})
        assert h.site is None
    finally:
        repo.close()


def test_bytes_by_source_per_site_and_version_on_the_console_and_metrics(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    client = TestClient(create_app(repo, access=AccessPolicy(mode="off")))
    try:
        vid = "0123456789abcdef"
        for i, (site, peers, cache, origin) in enumerate([("cafe", 900, 0, 100), ("cafe", 800, 0, 200),
                                                          ("school", 0, 700, 0), (None, 0, 0, 500)]):
            repo.register_agent(f"pc-{i}", {"site": site, "image": "lab", "version": vid, "sources": {
                vid: {"peers": {"chunks": 1, "bytes": peers}, "site_cache": {"chunks": 1, "bytes": cache},
                      "repository": {"chunks": 1, "bytes": origin}}}})
        repo.register_agent("pc-bad", {"site": "cafe", "sources": {"x": {"peers": {"bytes": "lots"}}}})  # ignored
        from blockprov.catalog.sites import traffic

        rows = {(r["site"], r["version"]): r for r in traffic(repo.agents())}
        assert rows[("cafe", vid)] | {} == {"site": "cafe", "image": "lab", "version": vid, "agents": 2,
                                            "peers": 1700, "site_cache": 0, "repository": 300}
        assert rows[("school", vid)]["site_cache"] == 700 and rows[(None, vid)]["repository"] == 500
        metrics = client.get("/metrics").text
        assert (f'blockprov_site_fetched_bytes{{image="lab",site="cafe",source="peers",version="{vid}"}} 1700.0'
                in metrics), metrics
        health = client.get("/ui/health").text
        assert 'data-site="cafe"' in health and "85 %" in health, health  # 1700 of 2000 bytes not from here
        machines = client.get("/ui/machines").text
        assert "site <b>cafe</b>" in machines and "peers 900 B" in machines, machines
    finally:
        client.close()
        repo.close()
