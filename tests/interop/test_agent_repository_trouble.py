"""The agent when its repository goes away: present data keeps being served, a missing chunk
fails with EIO within the fetch timeout (never hangs), and service resumes by itself."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image
from tests.procs import free_port, nbd_uri, start_agent, start_server

pytestmark = pytest.mark.interop


def qemu_io(sock: Path, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run([*args, nbd_uri(sock)], capture_output=True, text=True, check=check, timeout=120)


def test_repository_down_and_back(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "g.img", 16 << 20, seed=31, data_fraction=1.0, pattern_every=4 << 20)
    r = LocalRepository(data)
    import_image(r, src, "t:v1")
    r.close()
    port = free_port()
    server, url = start_server(data, port=port)
    sock = tmp_path / "s"
    agent, _ = start_agent(tmp_path / "cache", "t:v1", sock, "--fetch-timeout", "2", "--readahead", "0",
                           repo_url=url)
    try:
        expect = src.read_bytes()
        first = qemu_io(sock, "read -v 0 4096").stdout  # fetch the first chunk only
        assert "read 4096/4096" in first
        server.stop()
        # present data is still served
        assert "read 4096/4096" in qemu_io(sock, "read 0 4096").stdout
        # a missing chunk: EIO within the timeout, and the agent lives
        t = time.monotonic()
        p = qemu_io(sock, "read 8M 4096", check=False)
        elapsed = time.monotonic() - t
        assert "Input/output error" in (p.stdout + p.stderr)
        assert elapsed < 30
        assert agent.proc.poll() is None
        # the repository returns on the same address: reads succeed again, by themselves
        server, _ = start_server(data, port=port)
        out = tmp_path / "all.raw"
        subprocess.run(["nbdcopy", nbd_uri(sock), str(out)], check=True, timeout=120)
        assert out.read_bytes() == expect
    finally:
        agent.stop()
        server.stop()


def test_attach_with_unreachable_repository_is_a_clear_error(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    p = run_cli("--repo", f"http://127.0.0.1:{free_port()}", "attach", "t:v1", "--cache", str(tmp_path / "c"),
                "--socket", str(tmp_path / "s"), check=False)
    assert p.returncode == 7 and "unreachable" in p.stderr and "Traceback" not in p.stderr


def test_corrupt_chunk_in_repository_is_never_served(tmp_path: Path) -> None:
    from tests.conftest import corrupt_chunk

    data = tmp_path / "repo"
    src = make_image(tmp_path / "g.img", 8 << 20, seed=33, data_fraction=1.0)
    r = LocalRepository(data)
    import_image(r, src, "c:v1")
    m = r.resolve("c:v1")
    bad = 40  # the chunk at 2.5 MiB
    corrupt_chunk(r, m.digest_at(bad))
    r.close()
    sock = tmp_path / "s"
    agent, _ = start_agent(tmp_path / "cache", "c:v1", sock, "--readahead", "0", "--fetch-timeout", "2", data=data)
    try:
        p = qemu_io(sock, f"read {bad * m.chunk_size} 4096", check=False)
        assert "Input/output error" in p.stdout + p.stderr
        good = qemu_io(sock, "read -v 0 512").stdout  # other chunks are fine
        assert "read 512/512" in good
        assert agent.proc.poll() is None
    finally:
        agent.stop()
    from blockprov.cache import load_state

    assert not load_state(tmp_path / "cache").chunks.present(bad)  # never stored either
