"""``blockprov catalog copy``: an embedded repository's catalog moves into PostgreSQL whole (versions,
tags, boot files, hosts, profiles, agents and their requests, tokens) and serves the same answers
there; a non-empty target is refused; the way back into a new SQLite file works too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockprov.catalog import tokens as auth
from blockprov.catalog.db import open_database
from blockprov.imaging.exporter import export_image
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.sqlite import Database
from tests.conftest import make_image, run_cli


def _state(repo: LocalRepository) -> dict[str, Any]:
    """Everything the catalog answers, in comparable form."""
    tokens = auth.TokenStore(repo.catalog.db).tokens()
    versions = {i.name: repo.versions(i.name) for i in repo.images()}
    return {"images": repo.images(), "versions": versions, "hosts": repo.hosts(),
            "boot": repo.get_boot_files("lab:v1"), "profile": repo.get_profile("lab", versions["lab"][0].id),
            "agents": [{k: v for k, v in a.items() if k != "seen_ago"} for a in repo.agents()],
            "manifest": repo.resolve("lab:v2").to_json(), "tokens": tokens}


def test_copy_into_postgres_and_back(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "repo"
    src_img = make_image(tmp_path / "a.img", 1 << 20, seed=5)
    repo = LocalRepository(data)
    v1, _ = import_image(repo, src_img, "lab:v1")
    with open(src_img, "r+b") as f:
        f.write(b"v2")
    import_image(repo, src_img, "lab:v2")
    repo.set_boot_files("lab:v1", b"kernel" * 100, b"initrd", "console=ttyS0")
    repo.assign_host("52:54:00:12:34:56", "lab:v2", "quiet")
    repo.put_profile("lab", v1, [3, 1, 2])
    repo.register_agent("pc-1", {"image": "lab:v1"})
    rid = repo.post_request("pc-1", "snapshot", {"to": "lab:pc1"})
    token, _ = auth.TokenStore(repo.catalog.db).create("read", "viewer")
    before = _state(repo)
    repo.close()

    out = run_cli("catalog", "copy", "--to", pg_url, "--json", data=data)
    rows = json.loads(out.stdout)["rows"]
    assert rows["versions"] == 2 and rows["tags"] == 2 and rows["tokens"] == 1 and rows["agent_requests"] == 1

    shared = LocalRepository(data, catalog=open_database(pg_url, data))
    try:
        assert _state(shared) == before
        assert shared.get_request("pc-1", rid)["state"] == "pending"
        got = tmp_path / "out.img"
        export_image(shared, "lab:v2", got)
        assert got.read_bytes() == src_img.read_bytes()
        info = auth.TokenStore(shared.catalog.db).lookup(token)
        assert info is not None and info.name == "viewer"
    finally:
        shared.close()

    # a target that holds anything is refused (two catalogs are never merged), and nothing changes
    again = run_cli("catalog", "copy", "--to", pg_url, data=data, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr and "2 versions" in again.stderr

    # and back, from PostgreSQL into a new SQLite file
    back = tmp_path / "back" / "catalog.sqlite"
    back.parent.mkdir()
    run_cli("--catalog", pg_url, "catalog", "copy", "--to", str(back), data=data)
    copy = LocalRepository(data, catalog=Database(back))
    try:
        assert _state(copy) == before
    finally:
        copy.close()
    exists = run_cli("--catalog", pg_url, "catalog", "copy", "--to", str(back), data=data, check=False)
    assert exists.returncode == 2 and "exists already" in exists.stderr


def test_copy_refuses_remote_and_bad_targets(tmp_path: Path) -> None:
    p = run_cli("--repo", "http://127.0.0.1:9", "catalog", "copy", "--to", "x.sqlite", check=False)
    assert p.returncode == 2 and "where it is" in p.stderr
    LocalRepository(tmp_path / "d").close()
    p = run_cli("catalog", "copy", "--to", "postgresql://postgres@127.0.0.1:1/x", data=tmp_path / "d", check=False)
    assert p.returncode == 7 and "unreachable" in p.stderr
    p = run_cli("catalog", "copy", "--to", str(tmp_path / "x.sqlite"), data=tmp_path / "nowhere", check=False)
    assert p.returncode == 2 and "no catalog to copy" in p.stderr and not (tmp_path / "x.sqlite").exists()
