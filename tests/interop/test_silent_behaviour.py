"""Issue 17, "silent wrong behaviour" 1-5: each through the real CLI, with real agents, servers and
NBD clients, as a user would meet it.

1. a re-attached cache keeps the repository it was made with (all endpoints); one that lacks the
   version is refused, never adopted;
2. a second agent is refused a socket another one serves; a stale one is replaced;
3. ``reset`` of a customized clone returns to its customized pristine state;
4. ``reset`` and ``status`` say how many chunks depend on the repository;
5. ``snapshot`` of an unchanged instance answers with the version it equals.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.interop.test_clones_pools import debugfs_cat, ext4_golden, sh, start, uri  # noqa: F401 (a fixture)
from tests.procs import free_port, nbd_uri, start_agent, start_server

pytestmark = pytest.mark.interop
SIZE = 8 << 20


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, Path, Manifest]:
    """An embedded repository holding lab:v1, the image it was made from, and its manifest."""
    data = tmp_path / "repo"
    src = make_image(tmp_path / "lab.img", SIZE, seed=17, data_fraction=0.9)
    r = LocalRepository(data)
    import_image(r, src, "lab:v1")
    m = r.resolve("lab:v1")
    r.close()
    return data, src, m


def status(cache: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return out


def served(sock: Path) -> None:
    """The NBD server greeted a client: the process is past its banner and takes SIGTERM as a clean
    stop (one stopped in the instant between its banner and its signal handlers dies of the signal)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        assert s.recv(8) == b"NBDMAGIC"


def test_a_reattached_cache_keeps_its_repository_and_refuses_one_without_its_version(
        lab: tuple[Path, Path, Manifest], tmp_path: Path) -> None:
    data, src, _ = lab
    cache, sock = tmp_path / "cache", tmp_path / "a.sock"
    elsewhere = tmp_path / "elsewhere"  # the embedded repository $BLOCKPROV_DATA names: without lab:v1
    server, url = start_server(data)
    try:
        endpoints = f"{url},http://127.0.0.1:{free_port()}"  # a failover list: every endpoint is kept
        agent, _ = start_agent(cache, "lab:v1", sock, repo_url=endpoints)
        served(sock)
        assert agent.stop() == 0
        # Re-attached as the README shows: no --repo, and $BLOCKPROV_DATA set to another repository.
        agent, _ = start_agent(cache, None, sock, env={"BLOCKPROV_DATA": str(elsewhere)})
        try:
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))  # every miss fetched
            assert status(cache)["repository"] == endpoints
        finally:
            assert agent.stop() == 0
        # Told to use a repository that lacks the version: refused in one line, nothing recorded.
        empty, empty_url = start_server(tmp_path / "empty")
        try:
            p = run_cli("--repo", empty_url, "attach", "--cache", str(cache), "--socket", str(sock), check=False)
        finally:
            empty.stop()
        assert p.returncode == 8, p.stderr
        assert "does not hold lab@" in p.stderr and endpoints in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        assert status(cache)["repository"] == endpoints
        # Another repository that holds the version is adopted when named (the repository moved).
        moved, moved_url = start_server(data)
        try:
            agent, _ = start_agent(cache, None, sock, repo_url=moved_url)
            served(sock)
            assert agent.stop() == 0
        finally:
            moved.stop()
        assert status(cache)["repository"] == moved_url
    finally:
        server.stop()


