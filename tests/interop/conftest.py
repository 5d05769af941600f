"""Interop fixtures: a development NBD server (``python -m blockprov.nbd``) in a subprocess."""

from __future__ import annotations

import selectors
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NBD_SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's libnbd bindings (``import nbd``) live there


@dataclass
class NbdServerProcess:
    proc: subprocess.Popen[str]
    address: str  # "unix:/path" or "tcp:host:port"

    @property
    def socket(self) -> str:
        assert self.address.startswith("unix:")
        return self.address[5:]

    def uri(self, export: str = "") -> str:
        if self.address.startswith("unix:"):
            return f"nbd+unix:///{export}?socket={self.socket}"
        host, port = self.address[4:].rsplit(":", 1)
        return f"nbd://{host}:{port}/{export}"


@pytest.fixture
def nbd_server() -> Iterator[Callable[..., NbdServerProcess]]:
    """Start servers: ``nbd_server("--memory", "64M")``; a unix socket is added unless --listen is given."""
    started: list[subprocess.Popen[str]] = []
    tmpdir = tempfile.mkdtemp(prefix="nbd")  # short: unix socket paths are limited to 108 bytes

    def start(*args: str) -> NbdServerProcess:
        argv = [sys.executable, "-m", "blockprov.nbd", *args]
        if "--listen" not in args:
            argv += ["--socket", f"{tmpdir}/s{len(started)}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=20):
            raise AssertionError("the NBD server did not start")
        line = proc.stdout.readline()
        if not line.startswith("nbd: listening on "):
            raise AssertionError(f"the NBD server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        return NbdServerProcess(proc, line.split("listening on ", 1)[1].strip())

    yield start
    for proc in started:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert "Traceback" not in err, err
    shutil.rmtree(tmpdir, ignore_errors=True)


def nbd_run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def nbd_python(script: str, *args: str) -> str:
    """Run ``script`` with the system Python that has libnbd's ``nbd`` module; its stdout."""
    return nbd_run(NBD_SYSTEM_PYTHON, "-c", script, *args).stdout


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A small tmpfs (a real full disk); mounting needs root, which CI has."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    try:
        yield make
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)
