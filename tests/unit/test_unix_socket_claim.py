"""A unix socket path another server answers on is never taken over (issue 17 item 2): asyncio's
``create_unix_server`` removes any socket file in its way, so ``NbdServer.start_unix`` checks first.
A stale socket (its server died without removing it) is replaced; a regular file is left alone."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

import pytest

from blockprov.device.memory import MemoryDevice
from blockprov.errors import UsageError
from blockprov.nbd.server import NbdServer


def test_a_served_socket_is_refused_a_stale_one_replaced_a_file_kept() -> None:
    with tempfile.TemporaryDirectory(prefix="bpsock", dir="/tmp") as d:  # short: a unix socket's path
        asyncio.run(claims(Path(d) / "s.sock"))


async def claims(path: Path) -> None:
    """Three servers in turn on one path: a busy socket, a stale one, a regular file."""
    first = NbdServer({"": MemoryDevice(1 << 20)})
    await first.start_unix(path)
    try:
        second = NbdServer({"": MemoryDevice(1 << 20)})
        with pytest.raises(UsageError, match="in use"):
            await second.start_unix(path)
        await second.close()
        assert path.is_socket()
        with socket.socket(socket.AF_UNIX) as s:  # the first server still answers there
            s.connect(str(path))
    finally:
        await first.close()
    assert not path.exists()  # removed by its owner on close

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on: what a killed server leaves
    stale.close()
    again = NbdServer({"": MemoryDevice(1 << 20)})
    await again.start_unix(path)
    await again.close()

    path.write_text("not a socket")
    other = NbdServer({"": MemoryDevice(1 << 20)})
    with pytest.raises(UsageError, match="not a socket"):
        await other.start_unix(path)
    await other.close()
    assert path.read_text() == "not a socket"
