"""Processes the test suite started and left running (issue 27: a `clones serve` of a closed-pipe
`vm run` test was still running 40 minutes after the suite ended).

Every process a test starts inherits the environment, so the session marks it: conftest.py sets
``BLOCKPROV_TEST_SESSION`` to a fresh id before any test (and before pytest-xdist starts its
workers, which inherit it), and pytest sets ``PYTEST_CURRENT_TEST`` during each test, which names
the test that started a leftover. At the end of the session, the processes carrying the mark
whose program is one the suite runs as a server or agent are leftovers: the session waits a
little for those still shutting down, then reports and kills the rest, and fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

MARK = "BLOCKPROV_TEST_SESSION"
# Long-running programs the suite starts (servers, agents, VMs, mounts); a short-lived tool
# (qemu-img, curl) still running at the end is a hung test, which the timeout plugin reports.
PROGRAMS = ("qemu-system", "qemu-nbd", "nbdfuse", "nbdkit", "nginx", "weed", "postgres", "chromedriver",
            "chromium", "systemd-socket-activate")


@dataclass(frozen=True)
class Leftover:
    pid: int
    command: str
    test: str  # the test running when it was started ("" if none was)

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command[:160]}  (started by {self.test or 'no test: a fixture or the session'})"


def _blockprov(argv: list[str]) -> bool:
    """``blockprov …`` (the venv's script), or python running one of its modules: ``-m
    blockprov.clones.serve`` (the VM disks agent vm/vms.py starts), ``-m blockprov.nbd`` (the
    development NBD server), ``-c '…blockprov.cli…'``."""
    if any(Path(a).name == "blockprov" for a in argv[:2]):  # the script, or python running it
        return True
    return any("blockprov.cli" in a or a.startswith("blockprov.") for a in argv[1:4])  # -m blockprov.clones.serve


def _matches(argv: list[str]) -> bool:
    name = Path(argv[0]).name if argv else ""
    return _blockprov(argv) or any(name.startswith(p) for p in PROGRAMS)


def find(session: str) -> list[Leftover]:
    """The live processes marked with ``session`` that run one of the suite's long-lived programs."""
    mark = f"{MARK}={session}".encode()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
            if mark not in env:
                continue
            argv = [a.decode(errors="replace") for a in Path(entry.path, "cmdline").read_bytes().split(b"\0") if a]
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X") or not _matches(argv):
            continue
        test = next((e[len(b"PYTEST_CURRENT_TEST="):].decode(errors="replace") for e in env
                     if e.startswith(b"PYTEST_CURRENT_TEST=")), "")
        out.append(Leftover(int(entry.name), " ".join(argv), test))
    return out


def settle(session: str, grace: float = 30.0) -> list[Leftover]:
    """The leftovers still there after ``grace`` seconds (a server stopped by a test's last
    fixture may take a moment to exit); each is then killed (SIGTERM, SIGKILL 5 s later), so the
    machine is clean whatever the verdict."""
    deadline = time.monotonic() + grace
    left = find(session)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = find(session)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            with contextlib.suppress(OSError):
                os.kill(p.pid, sig)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(_lives(p.pid) for p in left):
            time.sleep(0.1)
    return left


def _lives(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False
