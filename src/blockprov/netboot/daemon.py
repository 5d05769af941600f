"""What makes a process of the in-machine agent a root-storage daemon (netboot/inagent.py,
netboot/supervisor.py).

The kernel may reclaim memory by writing dirty pages to the machine's root, which, on the NBD
data path, needs the agent — and, when the agent dies, its supervisor. So both:
``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` (no page of theirs is ever swapped or
dropped; ONFAULT so thread stacks and arenas are not populated up front),
``prctl(PR_SET_IO_FLUSHER)`` (their own allocations do not recurse into I/O reclaim, as for loop
and nbd-client), an ``oom_score_adj`` of -1000, and small thread stacks. Kept apart so the
supervisor, which must stay small, imports nothing of the agent. Also the one line a daemon says
when it is ready (``ready_line``), read by the supervisor from the agent and by PID 1
(netboot/machine.py) from the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import threading
import time
from pathlib import Path

PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def harden() -> list[str]:
    """Lock memory, become an I/O flusher, refuse the OOM killer; returns what failed (logged)."""
    problems = []
    threading.stack_size(512 << 10)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        problems.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        problems.append(f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())}")
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")
    except OSError as e:
        problems.append(f"oom_score_adj: {e.strerror}")
    return problems


def ready_line(proc: subprocess.Popen[bytes], r: int, timeout: float) -> str:
    """The first line ``proc`` writes on the pipe ``r``: 'READY …' or 'ERROR why' (also when it
    died, or stayed silent for ``timeout`` seconds, without a word)."""
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf and time.monotonic() < end:
        ready, _, _ = select.select([r], [], [], 1.0)
        if ready:
            got = os.read(r, 4096)
            if not got:
                break
            buf += got
        elif proc.poll() is not None:
            break
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    return line or f"ERROR the agent ended (exit status {proc.poll()}) without starting the device"
