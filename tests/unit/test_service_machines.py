"""The machine routes (boot files, boot scripts, hosts, profiles, agents) at the status-code level."""

from __future__ import annotations

import os
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov import boot, codec
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MAC = "52:54:00:ab:cd:ef"
KERNEL = os.urandom(boot.PIECE + 1000)
INITRD = b"initrd-bytes" * 300


class Env:
    def __init__(self, tmp: Path) -> None:
        self.repo = LocalRepository(tmp / "repo")
        src = make_image(tmp / "src.img", 1 << 20, seed=5)
        self.vid, _ = import_image(self.repo, src, "lab:v1")
        self.app = create_app(self.repo)
        self.c = TestClient(self.app)
        self.files = f"/v1/images/lab/versions/{self.vid}/boot"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.c.close()
    e.repo.close()


def err(r: Any) -> str:
    return str(r.json()["error"])


def test_openapi_lists_machine_routes(env: Env) -> None:
    paths = env.c.get("/openapi.json").json()["paths"]
    for p in ("/v1/boot/{host}", "/v1/hosts/{host}", "/v1/images/{name}/versions/{vid}/boot/{which}",
              "/v1/images/{name}/versions/{vid}/profile", "/v1/agents/{instance}/requests/next",
              "/v1/agents/{instance}/requests/{rid}/result"):
        assert p in paths, p


def test_boot_script_statuses(env: Env) -> None:
    r = env.c.get(f"/v1/boot/{MAC}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/plain")
    assert r.text == f"blockprov: no boot assignment for host {MAC} (assign one with: blockprov host assign " \
                     f"{MAC} NAME:TAG)\n"
    r = env.c.get(f"/v1/boot/{MAC}", headers={"accept": "application/json"})
    assert r.status_code == 404 and err(r) == "HostNotFound"
    r = env.c.get("/v1/boot/not_a_host")
    assert r.status_code == 400 and r.text.startswith("blockprov: invalid host") and r.text.count("\n") == 1
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1"}).status_code == 200
    r = env.c.get(f"/v1/boot/{MAC.upper().replace(':', '-')}")
    assert r.status_code == 409 and "has no boot files" in r.text
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0")
    r = env.c.get(f"/v1/boot/{MAC.replace(':', '-')}", headers={"host": "10.0.2.2:8420"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = boot.parse_script(r.text)
    assert s["kernel"] == f"http://10.0.2.2:8420{env.files}/kernel"
    assert s["params"]["blockprov.repo"] == "http://10.0.2.2:8420" and s["params"]["blockprov.host"] == MAC
    r = env.c.get(f"/v1/boot/{MAC}", params={"base": "https://repo.example:443/bp"})
    assert boot.parse_script(r.text)["initrd"] == f"https://repo.example:443/bp{env.files}/initrd?host={MAC}&platform=${{platform}}"
    assert env.c.get(f"/v1/boot/{MAC}", params={"base": "http://x/ y"}).status_code == 400


def test_last_boot_is_the_whole_initrd_fetched(env: Env) -> None:
    """Issue 27 item 5: a host's last boot is recorded once it fetched the whole initrd its boot
    script names (``?host=``), not for a fetch of the script (curl, ``host script``), a HEAD, a
    range, nor a boot that fails before."""
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1"}).status_code == 200
    assert env.c.get(f"/v1/boot/{MAC}").status_code == 409  # no boot files yet: not a boot
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD)
    s = boot.parse_script(env.c.get(f"/v1/boot/{MAC}", headers={"user-agent": "iPXE/1.21.1"}).text)
    initrd = s["initrd"].removeprefix("http://testserver")
    assert initrd == f"{env.files}/initrd?host={MAC}&platform=${{platform}}"
    assert env.c.get(s["kernel"].removeprefix("http://testserver")).status_code == 200
    assert env.c.head(initrd).status_code == 200
    assert env.c.get(initrd, headers={"range": "bytes=0-99"}).status_code == 206
    assert env.c.get(f"/v1/hosts/{MAC}").json()["last_boot"] is None
    assert env.c.get(f"{env.files}/initrd?host=not_a_host").status_code == 400
    before = time.time()
    assert env.c.get(initrd).content == INITRD
    h = env.c.get(f"/v1/hosts/{MAC}").json()
    assert before <= h["last_boot"] <= time.time() and h["last_boot_version"] == env.vid
    assert env.c.get("/v1/hosts").json()["hosts"][0]["last_boot_version"] == env.vid


def test_hosts_routes(env: Env) -> None:
    r = env.c.put("/v1/hosts/pc1", json={"ref": "lab:v1", "args": "ip=dhcp"})
    assert r.status_code == 200 and r.json()["version"] == env.vid
    assert env.c.get("/v1/hosts").json()["hosts"][0]["host"] == "pc1"
    assert env.c.get("/v1/hosts/pc1").json()["args"] == "ip=dhcp"
    assert env.c.put("/v1/hosts/pc1", json={"ref": "lab:nope"}).status_code == 404
    assert env.c.put("/v1/hosts/pc1", json={"ref": "lab:v1", "args": "a;b"}).status_code == 400
    assert env.c.put("/v1/hosts/pc1", json={"nope": 1}).status_code == 400
    assert env.c.put("/v1/hosts/pc1", content=b"{").status_code == 400
    assert env.c.put("/v1/hosts/PC1", json={"ref": "lab:v1"}).status_code == 400
    assert env.c.delete("/v1/hosts/pc1").json() == {"removed": "pc1"}
    r = env.c.delete("/v1/hosts/pc1")
    assert r.status_code == 404 and err(r) == "HostNotFound"
    assert env.c.get("/v1/hosts/pc1").status_code == 404


# Issue 27's mistakes on the machine routes: (name, method, path, JSON body, status, what the
# answer or the host record must then show). Run in order on one repository: each row starts
# from what the rows before it left.
HTTP_27: list[tuple[str, str, str, Any, int, dict[str, Any]]] = [
    # item 1: the policy and hydration are fields of the host record; what a request leaves out stays
    ("assign with settings", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": "A=1", "policy": "restore",
                                                       "hydrate": "off"}, 200,
     {"policy": "restore", "hydrate": "off", "args": "A=1"}),
    ("new args keep the policy", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": "B=2"}, 200,
     {"policy": "restore", "hydrate": "off", "args": "B=2"}),
    ("no args keep the args", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1"}, 200, {"args": "B=2", "policy": "restore"}),
    ("a setting cleared", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "hydrate": None}, 200,
     {"hydrate": None, "policy": "restore"}),
    ("args cleared", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": ""}, 200, {"args": "", "policy": "restore"}),
    ("a word in args is the field", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": "blockprov.policy=keep rw"},
     200, {"args": "rw", "policy": "keep"}),
    ("a bad policy", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "policy": "wipe"}, 400, {"policy": "keep"}),
    ("a policy of another type", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "policy": ["keep"]}, 400,
     {"policy": "keep"}),
    ("an unknown field", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "colour": "red"}, 400, {"args": "rw"}),
    ("args of another type", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": None}, 400, {"args": "rw"}),
    ("a setting given twice", "PUT", "/v1/hosts/pc1", {"ref": "lab:v1", "args": "blockprov.policy=keep",
                                                        "policy": "restore"}, 400, {"policy": "keep"}),
]


