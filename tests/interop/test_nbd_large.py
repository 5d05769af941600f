"""Requests of any size the NBD specification allows (issue 15 item 4), with real clients.

Before, the server refused READ and WRITE above 32 MiB (EOVERFLOW) and the NBD project's
``integrityhuge`` test failed. Now such requests are streamed in pieces and the advertised maximum
payload is 0xffffffff. Checked here: qemu-io (which splits at 32 MiB itself, so this checks it
honours what we advertise), libnbd (nbdsh; its own ceiling is 64 MiB) with and without structured
replies, a libnbd stand-in for ``integrityhuge`` (random large reads and writes checked against a
reference copy), and raw 256 MiB requests while the server's RSS is sampled: what a huge request
holds stays far below its size. Against the development server (``python -m blockprov.nbd``) and
the agent (``blockprov attach``: a cache file over a repository).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from blockprov.imaging.importer import import_image
from blockprov.nbd import constants as c
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image
from tests.interop.conftest import NbdServerProcess, nbd_python, nbd_run
from tests.interop.test_nbd_hostile import _handshake, _recv_exactly
from tests.procs import nbd_uri, start_agent
from tests.unit.test_nbd_protocol import request

pytestmark = pytest.mark.interop

Start = Callable[..., NbdServerProcess]
MiB = 1 << 20
HUGE = 256 * MiB
# What a 256 MiB request may add to the server's RSS: a few 4 MiB pieces (received, being written,
# waiting) plus allocator slack. Whole-request buffering would add ≥ 256 MiB.
RSS_BOUND = 48 * MiB


@contextmanager
def _agent(tmp_path: Path, size: int) -> Iterator[tuple[str, int]]:
    """An agent serving a fresh version of ``size`` bytes (a tenth of it data): (socket, pid)."""
    repo = LocalRepository(tmp_path / "repo")
    import_image(repo, make_image(tmp_path / "g.img", size, seed=3, data_fraction=0.1), "big:v1")
    repo.close()
    sock = tmp_path / "nbd.sock"
    agent, _ = start_agent(tmp_path / "cache", "big:v1", sock, data=tmp_path / "repo")
    try:
        yield str(sock), agent.proc.pid
    finally:
        assert agent.stop() == 0


def _qemu_io_96m(uri: str) -> None:
    out = nbd_run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 96M", "-c", "read -P 0xab 0 96M",
                  "-c", "write -P 0xcd 1M 100M", "-c", "read -P 0xcd 1M 100M", "-c", "read -P 0xab 0 1M",
                  uri, timeout=180).stdout
    assert "verification failed" not in out and out.count("wrote ") == 2 and out.count("read ") == 3, out


NBDSH_64M = r"""
import os, sys, nbd
sock = sys.argv[1]
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_unix(sock)
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 0xFFFFFFFF, h.get_block_size(nbd.SIZE_MAXIMUM)
    blob = os.urandom(64 << 20)
    off = 5 * 4096 + 1536  # not aligned to a piece nor a chunk
    h.pwrite(blob, off)
    assert h.pread(64 << 20, off) == blob
    h.pwrite(blob[::-1], off, nbd.CMD_FLAG_FUA)
    assert h.pread(64 << 20, off) == blob[::-1]
    h.shutdown()
print("ok")
"""

# A stand-in for the NBD project's integrityhuge test with libnbd: large requests (up to libnbd's
# 64 MiB ceiling) at random 512-aligned offsets, writes and reads mixed and several in flight,
# every read compared with a reference copy kept here.
INTEGRITY = r"""
import random, sys, nbd
sock, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(15)
h = nbd.NBD()
h.connect_unix(sock)
ref = bytearray().join(h.pread(min(32 << 20, size - o), o) for o in range(0, size, 32 << 20))
inflight = []  # (cookie, buffer or None, offset, length, expected)

def complete(entry):
    cookie, buf, off, length, expected = entry
    while not h.aio_command_completed(cookie):
        h.poll(1)
    if buf is not None:
        assert buf.to_bytearray() == expected, (off, length)

