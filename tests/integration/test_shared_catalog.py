"""Two hosts, one repository: two ``blockprov serve`` processes, each with a data directory of its own
(as on two machines), over one S3 bucket (SeaweedFS) and one catalog in PostgreSQL (``--catalog``).

* What one server imports the other lists and exports byte for byte; a tag moved through one is
  followed through the other at once (nothing caches tags); a version removed through one is gone
  (not found, exit 3) through the other.
* Tokens live in the shared catalog: one created on a third "admin" directory closes both servers
  (``--auth auto``); its scope holds on both (a read token cannot import: exit 11; a write token can);
  a revocation reaches both.
* Repository-initiated agent requests, at the HTTP level: registered through A, posted through B while
  the agent long-polls A, completed through B while a caller waits on A.
* Concurrent writers through both servers (commits and tag moves, one tag moved by everyone): the
  catalog stays consistent and both servers show the same versions and tags.

The servers get ``BLOCKPROV_STORE``/``BLOCKPROV_CATALOG`` in their environment; clients talk to them
with ``--repo`` only, as remote users do.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from blockprov.repo.remote import RemoteRepository
from tests.conftest import make_image, run_cli
from tests.procs import start_server, wait_for
from tests.s3fixture import SeaweedFS


@dataclass
class Hosts:
    a: str  # URL of the server on "host A"
    b: str  # URL of the server on "host B"
    catalog: str  # the shared catalog's URL
    admin: Path  # a third data directory, where an operator runs token commands


@pytest.fixture
def hosts(tmp_path: Path, seaweed: SeaweedFS, s3_env: dict[str, str], pg_url: str) -> Iterator[Hosts]:
    env = {"BLOCKPROV_STORE": f"s3://{seaweed.new_bucket()}/shared", "BLOCKPROV_CATALOG": pg_url}
    a, url_a = start_server(tmp_path / "host-a", env=env)  # clients use --repo only
    try:
        b, url_b = start_server(tmp_path / "host-b", env=env)
    except BaseException:
        a.stop()
        raise
    try:
        yield Hosts(url_a, url_b, pg_url, tmp_path / "admin")
    finally:
        a.stop()
        b.stop()


def show_id(url: str, ref: str) -> str:
    return str(json.loads(run_cli("--repo", url, "show", ref, "--json").stdout)["id"])


def versions(url: str, name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run_cli("--repo", url, "versions", name, "--json").stdout)
    return out


def test_two_hosts_share_images_tags_and_removals(tmp_path: Path, hosts: Hosts) -> None:
    img1 = make_image(tmp_path / "v1.img", 4 << 20, seed=11, data_fraction=0.7, pattern_every=256 << 10)
    run_cli("--repo", hosts.a, "import", str(img1), "lab:v1")
    images = json.loads(run_cli("--repo", hosts.b, "images", "--json").stdout)
    assert [i["name"] for i in images] == ["lab"] and set(images[0]["tags"]) == {"v1"}, images
    v1 = images[0]["tags"]["v1"]
    assert [v["id"] for v in versions(hosts.b, "lab")] == [v1]
    out = tmp_path / "out.raw"
    run_cli("--repo", hosts.b, "export", "lab:v1", str(out))
    assert out.read_bytes() == img1.read_bytes()

    img2 = make_image(tmp_path / "v2.img", 4 << 20, seed=12, data_fraction=0.7, pattern_every=256 << 10)
    run_cli("--repo", hosts.b, "import", str(img2), "lab:v2")
    v2 = show_id(hosts.a, "lab:v2")
    assert [v["id"] for v in versions(hosts.a, "lab")] == [v1, v2]

    # A tag moved through B is what A answers right after, every time (A resolved it before each move).
    for target in (v2, v1, v2):
        run_cli("--repo", hosts.b, "tag", f"lab@{target}", "lab:prod")
        assert show_id(hosts.a, "lab:prod") == target
    run_cli("--repo", hosts.a, "export", "lab:prod", str(out), "--force")
    assert out.read_bytes() == img2.read_bytes()

    # A version removed through A (with its tags v2 and prod) is not found through B.
    removed = run_cli("--repo", hosts.a, "rm", f"lab@{v2}").stdout
    assert f"lab@{v2}" in removed
    for args in (["show", f"lab@{v2}"], ["show", "lab:prod"], ["export", f"lab@{v2}", str(out)]):
        p = run_cli("--repo", hosts.b, *args, check=False)
        assert p.returncode == 3 and "no such image or version" in p.stderr, (args, p.returncode, p.stderr)
    r = httpx.get(f"{hosts.b}/v1/images/lab/manifest", params={"ref": f"@{v2}"})
    assert r.status_code == 404 and r.json()["error"] == "ImageNotFound", r.text
    assert [v["id"] for v in versions(hosts.b, "lab")] == [v1]
    assert json.loads(run_cli("--repo", hosts.b, "images", "--json").stdout)[0]["tags"] == {"v1": v1}
    run_cli("--repo", hosts.b, "export", "lab:v1", str(out), "--force")
    assert out.read_bytes() == img1.read_bytes()
    assert not any((tmp_path / h / "catalog.sqlite").exists() for h in ("host-a", "host-b"))  # all in PostgreSQL


def test_tokens_are_shared_by_both_servers(tmp_path: Path, hosts: Hosts) -> None:
    img = make_image(tmp_path / "v1.img", 2 << 20, seed=21, data_fraction=0.7, pattern_every=256 << 10)
    run_cli("--repo", hosts.a, "import", str(img), "lab:v1")  # no token yet: open
    admin = {"BLOCKPROV_CATALOG": hosts.catalog}

    def token(scope: str, name: str) -> str:
        return run_cli("token", "create", "--scope", scope, "--name", name, data=hosts.admin, env=admin).stdout.strip()

    read = token("read", "viewer")
    for url in (hosts.a, hosts.b):  # --auth auto: both start enforcing (within their 5 s lookup cache)
        assert wait_for(lambda url=url: run_cli("--repo", url, "images", check=False).returncode == 10,
                        timeout=20), f"{url} kept answering without a token"
        listed = json.loads(run_cli("--repo", url, "--token", read, "images", "--json").stdout)
        assert [i["name"] for i in listed] == ["lab"]
        p = run_cli("--repo", url, "--token", read, "import", str(img), "lab:nope", check=False)
        assert p.returncode == 11 and "read token cannot" in p.stderr, (p.returncode, p.stderr)

    write = token("write", "ci")
    img2 = make_image(tmp_path / "v2.img", 2 << 20, seed=22, data_fraction=0.7, pattern_every=256 << 10)
    run_cli("--repo", hosts.b, "--token", write, "import", str(img2), "lab:v2")
    run_cli("--repo", hosts.a, "--token", write, "tag", "lab:v2", "lab:prod")
    out = tmp_path / "out.raw"
    run_cli("--repo", hosts.a, "--token", read, "export", "lab:prod", str(out))
    assert out.read_bytes() == img2.read_bytes()
    assert "lab:nope" not in run_cli("--repo", hosts.b, "--token", read, "images").stdout

    # Tokens are managed from any directory that names the catalog; a revocation reaches both servers.
    other = tmp_path / "host-b"
    listed = json.loads(run_cli("token", "list", "--json", data=other, env=admin).stdout)
    assert sorted(t["name"] for t in listed) == ["ci", "viewer"]
    run_cli("token", "revoke", "viewer", data=hosts.admin, env=admin)
    for url in (hosts.a, hosts.b):
        assert wait_for(lambda url=url: run_cli("--repo", url, "--token", read, "images", check=False).returncode
                        == 10, timeout=20), f"{url} still accepts a revoked token"
        run_cli("--repo", url, "--token", write, "images")


def test_agent_requests_across_servers(hosts: Hosts) -> None:
    agent = "pc-1"
    base_a, base_b = f"{hosts.a}/v1/agents/{agent}", f"{hosts.b}/v1/agents/{agent}"
    info = {"image": "lab", "version": "0123456789abcdef", "host": "pc1", "pid": 4242, "addresses": []}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        r = http.put(base_a, json=info)
        assert r.status_code == 201, r.text
        agents = http.get(f"{hosts.b}/v1/agents").json()["agents"]
        assert [(x["instance"], x["info"]["pid"]) for x in agents] == [(agent, 4242)]

        # The agent long-polls A; the request is posted through B meanwhile.
        poll = pool.submit(httpx.get, f"{base_a}/requests/next", params={"wait": 20}, timeout=60)
        time.sleep(0.5)  # let the poll start waiting (either order is correct)
        r = http.post(f"{base_b}/requests", json={"op": "snapshot", "args": {"to": "lab:pc1"}})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        got = poll.result(timeout=60)
        assert got.status_code == 200, got.text
        taken = got.json()
        assert (taken["id"], taken["op"], taken["args"], taken["state"]) == (rid, "snapshot", {"to": "lab:pc1"},
                                                                             "running")
        assert http.get(f"{base_b}/requests/next").status_code == 204  # leased: not handed out twice
        assert http.get(f"{base_b}/requests/{rid}").json()["state"] == "running"

        # A caller waits on A for the result; the agent answers through B.
        waiting = pool.submit(httpx.get, f"{base_a}/requests/{rid}", params={"wait": 20}, timeout=60)
        time.sleep(0.5)
        r = http.post(f"{base_b}/requests/{rid}/result", json={"ok": True, "result": {"id": "feedfacecafebeef"}})
        assert r.status_code == 200, r.text
        done = waiting.result(timeout=60).json()
        assert (done["state"], done["result"]) == ("done", {"id": "feedfacecafebeef"}), done
        assert http.get(f"{base_a}/requests/{rid}").json()["state"] == "done"
        r = http.post(f"{base_a}/requests/{rid}/result", json={"ok": True})
        assert r.status_code == 409, r.text  # completed through B is completed for A too

        # Unregistered through B: unknown to A.
        assert http.delete(base_b).status_code == 200
        r = http.get(f"{base_a}/requests/next")
        assert r.status_code == 404 and r.json()["error"] == "AgentNotFound", r.text


WRITERS_PER_SERVER = 2
ROUNDS = 5  # each round: a commit, a tag move, and a move of the tag every writer moves


def test_concurrent_writers_through_both_servers(tmp_path: Path, hosts: Hosts) -> None:
    img = make_image(tmp_path / "base.img", 1 << 20, seed=31, data_fraction=1.0, pattern_every=256 << 10)
    run_cli("--repo", hosts.a, "import", str(img), "lab:base")
    probe = RemoteRepository(hosts.a)
    try:
        base = probe.resolve("lab:base")
    finally:
        probe.close()

    def writer(n: int, url: str) -> tuple[list[str], str]:
        """Commits versions (same chunks, own labels: new ids) and moves its own tag and ``hot``."""
        repo = RemoteRepository(url)
        mine: list[str] = []
        try:
            for k in range(ROUNDS):
                m = dataclasses.replace(base, labels={"writer": str(n), "round": str(k)})
                mine.append(repo.commit(m, tag=f"w{n}-c{k}"))
                repo.set_tag("lab", f"w{n}", mine[k // 2])
                repo.set_tag("lab", "hot", mine[-1])
            return mine, mine[(ROUNDS - 1) // 2]
        finally:
            repo.close()

    urls = [hosts.a, hosts.b] * WRITERS_PER_SERVER
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(writer, range(len(urls)), urls))

    committed = {vid for mine, _last in results for vid in mine}
    assert len(committed) == len(urls) * ROUNDS
    expected_tags = {"base": base.id, **{f"w{n}": last for n, (_m, last) in enumerate(results)},
                     **{f"w{n}-c{k}": vid for n, (mine, _l) in enumerate(results) for k, vid in enumerate(mine)}}
    seen: list[tuple[list[tuple[str, list[str]]], dict[str, str]]] = []
    for url in (hosts.a, hosts.b):
        repo = RemoteRepository(url)
        try:
            vs = repo.versions("lab")
            ids = {v.id for v in vs}
            assert ids == committed | {base.id}
            (image,) = repo.images()
            tags = dict(image.tags)
            assert tags.pop("hot") in committed  # whoever moved it last
            assert tags == expected_tags
            for tag, vid in image.tags.items():  # every tag resolves, to a version that is listed
                assert repo.resolve(f"lab:{tag}").id == vid
            assert image.versions == len(ids)
            seen.append(([(v.id, sorted(v.tags)) for v in vs], image.tags))
        finally:
            repo.close()
    assert seen[0] == seen[1]  # both servers show the very same catalog
