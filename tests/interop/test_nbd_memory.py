"""The NBD server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd (nbdsh), fio."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerProcess, nbd_python, nbd_run

pytestmark = pytest.mark.interop

Start = Callable[..., NbdServerProcess]
MiB = 1 << 20


def test_qemu_img_info(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M")
    info = json.loads(nbd_run("qemu-img", "info", "--output=json", srv.uri()).stdout)
    assert info["virtual-size"] == 64 * MiB and info["format"] == "raw"


def test_qemu_io(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M")
    out = nbd_run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 1M",
        "-c", "read -P 0xab 0 1M",
        "-c", "discard 0 64k",
        "-c", "read -P 0 0 64k",
        "-c", "read -P 0xab 64k 960k",
        "-c", "write -z 1M 64k",
        "-c", "read -P 0 1M 64k",
        "-c", "write -P 0x5a 3M 4k",
        "-c", "write -P 0x11 2053000 3000",  # unaligned: qemu does the read-modify-write
        "-c", "read -P 0x11 2053000 3000",
        "-c", "aio_write -P 0x22 8M 64k",
        "-c", "aio_write -P 0x33 9M 64k",
        "-c", "aio_flush",
        "-c", "read -P 0x22 8M 64k",
        "-c", "read -P 0x33 9M 64k",
        "-c", "flush",
        srv.uri(),
    ).stdout
    assert "verification failed" not in out and "error" not in out.lower(), out
    mapping = json.loads(nbd_run("nbdinfo", "--map", "--json", srv.uri()).stdout)
    by_offset = {m["offset"]: (m["length"], m["type"]) for m in mapping}
    assert by_offset[0] == (64 * 1024, 3)  # discarded: hole, zero
    assert by_offset[64 * 1024] == (MiB - 64 * 1024, 0)  # data
    assert by_offset[MiB] == (64 * 1024, 2)  # zeroed, kept allocated (qemu-io sends NO_HOLE)
    assert sum(m["length"] for m in mapping) == 64 * MiB


def test_nbdinfo_capabilities(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M", "--description", "blockprov test")
    for cap in ("flush", "trim", "zero", "fast-zero", "multi-conn", "fua", "cache", "df", "write"):
        assert nbd_run("nbdinfo", f"--can={cap}", srv.uri(), check=False).returncode == 0, cap
    assert nbd_run("nbdinfo", "--is=read-only", srv.uri(), check=False).returncode != 0
    info = json.loads(nbd_run("nbdinfo", "--json", srv.uri()).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 64 * MiB
    assert export["block_size_minimum"] == 512 and export["block_size_maximum"] == 0xFFFFFFFF
    assert export["description"] == "blockprov test"
    assert "base:allocation" in export["contexts"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True


def test_nbdinfo_lists_exports_and_read_only(nbd_server: Start) -> None:
    srv = nbd_server("--export", "alpha=16M", "--export", "beta=8M:ro")
    out = nbd_run("nbdinfo", "--list", "--json", srv.uri("alpha")).stdout
    names = sorted(e["export-name"] for e in json.loads(out)["exports"])
    assert names == ["alpha", "beta"]
    assert nbd_run("nbdinfo", "--is=read-only", srv.uri("beta"), check=False).returncode == 0
    for cap in ("trim", "zero"):
        assert nbd_run("nbdinfo", f"--can={cap}", srv.uri("beta"), check=False).returncode != 0
    assert nbd_run("nbdinfo", "--size", srv.uri("beta")).stdout.strip() == str(8 * MiB)
    assert nbd_run("nbdinfo", "--size", srv.uri("")).stdout.strip() == str(16 * MiB)  # default: first export
    bad = nbd_run("nbdinfo", srv.uri("nope"), check=False)
    assert bad.returncode != 0


def test_nbdcopy_round_trip(nbd_server: Start, tmp_path: Path) -> None:
    srv = nbd_server("--memory", "64M")
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 3):  # data and holes
            f.seek(i * MiB)
            f.write(os.urandom(MiB - 4096 * i))
    nbd_run("nbdcopy", str(src), srv.uri())
    out = tmp_path / "out.raw"
    nbd_run("nbdcopy", srv.uri(), str(out))
    assert out.read_bytes() == src.read_bytes()
    nbd_run("nbdcopy", "--request-size=1048576", "--connections=4", srv.uri(), "null:")
    nbd_run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri())


def test_libnbd_corner_cases(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M", "--export", "ro=1M:ro")
    out = nbd_python(
        r'''
import errno, sys, nbd
sock = sys.argv[1]

h = nbd.NBD()
h.set_strict_mode(0)
try:  # without a negotiated metadata context block status is refused by the server
    h.connect_unix(sock)
    h.block_status(4096, 0, lambda *a: 0)
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
else:
    raise AssertionError("block status without a context")
h.shutdown()

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_unix(sock)
assert h.can_meta_context("base:allocation")
size = h.get_size()
assert size == 64 << 20
h.set_strict_mode(0)  # let invalid requests reach the server
for bad in [(512, size), (512, size - 256), (0, 0)]:
    try:
        h.pread(*bad)
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, (bad, e)
    else:
        raise AssertionError(f"{bad} did not fail")
h.pwrite(b"x" * 4096, 0)
assert h.pread(4096, 0) == b"x" * 4096  # the connection still works
try:
    h.pwrite(b"y" * 512, size)
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.pread(512, 1)  # not aligned to the 512-byte minimum block size libnbd agreed to
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert len(h.pread(64 << 20, 0)) == 64 << 20  # over 32 MiB: streamed (no maximum is advertised)
assert h.pread(4096, 0) == b"x" * 4096
h.pwrite(b"z" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(4096, 16384, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 16384) == bytes(4096)
h.trim(65536, 65536)
h.cache(4096, 0)
h.flush()
seen = []
def extent(meta, offset, entries, err):
    seen.extend(entries)
h.block_status(1 << 20, 0, extent)
assert seen[:2] == [65536, 0] and sum(seen[0::2]) == 1 << 20, seen
seen.clear()
h.block_status(1 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 2, seen
assert h.pread(4096, 8192) == b"z" * 4096
h.shutdown()

# unknown export: NBD_OPT_GO fails, NBD_REP_ERR_UNKNOWN
h = nbd.NBD()
h.set_export_name("nope")
try:
    h.connect_unix(sock)
except nbd.Error as e:
    print("unknown export:", e)
else:
    raise AssertionError("unknown export accepted")

# read-only export refuses writes with EPERM (checked by the server, not libnbd)
h = nbd.NBD()
h.set_export_name("ro")
h.connect_unix(sock)
assert h.is_read_only() and not h.can_trim() and not h.can_zero()
h.set_strict_mode(0)
for op in (lambda: h.pwrite(b"w" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        op()
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
    else:
        raise AssertionError("write to a read-only export succeeded")
assert h.pread(512, 0) == bytes(512)
h.shutdown()

# option haggling: list, info, abort
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
names = []
h.opt_list(lambda name, desc: names.append(name))
assert sorted(names) == ["", "ro"], names
h.set_export_name("ro")
h.opt_info()
assert h.get_size() == 1 << 20
h.opt_abort()

# without structured replies: simple replies, errors still keep the connection
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_unix(sock)
assert not h.get_structured_replies_negotiated()
h.set_strict_mode(0)
try:
    h.pread(512, size)
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(4096, 0) == b"x" * 4096
h.shutdown()
print("ok")
''',
        srv.socket,
    )
    assert out.strip().endswith("ok"), out


def test_fast_zero_refused(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "16M", "--no-fast-zero")
    out = nbd_python(
        r'''
import errno, sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
assert h.can_fast_zero()
h.pwrite(b"a" * 4096, 0)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
else:
    raise AssertionError("fast zero accepted")
assert h.pread(4096, 0) == b"a" * 4096
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()
print("ok")
''',
        srv.socket,
    )
    assert out.strip() == "ok"


def test_tcp_port_zero(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M", "--listen", "127.0.0.1:0")
    assert srv.address.startswith("tcp:127.0.0.1:") and not srv.address.endswith(":0")
    info = json.loads(nbd_run("qemu-img", "info", "--output=json", srv.uri()).stdout)
    assert info["virtual-size"] == 64 * MiB
    nbd_run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "read -P 0x42 0 1M", srv.uri())
    assert nbd_run("nbdinfo", "--size", srv.uri()).stdout.strip() == str(64 * MiB)


def test_many_connections_see_one_disk(nbd_server: Start) -> None:
    srv = nbd_server("--memory", "64M")
    writers = [
        subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x10 + i} {i}M 1M", srv.uri()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    for p in writers:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    out = nbd_python(
        r'''
import sys, nbd
handles = []
for _ in range(4):
    h = nbd.NBD()
    h.connect_unix(sys.argv[1])
    assert h.can_multi_conn()
    handles.append(h)
for h in handles:
    for i in range(8):
        assert h.pread(1 << 20, i << 20) == bytes([0x10 + i]) * (1 << 20), i
# a write on one connection, flushed, is seen by all others
handles[0].pwrite(b"m" * 4096, 32 << 20)
handles[0].flush()
for h in handles[1:]:
    assert h.pread(4096, 32 << 20) == b"m" * 4096
for h in handles:
    h.shutdown()
print("ok")
''',
        srv.socket,
    )
    assert out.strip() == "ok"


def test_fio_verify_at_queue_depth(nbd_server: Start, tmp_path: Path) -> None:
    srv = nbd_server("--memory", "64M")
    nbd_run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri()}", "--rw=randwrite", "--bs=4k,64k",
        "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        f"--filename_format={tmp_path}/x", "--output-format=json", timeout=120,
    )
