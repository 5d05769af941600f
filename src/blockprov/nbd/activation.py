"""systemd socket activation: the listening sockets a service manager passed to this process.

systemd, and libnbd's ``nbd_connect_systemd_socket_activation`` (``nbdinfo -- [ CMD ]``), start a
server with its listening sockets already open as descriptors 3, 4, …, and say so in the
environment: ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process: a variable inherited by
some other process is not ours to use) and optionally ``LISTEN_FDNAMES``. nbdkit and qemu-nbd serve
on them instead of binding; the agents do the same (``attach``, ``clones serve``, ``pool serve``).
This is sd_listen_fds(3) without libsystemd: the protocol is these three variables.

The variables are removed once read (``unset_environment``), so a program the agent starts (a
customization command) does not believe the sockets are its own. Each descriptor must be a
listening stream socket: anything else is refused with a message, not served half-way.
"""

from __future__ import annotations

import os
import socket
import stat

from blockprov.errors import UsageError

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def listen_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The sockets passed to this process by socket activation, or ``[]`` when none were.

    ``environ``: os.environ by default (tests pass their own; it is cleaned the same way)."""
    env: dict[str, str] | os._Environ[str] = os.environ if environ is None else environ
    fds, pid = env.get("LISTEN_FDS"), env.get("LISTEN_PID")
    for name in _VARS:
        env.pop(name, None)
    if not fds or not pid:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (our parent's unit, a shell that exported it)
    if not fds.isdigit() or int(fds) < 1:
        raise UsageError(f"socket activation: LISTEN_FDS must be a positive number, not {fds!r}")
    out = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(fds)):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise UsageError(f"socket activation: LISTEN_FDS={fds}, but descriptor {fd} is not open") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"socket activation: descriptor {fd} is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise UsageError(f"socket activation: descriptor {fd} is not a listening stream socket "
                             "(ListenStream= in the .socket unit, Accept=no)")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        out.append(sock)
    return out


def address_of(sock: socket.socket) -> str | tuple[str, int]:
    """Where clients reach a listening socket: its unix path, or (host, port) for TCP."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return os.fsdecode(name) if isinstance(name, bytes) else str(name)
    return str(name[0]), int(name[1])


def uri_template(sock: socket.socket) -> str:
    """The NBD URI of export NAME on ``sock`` (``nbd+unix:///NAME?socket=…`` or ``nbd://HOST:PORT/NAME``)."""
    where = address_of(sock)
    if isinstance(where, str):
        return f"nbd+unix:///NAME?socket={where}"
    host, port = where
    shown = f"[{host}]" if ":" in host else host
    return f"nbd://{shown}:{port}/NAME"
