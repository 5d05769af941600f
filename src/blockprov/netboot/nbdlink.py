"""The kernel's NBD client driven through its generic netlink family ("nbd"), not ioctls.

Why netlink (issue 24 item 5): with the ioctls a device lives as long as the thread blocked in
``NBD_DO_IT``, inside the agent — kill the agent and the machine's root is gone. Through netlink
the kernel holds the device on its own: ``NBD_CMD_CONNECT`` hands it the connected sockets and
returns; when the server end dies the kernel marks the connection dead and, for up to the
*dead connection timeout*, keeps the requests that arrive waiting for ``NBD_CMD_RECONFIGURE``
to give it a new socket (requests in flight on the dead one are requeued when their *timeout*
fires). So a small supervisor (netboot/supervisor.py) can restart the agent and reconnect the
device, and the running system sees a delay, not an I/O error. The kernel also multicasts
``NBD_CMD_LINK_DEAD`` when it gives up a connection (a dead server, or a request past its
timeout), which is how the supervisor notices a link it must renew while the agent lives.

Wire format (linux/nbd-netlink.h, linux/genetlink.h): a netlink header, a generic netlink header
(command, version 1), then attributes (length, type, value padded to 4 bytes; nested ones carry
``NLA_F_NESTED``). The family's number is looked up by name through the generic netlink
controller. The message codec is pure (``encode``/``attributes``); ``Link`` does the socket I/O.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from blockprov.errors import NetlinkError

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLA_F_NESTED = 1 << 15
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS = 1, 2, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
FAMILY, MCAST_GROUP, VERSION = "nbd", "nbd_mc_group", 1

CMD_CONNECT, CMD_DISCONNECT, CMD_RECONFIGURE, CMD_LINK_DEAD, CMD_STATUS = 1, 2, 3, 4, 5
ATTR_INDEX, ATTR_SIZE_BYTES, ATTR_BLOCK_SIZE_BYTES, ATTR_TIMEOUT = 1, 2, 3, 4
ATTR_SERVER_FLAGS, ATTR_CLIENT_FLAGS, ATTR_SOCKETS, ATTR_DEAD_CONN_TIMEOUT, ATTR_DEVICE_LIST = 5, 6, 7, 8, 9
SOCK_ITEM, SOCK_FD = 1, 1
DEVICE_ITEM, DEVICE_INDEX, DEVICE_CONNECTED = 1, 1, 2

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_GENL = struct.Struct("=BBH")  # command, version, reserved
_NLA = struct.Struct("=HH")  # length, type


# -- the message codec (pure) ------------------------------------------------------------------------
def attr(kind: int, value: bytes, *, nested: bool = False) -> bytes:
    """One attribute: header, value, padding to 4 bytes. Pure."""
    head = _NLA.pack(_NLA.size + len(value), kind | (NLA_F_NESTED if nested else 0))
    return head + value + bytes(-len(value) % 4)


def u32(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=I", v))


def u64(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=Q", v))


def sockets(fds: Sequence[int]) -> bytes:
    """``NBD_ATTR_SOCKETS``: one nested item per socket, each holding its descriptor. Pure."""
    return attr(ATTR_SOCKETS, b"".join(attr(SOCK_ITEM, u32(SOCK_FD, fd), nested=True) for fd in fds), nested=True)


def encode(family: int, command: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """A whole generic netlink request. Pure."""
    body = _GENL.pack(command, VERSION, 0) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), family, flags, seq, 0) + body


def attributes(data: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """(type without flags, value) of each attribute in ``data``. Pure."""
    view = memoryview(data)
    off = 0
    while off + _NLA.size <= len(view):
        length, kind = _NLA.unpack_from(view, off)
        if length < _NLA.size or off + length > len(view):
            raise NetlinkError(msg="malformed netlink attribute")
        yield kind & ~NLA_F_NESTED, bytes(view[off + _NLA.size:off + length])
        off += (length + 3) & ~3


@dataclass(frozen=True)
class Message:
    kind: int  # netlink message type: the family, NLMSG_ERROR or NLMSG_DONE
    seq: int
    command: int  # generic netlink command (0 for NLMSG_ERROR)
    payload: bytes  # attributes, or for NLMSG_ERROR the error and the echoed request

    @property
    def error(self) -> int:
        """For NLMSG_ERROR: 0 (an acknowledgement) or a positive errno."""
        return -struct.unpack_from("=i", self.payload)[0] if self.kind == NLMSG_ERROR else 0

    def attrs(self) -> dict[int, bytes]:
        return dict(attributes(self.payload))


def messages(data: bytes) -> Iterator[Message]:
    """The messages of one datagram. Pure."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _port = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            raise NetlinkError(msg="malformed netlink message")
        body = data[off + _NLMSG.size:off + length]
        if kind == NLMSG_ERROR:
            yield Message(kind, seq, 0, body)
        elif kind != NLMSG_DONE and len(body) >= _GENL.size:
            yield Message(kind, seq, body[0], body[_GENL.size:])
        off += (length + 3) & ~3


