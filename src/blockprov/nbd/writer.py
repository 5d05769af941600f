"""How one NBD connection's replies leave: the reply path of the server (nbd/server.py keeps the
framing and the dispatch of requests).

Replies never interleave: each is written with one synchronous ``transport.writelines`` call, and
while a reply is sent in several writes (sendfile, a streamed READ) it holds the connection's
output and the other replies wait in a queue. Replies produced in the same loop iteration leave in
one ``writelines`` (one syscall for many small replies at high queue depth).

READ data: memory parts (``bytes``/``memoryview``) go out with ``writelines`` (scatter/gather, no
join under uvloop). ``FileSegment`` parts of at least ``SENDFILE_MIN`` bytes go out with
``os.sendfile`` straight from the data file to the socket (zero copy), under uvloop as under
asyncio: the writer keeps a duplicate of the socket's descriptor and, once the transport's write
buffer is empty (nothing of ours is queued in front), calls ``os.sendfile`` on it, waiting for
writability with ``loop.add_writer`` on the duplicate (the loops refuse watchers on a transport's
own descriptor, not on another descriptor of the same socket). If the transport still holds bytes,
the segment goes through ``loop.sendfile`` where the loop has it natively (asyncio; it waits for
the buffer to drain), else it is ``pread`` (in the default executor when large) and written.
Smaller segments are always ``pread`` and written (a syscall pair is cheaper). Measured with
nbdcopy, 1 GiB from a tmpfs file served as FileSegments over a unix socket (2 vCPU VM):
asyncio+sendfile 0.30 s at 1 MiB requests (1.28 s at 256 KiB), asyncio+pread 1.6 s, uvloop+pread
0.65 s (0.87 s at 256 KiB); from a MemoryDevice with uvloop 0.28 s. uvloop is ~2× faster for small
requests, so with the direct sendfile path uvloop is the better loop for both.

A failure while a reply is partly out drops the connection (``on_broken``): once part of a reply
is out, the framing cannot recover.

A peer that does not read its replies (issue 27). Replies waiting behind a held output count
against the connection's budget (``waiting``, ``waiting_bytes``: the connection stops reading
requests when they fill it, and reads again once they left, ``on_room``); a reply never waits for
the transport through the loop's own ``sendfile`` (whose progress cannot be seen) but for the
transport's buffer to empty (``_wait_empty``), then goes out on the duplicate descriptor. While
output waits on the peer (the transport's buffer above its high-water mark, or a direct send
waiting for writability), a watchdog checks that the peer takes some of it; one that takes
nothing for ``write_timeout`` seconds is dropped (``on_stalled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from blockprov.device.base import FileSegment

if TYPE_CHECKING:
    from blockprov.nbd.server import ServerStats

log = logging.getLogger("blockprov.nbd")

_IOV_MAX = 512
SENDFILE_MIN = 128 * 1024  # smaller file segments are pread and written (a syscall pair is cheaper)
BATCH_BYTES = 256 * 1024  # replies ``put`` holds before they leave without waiting for the batch's end
SNDBUF = 4 << 20  # asked for (the kernel caps it) so one sendfile mostly sends a whole reply
Buffer = bytes | bytearray | memoryview


class ReplyWriter:
    """The output side of one connection: its queue of replies, the held output of a reply sent
    in several writes, and the direct sendfile path on a duplicate of the socket's descriptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: ServerStats, on_broken: Callable[[], None], *,
                 on_room: Callable[[], None] = lambda: None, on_stalled: Callable[[], None] = lambda: None,
                 write_timeout: float | None = None) -> None:
        """``on_broken`` drops the connection (a reply failed after part of it went out);
        ``on_room``: replies that waited left, the connection may read requests again;
        ``on_stalled``: the peer took nothing for ``write_timeout`` s (None: never checked)."""
        self.loop = loop
        self.stats = stats
        self.on_broken = on_broken
        self.on_room = on_room
        self.on_stalled = on_stalled
        self.write_timeout = write_timeout
        self.transport: asyncio.Transport | None = None  # set when the connection is made
        self.peer: object = None
        self.busy = False  # a reply holds the output: others wait in ``queued``
        self.lock = asyncio.Lock()
        self.queued: deque[Sequence[Buffer]] = deque()
        self.waiting_bytes = 0  # bytes of the replies in ``queued``
        self.outq: list[Buffer] = []
        self.outq_bytes = 0  # what ``put`` added to ``outq`` since the last flush
        self.flush_scheduled = False
        self.sendfile_ok = True
        self.out_fd = -2  # duplicate of the socket's descriptor for os.sendfile; -2 not made yet, -1 none
        self.direct_active = False
        self.direct_waiter: asyncio.Future[None] | None = None
        self.closed = False  # the connection is done: the duplicate goes once no send uses it
        self.lost = False
        self.paused = False  # the transport's buffer is above its high-water mark
        self.drain_waiter: asyncio.Future[None] | None = None
        self.sent_direct = 0  # bytes the duplicate descriptor took (sendfile, writev)
        self.watchdog: asyncio.TimerHandle | None = None
        self.progress_mark: tuple[int, int] = (0, 0)  # (sent_direct, transport buffer) when last looked
        self.progress_at = 0.0  # when the peer was last seen taking bytes

    @property
    def waiting(self) -> int:
        """Replies waiting behind a held output (they count against the connection's budget)."""
        return len(self.queued)

    # --- the connection's events ------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True
        self._watch()

    def resume(self) -> None:
        self.paused = False
        self._wake_drain()

    def connection_lost(self) -> None:
        self.lost = True
        waiter = self.direct_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # a direct sendfile waiting for writability learns it now
        self._wake_drain()

    def close(self) -> None:
        """The connection is closed: the duplicate descriptor goes now, or when the direct send
        using it ends."""
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if not self.direct_active:
            self._close_out_fd()

    # --- the write-progress watchdog ---------------------------------------------------------

    def _stalled_on_peer(self) -> bool:
        """Output waits for the peer to take bytes (not for a device read, not for nothing)."""
        t = self.transport
        return not self.lost and ((t is not None and t.get_write_buffer_size() > 0) or self.direct_waiter is not None)

    def _mark(self) -> tuple[int, int]:
        t = self.transport
        return self.sent_direct, (t.get_write_buffer_size() if t is not None else 0)

    def _watch(self) -> None:
        """Start the watchdog when output begins to wait on the peer (one timer per connection)."""
        if self.write_timeout is None or self.watchdog is not None or self.closed:
            return
        self.progress_mark, self.progress_at = self._mark(), self.loop.time()
        self.watchdog = self.loop.call_later(self.write_timeout, self._check_progress)

    def _check_progress(self) -> None:
        """Progress is a direct send that took bytes, or a transport buffer that shrank (while
        output waits on the peer no new request is read, so it only grows by replies already owed)."""
        self.watchdog = None
        timeout = self.write_timeout
        if timeout is None or self.closed or not self._stalled_on_peer():
            return  # nothing waits on the peer: looked at again when something does
        now = self.loop.time()
        mark = self._mark()
        if mark[0] > self.progress_mark[0] or mark[1] < self.progress_mark[1]:
            self.progress_at = now
        self.progress_mark = mark
        if now - self.progress_at >= timeout:
            self.on_stalled()
            return
        self.watchdog = self.loop.call_at(self.progress_at + timeout, self._check_progress)

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark (a streamed
        READ reply sends its next piece only then: memory bounded by one piece)."""
        while self.paused and not self.lost:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    # --- whole replies ----------------------------------------------------------------------

    def send(self, parts: Sequence[Buffer]) -> None:
        """Queue one complete reply. Replies produced in the same loop iteration leave in one
        ``writelines``."""
        if self.busy:
            self.queued.append(parts)
            self.waiting_bytes += sum(len(p) for p in parts)
            return
        self.outq.extend(parts)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def put(self, parts: Sequence[Buffer], nbytes: int) -> None:
        """Queue one complete reply of ``nbytes`` bytes that the caller flushes: the server's fast
        path, which answers a batch of requests in the callback that parsed them and flushes at
        its end (one ``writelines`` for the batch, no loop callback). The batch leaves at once
        when it holds ``BATCH_BYTES``, so what waits here stays bounded (the transport's
        high-water mark takes over from there)."""
        if self.busy:
            self.queued.append(parts)
            self.waiting_bytes += nbytes
            return
        self.outq.extend(parts)
        self.outq_bytes += nbytes
        if self.outq_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.outq:
            return
        out, self.outq = self.outq, []
        self.outq_bytes = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(out)

    async def send_with_files(self, header: bytes, parts: Sequence[Any]) -> None:
        """Send a READ reply whose data has file segments."""
        # Resolve small segments (and, without any sendfile, all of them) to bytes first: once
        # the header is out, a failure can no longer be reported, only the connection dropped.
        # Large segments are only sent with sendfile when the file really holds them (a short
        # file would make sendfile stop early and break the framing).
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out: list[Any] = [header, *await self.resolve(parts)]
        if not any(type(p) is FileSegment for p in out):
            self.send(out)
            return
        async with self.output() as ok:
            if ok:
                await self.send_now(out)

    @contextlib.asynccontextmanager
    async def output(self) -> AsyncIterator[bool]:
        """Hold the connection's output for one reply sent in several writes (sendfile, a
        streamed READ): one such reply at a time, in turn; other replies wait in ``queued``
        meanwhile. Yields False when the transport is closing (send nothing). A failure while
        sending drops the connection: once part of a reply is out, the framing cannot recover."""
        transport = self.transport
        assert transport is not None
        async with self.lock:
            if transport.is_closing():
                yield False
                return
            self.flush()
            self.busy = True
            try:
                yield True
            except ConnectionError as e:
                log.info("nbd: %s went away while a read reply was sent: %s", self.peer, e)
                self.on_broken()
            except Exception:
                log.exception("nbd: sending a read reply to %s failed; closing the connection", self.peer)
                self.on_broken()
            finally:
                self.busy = False
                released = bool(self.queued)
                while self.queued:
                    self.send(self.queued.popleft())
                self.waiting_bytes = 0
                if released:
                    self.on_room()

    async def send_now(self, out: list[Any]) -> None:
        """Send one reply (or piece of one) while holding the connection's output: directly on
        the duplicate descriptor when the transport holds nothing, else through the transport."""
        transport = self.transport
        assert transport is not None
        fd = self._direct_fd()
        if fd < 0:
            await self._send_through(transport, out)
            return
        if transport.get_write_buffer_size():
            await asyncio.sleep(0)  # uvloop sends what it holds at the end of an iteration
            await self._wait_empty(transport)
        if self.lost:
            raise ConnectionResetError("connection lost while sending a reply")
        await self._send_direct(fd, out)

    async def _wait_empty(self, transport: asyncio.Transport) -> None:
        """Wait until the transport holds nothing of ours (then the duplicate descriptor may
        write): with a high-water mark of 0 the transport pauses us now and resumes us at empty."""
        if not transport.get_write_buffer_size():
            return
        transport.set_write_buffer_limits(high=0)
        try:
            await self.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits()

    async def resolve(self, parts: Sequence[Any]) -> list[Any]:
        """The parts of a read reply ready to send: file segments kept for sendfile when it can
        be used and the file holds them, else read into memory (see send_with_files)."""
        can_sendfile = self.sendfile_ok or self._direct_fd() >= 0
        out: list[Any] = []
        for part in parts:
            if type(part) is FileSegment:
                if can_sendfile and part.length >= SENDFILE_MIN and _file_covers(part):
                    out.append(part)
                else:
                    out.append(await self.pread(part))
            else:
                out.append(part)
        return out

    async def pread(self, seg: FileSegment) -> bytes:
        if seg.length <= SENDFILE_MIN:
            return read_segment(seg)
        return await self.loop.run_in_executor(None, read_segment, seg)

    # --- through the transport --------------------------------------------------------------

    async def _send_through(self, transport: asyncio.Transport, out: list[Any]) -> None:
        """Send a reply through the transport (only when there is no duplicate descriptor):
        memory parts written, file parts with the loop's sendfile where it has one, else read and
        written."""
        pending: list[Any] = []
        for part in out:
            if type(part) is not FileSegment:
                pending.append(part)
                continue
            if pending:
                transport.writelines(pending)
                pending = []
            await self._sendfile(transport, part)
        if pending:
            transport.writelines(pending)

    async def _sendfile(self, transport: asyncio.Transport, seg: FileSegment) -> None:
        if self.sendfile_ok:
            with os.fdopen(seg.fd, "rb", closefd=False) as f:
                try:
                    sent = await self.loop.sendfile(transport, f, seg.offset, seg.length, fallback=False)
                except (asyncio.SendfileNotAvailableError, NotImplementedError):
                    self.sendfile_ok = False
                    sent = 0
            self.stats.sendfile_bytes += sent
            if sent == seg.length:
                return
            seg = FileSegment(seg.fd, seg.offset + sent, seg.length - sent)
        transport.write(await self.pread(seg))

    # --- on the duplicate descriptor ---------------------------------------------------------

    async def _send_direct(self, fd: int, out: list[Any]) -> None:
        """Send a reply on the duplicate socket descriptor while the transport holds nothing:
        memory parts with ``os.writev``, file parts with ``os.sendfile``."""
        pending: list[Any] = []
        for part in out:
            if type(part) is not FileSegment:
                pending.append(part)
                continue
            if pending:
                await self._writev_direct(fd, pending)
                pending = []
            sent = await self._sendfile_direct(fd, part)
            self.stats.sendfile_bytes += sent
            if sent < part.length:  # the file ended early: the rest reads as zeros
                pending.append(await self.pread(FileSegment(part.fd, part.offset + sent, part.length - sent)))
        if pending:
            await self._writev_direct(fd, pending)

    async def _writev_direct(self, fd: int, parts: list[Any]) -> None:
        bufs = [memoryview(p).cast("B") for p in parts]
        while bufs:
            try:
                n = os.writev(fd, bufs[:_IOV_MAX])
            except BlockingIOError:
                await self._wait_writable(fd)
                continue
            self.sent_direct += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if n:
                bufs[0] = bufs[0][n:]

    def _direct_fd(self) -> int:
        """The duplicate socket descriptor for direct sendfile (made on first use), or -1."""
        if self.out_fd == -2:
            self.out_fd = -1
            transport = self.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None and hasattr(os, "sendfile"):
                try:
                    fd = os.dup(sock.fileno())
                except OSError:
                    return -1
                os.set_blocking(fd, False)  # the same open file as the transport's: already so
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
                self.out_fd = fd
        return self.out_fd

    def _close_out_fd(self) -> None:
        if self.out_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.out_fd)
        self.out_fd = -1

    async def _sendfile_direct(self, out_fd: int, seg: FileSegment) -> int:
        """``os.sendfile`` the segment, waiting for writability as needed; bytes sent (fewer only
        when the file ends early). Socket errors propagate (the caller drops the connection)."""
        offset, left = seg.offset, seg.length
        self.direct_active = True
        try:
            while left:
                try:
                    n = os.sendfile(out_fd, seg.fd, offset, left)
                except BlockingIOError:
                    await self._wait_writable(out_fd)
                    continue
                if n == 0:
                    break
                offset += n
                left -= n
                self.sent_direct += n
        finally:
            self.direct_active = False
            if self.closed:
                self._close_out_fd()
        return seg.length - left

    async def _wait_writable(self, fd: int) -> None:
        if self.lost:
            raise ConnectionResetError("connection lost while sending a reply")
        loop = self.loop
        waiter: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.direct_waiter = waiter
        self._watch()
        loop.add_writer(fd, ready)
        try:
            await waiter
        finally:
            self.direct_waiter = None
            loop.remove_writer(fd)
        if self.lost:
            raise ConnectionResetError("connection lost while sending a reply")


def read_segment(seg: FileSegment) -> bytes:
    """A file segment's bytes; past the end of the file reads as zeros. Small segments are read in
    the loop's thread (one ``pread`` of the page cache costs less than a hand-off to a thread)."""
    data = os.pread(seg.fd, seg.length, seg.offset)
    if len(data) < seg.length:
        data += bytes(seg.length - len(data))
    return data


def _file_covers(seg: FileSegment) -> bool:
    try:
        return os.fstat(seg.fd).st_size >= seg.offset + seg.length
    except OSError:
        return False