def test_clones_serve_uses_the_repository_the_clones_were_made_from(lab: tuple[Path, Path, Manifest],
                                                                     tmp_path: Path) -> None:
    data, src, _ = lab
    root, sock = tmp_path / "clones", tmp_path / "c.sock"
    server, url = start_server(data)
    try:
        run_cli("--repo", url, "clone", "lab:v1", "--dir", str(root))
        proc, banner = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=tmp_path / "elsewhere")
        try:
            assert list(banner["instances"]) == ["lab-1"]
            served(sock)
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock, "lab-1"))
        finally:
            assert proc.stop() == 0
        empty, empty_url = start_server(tmp_path / "empty")
        try:  # a repository without the version is not adopted: nothing is served from it
            proc, banner = start("clones", "serve", "--dir", str(root), "--socket", str(sock), repo_url=empty_url)
            served(sock)
            assert proc.stop() == 0
        finally:
            empty.stop()
        assert banner["instances"] == {}
        assert "does not hold lab@" in proc.proc.stderr.read()  # type: ignore[union-attr]
        base = next((root / "bases").iterdir())
        assert status(base)["repository"] == url
    finally:
        server.stop()


def test_a_second_agent_is_refused_a_socket_that_answers_and_a_stale_one_is_replaced(
        lab: tuple[Path, Path, Manifest], tmp_path: Path) -> None:
    data, src, _ = lab
    sock = tmp_path / "pc.sock"
    first, _ = start_agent(tmp_path / "c1", "lab:v1", sock, data=data)
    try:
        p = run_cli("attach", "lab:v1", "--cache", str(tmp_path / "c2"), "--socket", str(sock), data=data,
                    check=False)
        assert p.returncode == 2 and "in use" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        p = run_cli("clones", "serve", "--dir", str(tmp_path / "clones"), "--socket", str(sock), data=data,
                    check=False)
        assert p.returncode == 2 and "in use" in p.stderr, p.stderr
        # The first agent still owns its socket and serves on.
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))
    finally:
        first.kill9()  # dies without removing its socket
    assert sock.is_socket()
    again, _ = start_agent(tmp_path / "c1", None, sock, data=data)  # the stale socket is replaced
    try:
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))
    finally:
        assert again.stop() == 0
    assert not sock.exists()


def test_reset_of_a_customized_clone_keeps_its_customization(ext4_golden: tuple[Path, Path],  # noqa: F811
                                                             tmp_path: Path) -> None:
    data, _ = ext4_golden
    root, sock = tmp_path / "clones", tmp_path / "c.sock"
    run_cli("clone", "os:v1", "--count", "2", "--dir", str(root), "--customize", "builtin:identity", data=data)

    def identity(name: str) -> tuple[str, str]:
        out = tmp_path / f"{name}.raw"
        sh("nbdcopy", uri(sock, name), str(out))
        sh("e2fsck", "-fn", str(out))
        return debugfs_cat(out, "/etc/hostname"), debugfs_cat(out, "/etc/machine-id")

    proc, _ = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=data)
    try:
        # One more made while the directory is served: sealed by the serving process.
        run_cli("clone", "os:v1", "--dir", str(root), "--customize", "builtin:identity", data=data)
        made = {name: identity(name) for name in ("os-2", "os-3")}
        assert [h for h, _ in made.values()] == ["os-2", "os-3"]
        for name in made:
            sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 32M", uri(sock, name))  # the user wrecks it all
            out = json.loads(run_cli("reset", "--cache", str(root / "instances" / name), "--json").stdout)
            assert out["chunks_reset"] > 0
            assert identity(name) == made[name]  # its own hostname and machine-id, not the golden ones
        # Unchanged since it was made, the instance snapshots as its base version (nothing committed).
        snap = json.loads(run_cli("snapshot", "--cache", str(root / "instances" / "os-2"), "--to", "os:s2",
                                  "--json", data=data).stdout)
        assert snap["unchanged"] and snap["chunks_sent"] == 0
    finally:
        assert proc.stop() == 0
    listing = json.loads(run_cli("clones", "list", "--dir", str(root), "--json").stdout)
    assert all(x["chunks_modified"] == 0 for x in listing)  # the customization is pristine, not a change
    # Written while stopped and reset offline: served again, the customization is still there.
    proc, _ = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=data)
    try:
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 32M", uri(sock, "os-2"))
    finally:
        assert proc.stop() == 0
    run_cli("reset", "--cache", str(root / "instances" / "os-2"), data=data)
    proc, _ = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=data)
    try:
        assert identity("os-2") == made["os-2"]
        assert identity("os-1")[0] == "os-1"
    finally:
        assert proc.stop() == 0


