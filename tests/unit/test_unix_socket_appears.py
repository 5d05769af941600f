"""An NBD server's unix socket appears only once it accepts connections (issue 16): a client that
polls for the path connects the first time it sees it, never "connection refused". The rules of
``claim_unix_path`` still hold: a socket another server answers on is refused, a stale one is
replaced, a regular file is refused."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from blockprov.device.memory import MemoryDevice
from blockprov.errors import UsageError
from blockprov.nbd.server import NbdServer, bind_listening_unix


def poll_and_connect(path: Path, seen: list[str], stop: threading.Event) -> None:
    """Wait (bounded) for ``path`` to appear, then connect once: record how that went."""
    end = time.monotonic() + 20
    while not stop.is_set() and time.monotonic() < end:
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as c:
                try:
                    c.connect(str(path))
                    seen.append("ok")
                except OSError as e:
                    seen.append(f"refused: {e}")
            return
    seen.append("never appeared")


def test_a_polling_client_connects_the_first_time_it_sees_the_socket(tmp_path: Path) -> None:
    async def one_round(i: int) -> str:
        path = tmp_path / f"s{i}.sock"
        seen: list[str] = []
        stop = threading.Event()
        t = threading.Thread(target=poll_and_connect, args=(path, seen, stop))
        t.start()
        server = NbdServer({"": MemoryDevice(1 << 20)})
        try:
            await server.start_unix(path)
            await asyncio.get_running_loop().run_in_executor(None, t.join, 20)
        finally:
            stop.set()
            await server.close()
        return seen[0] if seen else "no answer"

    async def main() -> list[str]:
        return [await one_round(i) for i in range(25)]

    results = asyncio.run(main())
    assert results == ["ok"] * 25
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_bind_rules(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    live = bind_listening_unix(path)
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)  # it listens under its final name
        with pytest.raises(UsageError, match="in use"):
            bind_listening_unix(path)  # another server answers there
    finally:
        live.close()
    # the server died without removing it: stale, replaced
    again = bind_listening_unix(path)
    again.close()
    (tmp_path / "f").write_text("mine")
    with pytest.raises(UsageError, match="not a socket"):
        bind_listening_unix(str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sock", "f"]  # no temporary name left


def test_a_path_near_the_unix_limit(tmp_path: Path) -> None:
    """The temporary name is longer than the final one; bound through /proc/self/fd when it would
    not fit in a unix address."""
    d = tmp_path / ("d" * max(1, 97 - len(str(tmp_path))))  # DIR/x.sock is 105 bytes
    d.mkdir()
    path = str(d / "x.sock")
    assert len(path) <= 107 < len(path) + 30
    s = bind_listening_unix(path)
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
    finally:
        s.close()
    assert [p.name for p in d.iterdir()] == ["x.sock"]
