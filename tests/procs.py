"""Real processes for tests: a repository server and agents, started as users start them.

Both print their address on the first stdout line; we wait for it (bounded) and stop them with
SIGTERM (then SIGKILL after a grace period) in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
NBDSH_PY = "/usr/bin/python3"  # Debian's python, which has the libnbd bindings


@dataclass
class Proc:
    proc: subprocess.Popen[str]
    line: str
    url: str = ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    t.start()
    t.join(timeout)
    return line[0] if line else ""


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("BLOCKPROV_REPO", None)
    e.update(extra or {})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data: Path, *extra: str, port: int = 0, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """``blockprov serve`` on 127.0.0.1; returns the process (with ``.url``) and its URL. ``env``: more
    environment for the server only (e.g. ``BLOCKPROV_STORE``, ``BLOCKPROV_CATALOG``)."""
    proc = subprocess.Popen([str(VENV_BIN / "blockprov"), "--data", str(data), "serve",
                             "--listen", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
    line = first_line(proc, 30)
    m = re.match(r"serving (https?://\S+)", line)
    if m is None:
        proc.kill()
        _o, err = proc.communicate()
        raise AssertionError(f"server did not start: {line!r}\n{err}")
    return Proc(proc, line, m.group(1)), m.group(1)


def start_agent(cache: Path, ref: str | None, sock: Path, *extra: str, data: Path | None = None,
                repo_url: str | None = None, env: dict[str, str] | None = None) -> tuple[Proc, dict[str, object]]:
    """``blockprov attach`` serving on a unix socket; returns the process and its JSON banner."""
    args = [str(VENV_BIN / "blockprov")]
    if repo_url:
        args += ["--repo", repo_url]
    if data:
        args += ["--data", str(data)]
    args += ["attach", *([ref] if ref else []), "--cache", str(cache), "--socket", str(sock), "--json", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
    line = first_line(proc, 60)
    try:
        banner = json.loads(line)
    except ValueError:
        proc.kill()
        _o, err = proc.communicate()
        raise AssertionError(f"agent did not start: {line!r}\n{err}") from None
    return Proc(proc, line), banner


def start_serving(*args: str, data: Path | None = None, repo_url: str | None = None,
                  env: dict[str, str] | None = None) -> tuple[Proc, dict[str, object]]:
    """`blockprov clones serve` / `pool serve` with --json: the banner lists the instances."""
    cmd = [str(VENV_BIN / "blockprov")]
    cmd += ["--repo", repo_url] if repo_url else ["--data", str(data)]
    proc = subprocess.Popen([*cmd, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(env))
    line = first_line(proc, 60)
    try:
        return Proc(proc, line), json.loads(line)
    except ValueError:
        proc.kill()
        raise AssertionError(f"did not start: {line!r} {proc.communicate()[1]}") from None


def nbd_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def nbdsh(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a Python script with Debian's libnbd bindings (``import nbd``)."""
    return subprocess.run([NBDSH_PY, "-c", script], capture_output=True, text=True, timeout=timeout)


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if callable(pred) and pred():
            return True
        time.sleep(0.05)
    return False
