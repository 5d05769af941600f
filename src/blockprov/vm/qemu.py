"""qemu for managed VMs: the command line, the process, QMP, and the host's memory figures.

Why these choices: TCG only (``accel=tcg``: on these hosts /dev/kvm is a paravirtual KVM that hangs
a stock kernel); the machine type is resolved to its versioned name (``pc`` → ``pc-i440fx-7.2``)
and recorded, because device state migrated between different machine types is undefined; RAM is
always a file-backed memory backend (``share=on`` for a VM that may become a template, so the file
*is* its RAM; ``share=off`` for a clone, so the template's file is mapped copy-on-write and pages
stay shared until a clone writes them); every VM has the same device set (a virtio disk, a
virtio-net NIC with its own MAC and no option ROM, a virtio-serial port for the identity channel, a
``vmgenid`` device) so that any VM can become a template its clones match device for device.

QMP goes through ``qemu.qmp`` (the QEMU project's own client library, pinned in pyproject: its API
is young), never a hand-written client. No on-disk state here: vms.py owns the VM directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockprov.errors import UsageError, VmFailed
from blockprov.names import UNIX_PATH_MAX

QEMU = "qemu-system-x86_64"
IDENTITY_PORT = "org.blockprov.identity"  # the virtio-serial port the test guest listens on
MEMORY_ID = "ram"


@dataclass(frozen=True)
class Machine:
    """What must be identical between a template and its clones (template.py checks it)."""

    qemu_version: str
    machine: str  # the versioned machine type, e.g. pc-i440fx-7.2
    memory: int  # bytes
    cpus: int
    extra_args: tuple[str, ...]  # the user's own qemu arguments (after --)
    kernel: bool  # direct kernel boot (the boot files are copied next to the VM)
    append: str  # the kernel command line ("" without direct kernel boot)


@dataclass(frozen=True)
class Wiring:
    """What differs between VMs of one machine: files, sockets, disk, MAC."""

    dir: Path
    disk_uri: str
    mac: str
    memory_path: Path
    share: bool  # share=on: the VM's RAM is the file (a future template); off: a private CoW mapping
    incoming: bool  # -S -incoming defer: a clone waiting for its template's device state
    kernel: Path | None = None
    initrd: Path | None = None


@functools.cache
def qemu_version() -> str:
    out = _run([QEMU, "--version"]).splitlines()[0]
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out


@functools.cache
def machine_types() -> dict[str, str]:
    """Every machine type qemu knows, aliases resolved: ``{"pc": "pc-i440fx-7.2", "pc-i440fx-7.2": …}``."""
    out: dict[str, str] = {}
    for line in _run([QEMU, "-machine", "help"]).splitlines()[1:]:
        parts = line.split()
        if not parts:
            continue
        alias = re.search(r"\(alias of (\S+)\)", line)
        out[parts[0]] = alias.group(1) if alias else parts[0]
    return out


def resolve_machine(name: str) -> str:
    found = machine_types().get(name)
    if found is None:
        raise UsageError(f"qemu {qemu_version()} has no machine type {name!r}")
    return found


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30,
                              stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise VmFailed(name=cmd[0], why=f"cannot run {' '.join(cmd)}: {e}") from None


def new_mac(taken: set[str]) -> str:
    """A random locally administered MAC in qemu's 52:54:00 range, not in ``taken``."""
    while True:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        if mac not in taken:
            return mac


def sockets(d: Path) -> dict[str, Path]:
    """The VM's unix sockets, checked against the address limit (107 bytes) before qemu is started."""
    out = {"qmp": d / "qmp.sock", "identity": d / "identity.sock"}
    for p in out.values():
        if len(str(p).encode()) > UNIX_PATH_MAX:
            raise UsageError(f"{p} is too long for a unix socket ({UNIX_PATH_MAX} bytes): use a shorter --dir")
    return out


