"""The in-machine agent's supervisor (issue 24 item 5): the agent is no single point of failure.

While the disk lacks chunks, the agent serves the machine's root over NBD; if it dies, the root
must not. PID 1 (netboot/machine.py) starts this small process as ``@blockprov-supervisor`` — an
'@' root-storage process like the agent, which survives the switch to the real root and
systemd's shutdown — and it starts the agent:

* the agent says ``READY nbd SOCKET`` once its NBD server listens (or ``READY native DEVICE`` once
  the native path is up: netboot/native.py, no NBD at all; or ``ERROR why``);
* for NBD, the supervisor connects to the socket, does the handshake (netboot/kernelnbd.py) and
  hands the socket to the kernel through netlink (netboot/nbdlink.py) with a request timeout and
  a dead-connection timeout, then tells PID 1 ``READY nbd /dev/nbd0``;
* it then watches: when the agent dies (any signal, SIGKILL included) it starts it again, in
  resume mode (the cache reopened as it is: no reset, no update, no loader), and gives the kernel
  the new agent's socket (``NBD_CMD_RECONFIGURE``); when the kernel gives up a connection while
  the agent lives (a request past its timeout: a slow miss), it gives it a new one. Requests wait
  meanwhile: the kernel holds new ones for up to DEAD_CONN_TIMEOUT, and requeues those in flight
  on the dead connection after REQUEST_TIMEOUT. The machine sees a delay, not an I/O error.
  A native agent that dies is started again as the resident agent (``--resident``): nothing
  waits on it.

The resident agent (the root native: netboot/resident.py) is out of the machine's I/O path, so a
resident that does not start, or keeps dying, is not urgent: it is started again after
``RESIDENT_PAUSE`` (10 s, doubling to 30 min), for as long as the machine runs — it keeps trying,
never gives up, since what stops it may pass (a repository or network that comes back, a disk
busy at boot) and an attempt every half hour costs the machine nothing (idle priority). Each
failure is one console line saying why (the agent's own error), what the PC lacks meanwhile
(registration, its state on the console, repository-initiated snapshots) and when the next try is.
It used to be started again every 30 s for ever, with no word of why.

A write the dead agent acknowledged is in the page cache of the data partition (the kernel's, not
the agent's) and its ``modified`` record was synced before the write (cache/device.py's order), so
the new agent's first FLUSH makes it durable: invariant 3 holds across the restart.

Memory: like the agent, it locks itself in memory, is an I/O flusher and OOM-exempt
(netboot/daemon.py): it must be able to restart the agent under the memory pressure that may be
why it died. It imports nothing of the agent (the cache, asyncio, the HTTP client): it is small,
and its start costs the boot nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from blockprov.errors import BlockprovError
from blockprov.netboot import kernelnbd, nbdlink
from blockprov.netboot.daemon import harden, ready_line

NBD_INDEX = 0
REQUEST_TIMEOUT = 10  # seconds a request may take before the kernel requeues it (a dead agent's in flight)
DEAD_CONN_TIMEOUT = 600  # seconds the kernel holds requests for a new connection before they fail
READY_TIMEOUT = 3600.0  # before-boot hydration of a large image over a slow link takes a while
RESTART_PAUSE = (0.5, 30.0)  # seconds between restarts: first, and at most (doubled each quick death)
RESIDENT_PAUSE = (10.0, 1800.0)  # the same for the resident agent (module docstring): nothing waits on it
QUICK_DEATH = 60.0  # an agent that dies sooner than this after its start backs the next restart off
DIAL_TIMEOUT = 60.0


def say(msg: str) -> None:
    print(f"blockprov-supervisor: {msg}", file=sys.stderr, flush=True)


def own_api() -> None:
    """/dev, /proc and /sys in this root once PID 1 moved them into the machine's root (a restart
    after the switch): python reads /dev/urandom, the agent finds its disk in /sys and /dev (where
    its cache records its data partition) and hardens itself through /proc. Out of the
    machine's sight. The initramfs's own /dev/null and /dev/console stay behind the move: not a
    sign that /dev is there, its mount is."""
    for fs, where in (("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")):
        if not os.path.ismount(where):
            os.makedirs(where, exist_ok=True)
            subprocess.run(["mount", "-t", fs, f"bp-{fs}", where], capture_output=True, timeout=60)


def start_agent(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """The agent (``@blockprov-agent ARGS… READY_FD``), and the read end of its READY pipe."""
    own_api()
    r, w = os.pipe()
    proc = subprocess.Popen(["@blockprov-agent", "-S", "-B", "-m", "blockprov.netboot.inagent", *args, str(w)],
                            executable=sys.executable or "/usr/bin/python3", pass_fds=(w,))
    os.close(w)
    return proc, r


def wait_ready(proc: subprocess.Popen[bytes], r: int, timeout: float = READY_TIMEOUT) -> str:
    """The agent's first line: 'READY …' or 'ERROR why'; the pipe closed."""
    try:
        return ready_line(proc, r, timeout)
    finally:
        os.close(r)