def test_reset_and_status_say_how_many_chunks_depend_on_the_repository(
        lab: tuple[Path, Path, Manifest], tmp_path: Path) -> None:
    data, _, m = lab
    cache, sock = tmp_path / "cache", tmp_path / "a.sock"
    dirty = 4
    first = next(i for i in range(m.count) if not m.is_zero(i))
    expected = sum(1 for i in range(first, first + dirty) if not m.is_zero(i))  # a reset zero chunk stays local
    at, length = first * m.chunk_size, dirty * m.chunk_size
    server, url = start_server(data)
    try:
        agent, _ = start_agent(cache, "lab:v1", sock, "--fetch-timeout", "1", repo_url=url)
        try:
            sh("nbdcopy", nbd_uri(sock), "null:")  # everything local: nothing depends on the repository
            assert status(cache)["chunks_from_repository"] == 0
            sh("qemu-io", "-f", "raw", "-c", f"write -P 0x33 {at} {length}", nbd_uri(sock))
            out = json.loads(run_cli("reset", "--cache", str(cache), "--json").stdout)
            assert (out["chunks_reset"], out["reset_from_repository"], out["chunks_from_repository"]) == (
                dirty, expected, expected)
            assert status(cache)["chunks_from_repository"] == expected
            human = run_cli("status", "--cache", str(cache)).stdout
            assert f"depends   {expected} chunks can only be read from the repository" in human and url in human
            sh("qemu-io", "-f", "raw", "-c", f"write -P 0x34 {at} {length}", nbd_uri(sock))
            said = run_cli("reset", "--cache", str(cache)).stdout
            assert f"{expected} of them and {expected} chunk(s) in all now depend on the repository" in said
            server.stop()
            # What reset said: with the repository down those reads fail.
            p = sh("qemu-io", "-f", "raw", "-c", f"read {at} {length}", nbd_uri(sock), check=False)
            assert p.returncode != 0 or "error" in (p.stdout + p.stderr).lower()
        finally:
            agent.stop()
    finally:
        server.stop()


def test_a_snapshot_of_an_unchanged_instance_answers_with_the_version_it_equals(
        lab: tuple[Path, Path, Manifest], tmp_path: Path) -> None:
    data, _, m = lab
    cache, sock = tmp_path / "cache", tmp_path / "a.sock"

    def versions() -> list[str]:
        return [v["id"] for v in json.loads(run_cli("versions", "lab", "--json", data=data).stdout)]

    def snapshot(tag: str) -> dict[str, object]:
        out: dict[str, object] = json.loads(run_cli("snapshot", "--cache", str(cache), "--to", f"lab:{tag}",
                                                    "--json", data=data).stdout)
        return out

    agent, _ = start_agent(cache, "lab:v1", sock, data=data)
    try:
        out = snapshot("s0")  # nothing written: it is the base version
        assert out["unchanged"] and out["version"] == m.id and versions() == [m.id]
        assert json.loads(run_cli("show", "lab:s0", "--json", data=data).stdout)["id"] == m.id
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x41 64k 64k", nbd_uri(sock))
        first = snapshot("s1")
        assert not first["unchanged"] and first["version"] != m.id and len(versions()) == 2
        said = run_cli("snapshot", "--cache", str(cache), "--to", "lab:s2", data=data).stdout
        assert said.startswith(f"unchanged: the instance equals lab@{first['version']}")
        assert len(versions()) == 2
        assert json.loads(run_cli("show", "lab:s2", "--json", data=data).stdout)["id"] == first["version"]
        run_cli("reset", "--cache", str(cache), data=data)
        out = snapshot("s3")  # reset: the base version again
        assert out["unchanged"] and out["version"] == m.id and len(versions()) == 2
    finally:
        assert agent.stop() == 0
