"""The client half of an NBD connection, handed to the Linux kernel's NBD driver (``/dev/nbdN``).

Why the ioctls and not netlink: the ioctl interface needs nothing but ``fcntl.ioctl`` (netlink's
generic family would need a netlink library in the initramfs), and ``NBD_DO_IT`` ties the device's
life to the thread that runs it, inside the agent's own process — no separate ``nbd-client`` whose
death would leave the root device without a server.

The kernel speaks only the transmission phase, so the handshake (fixed newstyle, ``NBD_OPT_GO``)
is done here in Python first, on the same socket; then ``NBD_SET_SOCK`` gives the socket to the
kernel. The server end is blockprov's own NBD server (a unix socket it listens on, connected to by
this process). Blocking I/O on a plain socket; run it in a thread (``NBD_DO_IT`` blocks until the
device is disconnected).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from blockprov.errors import HandshakeError
from blockprov.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ClientFlag, HandshakeFlag, Info, Option

NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A
REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
BLOCK = 4096


@dataclass(frozen=True)
class Export:
    size: int
    flags: int  # transmission flags, as NBD_SET_FLAGS wants them


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise HandshakeError(f"the NBD server closed the connection during the handshake ({len(buf)}/{n} bytes)")
        buf += got
    return bytes(buf)


def handshake(sock: socket.socket, name: str = "") -> Export:
    """Fixed-newstyle handshake ending in ``NBD_OPT_GO`` for export ``name``."""
    magic, opt, hflags = struct.unpack(">QQH", _recv(sock, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT or not hflags & HandshakeFlag.FIXED_NEWSTYLE:
        raise HandshakeError("not a fixed-newstyle NBD server")
    cflags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if hflags & HandshakeFlag.NO_ZEROES else 0)
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", int(cflags)) + struct.pack(">QII", IHAVEOPT, int(Option.GO), len(payload))
                 + payload)
    size = flags = None
    for _ in range(64):  # a server sends a few INFO replies, then ACK
        rmagic, ropt, rtype, rlen = struct.unpack(">QIII", _recv(sock, 20))
        data = _recv(sock, rlen) if rlen else b""
        if rmagic != OPTION_REPLY_MAGIC or ropt != Option.GO:
            raise HandshakeError("bad option reply from the NBD server")
        if rtype & REP_ERR:
            raise HandshakeError(f"the NBD server refused export {name!r}: {data.decode(errors='replace')}")
        if rtype == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == Info.EXPORT:
            size, flags = struct.unpack(">QH", data[2:12])
        elif rtype == REP_ACK:
            if size is None or flags is None:
                raise HandshakeError("the NBD server sent no export size")
            return Export(size=size, flags=flags)
    raise HandshakeError("the NBD server never finished NBD_OPT_GO")


def attach(device: str, sock: socket.socket, export: Export, *, timeout: int = 0) -> int:
    """Give the connected, handshaken socket to ``device`` (e.g. /dev/nbd0); returns the device fd.
    Then call ``serve(fd)`` (blocks)."""
    if export.size % BLOCK:
        raise HandshakeError(f"export size {export.size} is not a multiple of {BLOCK}")
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK)
        fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, export.size // BLOCK)
        fcntl.ioctl(fd, NBD_SET_FLAGS, export.flags)
        if timeout:
            fcntl.ioctl(fd, NBD_SET_TIMEOUT, timeout)
        fcntl.ioctl(fd, NBD_SET_SOCK, sock.fileno())
    except BaseException:
        os.close(fd)
        raise
    return fd


def serve(fd: int) -> None:
    """``NBD_DO_IT``: the kernel runs the device until it is disconnected (blocks; the GIL is released)."""
    try:
        fcntl.ioctl(fd, NBD_DO_IT)
    finally:
        fcntl.ioctl(fd, NBD_CLEAR_QUE)
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
