"""The asyncio NBD server in-process, with a minimal client: error mapping, pipelining, sendfile, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockprov.device.base import FileSegment, ReadResult
from blockprov.device.memory import MemoryDevice
from blockprov.errors import IntegrityError, InvalidRequest, NoSpace
from blockprov.nbd import constants as c
from blockprov.nbd.constants import Command, CommandFlag, Info, NbdError, Option
from blockprov.nbd.server import NbdServer, errno_for
from blockprov.nbd.writer import BATCH_BYTES
from tests.unit.test_nbd_protocol import client_flags, go_data, meta_data, option, request

MiB = 1 << 20


class Client:
    """Just enough of an NBD client to drive the server from a test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.structured = False
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, address: str | tuple[str, int], export: str = "", *, structured: bool = True) -> Client:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        self = cls(reader, writer)
        greeting = await reader.readexactly(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        wire = client_flags()
        if structured:
            wire += option(Option.STRUCTURED_REPLY) + option(Option.SET_META_CONTEXT,
                                                             meta_data(export, "base:allocation"))
        wire += option(Option.GO, go_data(export, Info.BLOCK_SIZE))
        writer.write(wire)
        while True:
            _, opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
            payload = await reader.readexactly(length)
            if rtype >= 1 << 31:
                raise ConnectionError(f"option {opt} failed: {rtype:#x} {payload!r}")
            if opt == Option.STRUCTURED_REPLY:
                self.structured = True
            if opt == Option.GO and rtype == c.Reply.INFO and payload[:2] == b"\x00\x00":
                self.size, self.flags = struct.unpack(">QH", payload[2:])
            if opt == Option.GO and rtype == c.Reply.ACK:
                return self

    def send(self, cmd: int, offset: int = 0, length: int = 0, *, handle: int = 1, flags: int = 0,
             data: bytes = b"") -> None:
        self.writer.write(request(cmd, offset, length, handle=handle, flags=flags, data=data))

    async def reply(self, read_length: int | dict[int, int] = 0) -> tuple[int, int, bytes]:
        """(handle, error, data) of the next complete reply (``read_length``: of a simple READ
        reply's data, or by handle when replies to several requests may come)."""
        magic = struct.unpack(">I", await self.reader.readexactly(4))[0]
        if magic == c.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", await self.reader.readexactly(12))
            if isinstance(read_length, dict):
                read_length = read_length.get(handle, 0)
            data = await self.reader.readexactly(read_length) if read_length and not error else b""
            return handle, error, data
        assert magic == c.STRUCTURED_REPLY_MAGIC
        data = b""
        error = 0
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", await self.reader.readexactly(16))
            payload = await self.reader.readexactly(length)
            if rtype == c.ReplyType.OFFSET_DATA:
                data += payload[8:]
            elif rtype == c.ReplyType.BLOCK_STATUS:
                data += payload
            elif rtype & 0x8000:
                error = struct.unpack_from(">I", payload)[0]
            if flags & c.REPLY_FLAG_DONE:
                return handle, error, data
            magic = struct.unpack(">I", await self.reader.readexactly(4))[0]

    async def call(self, cmd: int, offset: int = 0, length: int = 0, **kw: Any) -> tuple[int, bytes]:
        self.send(cmd, offset, length, **kw)
        _, error, data = await self.reply(length if cmd == Command.READ else 0)
        return error, data

    async def close(self) -> None:
        self.send(Command.DISC)
        await self.writer.drain()
        assert await self.reader.read() == b""
        self.writer.close()


def serve(exports: dict[str, Any], test: Callable[[NbdServer, str], Awaitable[None]], tmp_path: Path,
          *, use_uvloop: bool = False, **kw: Any) -> NbdServer:
    server = NbdServer(exports, **kw)

    async def main() -> None:
        path = await server.start_unix(tmp_path / "nbd.sock")
        try:
            await asyncio.wait_for(test(server, path), 30)
        finally:
            await server.close()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    return server


class FaultyDevice(MemoryDevice):
    """Raises what a test asks for at chosen offsets. ``at_hand``: its reads are answered by the
    server's fast path (``read_now``), else every one goes through ``read`` (the slow path)."""

    faults: dict[int, BaseException]

    def __init__(self, size: int, *, at_hand: bool = True) -> None:
        super().__init__(size)
        self.faults = {}
        self.at_hand = at_hand

    def read_now(self, offset: int, length: int) -> ReadResult | None:  # type: ignore[override]
        return self._read(offset, length) if self.at_hand else None

    async def read(self, offset: int, length: int) -> ReadResult:
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> ReadResult:
        if offset in self.faults:
            raise self.faults[offset]
        return MemoryDevice.read_now(self, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        if offset in self.faults:
            raise self.faults[offset]
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("at_hand", [True, False])
@pytest.mark.parametrize("structured", [True, False])
def test_device_errors_are_mapped_and_the_connection_lives(tmp_path: Path, structured: bool, at_hand: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    dev = FaultyDevice(4 * MiB, at_hand=at_hand)
    dev.faults = {
        4096: NoSpace("full"),
        8192: InvalidRequest("nope"),
        12288: IntegrityError("bad chunk"),
        16384: RuntimeError("bug"),
    }

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=structured)
        for offset, error in [(4096, NbdError.ENOSPC), (8192, NbdError.EINVAL), (12288, NbdError.EIO),
                              (16384, NbdError.EIO)]:
            assert await client.call(Command.READ, offset, 4096) == (error, b"")
            assert await client.call(Command.WRITE, offset, 512, data=b"x" * 512) == (error, b"")
        assert await client.call(Command.WRITE, 0, 512, data=b"y" * 512) == (0, b"")
        assert await client.call(Command.READ, 0, 512) == (0, b"y" * 512)
        await client.close()

    with caplog.at_level(logging.INFO, logger="blockprov.nbd"):
        server = serve({"": dev}, test, tmp_path)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2 and all("bug" in str(r.exc_info[1]) for r in tracebacks if r.exc_info)
    assert server.stats.errors == 8
    assert server.stats.connections_total == 1 and server.stats.connections_active == 0


def test_errno_table() -> None:
    assert errno_for(NoSpace("x")) == NbdError.ENOSPC
    assert errno_for(ValueError()) == NbdError.EIO
    assert c.error_from_name("EDQUOT") == NbdError.ENOSPC
    assert c.error_from_name("EWHATEVER") == NbdError.EIO


def test_development_server_arguments() -> None:
    from blockprov.nbd.__main__ import _parse_args

    a = _parse_args(["--memory", "64M", "--export", "b=1GiB:ro", "--export", "c=4096", "--socket", "/tmp/s"])
    assert a.memory == 64 * MiB and a.export == [("b", 1 << 30, True), ("c", 4096, False)]
    for bad in (["--memory", "lots"], ["--memory", "-1"], ["--export", "b"], ["--export", "b=1M:rw"]):
        with pytest.raises(SystemExit):
            _parse_args([*bad, "--socket", "/tmp/s"])


def test_pipelined_requests_with_backpressure(tmp_path: Path) -> None:
    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path)
        payloads = {h: bytes([h]) * 65536 for h in range(1, 201)}
        for h, data in payloads.items():
            client.send(Command.WRITE, h * 65536, 65536, handle=h, data=data)
        for _ in payloads:
            _, error, _ = await client.reply()
            assert error == 0
        for h in payloads:
            client.send(Command.READ, h * 65536, 65536, handle=h)
        for _ in payloads:
            h, error, data = await client.reply(65536)
            assert error == 0 and data == payloads[h]
        client.send(Command.BLOCK_STATUS, 0, 2 * 65536, handle=7)
        _, error, data = await client.reply()
        assert error == 0
        assert struct.unpack(">IIIII", data) == (c.BASE_ALLOCATION_ID, 65536, 3, 65536, 0)
        await client.close()

    server = serve({"": MemoryDevice(64 * MiB)}, test, tmp_path, max_in_flight=4, max_buffered=256 * 1024)
    assert server.stats.requests == 401
    assert server.stats.bytes_written == server.stats.bytes_read == 200 * 65536


def test_write_zeroes_fast_zero_and_flush(tmp_path: Path) -> None:
    dev = MemoryDevice(4 * MiB, fast_zero=False)

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path)
        assert client.flags & c.TransmissionFlag.SEND_FAST_ZERO
        assert await client.call(Command.WRITE, 0, 4096, data=b"q" * 4096) == (0, b"")
        fast = CommandFlag.FAST_ZERO
        assert await client.call(Command.WRITE_ZEROES, 0, 4096, flags=fast) == (NbdError.ENOTSUP, b"")
        assert await client.call(Command.READ, 0, 4096) == (0, b"q" * 4096)
        assert await client.call(Command.WRITE_ZEROES, 0, 4096, flags=CommandFlag.NO_HOLE) == (0, b"")
        assert await client.call(Command.READ, 0, 4096) == (0, bytes(4096))
        assert await client.call(Command.FLUSH) == (0, b"")
        assert await client.call(Command.CACHE, 0, 4096) == (0, b"")
        assert await client.call(Command.TRIM, 0, 4096, flags=CommandFlag.FUA) == (0, b"")
        await client.close()

    serve({"": dev}, test, tmp_path)
    assert dev.flushes == 1


