"""systemd socket activation of the NBD servers (issue 16): ``attach``, ``clones serve`` and ``pool
serve`` started with their listening socket passed (LISTEN_FDS/LISTEN_PID), by the clients that do
it for real: nbdinfo's ``-- [ CMD ]`` form and libnbd's ``connect_systemd_socket_activation``
(Debian's python3 bindings). The server binds nothing; the client reads the image through it."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import make_image, require_tool, run_cli
from tests.procs import VENV_BIN, nbdsh, wait_for

pytestmark = pytest.mark.interop
BLOCKPROV = str(VENV_BIN / "blockprov")
SIZE = 4 << 20


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "golden.img", SIZE, seed=161, data_fraction=0.6)
    run_cli("import", str(src), "lab:v1", data=data)
    return data, src


def read_through_activation(argv: list[str], export: str = "") -> dict[str, object]:
    """Start ``argv`` by libnbd's socket activation, read the whole export, hash it."""
    script = textwrap.dedent(f"""
        import hashlib, json, nbd
        h = nbd.NBD()
        h.set_export_name({export!r})
        h.connect_systemd_socket_activation({argv!r})
        size = h.get_size()
        digest, off = hashlib.sha256(), 0
        while off < size:
            n = min(1 << 20, size - off)
            digest.update(h.pread(n, off))
            off += n
        print(json.dumps({{"size": size, "sha256": digest.hexdigest()}}))
        h.shutdown()
    """)
    p = nbdsh(script, timeout=120)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nbdinfo_starts_attach_by_socket_activation(golden: tuple[Path, Path], tmp_path: Path) -> None:
    """``nbdinfo --json -- [ blockprov attach … ]``: no --socket, no --listen; nbdinfo's stdout is
    its own (the agent's banner went to stderr)."""
    data, _ = golden
    p = subprocess.run([require_tool("nbdinfo"), "--json", "--", "[", BLOCKPROV, "--data", str(data), "attach",
                        "lab:v1", "--cache", str(tmp_path / "cache"), "--no-register", "]"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["exports"][0]["export-size"] == SIZE
    assert "serving lab@" in p.stderr and "stopped cleanly" in p.stderr  # libnbd stops it with SIGTERM


def test_libnbd_reads_attach_by_socket_activation(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, src = golden
    got = read_through_activation([BLOCKPROV, "attach", "lab:v1", "--cache", str(tmp_path / "cache"),
                                   "--no-register", "--data", str(data)], export="lab")
    assert got["size"] == SIZE and got["sha256"] == sha256(src)
    # the cache stays usable by an ordinary attach afterwards (the agent stopped cleanly)
    st = json.loads(run_cli("status", "--cache", str(tmp_path / "cache"), "--json").stdout)
    assert st["clean_shutdown"] is True and st["agent"]["running"] is False


def test_clones_and_pool_serve_by_socket_activation(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, src = golden
    root = tmp_path / "clones"
    run_cli("clone", "lab:v1", "--count", "2", "--dir", str(root), data=data)
    got = read_through_activation([BLOCKPROV, "--data", str(data), "clones", "serve", "--dir", str(root)],
                                  export="lab-2")
    assert got["size"] == SIZE and got["sha256"] == sha256(src)

    run_cli("pool", "create", "p1", "--from", "lab:v1", "--size", "1", data=data)
    got = read_through_activation([BLOCKPROV, "pool", "serve", "p1", "--data", str(data)], export="p1-1")
    assert got["size"] == SIZE and got["sha256"] == sha256(src)
    assert not (data / "pools" / "p1" / "nbd.sock").exists()  # it served the passed socket, bound nothing


def activated(args: list[str], sock: socket.socket, *, pid: str = "$$") -> subprocess.CompletedProcess[str]:
    """``blockprov ARGS`` with ``sock`` as descriptor 3 (bash moves it there: dash takes one-digit
    descriptors only) and LISTEN_PID set by the shell that execs it (so it is the command's own pid)."""
    fd = sock.fileno()
    cmd = f"LISTEN_FDS=1 LISTEN_PID={pid} exec {shlex.join([BLOCKPROV, *args])} 3<&{fd} {fd}<&-"
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, pass_fds=(fd,),
                          stdin=subprocess.DEVNULL)


def test_activation_mistakes(golden: tuple[Path, Path], tmp_path: Path) -> None:
    """A listener on the command line of an activated server, and a descriptor that is not a
    listening socket: one line, exit 2, nothing served."""
    data, _ = golden
    attach = ["--data", str(data), "attach", "lab:v1", "--cache", str(tmp_path / "cache"), "--no-register"]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "a.sock"))
        s.listen()
        p = activated([*attach, "--socket", str(tmp_path / "b.sock")], s)
        assert p.returncode == 2 and "socket activation" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
        assert not (tmp_path / "b.sock").exists()
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listening
        s.bind(str(tmp_path / "c.sock"))
        p = activated(attach, s)
        assert p.returncode == 2 and "not a listening stream socket" in p.stderr, p.stderr
    with socket.socket(socket.AF_UNIX) as s:  # LISTEN_PID of another process: not ours, so no listener at all
        s.bind(str(tmp_path / "d.sock"))
        s.listen()
        p = activated(attach, s, pid="1")
        assert p.returncode == 2 and "--socket PATH or --listen" in p.stderr, p.stderr


def test_systemd_socket_activate_starts_attach(golden: tuple[Path, Path], tmp_path: Path) -> None:
    """systemd's own activator (what a .socket unit does, contrib/systemd/blockprov-agent@.socket):
    the socket exists before the agent runs, the first connection starts it, it keeps serving the
    same socket to later clients, and SIGTERM stops it cleanly."""
    data, src = golden
    sock = tmp_path / "agent.sock"
    env = [f"--setenv={k}" for k in ("PYTHONPATH", "PATH") if k in os.environ]
    proc = subprocess.Popen([require_tool("systemd-socket-activate"), "--listen", str(sock), "--fdname=nbd", *env,
                             BLOCKPROV, "--data", str(data), "attach", "lab:v1", "--cache", str(tmp_path / "cache"),
                             "--no-register"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(sock.exists, 30), "systemd-socket-activate made no socket"
        for _ in range(2):
            p = subprocess.run([require_tool("nbdinfo"), "--size", f"nbd+unix:///lab?socket={sock}"],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and int(p.stdout) == SIZE, p.stderr
        copied = tmp_path / "copy.img"
        subprocess.run([require_tool("nbdcopy"), f"nbd+unix:///lab?socket={sock}", str(copied)], check=True,
                       timeout=120)
        assert sha256(copied) == sha256(src)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped cleanly" in err, err


def test_a_polling_client_connects_to_the_agent_the_first_time_it_sees_its_socket(golden: tuple[Path, Path],
                                                                                  tmp_path: Path) -> None:
    """``attach --socket``: a script waiting for the path connects when it appears, first try."""
    data, _ = golden
    sock = tmp_path / "run" / "agent.sock"
    proc = subprocess.Popen([BLOCKPROV, "--data", str(data), "attach", "lab:v1", "--cache", str(tmp_path / "cache"),
                             "--socket", str(sock), "--no-register"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.exists(sock), 60), "the socket never appeared"
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))  # no ConnectionRefusedError: it listened before it had this name
            assert c.recv(8) == b"NBDMAGIC"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