def dial(path: str, timeout: float = DIAL_TIMEOUT) -> tuple[socket.socket, kernelnbd.Export]:
    """A connected, handshaken socket to the agent's NBD server at ``path``."""
    end = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock, kernelnbd.handshake(sock)
        except (OSError, BlockprovError):
            sock.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


class Supervisor:
    """Starts the agent, connects the kernel's NBD device to it, and keeps both going."""

    def __init__(self, params: dict[str, str]) -> None:
        self.params = params
        self.agent: subprocess.Popen[bytes] | None = None
        self.kind = ""  # "nbd" or "native", as the agent said
        self.why = ""  # the agent's last ERROR line (it did not start), said with the next restart
        self.socket = ""
        self.started = 0.0
        self.pause = RESTART_PAUSE[0]
        self.stale = False  # /dev/nbd has no live connection to the agent: reconnect every second until it has
        self.link: nbdlink.Link | None = None
        self.events: nbdlink.Link | None = None

    def first(self) -> str:
        """Start the agent for the boot; returns PID 1's READY or ERROR line."""
        proc, r = start_agent([json.dumps(self.params)])
        self.agent, self.started = proc, time.monotonic()
        line = wait_ready(proc, r)
        words = line.split()
        if words[:1] != ["READY"] or len(words) < 3:
            return line if line.startswith("ERROR") else f"ERROR the agent said {line!r}"
        self.kind = words[1]
        if self.kind == "native":
            return line
        self.socket = words[2]
        try:
            self.attach()
        except (OSError, BlockprovError) as e:
            return f"ERROR cannot start /dev/nbd{NBD_INDEX}: {e}"
        return f"READY nbd /dev/nbd{NBD_INDEX}"

    def attach(self) -> None:
        sock, export = dial(self.socket)
        try:
            self.link = nbdlink.Link()
            self.link.connect([sock.fileno()], export.size, index=NBD_INDEX, server_flags=export.flags,
                              timeout=REQUEST_TIMEOUT, dead_conn_timeout=DEAD_CONN_TIMEOUT)
        finally:
            sock.close()  # the kernel holds its own reference
        self.events = nbdlink.Link()
        self.events.watch_dead_links()

    def reconnect(self) -> None:
        """A new connection to the agent for the kernel's dead one."""
        assert self.link is not None
        sock, _export = dial(self.socket)
        try:
            self.link.reconfigure(NBD_INDEX, [sock.fileno()])
        finally:
            sock.close()

    def start_resident(self) -> str:
        """Start the resident agent (the root is native); its READY or ERROR line."""
        self.kind = "native"
        proc, r = start_agent(["--resident", "{}"])
        self.agent, self.started = proc, time.monotonic()
        line = wait_ready(proc, r)
        self.why = "" if line.startswith("READY") else line.removeprefix("ERROR").strip()
        return line

    def restart(self) -> None:
        """The agent died: start it again (resume mode for NBD, the resident for native), reconnect."""
        code = self.agent.returncode if self.agent is not None else None
        lived = time.monotonic() - self.started
        if self.kind == "native":
            first, most = RESIDENT_PAUSE
            # back to the first pause only after a resident that ran a while; one that never started backs off
            self.pause = first if lived > QUICK_DEATH and not self.why else min(most, max(first, self.pause * 2))
            what = f"did not start: {self.why}" if self.why else f"died (exit status {code}) after {lived:.0f} s"
            say(f"the resident agent {what}. The PC runs on (its root is native: nothing waits on the agent), "
                f"but until it starts the PC is not registered, shows no state on the console and takes no "
                f"snapshot. Starting it again in {self.pause:g} s (the interval doubles to {most:g} s; it keeps "
                "trying as long as the PC runs)")
            time.sleep(self.pause)
            line = self.start_resident()
            if line.startswith("READY"):
                say("the resident agent is running")
            return
        self.pause = RESTART_PAUSE[0] if lived > QUICK_DEATH else min(RESTART_PAUSE[1], self.pause * 2)
        say(f"the agent died (exit status {code}) after {lived:.0f} s: starting it again in {self.pause:g} s")
        time.sleep(self.pause)
        t0 = time.monotonic()
        proc, r = start_agent(["--resume", json.dumps(self.params)])
        self.agent, self.started = proc, time.monotonic()
        line = wait_ready(proc, r)
        if not line.startswith("READY"):
            say(f"the agent did not come back: {line}")
            return
        try:
            self.reconnect()
        except (OSError, BlockprovError) as e:
            say(f"cannot give /dev/nbd{NBD_INDEX} the new agent's socket: {e} (tried again every second)")
            self.stale = True
            return
        self.stale = False
        say(f"the agent is back after {time.monotonic() - t0:.1f} s; /dev/nbd{NBD_INDEX} reconnected")

    def watch(self) -> None:
        """Forever: restart the agent when it dies, renew a connection the kernel gave up."""
        if self.agent is not None:
            say(f"watching the agent (pid {self.agent.pid})")
        while True:
            fds = [self.events.sock] if self.events is not None else []
            got, _, _ = select.select(fds, [], [], 1.0)
            dead = bool(got) and self.events is not None and NBD_INDEX in self.events.dead_links()
            if self.agent is not None and self.agent.poll() is not None:
                self.restart()
            elif (dead or self.stale) and self.link is not None:
                time.sleep(0.2)  # the agent may be dying: its death is seen first
                if self.agent is not None and self.agent.poll() is not None:
                    continue
                try:
                    self.reconnect()
                    say(f"/dev/nbd{NBD_INDEX}: a new connection to the running agent")
                    self.stale = False
                except (OSError, BlockprovError) as e:
                    # the kernel's event was taken: without this flag nothing would try again, and
                    # the root would get I/O errors once the device's dead-connection timeout ends
                    if not self.stale:
                        say(f"cannot renew /dev/nbd{NBD_INDEX}'s connection: {e} (tried again every second)")
                    self.stale = True


def main(argv: list[str]) -> int:
    """``@blockprov-supervisor PARAMS_JSON READY_FD`` (PID 1 reads one line on READY_FD), or
    ``@blockprov-supervisor --resident`` (the every-day boot's: the root is native already, the
    agent is started resident and kept so)."""
    if argv[:1] == ["--resident"]:
        # idle CPU class for it and the agent it starts (inherited: the agent's python start and
        # imports too): out of the I/O path, it takes only what the machine leaves
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    for problem in harden():
        say(f"warning: {problem}")
    if argv[:1] == ["--resident"]:
        sup = Supervisor({})
        sup.start_resident()  # when it did not start, watch() says why, and when it is tried again
        sup.watch()
        return 0
    params: dict[str, str] = json.loads(argv[0])
    ready = int(argv[1])
    sup = Supervisor(params)
    line = sup.first()
    os.write(ready, (line + "\n").encode())
    os.close(ready)
    if not line.startswith("READY"):
        return 1
    Path("/run/blockprov").mkdir(parents=True, exist_ok=True)
    sup.watch()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