def family_of(reply: Message) -> tuple[int, dict[str, int]]:
    """The family number and multicast groups (name → id) of a controller's GETFAMILY reply. Pure."""
    a = reply.attrs()
    if CTRL_ATTR_FAMILY_ID not in a:
        raise NetlinkError(msg="the generic netlink controller did not name the nbd family")
    groups = {}
    for _i, grp in attributes(a.get(CTRL_ATTR_MCAST_GROUPS, b"")):
        g = dict(attributes(grp))
        if CTRL_ATTR_MCAST_GRP_NAME in g and CTRL_ATTR_MCAST_GRP_ID in g:
            name = g[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()
            groups[name] = struct.unpack("=I", g[CTRL_ATTR_MCAST_GRP_ID])[0]
    return struct.unpack("=H", a[CTRL_ATTR_FAMILY_ID][:2])[0], groups


def index_of(msg: Message) -> int | None:
    v = msg.attrs().get(ATTR_INDEX)
    return None if v is None else int(struct.unpack("=I", v[:4])[0])


# -- the socket ------------------------------------------------------------------------------------
class Link:
    """A generic netlink socket speaking to the kernel's nbd family. Blocking; one request at a time."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        except OSError as e:
            raise NetlinkError(msg=f"no generic netlink socket: {e.strerror}") from None
        self.sock.bind((0, 0))
        self._seq = 0
        reply = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, FAMILY.encode() + b"\0"))
        if reply is None:
            raise NetlinkError(msg="the kernel has no nbd netlink family (is the nbd module loaded?)")
        self.family, self.groups = family_of(reply)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, family: int, command: int, attrs: bytes) -> Message | None:
        """Send one request; returns its data reply (None when the kernel only acknowledged it);
        an error reply raises NetlinkError with the kernel's errno."""
        self._seq += 1
        seq = self._seq
        self.sock.send(encode(family, command, attrs, seq))
        data: Message | None = None
        while True:
            for m in messages(self.sock.recv(65536)):
                if m.seq != seq:
                    continue  # a multicast event or a late reply: not ours
                if m.kind == NLMSG_ERROR:
                    if m.error:
                        err = m.error
                        if family == GENL_ID_CTRL and err == errno.ENOENT:
                            return None
                        raise NetlinkError(msg=f"nbd netlink command {command}: {os.strerror(err)}")
                    return data
                data = m

    def connect(self, fds: Sequence[int], size: int, *, index: int | None = None, block: int = 4096,
                server_flags: int = 0, timeout: int = 0, dead_conn_timeout: int = 0) -> int:
        """``NBD_CMD_CONNECT``: a device (``index``, or the first free one) over the connected,
        handshaken sockets ``fds``; returns the device's index. ``timeout``: seconds a request may
        take before it is requeued (0: never — then a request in flight on a connection that
        dies waits for ever); ``dead_conn_timeout``: seconds requests wait for a new socket
        after the connection died, before they fail."""
        a = u64(ATTR_SIZE_BYTES, size) + u64(ATTR_BLOCK_SIZE_BYTES, block) + u64(ATTR_SERVER_FLAGS, server_flags)
        if index is not None:
            a += u32(ATTR_INDEX, index)
        if timeout:
            a += u64(ATTR_TIMEOUT, timeout)
        if dead_conn_timeout:
            a += u64(ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout)
        reply = self._request(self.family, CMD_CONNECT, a + sockets(fds))
        got = None if reply is None else index_of(reply)
        if got is None:
            if index is None:
                raise NetlinkError(msg="the kernel connected an NBD device without saying which")
            return index
        return got

    def reconfigure(self, index: int, fds: Sequence[int]) -> None:
        """``NBD_CMD_RECONFIGURE``: new sockets for ``index``'s dead connections (the kernel
        refuses, EINVAL, when none is dead: the link is alive)."""
        self._request(self.family, CMD_RECONFIGURE, u32(ATTR_INDEX, index) + sockets(fds))

    def disconnect(self, index: int) -> None:
        self._request(self.family, CMD_DISCONNECT, u32(ATTR_INDEX, index))

    def connected(self, index: int) -> bool:
        """``NBD_CMD_STATUS``: whether device ``index`` is connected (has a configuration)."""
        reply = self._request(self.family, CMD_STATUS, u32(ATTR_INDEX, index))
        if reply is None:
            return False
        for _k, item in attributes(reply.attrs().get(ATTR_DEVICE_LIST, b"")):
            d = dict(attributes(item))
            if DEVICE_INDEX in d and struct.unpack("=I", d[DEVICE_INDEX][:4])[0] == index:
                return bool(d.get(DEVICE_CONNECTED, b"\0")[0])
        return False

    def watch_dead_links(self) -> None:
        """Join the nbd multicast group: ``NBD_CMD_LINK_DEAD`` events then arrive on this socket
        (read them with ``dead_links``)."""
        group = self.groups.get(MCAST_GROUP)
        if group is None:
            raise NetlinkError(msg=f"the nbd family has no multicast group {MCAST_GROUP!r}")
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def dead_links(self) -> list[int]:
        """The device indices of the ``NBD_CMD_LINK_DEAD`` events waiting on the socket (blocks
        for the first datagram; use select on ``sock`` to wait with a timeout)."""
        out = []
        for m in messages(self.sock.recv(65536)):
            if m.kind == self.family and m.command == CMD_LINK_DEAD and (i := index_of(m)) is not None:
                out.append(i)
        return out