class FileDevice(MemoryDevice):
    """Reads come back as FileSegments of a data file (as the cache returns them). ``at_hand``:
    answered by the server's fast path (``read_now``), else through ``read``."""

    def __init__(self, path: Path, size: int, *, at_hand: bool = True) -> None:
        super().__init__(size)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size // 2)  # the second half is past the end of the file: zeros
        self.at_hand = at_hand

    def read_now(self, offset: int, length: int) -> ReadResult | None:  # type: ignore[override]
        return self._segments(offset, length) if self.at_hand else None

    async def read(self, offset: int, length: int) -> ReadResult:
        return self._segments(offset, length)

    def _segments(self, offset: int, length: int) -> ReadResult:
        half = length // 2
        return [FileSegment(self.fd, offset, half), b"-" * 0, FileSegment(self.fd, offset + half, length - half)]

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        os.pwrite(self.fd, data, offset)


@pytest.mark.parametrize(("use_uvloop", "at_hand"), [(False, True), (True, True), (True, False)])
def test_file_segments_are_sent(tmp_path: Path, use_uvloop: bool, at_hand: bool) -> None:
    dev = FileDevice(tmp_path / "data", 8 * MiB, at_hand=at_hand)
    blob = os.urandom(2 * MiB)

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path)
        assert await client.call(Command.WRITE, 0, len(blob), data=blob) == (0, b"")
        for _ in range(3):  # several in flight: replies must not interleave
            client.send(Command.READ, 0, 2 * MiB, handle=1)
            client.send(Command.READ, 4096, 4096, handle=2)
            client.send(Command.READ, 3 * MiB, 2 * MiB, handle=3)  # straddles the end of the file
        for _ in range(9):
            handle, error, data = await client.reply()
            assert error == 0
            expected = {1: blob, 2: blob[4096:8192], 3: bytes(2 * MiB)}[handle]
            assert data == expected
        await client.close()

    server = serve({"": dev}, test, tmp_path, use_uvloop=use_uvloop)
    os.close(dev.fd)
    assert server.stats.sendfile_bytes >= 3 * 2 * MiB  # zero copy under both loops


