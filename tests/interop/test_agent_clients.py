"""The agent (``blockprov attach``) against NBD clients we did not write: qemu-img, qemu-io,
nbdinfo, nbdcopy and libnbd (nbdsh's bindings), over a unix socket and TCP."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.procs import Proc, nbd_uri, nbdsh, start_agent

pytestmark = pytest.mark.interop
SIZE = 40 << 20


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "golden.img", SIZE, seed=21, data_fraction=0.6)
    r = LocalRepository(data)
    import_image(r, src, "lab:v1")
    r.close()
    return data, src


@pytest.fixture
def agent(tmp_path: Path, golden: tuple[Path, Path]) -> Iterator[tuple[Proc, Path]]:
    data, _ = golden
    sock = tmp_path / "nbd.sock"
    proc, banner = start_agent(tmp_path / "cache", "lab:v1", sock, data=data)
    assert banner["image"] == "lab"
    try:
        yield proc, sock
    finally:
        assert proc.stop() == 0


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)


def test_qemu_img_info_compare_convert(agent: tuple[Proc, Path], golden: tuple[Path, Path], tmp_path: Path) -> None:
    _, sock = agent
    _, src = golden
    info = json.loads(run("qemu-img", "info", "--output=json", nbd_uri(sock)).stdout)
    assert info["virtual-size"] == SIZE
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock, "lab"))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", nbd_uri(sock), str(tmp_path / "c.qcow2"))
    run("qemu-img", "compare", str(src), str(tmp_path / "c.qcow2"))


def test_qemu_io_patterns_discard_zero(agent: tuple[Proc, Path]) -> None:
    _, sock = agent
    out = run("qemu-io", "-f", "raw",
              "-c", "write -P 0xab 100k 1M", "-c", "read -P 0xab 100k 1M",
              "-c", "write -P 0x11 3000 5", "-c", "read -P 0x11 3000 5",  # partial write into a missing chunk
              "-c", "discard 4M 1M", "-c", "read -P 0 4M 1M",
              "-c", "write -z 8M 200k", "-c", "read -P 0 8M 200k",
              "-c", "write -z -u 12M 128k", "-c", "read -P 0 12M 128k",
              "-c", "flush", nbd_uri(sock)).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower()


def test_nbdinfo_map_and_can(agent: tuple[Proc, Path]) -> None:
    _, sock = agent
    uri = nbd_uri(sock)
    for flag in ("flush", "trim", "zero", "fast-zero", "fua", "multi-conn"):
        assert subprocess.run(["nbdinfo", f"--can={flag}", uri]).returncode == 0, flag
    assert subprocess.run(["nbdinfo", "--is=read-only", uri]).returncode != 0
    run("qemu-io", "-f", "raw", "-c", "write -z 0 1M", uri)
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    assert sum(e["length"] for e in extents) == SIZE
    assert extents[0]["offset"] == 0 and extents[0]["type"] & 2  # the zeroed head reads as zero
    assert any(e["type"] == 0 for e in extents)  # data extents exist


def test_nbdcopy_whole_disk(agent: tuple[Proc, Path], golden: tuple[Path, Path], tmp_path: Path) -> None:
    _, sock = agent
    _, src = golden
    out = tmp_path / "copy.raw"
    run("nbdcopy", nbd_uri(sock), str(out))
    assert out.read_bytes() == src.read_bytes()
    run("nbdcopy", "--connections=4", "--requests=16", nbd_uri(sock), "null:")


def test_nbdsh_corner_cases(agent: tuple[Proc, Path]) -> None:
    _, sock = agent
    script = textwrap.dedent(f"""
        import nbd
        h = nbd.NBD()
        h.set_strict_mode(0)  # let the requests reach the server: we test its validation
        h.connect_unix({str(sock)!r})
        size = h.get_size()
        for off, n in ((size - 512, 1024), (size, 512), (size + 4096, 512)):
            try:
                h.pread(n, off)
                raise SystemExit("out-of-range read succeeded")
            except nbd.Error as e:
                assert e.errno == "EINVAL", e
        try:
            h.pwrite(b"x" * 1024, size - 512)
            raise SystemExit("out-of-range write succeeded")
        except nbd.Error as e:
            assert e.errno == "ENOSPC", e  # proto.md: writes beyond the end SHOULD get ENOSPC
        # the connection lives on
        h.pwrite(b"\\x5a" * 4096, 8192)
        assert h.pread(4096, 8192) == b"\\x5a" * 4096
        h.flush()
        h2 = nbd.NBD()
        h2.connect_unix({str(sock)!r})
        assert h2.pread(4096, 8192) == b"\\x5a" * 4096  # two connections, one disk
        h3 = nbd.NBD()
        h3.set_export_name("no-such-export")
        try:
            h3.connect_unix({str(sock)!r})
            raise SystemExit("unknown export accepted")
        except nbd.Error:
            pass
        h.shutdown(); h2.shutdown()
        print("ok")
    """)
    p = nbdsh(script)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_written_data_survives_restart_without_refetch(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, src = golden
    sock, cache = tmp_path / "a.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, data=data)
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 5M 300k", "-c", "flush", nbd_uri(sock))
        run("nbdcopy", nbd_uri(sock), "null:")  # fetch everything
    finally:
        assert proc.stop() == 0
    st = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    assert st["agent"]["running"] is False and st["chunks_missing"] == 0 and st["chunks_modified"] >= 5
    assert 0 < st["totals"]["wire_bytes"] <= st["totals"]["bytes_fetched"]
    proc, _ = start_agent(cache, None, sock, data=data)  # re-attach what the cache holds
    try:
        run("qemu-io", "-f", "raw", "-c", "read -P 0xcd 5M 300k", nbd_uri(sock))
        expected = bytearray(src.read_bytes())
        expected[5 << 20:(5 << 20) + (300 << 10)] = b"\xcd" * (300 << 10)
        out = tmp_path / "after.raw"
        run("nbdcopy", nbd_uri(sock), str(out))
        assert out.read_bytes() == bytes(expected)
        st = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
        assert st["agent"]["running"] is True and st["chunks_fetched"] == 0  # nothing refetched
        assert st["totals"]["bytes_fetched"] > 0  # what the first run fetched is remembered
    finally:
        assert proc.stop() == 0


def test_tcp_listener_and_cache_refusals(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, src = golden
    cache = tmp_path / "cache"
    proc, banner = start_agent(cache, "lab:v1", tmp_path / "s", "--listen", "127.0.0.1:0", data=data)
    try:
        tcp = next(a for a in banner["addresses"] if str(a).startswith("nbd://"))  # type: ignore[attr-defined]
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(tcp))
        # a second agent on the same cache is refused while the first runs
        p = run_cli("--data", str(data), "attach", "lab:v1", "--cache", str(cache), "--socket",
                    str(tmp_path / "t"), check=False)
        assert p.returncode == 8 and "in use by another agent" in p.stderr
    finally:
        assert proc.stop() == 0
    r = LocalRepository(data)
    src2 = make_image(tmp_path / "v2.img", SIZE, seed=22)
    import_image(r, src2, "lab:v2")
    r.close()
    p = run_cli("--data", str(data), "attach", "lab:v2", "--cache", str(cache), "--socket", str(tmp_path / "t"),
                check=False)
    assert p.returncode == 8 and "holds lab@" in p.stderr and "another --cache" in p.stderr
    p = run_cli("--data", str(data), "attach", "lab:v1", "--cache", str(cache), check=False)
    assert p.returncode == 2 and "--socket" in p.stderr


def test_a_socket_path_too_long_is_a_usage_error(golden: tuple[Path, Path], tmp_path: Path) -> None:
    """A unix address holds 107 bytes: a longer --socket is refused in one line (no client could
    reach it), and the cache it was about to serve stays usable."""
    data, src = golden
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    cache = tmp_path / "cache"
    for args in (["attach", "lab:v1", "--cache", str(cache)], ["clones", "serve", "--dir", str(tmp_path / "cl")]):
        p = run_cli("--data", str(data), *args, "--socket", str(deep / "nbd.sock"), check=False)
        assert p.returncode == 2 and "unix socket path" in p.stderr and "at most 107" in p.stderr, p.stderr
        assert "internal error" not in p.stderr
    proc, _ = start_agent(cache, None, tmp_path / "s", data=data)
    try:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(tmp_path / "s"))
    finally:
        assert proc.stop() == 0
