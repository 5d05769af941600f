"""The asyncio NBD server: a thin transport around :mod:`blockprov.nbd.protocol`.

One ``asyncio.BufferedProtocol`` per connection feeds the pure protocol without copies (WRITE
payloads are received straight into their own buffer) and one supervisor task per connection owns
its lifetime: it ends when the peer disconnects, waits for the requests in flight, and closes the
transport in ``finally``.

A READ the device has at hand (device/base.py ``ImmediateReads``: a cache hit) is answered in the
callback that parsed it: ``read_now``, a ``pread`` of small file segments, and the reply joins the
batch that leaves in one ``writelines`` when the callback ends (issue 26: a boot's thousands of
4 KiB reads, one at a time, each paid a task and its hops through the loop). Every other request
runs in its own task, so several are in flight per connection; at most
``max_in_flight`` requests and ``max_buffered`` bytes of payload (WRITE data received plus READ
data requested) are admitted at once, beyond that the server stops reading from the socket.
Replies that wait to be sent behind a held output count against the same budget (issue 27: a
peer that sends requests and never reads its replies held 1.6 GiB of them), and a peer that takes
none of its replies for ``write_timeout`` seconds is dropped (nbd/writer.py).
Replies leave through the connection's ``ReplyWriter`` (nbd/writer.py: the queue, held output,
sendfile); this module keeps the framing and the dispatch of requests.

Hostile peers (issue 17). What a connection holds follows what its peer really sent (the protocol
grows a WRITE payload's buffer as bytes arrive), and a peer that stops in the middle of something
it owes — the handshake, a request header, a WRITE payload — is dropped once it has sent nothing
for ``frame_timeout`` seconds while we were reading (time we spend not reading, because requests
are in flight or the peer does not read its replies, does not count). A peer quiet *between*
requests is an idle disk and stays connected.

Requests larger than ``STREAM_ABOVE`` (issue 15 item 4) are streamed, never held whole. A READ is
answered piece by piece (``STREAM_PIECE`` bytes, chunk-aligned): each piece is read from the
device and sent (sendfile or writev on the duplicate descriptor, else through the transport,
waiting for it to drain) before the next is read, holding the connection's output meanwhile (other
replies wait in the queue). An error before anything was sent is an error reply; after a
structured piece went out it is an ``ERROR_OFFSET`` chunk; after a simple reply's header, or the one
data chunk's header of a structured reply under ``NBD_CMD_FLAG_DF`` (don't fragment: one chunk
announcing the whole length, its data streamed the same way), the connection is dropped (the
protocol has no other way to say it). A WRITE arrives as pieces
(nbd/protocol.py); each is written through to the device in order, and the connection stops
reading while ``STREAM_WINDOW`` bytes of it wait to be written. If a piece fails, the pieces after
it are still received (the framing) but not written, and the request gets the error: the device
then holds the new data before the failed piece, unspecified data in it (it may be partly
written), and its old data after it — proto.md leaves a failed write's range unspecified.

Errors are mapped to NBD errors here and only here: ``DeviceError.errno_name`` → its NBD errno,
any other ``BlockprovError`` → EIO, anything unexpected → EIO with a logged traceback. The
connection lives in every case; only a frame that cannot be parsed ends it.

Run ``python -m blockprov.nbd --memory 64M --socket /tmp/s`` (nbd/__main__.py) for a development
server serving a :class:`~blockprov.device.memory.MemoryDevice`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockprov.device.base import BlockDevice, FileSegment, ImmediateReads, ReadResult
from blockprov.errors import BlockprovError, DeviceError, DeviceIOError, UsageError
from blockprov.names import UNIX_PATH_MAX, unix_socket_path
from blockprov.nbd.activation import address_of
from blockprov.nbd.constants import STREAM_ABOVE, STREAM_PIECE, NbdError, error_from_name
from blockprov.nbd.protocol import (
    NEED_DATA,
    Aborted,
    BadRequest,
    BlockStatus,
    Cache,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    Flush,
    OptionHandled,
    Read,
    RemoteProtocolError,
    ServerConnection,
    TransmissionStarted,
    Trim,
    Write,
    WriteZeroes,
)
from blockprov.nbd.writer import SENDFILE_MIN, ReplyWriter, read_segment

CLAIM_PROBE_TIMEOUT = 2.0  # seconds a connect to an existing socket may take before it counts as in use
log = logging.getLogger("blockprov.nbd")

# Generous: real clients send a request in one go; a peer silent this long in the middle of one is
# gone or hostile. qemu-nbd allows 10 s for the whole handshake.
FRAME_TIMEOUT = 60.0
# A peer that takes none of its replies this long while they wait for it is gone or hostile: dropped.
WRITE_TIMEOUT = 60.0
# Bytes of a streamed WRITE received but not yet written that make the connection stop reading
# (one piece being written, one waiting): with the piece being received, what a request of any
# size holds is at most three pieces.
STREAM_WINDOW = 2 * STREAM_PIECE


@dataclass
class ServerStats:
    """Counters for status pages and tests."""

    connections_total: int = 0
    connections_active: int = 0
    requests: int = 0
    errors: int = 0  # error replies sent
    protocol_errors: int = 0  # connections ended because a frame could not be parsed
    timeouts: int = 0  # connections dropped for staying silent in the middle of a frame
    write_timeouts: int = 0  # connections dropped for taking none of their replies
    bytes_read: int = 0
    bytes_written: int = 0
    sendfile_bytes: int = 0


def errno_for(exc: BaseException) -> NbdError:
    """The NBD error for an exception raised by a device (the one mapping table of the server)."""
    if isinstance(exc, DeviceError):
        return error_from_name(exc.errno_name)
    return NbdError.EIO


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for a new listening socket, or refuse. A socket file there that answers a
    connect belongs to a running server (another agent): binding over it would cut that server off
    from every new client and delete its socket when we stop, so it is refused. One that refuses
    the connect is stale (its server died without removing it) and is removed. Anything else
    (a regular file, a directory) is the user's and is refused untouched."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; choose another socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CLAIM_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as e:  # a full backlog, a timeout, no permission: someone may still serve it
            raise UsageError(f"{path} may be in use (connecting to it: {e.strerror or e}); stop the process "
                             "serving it or remove it, or choose another socket path") from None
    raise UsageError(f"{path} is in use: another process serves it; stop it first or choose another socket path")


LISTEN_BACKLOG = 128


def bind_listening_unix(path: str) -> socket.socket:
    """A unix socket listening at ``path``, which appears there only once it accepts connections.

    A socket bound at its final name is visible between ``bind`` and ``listen``, and a client that
    connects in that moment (one polling for the path to appear) gets "connection refused". So the
    socket is bound at a temporary name in the same directory, listens, and is then hard-linked
    into place, which fails if the name was taken meanwhile (``claim_unix_path`` checked it: the
    race is with another server starting now, refused as in use, never replaced). A file system
    without hard links gets a rename (which replaces). The temporary name is then removed; the
    socket is reached by its inode, under whichever name."""
    claim_unix_path(path)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base[:40]}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        # bind by /proc/self/fd/N/NAME when DIR/NAME would be longer than a unix address holds
        sock.bind(tmp if len(os.fsencode(tmp)) <= UNIX_PATH_MAX else f"/proc/self/fd/{dir_fd}/{os.path.basename(tmp)}")
        sock.listen(LISTEN_BACKLOG)
        try:
            os.link(os.path.basename(tmp), base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileExistsError:
            raise UsageError(f"{path} is in use: another process serves it; stop it first or choose "
                             "another socket path") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.rename(os.path.basename(tmp), base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.basename(tmp), dir_fd=dir_fd)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.basename(tmp), dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    return sock


class NbdServer:
    def __init__(self, exports: dict[str, BlockDevice], *, description: str = "",
                 default_export: str | None = None, max_in_flight: int = 64,
                 max_buffered: int = 128 * 1024 * 1024, frame_timeout: float | None = FRAME_TIMEOUT,
                 write_timeout: float | None = WRITE_TIMEOUT) -> None:
        """``exports`` maps export names to devices. The empty name is ``exports[""]`` if present,
        else ``exports[default_export]``, else the first export. Exports added to the dict later
        are offered to connections made after that (a host's clones come and go).
        ``frame_timeout``: seconds a peer may stay silent in the middle of the handshake or of a
        request before it is dropped (None: never); ``write_timeout``: seconds a peer may take none
        of the replies waiting for it before it is dropped (None: never)."""
        self.exports = exports
        self.description = description
        if default_export is None and "" not in exports and exports:
            default_export = next(iter(exports))
        self.default_export = default_export
        self.max_in_flight = max_in_flight
        self.max_buffered = max_buffered
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.stats = ServerStats()
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_paths: list[str] = []
        self._closed: asyncio.Future[None] | None = None
        self.addresses: list[str | tuple[str, int]] = []

    def export_infos(self) -> dict[str, ExportInfo]:
        return {
            name: ExportInfo(
                size=dev.size, read_only=dev.read_only, min_block=dev.min_block,
                preferred_block=dev.preferred_block, can_multi_conn=dev.can_multi_conn,
                description=self.description,
            )
            for name, dev in self.exports.items()
        }

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a unix socket at ``path``: a stale socket left there is replaced, one that
        answers is refused (``claim_unix_path``), and the socket is removed again by ``close``.
        ``path`` appears only once it accepts connections (``bind_listening_unix``)."""
        path = unix_socket_path(os.fspath(path))  # clients reach it by this path: no /proc/self/fd detour
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, bind_listening_unix, path)
        try:
            server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self._unix_paths.append(path)
        self.addresses.append(path)
        return path

    async def start_socket(self, sock: socket.socket) -> str | tuple[str, int]:
        """Serve on a socket that already listens (systemd socket activation, nbd/activation.py):
        a unix one or a TCP one. Its path, if any, is not ours: ``close`` leaves it (the service
        manager made it and keeps it for the next start)."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        else:
            server = await loop.create_server(lambda: _Connection(self), sock=sock)
        self._servers.append(server)
        address = address_of(sock)
        self.addresses.append(address)
        return address

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        address = (str(sockname[0]), int(sockname[1]))
        self.addresses.append(address)
        return address

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` (the listeners already accept connections)."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    async def close(self) -> None:
        """Stop listening, let every connection finish its requests in flight, then close them."""
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.shutdown()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        if not self._closed.done():
            self._closed.set_result(None)

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _track(self, conn: _Connection, coro: Any) -> None:
        self._connections.add(conn)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._connections.discard(conn)

        task.add_done_callback(done)


class _Connection(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.stats = server.stats
        self.proto = ServerConnection(server.export_infos(), default=server.default_export)
        self.transport: asyncio.Transport | None = None
        self.device: BlockDevice | None = None
        self.read_now: Callable[[int, int], ReadResult | None] | None = None  # the device's fast path, if any
        self.loop = asyncio.get_running_loop()
        self.peer: object = None
        self.in_flight = 0
        self.buffered = 0
        self.requests: set[asyncio.Task[None]] = set()
        self.reading_paused = False
        self.stopped = False  # no more requests are read
        self.finished: asyncio.Future[bool] = self.loop.create_future()  # result: abort?
        self.idle: asyncio.Future[None] | None = None
        self.out = ReplyWriter(self.loop, self.stats, lambda: self._finish(abort=True), on_room=self._room,
                               on_stalled=self._stalled, write_timeout=server.write_timeout)
        self.last_heard = self.loop.time()  # when bytes last arrived (or reading last resumed)
        self.frame_timer: asyncio.TimerHandle | None = None
        self.stream: _WriteStream | None = None  # the streamed WRITE whose pieces are arriving
        self.stream_bytes = 0  # bytes of streamed WRITE pieces received and not yet written

    # --- asyncio.BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.peer = transport.get_extra_info("peername") or "unix socket"
        self.out.transport, self.out.peer = self.transport, self.peer
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        self.server._track(self, self._supervise())
        transport.write(self.proto.data_to_send())  # type: ignore[attr-defined]
        self._arm_frame_timer()  # the handshake is owed from now on

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer(max(sizehint, 64 * 1024))

    def buffer_updated(self, nbytes: int) -> None:
        self.proto.buffer_updated(nbytes)
        self.last_heard = self.loop.time()
        self._process()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.stopped = True
        self._disarm_frame_timer()
        self.out.connection_lost()
        if not self.finished.done():
            self.finished.set_result(False)

    def pause_writing(self) -> None:
        self.out.pause()
        self._pause_reading()

    def resume_writing(self) -> None:
        self.out.resume()
        self._process()

    # --- lifetime ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        abort = False
        try:
            abort = await self.finished
            while self.in_flight:
                self.idle = self.loop.create_future()
                await self.idle
        finally:
            transport = self.transport
            if transport is not None:
                self.out.flush()
                if abort:
                    transport.abort()
                else:
                    transport.close()
            self.out.close()
            self.stats.connections_active -= 1
            if self.device is not None:
                log.debug("nbd: connection from %s to %r closed", self.peer, self.proto.export_name)

    def shutdown(self) -> None:
        """Read no more requests; the connection closes once those in flight are answered."""
        self._finish(abort=False)

    def _finish(self, *, abort: bool) -> None:
        self.stopped = True
        self._disarm_frame_timer()
        self._pause_reading()
        if not self.finished.done():
            self.finished.set_result(abort)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def _arm_frame_timer(self) -> None:
        timeout = self.server.frame_timeout
        if timeout is not None and self.frame_timer is None and not self.stopped:
            self.frame_timer = self.loop.call_at(self.last_heard + timeout, self._frame_timer_fired)

    def _disarm_frame_timer(self) -> None:
        if self.frame_timer is not None:
            self.frame_timer.cancel()
            self.frame_timer = None

    def _room(self) -> None:
        """Replies that waited left: read requests again if they were what stopped us."""
        if self.reading_paused and not self.stopped:
            self._process()

    def _stalled(self) -> None:
        """The peer took none of its replies for the write timeout: drop it now (the request whose
        reply waits for it cannot finish, so nothing is waited for)."""
        self.stats.write_timeouts += 1
        log.warning("nbd: dropping %s: it took none of its replies for %.0f s", self.peer, self.server.write_timeout)
        self._finish(abort=True)
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(Exception):  # a reset: the kernel drops what it still holds for the peer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def _frame_timer_fired(self) -> None:
        """Drop the peer if it owes us the rest of a frame and has sent nothing for the timeout
        while we were reading; else look again when it could next have timed out. One timer per
        connection, re-armed here instead of on every receive (the hot path only stores a time)."""
        self.frame_timer = None
        timeout = self.server.frame_timeout
        if self.stopped or timeout is None or not self.proto.in_frame:
            return  # re-armed by _process when a frame is started again
        now = self.loop.time()
        if self.reading_paused:
            self.last_heard = now  # our own pause is not the peer's silence
        elif now - self.last_heard >= timeout:
            self.stats.timeouts += 1
            log.warning("nbd: dropping %s: silent for %.0f s in the middle of a frame (%s)", self.peer, timeout,
                        "handshake" if self.device is None else "request")
            self._finish(abort=True)
            return
        self._arm_frame_timer()

    # --- events -----------------------------------------------------------------------------

    def _process(self) -> None:
        """Parse and dispatch what arrived; the replies answered meanwhile (the fast path's) leave
        together at the end, in one ``writelines``."""
        try:
            self._dispatch()
        finally:
            if self.out.outq:
                self.out.flush()

    def _dispatch(self) -> None:
        proto = self.proto
        server = self.server
        while not self.stopped:
            out = self.out
            if (self.in_flight + out.waiting >= server.max_in_flight
                    or self.buffered + out.waiting_bytes >= server.max_buffered
                    or out.paused or self.stream_bytes >= STREAM_WINDOW):
                self._pause_reading()
                return
            try:
                event = proto.next_event()
            except RemoteProtocolError as e:
                self.stats.protocol_errors += 1
                log.warning("nbd: closing connection from %s: %s", self.peer, e)
                self._finish(abort=True)
                return
            if event is NEED_DATA:
                if self.reading_paused and self.transport is not None:
                    self.reading_paused = False
                    self.last_heard = self.loop.time()
                    self.transport.resume_reading()
                if self.frame_timer is None and proto.in_frame:
                    self._arm_frame_timer()
                return
            kind = type(event)
            if kind is Read:
                assert isinstance(event, Read)
                if event.length > STREAM_ABOVE:
                    self._spawn(self._read_streamed(event), STREAM_PIECE)
                elif self.read_now is None or not self._read_at_hand(event, self.read_now):
                    self._spawn(self._read(event), event.length)
            elif kind is Write:
                assert isinstance(event, Write)
                if event.first and not event.more:
                    self._spawn(self._write(event), len(event.data))
                else:
                    self._write_piece(event)
            elif kind in (Flush, Trim, WriteZeroes, BlockStatus, Cache):
                self._spawn(self._other(event), 0)  # type: ignore[arg-type]
            elif kind is BadRequest:
                assert isinstance(event, BadRequest)
                self.stats.requests += 1
                self.stats.errors += 1
                log.info("nbd: bad request from %s: %s", self.peer, event.message)
                self.out.send((proto.reply_error(event.handle, event.error, event.message),))
            elif kind is OptionHandled:
                self.out.send((proto.data_to_send(),))
            elif kind is TransmissionStarted:
                assert isinstance(event, TransmissionStarted)
                self.out.send((proto.data_to_send(),))
                self.device = server.exports[event.name]
                self.read_now = self.device.read_now if isinstance(self.device, ImmediateReads) else None
                log.debug("nbd: %s uses export %r (flags %#x)", self.peer, event.name, event.flags)
            elif kind is Aborted:
                self.out.send((proto.data_to_send(),))
                self._finish(abort=False)
            else:  # Disconnect, ConnectionClosed
                assert isinstance(event, Disconnect | ConnectionClosed)
                self._finish(abort=False)

    def _spawn(self, coro: Any, cost: int) -> asyncio.Task[None]:
        self.in_flight += 1
        self.buffered += cost
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self.requests.add(task)
        task.add_done_callback(self._request_done(cost))
        return task

    def _request_done(self, cost: int) -> Any:
        def done(task: asyncio.Task[None]) -> None:
            self.requests.discard(task)
            self.in_flight -= 1
            self.buffered -= cost
            if self.in_flight == 0 and self.idle is not None and not self.idle.done():
                self.idle.set_result(None)
            if self.reading_paused and not self.stopped:
                self._process()

        return done

    def _fail(self, handle: int, exc: BaseException, what: str) -> None:
        error = errno_for(exc)
        self.stats.errors += 1
        if isinstance(exc, BlockprovError):
            log.info("nbd: %s failed: %s", what, exc)
        else:
            log.error("nbd: %s failed with an unexpected error", what, exc_info=exc)
        self.out.send((self.proto.reply_error(handle, error, str(exc) or type(exc).__name__),))

    # --- requests ---------------------------------------------------------------------------

    def _read_at_hand(self, ev: Read, read_now: Callable[[int, int], ReadResult | None]) -> bool:
        """The fast path: answer a READ the device has at hand (a cache hit) here, in the callback
        that parsed it, with no task and no await; False when the device does not have it (the
        caller spawns ``_read``). A boot's reads are mostly 4 KiB, one at a time (issue 26):
        each one's Python cost is latency the guest waits for."""
        try:
            parts = read_now(ev.offset, ev.length)
        except Exception as exc:
            self.stats.requests += 1
            self._fail(ev.handle, exc, f"read of {ev.length} bytes at {ev.offset}")
            return True
        if parts is None:
            return False
        self.stats.requests += 1
        reply = self._read_reply(ev, parts)
        if reply is None:  # large file segments: sendfile, which may have to wait for the socket
            self._spawn(self._send_files(ev, parts), ev.length)
        elif reply:
            self.out.put(reply, ev.length)
        return True

    async def _read(self, ev: Read) -> None:
        self.stats.requests += 1
        device = self.device
        assert device is not None
        try:
            parts = await device.read(ev.offset, ev.length)
        except Exception as exc:
            self._fail(ev.handle, exc, f"read of {ev.length} bytes at {ev.offset}")
            return
        reply = self._read_reply(ev, parts)
        if reply is None:
            await self._send_files(ev, parts)
        elif reply:
            self.out.send(reply)

    def _read_reply(self, ev: Read, parts: ReadResult) -> list[Any] | None:
        """A READ's whole reply, its small file segments read (``pread`` of the page cache, in
        this thread); None when a segment is large enough for sendfile (``_send_files``). A
        failure is answered here as an error reply (an empty list is returned then)."""
        out: list[Any] = [b""]
        total = 0
        try:
            for part in parts:
                if type(part) is FileSegment:
                    if part.length >= SENDFILE_MIN:
                        return None
                    total += part.length
                    out.append(read_segment(part))
                else:
                    total += len(part)
                    out.append(part)
            if total != ev.length:
                raise BlockprovError(f"device returned {total} bytes for a read of {ev.length}")
        except Exception as exc:
            if isinstance(exc, OSError):
                exc = DeviceIOError(msg=f"reading the data file: {exc.strerror or exc}")
            self._fail(ev.handle, exc, f"read of {ev.length} bytes at {ev.offset}")
            return []
        out[0] = self.proto.reply_read_header(ev.handle, ev.offset, ev.length)
        self.stats.bytes_read += ev.length
        return out

    async def _send_files(self, ev: Read, parts: ReadResult) -> None:
        """A READ reply with file segments for sendfile (nbd/writer.py ``send_with_files``)."""
        if sum(p.length if type(p) is FileSegment else len(p) for p in parts) != ev.length:
            self._fail(ev.handle, BlockprovError(f"device returned the wrong length for a read of {ev.length}"),
                       f"read of {ev.length} bytes at {ev.offset}")
            return
        header = self.proto.reply_read_header(ev.handle, ev.offset, ev.length)
        try:
            await self.out.send_with_files(header, parts)
        except OSError as exc:  # reading a segment before anything was sent: nothing is out yet
            self._fail(ev.handle, DeviceIOError(msg=f"reading the data file: {exc.strerror or exc}"),
                       f"read of {ev.length} bytes at {ev.offset}")
            return
        self.stats.bytes_read += ev.length

    async def _read_streamed(self, ev: Read) -> None:
        """A READ above ``STREAM_ABOVE``: read and sent one chunk-aligned piece at a time (module
        docstring), holding the connection's output for the whole reply."""
        self.stats.requests += 1
        device = self.device
        transport = self.transport
        assert device is not None
        if transport is None or transport.is_closing():
            return
        proto = self.proto
        # Simple replies, and structured ones under NBD_CMD_FLAG_DF, are one header then the data.
        one_header = not proto.structured or ev.df
        async with self.out.output() as ok:
            pos, end = ev.offset, ev.offset + ev.length
            while ok and pos < end and not self.out.lost:
                n = min(STREAM_PIECE - pos % STREAM_PIECE, end - pos)
                try:
                    parts = await device.read(pos, n)
                    if sum(p.length if type(p) is FileSegment else len(p) for p in parts) != n:
                        raise BlockprovError(f"device returned the wrong length for a read of {n} bytes")
                    out = await self.out.resolve(parts)
                except Exception as exc:
                    what = f"read of {ev.length} bytes at {ev.offset} (at {pos})"
                    if pos == ev.offset:
                        self._fail(ev.handle, exc, what)  # nothing sent yet: queued, sent after us
                    elif not one_header:
                        self.stats.errors += 1
                        log.info("nbd: %s failed: %s", what, exc)
                        reply = proto.reply_error_offset(ev.handle, errno_for(exc), pos, str(exc))
                        await self.out.send_now([reply])
                    else:
                        log.warning("nbd: %s failed after the reply header went out; closing the "
                                    "connection (a simple or unfragmented reply cannot report it): %s", what, exc)
                        self._finish(abort=True)
                    return
                if one_header:
                    header = proto.reply_read_header(ev.handle, ev.offset, ev.length) if pos == ev.offset else b""
                else:
                    header = proto.reply_read_header(ev.handle, pos, n, first=pos == ev.offset, last=pos + n == end)
                await self.out.send_now([header, *out] if header else out)
                self.stats.bytes_read += n
                pos += n
                await self.out.drain()

    async def _write(self, ev: Write) -> None:
        self.stats.requests += 1
        device = self.device
        assert device is not None
        try:
            await device.write(ev.offset, ev.data, fua=ev.fua)
        except Exception as exc:
            self._fail(ev.handle, exc, f"write of {len(ev.data)} bytes at {ev.offset}")
            return
        self.stats.bytes_written += len(ev.data)
        self.out.send((self.proto.reply_ok(ev.handle),))

    def _write_piece(self, ev: Write) -> None:
        """One piece of a streamed WRITE: written after the piece before it (in order, so a
        failure leaves a prefix written), answered after the last (module docstring)."""
        stream = self.stream
        if ev.first or stream is None:
            self.stats.requests += 1
            stream = self.stream = _WriteStream(ev.handle, ev.offset)
        self.stream_bytes += len(ev.data)
        stream.last = self._spawn(self._write_streamed(stream, ev, stream.last), len(ev.data))
        if not ev.more:
            self.stream = None

    async def _write_streamed(self, stream: _WriteStream, ev: Write, before: asyncio.Task[None] | None) -> None:
        device = self.device
        assert device is not None
        more = ev.more
        try:
            if before is not None:
                await asyncio.wait((before,))
            if stream.error is None:
                try:
                    await device.write(ev.offset, ev.data, fua=ev.fua)
                except Exception as exc:
                    stream.error, stream.error_at = exc, ev.offset
                else:
                    self.stats.bytes_written += len(ev.data)
        finally:
            self.stream_bytes -= len(ev.data)
            del ev  # the piece's buffer goes now, not when the task object does
        if more:
            return  # the last piece answers (it runs after every other)
        if stream.error is not None:
            self._fail(stream.handle, stream.error,
                       f"streamed write at {stream.offset} (failed at {stream.error_at}; written before it)")
        else:
            self.out.send((self.proto.reply_ok(stream.handle),))

    async def _other(self, ev: Flush | Trim | WriteZeroes | BlockStatus | Cache) -> None:
        self.stats.requests += 1
        device = self.device
        assert device is not None
        proto = self.proto
        try:
            if type(ev) is Flush:
                await device.flush()
            elif type(ev) is Trim:
                assert isinstance(ev, Trim)
                await device.trim(ev.offset, ev.length, fua=ev.fua)
            elif type(ev) is WriteZeroes:
                assert isinstance(ev, WriteZeroes)
                await device.write_zeroes(ev.offset, ev.length, may_trim=ev.may_trim, fua=ev.fua,
                                          fast_only=ev.fast_only)
            elif type(ev) is BlockStatus:
                assert isinstance(ev, BlockStatus)
                extents = await device.extents(ev.offset, ev.length)
                try:
                    reply = proto.reply_block_status(ev.handle, ev.length, extents, req_one=ev.req_one)
                except Exception as exc:
                    raise BlockprovError(f"device returned unusable extents: {exc}") from exc
                self.out.send((reply,))
                return
            # Cache: a hint; succeed without doing anything.
        except Exception as exc:
            self._fail(ev.handle, exc, f"{type(ev).__name__}")
            return
        self.out.send((proto.reply_ok(ev.handle),))


@dataclass
class _WriteStream:
    """A streamed WRITE in progress on a connection."""

    handle: int
    offset: int
    last: asyncio.Task[None] | None = None  # the task of the latest piece
    error: BaseException | None = None
    error_at: int = 0

