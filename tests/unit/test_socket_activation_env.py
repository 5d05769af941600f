"""The socket activation variables (nbd/activation.py): whose they are, and that they are consumed.
The sockets themselves are passed by real clients in tests/interop/test_socket_activation.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from blockprov.errors import UsageError
from blockprov.nbd.activation import listen_sockets, uri_template


def test_no_activation() -> None:
    assert listen_sockets({}) == []


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "nbd", "PATH": "/bin"}
    assert listen_sockets(env) == []
    assert env == {"PATH": "/bin"}  # a program the agent starts must not take the sockets for its own


def test_a_bad_count_is_refused() -> None:
    with pytest.raises(UsageError, match="LISTEN_FDS"):
        listen_sockets({"LISTEN_FDS": "many", "LISTEN_PID": str(os.getpid())})


def test_uri_templates(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as u, socket.socket() as t:
        u.bind(str(tmp_path / "s"))
        t.bind(("127.0.0.1", 0))
        assert uri_template(u) == f"nbd+unix:///NAME?socket={tmp_path / 's'}"
        assert uri_template(t) == f"nbd://127.0.0.1:{t.getsockname()[1]}/NAME"