@pytest.mark.parametrize("at_hand", [True, False])
def test_a_data_file_that_fails_is_eio_and_the_connection_lives(tmp_path: Path, at_hand: bool) -> None:
    """A read of the data file that fails (here: EISDIR, the device's descriptor swapped for a
    directory's) is an EIO reply, small reads (pread in the loop) and large ones (sendfile) alike,
    on the fast path and the slow one; the connection goes on being served."""
    dev = FileDevice(tmp_path / "data", 8 * MiB, at_hand=at_hand)

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=True)
        assert await client.call(Command.READ, 0, 4096) == (0, bytes(4096))
        good, dev.fd = dev.fd, os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for length in (4096, MiB):
                assert await client.call(Command.READ, 0, length) == (NbdError.EIO, b"")
        finally:
            os.close(dev.fd)
            dev.fd = good
        assert await client.call(Command.READ, 0, 4096) == (0, bytes(4096))
        await client.close()

    server = serve({"": dev}, test, tmp_path, use_uvloop=True)
    os.close(dev.fd)
    assert server.stats.errors == 2 and server.stats.requests == 4


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_peer_gone_during_sendfile(tmp_path: Path, use_uvloop: bool) -> None:
    """A client that asks for far more than the socket buffers and disconnects without reading:
    the reply being sent with sendfile stops, the connection ends, the server keeps serving."""
    dev = FileDevice(tmp_path / "data", 64 * MiB)
    os.ftruncate(dev.fd, 64 * MiB)

    async def test(server: NbdServer, path: str) -> None:
        gone = await Client.connect(path)
        for h in range(8):
            gone.send(Command.READ, 0, 32 * MiB, handle=h)
        await gone.writer.drain()
        for _ in range(100):
            if server.stats.sendfile_bytes:
                break
            await asyncio.sleep(0.01)
        gone.writer.transport.abort()
        for _ in range(500):
            if server.stats.connections_active == 0:
                break
            await asyncio.sleep(0.01)
        assert server.stats.connections_active == 0
        other = await Client.connect(path)
        assert await other.call(Command.READ, 0, 4096) == (0, bytes(4096))
        await other.close()

    logging.getLogger("blockprov.nbd").setLevel(logging.CRITICAL)  # the dropped reply is logged
    try:
        serve({"": dev}, test, tmp_path, use_uvloop=use_uvloop)
    finally:
        logging.getLogger("blockprov.nbd").setLevel(logging.NOTSET)
        os.close(dev.fd)


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_replies_never_read_fill_the_budget_and_the_peer_is_dropped(tmp_path: Path, use_uvloop: bool) -> None:
    """Issue 27 item 6, in-process under both loops: READ 0+32 MiB (sent from the file, holding the
    output) and then 2,000 READs of 120 KiB (read into memory, queued behind it), never reading a
    reply. The server stops reading requests once 64 are in flight or waiting (max_in_flight) or the
    transport holds more than its high-water mark, drops
    the peer after write_timeout, and serves another client meanwhile."""
    dev = FileDevice(tmp_path / "data", 64 * MiB)
    os.ftruncate(dev.fd, 64 * MiB)

    async def test(server: NbdServer, path: str) -> None:
        flood = await Client.connect(path)
        flood.send(Command.READ, 0, 32 * MiB, handle=0)
        for h in range(1, 2001):
            flood.send(Command.READ, (h % 400) * 131072, 120 * 1024, handle=h)
        with contextlib.suppress(TimeoutError):  # the server stops reading: our writes stop too
            await asyncio.wait_for(flood.writer.drain(), 1.0)
        await asyncio.sleep(0.3)
        started = server.stats.requests
        other = await Client.connect(path)
        assert await other.call(Command.READ, 4096, 4096) == (0, bytes(4096))
        await other.close()
        for _ in range(200):  # bounded: write_timeout is 1 s
            if server.stats.write_timeouts:
                break
            await asyncio.sleep(0.05)
        # the budget, the big READ, and the replies answered at once (the fast path) that went to
        # the transport before the big one held the output: at most one batch's worth
        assert started <= 64 + 1 + BATCH_BYTES // (120 * 1024) + 1, started
        assert server.stats.write_timeouts == 1
        flood.writer.transport.abort()

    logging.getLogger("blockprov.nbd").setLevel(logging.CRITICAL)  # the drop is logged
    try:
        serve({"": dev}, test, tmp_path, use_uvloop=use_uvloop, write_timeout=1.0)
    finally:
        logging.getLogger("blockprov.nbd").setLevel(logging.NOTSET)
        os.close(dev.fd)