def command(m: Machine, w: Wiring) -> list[str]:
    """The qemu command line of one VM."""
    s = sockets(w.dir)
    drive = w.disk_uri.replace(",", ",,")
    cmd = [QEMU, "-name", w.dir.name, "-machine", f"{m.machine},accel=tcg,memory-backend={MEMORY_ID}",
           "-m", f"{m.memory >> 20}M", "-smp", str(m.cpus),
           "-object", f"memory-backend-file,id={MEMORY_ID},size={m.memory >> 20}M,"
                      f"mem-path={str(w.memory_path).replace(',', ',,')},share={'on' if w.share else 'off'}",
           "-display", "none", "-vga", "none", "-no-user-config", "-nodefaults",
           "-serial", f"file:{w.dir / 'console.log'}",
           "-qmp", f"unix:{s['qmp']},server=on,wait=off",
           "-drive", f"file={drive},format=raw,if=none,id=root,cache=writeback",
           "-device", "virtio-blk-pci,drive=root,id=disk0",
           "-netdev", "user,id=net0", "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={w.mac},romfile=",
           "-device", "virtio-serial-pci,id=vser0",
           "-chardev", f"socket,id=ident,path={s['identity']},server=on,wait=off",
           "-device", f"virtserialport,chardev=ident,name={IDENTITY_PORT}",
           "-device", "vmgenid,guid=auto"]
    if m.kernel:
        if w.kernel is None or w.initrd is None:
            raise UsageError("direct kernel boot needs the kernel and the initrd")
        cmd += ["-kernel", str(w.kernel), "-initrd", str(w.initrd), "-append", m.append]
    if w.incoming:
        cmd += ["-S", "-incoming", "defer"]
    return cmd + list(m.extra_args)


def spawn(cmd: list[str], log: Path, ready: Callable[[], bool], name: str, timeout: float,
          poll: float = 0.05) -> int:
    """Start ``cmd`` detached from us (its own session: it outlives the command that started it),
    its output appended to ``log``, and wait until ``ready()`` (asked every ``poll`` seconds);
    returns its pid. One that exits or is not ready in time is killed and reported with the end of
    its log. So is one whose wait is interrupted (Ctrl-C): the caller never learnt its pid, and a
    detached process nobody knows of would outlive the command."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise VmFailed(name=name, why=f"{cmd[0]} exited with status {proc.returncode}: {_tail(log)}")
            if ready():
                return proc.pid
            time.sleep(poll)
        raise VmFailed(name=name, why=f"not ready after {timeout:g} s: {_tail(log)}")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def start(cmd: list[str], d: Path, timeout: float = 30.0) -> int:
    """Start qemu and wait until its QMP socket exists (a stat every 10 ms: a clone's whole start
    takes a few tenths of a second); its own messages go to ``d/qemu.log``."""
    qmp = sockets(d)["qmp"]
    qmp.unlink(missing_ok=True)
    return spawn(cmd, d / "qemu.log", qmp.exists, d.name, timeout, poll=0.01)


def _tail(p: Path, n: int = 5) -> str:
    try:
        return " / ".join(p.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def process_lives(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def alive(pid: int | None, d: Path) -> bool:
    """True when ``pid`` is a live (not zombie) qemu of the VM in ``d``: a pid reused by another
    process must never be taken for the VM, let alone signalled."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not process_lives(pid):
        return False
    return str(d / "qmp.sock").encode() in b"".join(cmdline) or any(str(d).encode() in a for a in cmdline)