for _ in range(rounds * 4):
    length = rng.randrange(1, 64 << 11) * 512
    off = rng.randrange(0, (size - length) // 512 + 1) * 512
    write = rng.random() < 0.5
    # In-flight requests have no order (proto.md): wait for those this one overlaps with a write.
    for e in [e for e in inflight if e[2] < off + length and off < e[2] + e[3] and (write or e[1] is None)]:
        complete(e)
        inflight.remove(e)
    if write:
        data = rng.randbytes(length)
        ref[off:off + length] = data
        inflight.append((h.aio_pwrite(data, off), None, off, length, None))
    else:
        buf = nbd.Buffer(length)
        inflight.append((h.aio_pread(buf, off), buf, off, length, bytes(ref[off:off + length])))
    while len(inflight) > 4:
        complete(inflight.pop(0))
for e in inflight:
    complete(e)
h.flush()
for o in range(0, size, 32 << 20):
    assert h.pread(min(32 << 20, size - o), o) == ref[o:o + (32 << 20)], o
h.shutdown()
print("ok")
"""


def _peak_rss_during_huge_requests(path: str, pid: int) -> tuple[int, int]:
    """A raw 256 MiB WRITE then a 256 MiB READ of it, sampling ``pid``'s RSS as the bytes flow:
    (peak growth during the write, during the read) over the RSS before each."""
    proc = psutil.Process(pid)
    piece = bytes([0x5A]) * MiB
    sock = _handshake(path)  # simple replies: the READ's data follows one header
    sock.settimeout(60)
    try:
        before = proc.memory_info().rss
        peak = before
        sock.sendall(request(c.Command.WRITE, 0, HUGE, handle=1))
        for _ in range(HUGE // MiB):
            sock.sendall(piece)
            peak = max(peak, proc.memory_info().rss)
        assert struct.unpack(">IIQ", _recv_exactly(sock, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
        write_growth = peak - before
        before = peak = proc.memory_info().rss
        sock.sendall(request(c.Command.READ, 0, HUGE, handle=2))
        assert struct.unpack(">IIQ", _recv_exactly(sock, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 2)
        for _ in range(HUGE // MiB):
            assert _recv_exactly(sock, MiB) == piece
            peak = max(peak, proc.memory_info().rss)
        return write_growth, peak - before
    finally:
        sock.close()


def test_development_server_large_requests(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "320M")
    nbd_run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", "-c", "read -P 0x11 0 4M", srv.uri())  # warm up
    # Measured first, on a fresh server: a memory device keeps what is written (256 MiB of pages),
    # so the WRITE may add that much plus what the request holds; the READ returns views, nothing.
    write_growth, read_growth = _peak_rss_during_huge_requests(srv.socket, srv.proc.pid)
    held = write_growth - HUGE
    print(f"dev server: RSS +{write_growth / MiB:.1f} MiB during the WRITE (256 MiB of it the data kept), "
          f"+{read_growth / MiB:.1f} MiB during the READ")
    assert held < RSS_BOUND, f"RSS grew {write_growth / MiB:.0f} MiB during a 256 MiB WRITE"
    assert read_growth < RSS_BOUND, f"RSS grew {read_growth / MiB:.0f} MiB during a 256 MiB READ"
    _qemu_io_96m(srv.uri())
    assert nbd_python(NBDSH_64M, srv.socket).strip() == "ok"
    assert nbd_python(INTEGRITY, srv.socket, str(320 * MiB), "12").strip() == "ok"


def test_agent_large_requests(tmp_path: Path) -> None:
    with _agent(tmp_path, 320 * MiB) as (path, pid):
        uri = nbd_uri(Path(path))
        nbd_run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", "-c", "read -P 0x11 0 4M", uri)  # warm up
        write_growth, read_growth = _peak_rss_during_huge_requests(path, pid)  # first, on a fresh agent
        print(f"agent: RSS +{write_growth / MiB:.1f} MiB during the WRITE, +{read_growth / MiB:.1f} MiB during "
              "the READ")
        assert write_growth < RSS_BOUND, f"agent RSS grew {write_growth / MiB:.0f} MiB during a 256 MiB WRITE"
        assert read_growth < RSS_BOUND, f"agent RSS grew {read_growth / MiB:.0f} MiB during a 256 MiB READ"
        nbd_run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 32M", uri)  # the 256 MiB write is in the cache
        _qemu_io_96m(uri)
        assert nbd_python(NBDSH_64M, path).strip() == "ok"
        assert nbd_python(INTEGRITY, path, str(320 * MiB), "12").strip() == "ok"


def test_a_gigabyte_announced_and_never_sent_costs_a_piece(nbd_server: Start) -> None:
    """Issue 17 with requests of any size: a WRITE header announcing 1 GiB, a little of it sent,
    then silence: the server holds a piece, not a gigabyte, and drops the peer at its frame
    timeout while serving others."""
    srv = nbd_server("--memory", "2G", "--frame-timeout", "2")
    proc = psutil.Process(srv.proc.pid)
    nbd_run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", srv.uri())
    before = proc.memory_info().rss
    socks = [_handshake(srv.socket) for _ in range(8)]
    try:
        for i, s in enumerate(socks):
            s.sendall(request(c.Command.WRITE, i * MiB, 1 << 30, handle=i) + bytes(4096))
        out = nbd_run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4M", srv.uri()).stdout
        assert "verification failed" not in out, out
        grown = proc.memory_info().rss - before
        assert grown < 16 * MiB, f"RSS grew {grown / MiB:.0f} MiB for 8 announced 1 GiB writes"
        for s in socks:
            s.settimeout(30)
            with pytest.raises((ConnectionError, socket.timeout)) as info:
                _recv_exactly(s, 1)  # closed by the server after its frame timeout
            assert info.type is not socket.timeout
    finally:
        for s in socks:
            s.close()