def test_bad_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async def test(server: NbdServer, path: str) -> None:
        good = await Client.connect(path)
        bad = await Client.connect(path)
        bad.writer.write(b"\xde\xad\xbe\xef" + bytes(24))
        assert await bad.reader.read() == b""
        assert await good.call(Command.READ, 0, 512) == (0, bytes(512))
        await good.close()

    server = serve({"": MemoryDevice(MiB)}, test, tmp_path)
    assert server.stats.protocol_errors == 1


def test_close_waits_for_requests_in_flight(tmp_path: Path) -> None:
    class SlowDevice(MemoryDevice):
        async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
            await asyncio.sleep(0.3)
            await super().write(offset, data, fua=fua)

    dev = SlowDevice(MiB)

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path)
        client.send(Command.WRITE, 0, 512, handle=5, data=b"w" * 512)
        await client.writer.drain()
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(server.close())
        assert await client.reply() == (5, 0, b"")
        assert await client.reader.read() == b""
        await closing

    serve({"": dev}, test, tmp_path)
    assert asyncio.run(dev.read(0, 512)) == [b"w" * 512]


def test_tcp_port_zero_and_named_exports(tmp_path: Path) -> None:
    exports = {"a": MemoryDevice(MiB), "b": MemoryDevice(2 * MiB, read_only=True)}

    async def main() -> None:
        server = NbdServer(exports, description="test server")
        host, port = await server.start_tcp("127.0.0.1", 0)
        assert port > 0 and server.addresses == [(host, port)]
        try:
            a = await Client.connect((host, port), "a")
            b = await Client.connect((host, port), "b")
            default = await Client.connect((host, port), "")
            assert (a.size, b.size, default.size) == (MiB, 2 * MiB, MiB)
            assert b.flags & c.TransmissionFlag.READ_ONLY
            assert await b.call(Command.WRITE, 0, 512, data=bytes(512)) == (NbdError.EPERM, b"")
            assert await b.call(Command.READ, 0, 512) == (0, bytes(512))
            with pytest.raises(ConnectionError, match="0x80000006"):
                await Client.connect((host, port), "missing")
            for client in (a, b, default):
                await client.close()
            assert server.stats.connections_total == 4
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_peer_silent_in_the_middle_of_a_frame_is_dropped(tmp_path: Path, use_uvloop: bool) -> None:
    """Issue 17: a half-sent WRITE, a half-sent header and an unfinished handshake are dropped
    after the frame timeout; a client idle between requests, and one busy meanwhile, are not."""

    async def test(server: NbdServer, path: str) -> None:
        idle = await Client.connect(path)  # between requests: a quiet disk, kept
        half_write = await Client.connect(path)
        half_write.writer.write(request(Command.WRITE, 0, 32 * MiB, handle=1) + b"w" * 4096)
        half_header = await Client.connect(path)
        half_header.writer.write(request(Command.READ, 0, 4096, handle=2)[:13])
        no_handshake, nh_writer = await asyncio.open_unix_connection(path)  # greeting sent, never answered
        busy = await Client.connect(path)
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.2  # a few timeouts: the silent ones must be gone by then
        n = 0
        while loop.time() < until:
            n += 1
            assert await busy.call(Command.WRITE, 0, 4096, data=bytes([n % 256]) * 4096, handle=n) == (0, b"")
            await asyncio.sleep(0.01)
        for silent in (half_write, half_header):
            assert await asyncio.wait_for(silent.reader.read(), 5) == b""  # closed by the server
        assert len(await asyncio.wait_for(no_handshake.read(), 5)) == 18  # the greeting, then closed
        assert server.stats.timeouts == 3 and server.stats.connections_active == 2
        assert await idle.call(Command.READ, 0, 4096) == (0, bytes([n % 256]) * 4096)
        await idle.close()
        await busy.close()
        nh_writer.close()

    serve({"": MemoryDevice(64 * MiB)}, test, tmp_path, use_uvloop=use_uvloop, frame_timeout=0.3)


