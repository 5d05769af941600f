"""The raw view against real clients over a real socket: curl ranges, qemu's http block driver.

The server is ``blockprov serve`` on 127.0.0.1 port 0, exactly as operators run it; its first
stdout line tells us the port.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests import procs
from tests.conftest import corrupt_chunk, make_image, run_cli
from tests.procs import Proc as Server

pytestmark = pytest.mark.interop

SIZE = 48 << 20 | 4096  # not a multiple of the chunk size: the short last chunk is exercised too


def start_server(data: Path, *extra: str) -> Server:
    return procs.start_server(data, *extra)[0]


@dataclass
class Served:
    server: Server
    src: Path
    vid: str
    tmp: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("http-raw")
    src = make_image(tmp / "src.img", SIZE, seed=21, data_fraction=0.6, pattern_every=1 << 20)
    with open(src, "r+b") as f:  # make the short tail chunk non-zero
        f.seek(SIZE - 10)
        f.write(b"TAILTAILTA")
    repo = LocalRepository(tmp / "repo")
    vid, _ = import_image(repo, src, "disk:v1")
    repo.close()
    server = start_server(tmp / "repo")
    yield Served(server, src, vid, tmp)
    assert server.stop(signal.SIGTERM) == 0  # SIGTERM is a clean stop, exit status 0


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "60", *args], capture_output=True, timeout=90)


def test_curl_ranges_equal_source(served: Served) -> None:
    data = served.src.read_bytes()
    url = f"{served.server.url}/v1/images/disk/raw/v1"
    for lo, hi in ((0, 511), (65535, 65537), (1 << 20, (3 << 20) + 12345), (SIZE - 5000, SIZE - 1)):
        p = curl("-f", "-r", f"{lo}-{hi}", url)
        assert p.returncode == 0, p.stderr
        assert p.stdout == data[lo:hi + 1], (lo, hi)
    p = curl("-f", "-r", "-100", url)
    assert p.stdout == data[-100:]
    p = curl("-f", "-o", str(served.tmp / "full.raw"), url)
    assert p.returncode == 0 and (served.tmp / "full.raw").read_bytes() == data


def test_curl_head_and_past_end(served: Served) -> None:
    url = f"{served.server.url}/v1/images/disk/raw/v1"
    p = curl("-I", url)
    head = p.stdout.decode().lower()
    assert "200" in head.splitlines()[0]
    assert f"content-length: {SIZE}" in head and "accept-ranges: bytes" in head
    p = curl("-o", "/dev/null", "-w", "%{http_code}", "-r", f"{SIZE}-{SIZE + 100}", url)
    assert p.stdout == b"416"
    p = curl("-o", "/dev/null", "-w", "%{http_code}", f"{served.server.url}/v1/images/disk/raw/nope")
    assert p.stdout == b"404"


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ref", ["v1", "@VID"])
def test_qemu_img_info_and_convert(served: Served, ref: str) -> None:
    url = f"{served.server.url}/v1/images/disk/raw/{ref.replace('VID', served.vid)}"
    p = qemu_img("info", "--output=json", url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual-size"] == SIZE
    out = served.tmp / f"out-{ref.strip('@')}.raw"
    # qemu's curl driver gives each request 5 s by default and can hang for good after a timeout
    # (seen under a loaded CI machine): give it the time a slow machine needs, as an operator would.
    opts = json.dumps({"driver": "raw", "file": {"driver": "http", "url": url, "timeout": 120}})
    p = qemu_img("convert", "-O", "raw", f"json:{opts}", str(out))
    assert p.returncode == 0, p.stderr
    p = qemu_img("compare", "-f", "raw", "-F", "raw", str(out), str(served.src))
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.stat().st_size == SIZE


def test_qemu_io_reads_through_http_driver(served: Served) -> None:
    """qemu's ``http`` driver with explicit options (as a -drive would use it), read-only."""
    data = served.src.read_bytes()
    url = f"{served.server.url}/v1/images/disk/raw/v1"
    opts = json.dumps({"driver": "raw", "file": {"driver": "http", "url": url, "readahead": 65536, "timeout": 120}})
    out = served.tmp / "qio.raw"
    p = qemu_img("convert", "-O", "raw", f"json:{opts}", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == data


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    s = start_server(tmp_path / "empty")
    p = curl("-f", f"{s.url}/v1/images")
    assert json.loads(p.stdout) == {"images": []}
    assert s.stop(signal.SIGINT) == 0


def test_port_in_use_fails_clearly(served: Served) -> None:
    port = served.server.url.rsplit(":", 1)[1]
    p = run_cli("serve", "--listen", f"127.0.0.1:{port}", data=served.tmp / "other", check=False)
    assert p.returncode == 2 and "address already in use" in p.stderr.lower() and "Traceback" not in p.stderr


def test_corrupt_chunk_cuts_the_stream_never_sends_it(tmp_path: Path) -> None:
    """Invariant 6 over a real socket: a corrupt chunk deep in the body ends the transfer short."""
    src = make_image(tmp_path / "c.img", 12 << 20, seed=3, data_fraction=1.0, pattern_every=12 << 20)
    data = src.read_bytes()
    repo = LocalRepository(tmp_path / "repo")
    import_image(repo, src, "c:v1")
    m = repo.resolve("c:v1")
    bad = (9 << 20) // m.chunk_size  # past the first 4 MiB batch: headers are already out
    corrupt_chunk(repo, m.digest_at(bad))
    repo.close()
    s = start_server(tmp_path / "repo")
    try:
        url = f"{s.url}/v1/images/c/raw/v1"
        out = tmp_path / "partial.raw"
        p = curl("-o", str(out), url)
        assert p.returncode != 0  # curl: transfer closed with bytes remaining
        got = out.read_bytes()
        assert len(got) <= bad * m.chunk_size and got == data[:len(got)]
        p = curl("-o", "/dev/null", "-w", "%{http_code}", "-r", f"{bad * m.chunk_size}-{bad * m.chunk_size + 9}", url)
        assert p.stdout == b"422"
        assert curl("-f", "-r", "0-99", url).stdout == data[:100]  # the server still serves
    finally:
        assert s.stop() == 0


# -- hostile input over a real socket (issue 17) ----------------------------------------------------
def _raw_http(url: str, head: bytes, *, timeout: float = 30) -> tuple[int, bytes]:
    """Send ``head`` (a request without a body) as is; the status and the headers of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sk:
        sk.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = sk.recv(65536)
            if not part:
                break
            answer += part
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize(("rng", "status"), [
    (b"bytes=\xb2-", 200),  # "²" in Latin-1, as the server decodes headers: not a number, ignored
    (b"bytes=0-\xb2", 200),
    (b"bytes=-\xb3", 200),
    (b"bytes=" + b"9" * 5000 + b"-", 416),  # past Python's 4,300-digit int limit: past the end
    (b"bytes=0-" + b"9" * 5000, 206),
    (b"bytes=-" + b"9" * 5000, 206),
])
def test_malformed_range_is_never_a_server_error(served: Served, rng: bytes, status: int) -> None:
    head = b"HEAD /v1/images/disk/raw/v1 HTTP/1.1\r\nHost: x\r\nRange: " + rng + b"\r\nConnection: close\r\n\r\n"
    assert _raw_http(served.server.url, head)[0] == status


def test_endless_chunked_body_gets_413_and_the_connection_closed(tmp_path: Path) -> None:
    """A chunked body that never ends: 413 once past --max-body, then the server closes the
    connection (it used to keep reading, and discarding, forever). Bounded: 64 MiB sent at most."""
    s = start_server(tmp_path / "repo", "--max-body", "100000")
    try:
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sk:
            sk.sendall(b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Content-Type: application/octet-stream\r\n\r\n")
            chunk = memoryview(b"%x\r\n" % 65536 + bytes(65536) + b"\r\n")
            sk.setblocking(False)
            answer, closed, sent, pos = b"", False, 0, 0
            while not closed and sent < 64 << 20:
                try:
                    n = sk.send(chunk[pos:])  # well framed: each chunk whole, however it is cut
                    sent, pos = sent + n, (pos + n) % len(chunk)
                except BlockingIOError:
                    select.select([sk], [sk], [], 1)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                try:
                    part = sk.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    closed = True
                    continue
                answer += part
                closed = closed or not part
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert closed, f"the server still read after {sent} bytes"
        assert curl("-f", f"{s.url}/v1/images").returncode == 0  # and it still serves
    finally:
        assert s.stop() == 0