def test_http_mistakes_27(env: Env) -> None:
    for name, method, path, body, status, then in HTTP_27:
        r = env.c.request(method, path, json=body)
        assert r.status_code == status, (name, r.status_code, r.text)
        if status >= 400:
            assert set(r.json()) >= {"error", "message"} and "Traceback" not in r.text, name
        host = env.c.get(path).json()
        assert {k: host.get(k) for k in then} == then, (name, host)
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD)
    s = boot.parse_script(env.repo.boot_script("pc1", "http://10.0.2.2:8420"))
    assert s["params"]["blockprov.policy"] == "keep" and "blockprov.hydrate" not in s["params"]


def test_boot_file_download(env: Env) -> None:
    r = env.c.get(f"{env.files}/kernel")
    assert r.status_code == 409 and err(r) == "BootFilesMissing"
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD)
    r = env.c.get(f"{env.files}/kernel")
    assert r.status_code == 200 and r.content == KERNEL and r.headers["content-length"] == str(len(KERNEL))
    etag = r.headers["etag"]
    assert env.c.get(f"{env.files}/kernel", headers={"if-none-match": etag}).status_code == 304
    h = env.c.head(f"{env.files}/initrd")
    assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == str(len(INITRD))
    lo, hi = boot.PIECE - 10, boot.PIECE + 20  # across two pieces
    r = env.c.get(f"{env.files}/kernel", headers={"range": f"bytes={lo}-{hi}"})
    assert r.status_code == 206 and r.content == KERNEL[lo:hi + 1]
    assert r.headers["content-range"] == f"bytes {lo}-{hi}/{len(KERNEL)}"
    r = env.c.get(f"{env.files}/kernel", headers={"range": "bytes=-5"})
    assert r.content == KERNEL[-5:]
    r = env.c.get(f"{env.files}/kernel", headers={"range": f"bytes={len(KERNEL)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(KERNEL)}"
    r = env.c.get(f"{env.files}/kernel", headers={"range": "bytes=0-3", "if-range": '"stale"'})
    assert r.status_code == 200 and r.content == KERNEL
    assert env.c.get(f"{env.files}/bios").status_code == 400
    assert env.c.get("/v1/images/lab/versions/0123456789abcdef/boot/kernel").status_code == 404
    assert env.c.get("/v1/images/lab/versions/v1/boot/kernel").status_code == 400
    info = env.c.get(env.files).json()["boot"]
    assert info["kernel"]["size"] == len(KERNEL) and f'"{info["kernel"]["id"]}"' == etag


def test_corrupt_piece_is_never_served(env: Env) -> None:
    from tests.conftest import corrupt_chunk

    info = env.repo.set_boot_files("lab:v1", KERNEL, INITRD)
    corrupt_chunk(env.repo, info.kernel.piece_id(0))
    r = env.c.get(f"{env.files}/kernel", headers={"range": "bytes=0-99"})
    assert r.status_code == 422 and err(r) == "ChunkCorrupt"


def test_put_boot_descriptors(env: Env) -> None:
    data = b"kernel that was never uploaded"
    k = boot.BootFile(size=len(data), pieces=codec.digest(data))
    body = {"kernel": k.to_dict(), "initrd": k.to_dict(), "cmdline": "quiet"}
    r = env.c.put(env.files, json=body)
    assert r.status_code == 409 and err(r) == "MissingChunks" and r.json()["missing"] == [k.pieces.hex()]
    assert env.c.put(f"/v1/chunks/{k.pieces.hex()}", content=codec.encode(data)).status_code == 201
    assert env.c.put(env.files, json=body).status_code == 200
    assert env.c.get(f"{env.files}/initrd").content == data
    for bad in ({"kernel": {"size": 5, "pieces": []}, "initrd": k.to_dict()},
                {"kernel": k.to_dict() | {"id": "0" * 32}, "initrd": k.to_dict()},
                {"kernel": {"size": 1, "pieces": ["zz"]}, "initrd": k.to_dict()},
                {"kernel": k.to_dict(), "initrd": k.to_dict(), "cmdline": 5},
                {"kernel": k.to_dict(), "initrd": k.to_dict(), "cmdline": "a\nb"}, [1]):
        assert env.c.put(env.files, json=bad).status_code == 400, bad
    # a descriptor whose size does not match what its piece decodes to is refused
    lying = {"size": len(data) + 1, "pieces": [k.pieces.hex()]}
    assert env.c.put(env.files, json={"kernel": lying, "initrd": lying}).status_code == 400
    assert env.c.put("/v1/images/lab/versions/0123456789abcdef/boot", json=body).status_code == 404


def test_profile_routes(env: Env) -> None:
    url = f"/v1/images/lab/versions/{env.vid}/profile"
    r = env.c.get(url)
    assert r.status_code == 404 and err(r) == "ProfileNotFound"
    assert env.c.put(url, json={"chunks": [3, 1, 2]}).json()["chunks"] == 3
    assert env.c.get(url).json()["chunks"] == [3, 1, 2]
    r = env.c.get(url, headers={"accept": "application/octet-stream"})
    assert r.content == struct.pack("<3I", 3, 1, 2)
    r = env.c.put(url, content=struct.pack("<2I", 7, 0), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and env.c.get(url).json()["chunks"] == [7, 0]
    for bad in ({"chunks": [1, 1]}, {"chunks": [10 ** 6]}, {"chunks": ["a"]}, {"chunks": 5}, {"x": []}):
        assert env.c.put(url, json=bad).status_code == 400, bad
    assert env.c.put(url, content=b"abc", headers={"content-type": "application/octet-stream"}).status_code == 400
    assert env.c.get("/v1/images/lab/versions/0123456789abcdef/profile").json()["error"] == "ImageNotFound"


def test_agent_routes(env: Env) -> None:
    assert env.c.get("/v1/agents").json() == {"agents": []}
    r = env.c.post("/v1/agents/a1/requests", json={"op": "snapshot"})
    assert r.status_code == 404 and err(r) == "AgentNotFound"
    assert env.c.get("/v1/agents/a1/requests/next").status_code == 404
    assert env.c.put("/v1/agents/a1", json={"pid": 1}).status_code == 201
    assert env.c.put("/v1/agents/a1", json={"pid": 2}).status_code == 200
    assert env.c.put("/v1/agents/a1", json=[1]).status_code == 400
    assert env.c.put("/v1/agents/a%2Fb", json={}).status_code in (400, 404)
    assert env.c.put("/v1/agents/a1", json={"big": "x" * (70 << 10)}).status_code == 413
    assert env.c.get("/v1/agents/a1/requests/next").status_code == 204
    assert env.c.get("/v1/agents/a1/requests/next", params={"wait": 31}).status_code == 400
    assert env.c.get("/v1/agents/a1/requests/next", params={"wait": "soon"}).status_code == 400
    r = env.c.post("/v1/agents/a1/requests", json={"op": "snapshot", "args": {"to": "lab:s"}})
    assert r.status_code == 201
    rid = r.json()["id"]
    assert env.c.post("/v1/agents/a1/requests", json={"args": {}}).status_code == 400
    assert env.c.post("/v1/agents/a1/requests", json={"op": "snapshot", "args": [1]}).status_code == 400
    r = env.c.get("/v1/agents/a1/requests/next", params={"wait": 1})
    assert r.status_code == 200 and r.json()["id"] == rid and r.json()["state"] == "running"
    assert env.c.get(f"/v1/agents/a1/requests/{rid}").json()["state"] == "running"
    assert env.c.get("/v1/agents/a1/requests/0123456789abcdef").status_code == 404
    assert env.c.get("/v1/agents/a1/requests/nothex").status_code == 400
    res = f"/v1/agents/a1/requests/{rid}/result"
    assert env.c.post(res, json={"result": {}}).status_code == 400
    assert env.c.post(res, json={"ok": True, "result": [1]}).status_code == 400
    r = env.c.post(res, json={"ok": True, "result": {"version": "x"}})
    assert r.status_code == 200 and r.json()["state"] == "done"
    r = env.c.post(res, json={"ok": True})
    assert r.status_code == 409 and err(r) == "Conflict"
    assert env.c.get(f"/v1/agents/a1/requests/{rid}", params={"wait": 5}).json()["result"] == {"version": "x"}
    assert env.c.get("/v1/agents").json()["agents"][0]["info"] == {"pid": 2}
    assert env.c.delete("/v1/agents/a1").status_code == 200
    assert env.c.delete("/v1/agents/a1").status_code == 404


def test_long_poll_ends_when_the_server_drains(env: Env) -> None:
    env.c.put("/v1/agents/a1", json={})
    env.app.state.draining = True
    t0 = time.monotonic()
    assert env.c.get("/v1/agents/a1/requests/next", params={"wait": 20}).status_code == 204
    assert time.monotonic() - t0 < 5


def test_waiting_agents_share_one_catalog_query_per_poll(env: Env, tmp_path: Path, monkeypatch: Any) -> None:
    """30 agents long-polling at once cost one ``ready_instances`` query per POLL, not 30 reads per
    POLL; a request posted by another server (no local wake-up) still reaches its agent in time."""
    import asyncio

    import httpx

    from blockprov.service import longpoll

    reg = env.repo.registry
    calls = {"try": 0, "ready": 0}
    for name, key in (("try_next_request", "try"), ("ready_instances", "ready")):
        real = getattr(reg, name)

        def counted(*a: Any, _real: Any = real, _key: str = key) -> Any:
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(reg, name, counted)
    agents = [f"pc-{i}" for i in range(30)]
    for a in agents:
        reg.register_agent(a, {})
    other = LocalRepository(tmp_path / "repo")  # another server's handle on the same catalog
    wait = 1.5

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=env.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            polls = [asyncio.create_task(c.get(f"/v1/agents/{a}/requests/next", params={"wait": wait}, timeout=30))
                     for a in agents]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(other.post_request, "pc-7", "snapshot", {"to": "lab:pc7"})
            return [r.status_code for r in await asyncio.gather(*polls)]

    t0 = time.monotonic()
    try:
        codes = asyncio.run(main())
    finally:
        other.close()
    elapsed = time.monotonic() - t0
    assert codes[7] == 200 and codes.count(204) == 29
    assert calls["ready"] <= elapsed / longpoll.POLL + 2
    # each agent: its first check, at most one after the catalog named it (pc-7), none in between
    assert calls["try"] <= len(agents) + 2, calls