def test_time_the_server_spends_not_reading_is_not_the_peers_silence(tmp_path: Path) -> None:
    """A client whose requests wait on a slow device (reading paused by max_in_flight) while the
    rest of its pipeline sits half-read is not timed out for our own pause."""

    class SlowDevice(MemoryDevice):
        async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
            await asyncio.sleep(0.5)
            await super().write(offset, data, fua=fua)

    async def test(server: NbdServer, path: str) -> None:
        cl = await Client.connect(path)
        for h in range(4):  # 2 admitted at once; the rest waits in the socket, unread
            cl.send(Command.WRITE, h * 4096, 4096, handle=h, data=b"s" * 4096)
        await cl.writer.drain()
        replies = [await asyncio.wait_for(cl.reply(), 5) for _ in range(4)]
        assert sorted(h for h, _, _ in replies) == [0, 1, 2, 3] and all(e == 0 for _, e, _ in replies)
        assert server.stats.timeouts == 0
        await cl.close()

    serve({"": SlowDevice(1 * MiB)}, test, tmp_path, frame_timeout=0.3, max_in_flight=2)


# --- requests of any size (issue 15 item 4) ---------------------------------------------------


@pytest.mark.parametrize(("structured", "use_uvloop", "files"),
                         [(True, False, False), (False, True, False), (True, True, True), (False, False, True)])
