"""The client half of an NBD connection, for the Linux kernel's NBD driver (``/dev/nbdN``).

The kernel speaks only the transmission phase, so the handshake (fixed newstyle, ``NBD_OPT_GO``)
is done here in Python first, on the socket the kernel then takes over: netboot/supervisor.py
connects to the agent's unix socket, calls ``handshake`` and hands the socket to the kernel
through its netlink family (netboot/nbdlink.py). Netlink, not the ``NBD_SET_SOCK``/``NBD_DO_IT``
ioctls: with those the device lived only as long as a thread of the agent blocked in
``NBD_DO_IT``, so the agent's death took the machine's root with it (issue 24 item 5). Blocking
I/O on a plain socket.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from blockprov.errors import HandshakeError
from blockprov.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ClientFlag, HandshakeFlag, Info, Option

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
