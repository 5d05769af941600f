"""The session-end check for processes the suite left running (tests/leftovers.py, conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests import leftovers

BLOCKPROV = str(Path(sys.executable).parent / "blockprov")


def test_a_server_left_running_is_found_with_its_test_then_killed(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex  # its own session: the real one's check must not see this process
    env = {**os.environ, leftovers.MARK: mark}
    other = subprocess.Popen(["sleep", "60"], env=env)  # marked, but not a program the suite leaves running
    server = subprocess.Popen([BLOCKPROV, "--data", str(tmp_path / "d"), "serve", "--listen", "127.0.0.1:0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("serving ")
        (found,) = leftovers.find(mark)
        assert found.pid == server.pid and "serve --listen" in found.command
        assert found.test.startswith("tests/unit/test_leftovers.py::test_a_server_left_running")
        assert [p.pid for p in leftovers.settle(mark, grace=0.5)] == [server.pid]
        assert server.wait(10) is not None and leftovers.find(mark) == []
    finally:
        for p in (server, other):
            p.kill()
            p.wait()