def kill(pid: int, d: Path, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, a qemu that did not quit when asked."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not alive(pid, d):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive(pid, d):
            time.sleep(0.05)


# -- QMP --------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def qmp(d: Path, timeout: float = 10.0, pid: int | None = None) -> AsyncIterator[Any]:
    """A connected ``qemu.qmp.QMPClient`` of the VM in ``d``. A refused connection is tried again
    until ``timeout``: qemu binds its socket (the file appears, which is what ``start`` waits for)
    a moment before it listens — unless qemu (``pid``) has exited, which is said at once."""
    from qemu.qmp import QMPClient, QMPError

    deadline = time.monotonic() + timeout
    while True:
        client = QMPClient(d.name)
        try:
            await asyncio.wait_for(client.connect(str(sockets(d)["qmp"])), max(0.1, deadline - time.monotonic()))
            break
        except (TimeoutError, QMPError, OSError) as e:
            with contextlib.suppress(Exception):
                await client.disconnect()
            if pid is not None and not process_lives(pid):
                raise VmFailed(name=d.name, why=f"qemu exited: {_tail(d / 'qemu.log') or 'no message'}") from None
            if time.monotonic() >= deadline or not _refused(e):
                raise VmFailed(name=d.name, why=f"QMP does not answer: {e or type(e).__name__}") from None
            await asyncio.sleep(0.01)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


# query-status answers the guest cannot come back from by itself
ENDED = ("shutdown", "guest-panicked", "internal-error", "io-error")


def wait_running(d: Path, pid: int, timeout: float = 60.0, poll: float = 0.05) -> None:
    """Return once QMP's ``query-status`` says the guest runs. qemu that exits first (a memory size
    it cannot map, a bad argument after the socket appeared), a guest stopped on an error, or one
    not running within ``timeout`` seconds: VmFailed with qemu's last words (its log)."""
    async def ask() -> None:
        deadline = time.monotonic() + timeout
        async with qmp(d, timeout=timeout, pid=pid) as c:
            while True:
                st = str((await execute(c, "query-status", timeout=timeout)).get("status", "unknown"))
                if st == "running":
                    return
                if st in ENDED or time.monotonic() > deadline:
                    tail = _tail(d / "qemu.log")
                    raise VmFailed(name=d.name, why=f"the guest is {st}, not running" + (f": {tail}" if tail else ""))
                await asyncio.sleep(poll)
    try:
        asyncio.run(ask())
    except VmFailed:
        if not process_lives(pid):
            time.sleep(0.1)  # its last words reach the log as it exits
            raise VmFailed(name=d.name, why=f"qemu exited: {_tail(d / 'qemu.log') or 'no message'}") from None
        raise


def _refused(e: BaseException) -> bool:
    """True for a connection refused (qemu.qmp wraps the OSError in its own error)."""
    seen: BaseException | None = e
    for _ in range(8):  # a chain is short; never follow a cyclic one for ever
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def execute(client: Any, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """One QMP command; its error becomes ``VmFailed`` naming the command."""
    from qemu.qmp import QMPError

    try:
        return await asyncio.wait_for(client.execute(cmd, args), timeout)
    except (TimeoutError, QMPError, OSError) as e:
        raise VmFailed(name=client.name, why=f"{cmd}: {e or type(e).__name__}") from None


async def wait_migration(client: Any, timeout: float, states: tuple[str, ...] = ("completed",),
                         poll: float = 0.01) -> dict[str, Any]:
    """Poll ``query-migrate`` every ``poll`` seconds until it reaches one of ``states`` (failed or
    cancelled: an error). A clone's device state loads in a few hundredths of a second."""
    deadline = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = await execute(client, "query-migrate")
        status = st.get("status", "none")
        if status in states:
            return st
        if status in ("failed", "cancelled"):
            raise VmFailed(name=client.name, why=f"migration {status}: {st.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise VmFailed(name=client.name, why=f"migration still {status} after {timeout:g} s")
        await asyncio.sleep(poll)


async def set_ignore_shared(client: Any) -> None:
    """RAM that is a shared, named file is not copied by the migration: the file already holds it."""
    await execute(client, "migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


# -- host memory ------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, shared and private bytes of a process (``/proc/PID/smaps_rollup``); {} if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    kb: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
            kb[parts[0][:-1]] = int(parts[1]) << 10
    return {"rss": kb.get("Rss", 0), "pss": kb.get("Pss", 0),
            "shared": kb.get("Shared_Clean", 0) + kb.get("Shared_Dirty", 0),
            "private": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)}


def mapping_figures(pid: int, path: Path) -> dict[str, int]:
    """The same figures for one file's mappings only (``/proc/PID/smaps``): the guest RAM of a VM,
    whose sharing is what templates are for, apart from qemu's own heap and translation cache."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    want = str(path)
    kb: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
            inside = len(parts) >= 6 and " ".join(parts[5:]) == want
        elif inside and len(parts) >= 3 and parts[2] == "kB":
            kb[parts[0][:-1]] = kb.get(parts[0][:-1], 0) + (int(parts[1]) << 10)
    return {"rss": kb.get("Rss", 0), "pss": kb.get("Pss", 0),
            "shared": kb.get("Shared_Clean", 0) + kb.get("Shared_Dirty", 0),
            "private": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)}


def mem_available(meminfo: str | None = None) -> int:
    """MemAvailable in bytes (from ``meminfo``'s text, else /proc/meminfo)."""
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    if m is None:
        raise VmFailed(name="host", why="no MemAvailable in /proc/meminfo")
    return int(m.group(1)) << 10