def test_large_requests_are_streamed(tmp_path: Path, structured: bool, use_uvloop: bool, files: bool) -> None:
    """A 40 MiB WRITE and READ at an unaligned offset, with small requests pipelined around them:
    the replies do not interleave, the data round-trips, the READ went out in pieces."""
    size = 64 * MiB
    dev: MemoryDevice = FileDevice(tmp_path / "data", size) if files else MemoryDevice(size)
    if files:
        os.ftruncate(dev.fd, size)  # type: ignore[attr-defined]
    blob = os.urandom(40 * MiB)
    offset = 3 * MiB + 4096

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=structured)
        client.send(Command.WRITE, 0, 4096, handle=1, data=b"a" * 4096)
        client.send(Command.WRITE, offset, len(blob), handle=2, data=blob, flags=CommandFlag.FUA)
        client.send(Command.READ, 0, 4096, handle=3)
        replies = {}
        for _ in range(3):
            handle, error, data = await client.reply({3: 4096})
            replies[handle] = (error, data)
        assert replies == {1: (0, b""), 2: (0, b""), 3: (0, b"a" * 4096)}
        client.send(Command.READ, offset, len(blob), handle=4)
        client.send(Command.READ, 0, 4096, handle=5)
        got = {}
        for _ in range(2):
            handle, error, data = await client.reply({4: len(blob), 5: 4096})
            got[handle] = (error, data)
        assert got[4] == (0, blob) and got[5] == (0, b"a" * 4096)
        await client.close()

    server = serve({"": dev}, test, tmp_path, use_uvloop=use_uvloop)
    if files:
        os.close(dev.fd)  # type: ignore[attr-defined]
        assert server.stats.sendfile_bytes >= 30 * MiB
    assert server.stats.requests == 5 and server.stats.errors == 0


@pytest.mark.parametrize("structured", [True, False])
def test_streamed_write_failing_half_way(tmp_path: Path, structured: bool) -> None:
    """A piece fails: the pieces before it are written, those after it are received but not
    written, the request gets the error, and the connection lives."""
    dev = FaultyDevice(64 * MiB)
    dev.faults = {16 * MiB: NoSpace("full")}

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=structured)
        assert await client.call(Command.WRITE, 0, 48 * MiB, data=b"n" * (48 * MiB)) == (NbdError.ENOSPC, b"")
        assert await client.call(Command.READ, 0, 4096) == (0, b"n" * 4096)
        assert await client.call(Command.READ, 16 * MiB - 4096, 4096) == (0, b"n" * 4096)
        assert await client.call(Command.READ, 20 * MiB, 4096) == (0, bytes(4096))  # after the failure: old
        await client.close()

    server = serve({"": dev}, test, tmp_path)
    assert server.stats.errors == 1


def test_streamed_read_failing_half_way(tmp_path: Path) -> None:
    """Structured replies: the pieces sent, then an error chunk at the failing offset; simple
    replies cannot say it once the header is out, so the connection is dropped."""
    dev = FaultyDevice(64 * MiB)
    dev.faults = {12 * MiB: IntegrityError("bad chunk")}

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=True)
        client.send(Command.READ, 0, 40 * MiB, handle=7)
        handle, error, data = await client.reply()
        assert (handle, error, len(data)) == (7, NbdError.EIO, 12 * MiB)
        assert await client.call(Command.READ, 0, 4096) == (0, bytes(4096))
        await client.close()
        simple = await Client.connect(path, structured=False)
        simple.send(Command.READ, 0, 40 * MiB, handle=8)
        header = await simple.reader.readexactly(16)
        assert struct.unpack(">IIQ", header) == (c.SIMPLE_REPLY_MAGIC, 0, 8)
        rest = await simple.reader.read(-1)  # dropped after what went out
        assert len(rest) == 12 * MiB
        simple.writer.close()

    serve({"": dev}, test, tmp_path)


def test_large_read_under_df_is_one_chunk(tmp_path: Path) -> None:
    """NBD_CMD_FLAG_DF (don't fragment): a 40 MiB READ is one OFFSET_DATA chunk, its data streamed."""
    dev = MemoryDevice(64 * MiB)
    blob = os.urandom(40 * MiB)

    async def test(server: NbdServer, path: str) -> None:
        client = await Client.connect(path, structured=True)
        assert await client.call(Command.WRITE, 4096, len(blob), data=blob) == (0, b"")
        client.send(Command.READ, 4096, len(blob), handle=3, flags=CommandFlag.DF)
        magic, flags, rtype, handle, length, offset = struct.unpack(">IHHQIQ", await client.reader.readexactly(28))
        assert (magic, flags, rtype, handle, length, offset) == (
            c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.ReplyType.OFFSET_DATA, 3, len(blob) + 8, 4096)
        assert await client.reader.readexactly(len(blob)) == blob
        assert await client.call(Command.READ, 0, 4096, flags=CommandFlag.DF) == (0, bytes(4096))
        await client.close()

    serve({"": dev}, test, tmp_path)
