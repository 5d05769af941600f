"""A machine that cannot boot yet is told why on its console and asks again (issue 13 faults):
the boot route answers iPXE (its User-Agent) a retry script for 404/409, everyone else the error."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import boot
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import make_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MAC = "52:54:00:ab:cd:01"
IPXE = {"user-agent": "iPXE/1.0.0+git-20190125.36a4c85"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, LocalRepository]]:
    repo = LocalRepository(tmp_path / "repo")
    import_image(repo, make_image(tmp_path / "src.img", 1 << 20, seed=7), "lab:v1")
    c = TestClient(create_app(repo))
    yield c, repo
    c.close()
    repo.close()


def test_retry_script_is_literal_and_replaces_itself() -> None:
    s = boot.retry_script("no boot assignment for ${net0/mac}\nsecond line", "http://r:1/v1/boot/x?retry=5", 5)
    lines = s.splitlines()
    assert lines[0] == "#!ipxe" and "$" not in s
    assert lines[1] == "echo blockprov: no boot assignment for {net0/mac} second line"
    assert lines[-2:] == ["sleep 5", "chain --replace --autofree http://r:1/v1/boot/x?retry=5"]


def test_ipxe_gets_a_retry_script_for_an_unknown_host_then_its_boot_script(
        client: tuple[TestClient, LocalRepository]) -> None:
    c, repo = client
    r = c.get(f"/v1/boot/{MAC}", params={"retry": 7}, headers=IPXE | {"host": "10.0.2.2:8420"})
    assert r.status_code == 200 and r.headers["x-blockprov-error"] == "HostNotFound"
    lines = r.text.splitlines()
    assert "no boot assignment for host" in lines[1] and "[404]" in lines[1]
    assert lines[-2] == "sleep 7"
    assert lines[-1].startswith("chain --replace --autofree http://10.0.2.2:8420/v1/boot/") and "retry=7" in lines[-1]
    # curl and the CLI still get the 404 and its one line
    assert c.get(f"/v1/boot/{MAC}").status_code == 404
    # assigned, no boot files yet: still a retry (409), then the real script once it can boot
    assert c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1"}).status_code == 200
    r = c.get(f"/v1/boot/{MAC}", headers=IPXE)
    assert r.status_code == 200 and "has no boot files" in r.text and "[409]" in r.text
    assert r.text.splitlines()[-2] == f"sleep {boot.RETRY_SECONDS}"
    repo.set_boot_files("lab:v1", b"k" * 5000, b"i" * 3000)
    r = c.get(f"/v1/boot/{MAC}", headers=IPXE)
    assert r.status_code == 200 and boot.parse_script(r.text)["params"]["blockprov.host"] == MAC
    # a malformed host is no reason to wait, and a silly delay is refused
    assert c.get("/v1/boot/not_a_host", headers=IPXE).status_code == 400
    assert c.get("/v1/boot/52:54:00:ab:cd:02", params={"retry": 0}, headers=IPXE).status_code == 400


def test_the_first_token_does_not_silently_stop_pcs(client: tuple[TestClient, LocalRepository],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27 item 2: once tokens are required and the server has no --anonymous-boot, iPXE gets
    a script that says so on the PC's screen (not a 401 it shows as "Permission denied" before
    booting its disk's old version offline); the refusal is logged and on the host's record."""
    from blockprov.catalog.tokens import TokenStore
    from blockprov.service.access import AccessPolicy

    c, repo = client
    repo.set_boot_files("lab:v1", b"kernel", b"initrd")
    repo.assign_host(MAC, "lab:v1")
    token, _ = TokenStore(repo.catalog.db).create("write", "admin")
    auth = {"authorization": f"Bearer {token}"}
    with caplog.at_level("WARNING", logger="blockprov.service"):
        r = c.get(f"/v1/boot/{MAC}", headers=IPXE)
    assert r.status_code == 200 and r.headers["x-blockprov-error"] == "Unauthorized"
    lines = r.text.splitlines()
    assert lines[0] == "#!ipxe" and "--anonymous-boot" in lines[1] and "[401]" in lines[1]
    assert lines[-1].startswith("chain --replace --autofree http://testserver/v1/boot/")
    assert any("boot request of host" in m and "--anonymous-boot" in m for m in caplog.messages)
    h = c.get(f"/v1/hosts/{MAC}", headers=auth).json()
    assert h["last_refused"] is not None and "--anonymous-boot" in h["refused_why"] and h["last_boot"] is None
    r = c.get(f"/v1/boot/{MAC.replace(':', '%3A')}", headers=IPXE)  # as real iPXE sends it: recorded again
    assert r.status_code == 200 and c.get(f"/v1/hosts/{MAC}", headers=auth).json()["last_refused"] > h["last_refused"]
    r = c.get(f"/v1/boot/{MAC}")  # curl, the CLI: the 401 as before (and recorded too)
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    r = c.get("/v1/boot/not_a_host", headers=IPXE)  # refused before its host is even checked: no record, no 500
    assert r.status_code == 200 and "--anonymous-boot" in r.text
    with TestClient(create_app(repo, access=AccessPolicy(anonymous_boot=True))) as open_boot:
        assert open_boot.get(f"/v1/boot/{MAC}", headers=IPXE).text.startswith("#!ipxe\n# blockprov: host")
        r = open_boot.get(f"/v1/boot/{MAC}", headers=IPXE | {"authorization": "Bearer bpt_wrong"})
        assert r.status_code == 200 and "refused the token sent" in r.text and "not valid" in r.text
