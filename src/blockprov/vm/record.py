"""Record a version's boot profile without a client paying for it: ``blockprov profile record``.

A new bootable version's first machine pays a cold boot (issue 15): the profile that makes every
later boot fast is recorded by that boot. This boots the version once, headless, next to the
repository instead: qemu (``accel=tcg``: it needs no KVM, and on these hosts KVM hangs a stock
kernel), its root disk a virtio drive on an NBD export of a throwaway cache over the repository.
The cache records the order in which the boot first reads chunks (cache/profile.py), and that
order is saved as the version's profile (merged with the one it inherited, catalog/inherit.py).

How it boots: direct kernel boot with the version's boot files when it has them (``blockprov
boot-files set``; their command line plus ``console=ttyS0`` and ``--append``), else the disk's own
boot loader (SeaBIOS; a disk without one is an error, nothing is saved). No network (``-nic
none``): a guest that needs one to boot records what it read until it gave up. The guest's writes
go to the throwaway cache, never to the version.

When the boot is over: the guest powers off (qemu exits: ``-no-reboot`` makes a reboot an exit
too), or the guest went idle — no chunk read for the first time for ``idle`` seconds after the
first read *and* qemu used under :data:`IDLE_CPU` of a core meanwhile (a guest at its login prompt
halts its CPUs; one still booting under TCG keeps a core busy, however loaded the host and however
long it goes without reading) — or ``timeout`` seconds passed. The reads of a boot with TCG are those of a
boot with KVM (the same kernel and programs read the same files); only the time differs.

No on-disk state of its own: the cache lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockprov.cache import CacheDevice, repository_source
from blockprov.errors import VmFailed
from blockprov.manifest import Manifest
from blockprov.nbd.server import NbdServer
from blockprov.repo.base import Repository
from blockprov.results import skip
from blockprov.vm.qemu import QEMU

log = logging.getLogger("blockprov.vm")

TIMEOUT = 600.0  # seconds a recording boot may take at most
IDLE = 20.0  # seconds without a new chunk read that end a boot that does not power off
POLL = 0.25
IDLE_CPU = 0.2  # share of a core below which qemu counts as idle (a halted guest: timer ticks only)
NO_BOOT = "No bootable device"  # SeaBIOS, when the disk has no boot loader
CONSOLE_TAIL = 4000  # bytes of the guest's console kept for the result and errors


@dataclass
class Recorded:
    image: str
    version: str
    chunks: int  # chunks in the recorded order
    saved: bool
    ended: str  # "poweroff", "idle", "timeout" or "no boot device"
    seconds: float
    direct_kernel: bool
    console: str = skip()  # the end of the guest's serial console (not in --json)


def _tail_bytes(path: Path, n: int = CONSOLE_TAIL) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - n))
        return f.read()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def qemu_command(drive_socket: Path, *, memory: str, kernel: Path | None = None, initrd: Path | None = None,
                 append: str = "") -> list[str]:
    drive = f"file=nbd+unix:///?socket={drive_socket},format=raw,if=virtio,cache=writeback"
    cmd = [QEMU, "-machine", "accel=tcg", "-m", memory, "-nographic", "-no-reboot", "-nic", "none",
           "-drive", drive]
    if kernel is not None and initrd is not None:
        cmd += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    return cmd


async def record(repo: Repository, manifest: Manifest, *, timeout: float = TIMEOUT, idle: float = IDLE,
                 memory: str = "512", append: str = "", save: bool = True,
                 workdir: Path | None = None) -> Recorded:
    """Boot ``manifest`` once as described in the module docstring; save the read order as its
    profile (unless ``save`` is false). VmFailed when qemu cannot run or the boot read nothing."""
    tmp = Path(tempfile.mkdtemp(prefix="bprec", dir=workdir))  # short: a unix socket path lives in it
    loop = asyncio.get_running_loop()
    ref = f"{manifest.image}@{manifest.id}"
    name = f"profile recording of {ref}"
    try:
        files = await loop.run_in_executor(None, repo.get_boot_files, ref)
        kernel = initrd = None
        cmdline = ""
        if files is not None:
            kernel, initrd = tmp / "kernel", tmp / "initrd"
            kernel.write_bytes(await loop.run_in_executor(None, repo.boot_file, ref, "kernel"))
            initrd.write_bytes(await loop.run_in_executor(None, repo.boot_file, ref, "initrd"))
            cmdline = " ".join(p for p in (files.cmdline, "console=ttyS0", append) if p)
        dev = await CacheDevice.open(tmp / "cache", repository_source(repo), manifest, repo=repo)
        server = NbdServer({"": dev})
        try:
            sock = Path(await server.start_unix(tmp / "nbd.sock"))
            cmd = qemu_command(sock, memory=memory, kernel=kernel, initrd=initrd, append=cmdline)
            log.info("recording the boot profile of %s: %s", ref, " ".join(cmd))
            ended, seconds, console = await boot_until_idle(cmd, lambda: len(dev.profile()), tmp / "console.log", name,
                                                            timeout=timeout, idle=idle)
            order = dev.profile()
        finally:
            await server.close()
            await dev.close()
        if files is None and NO_BOOT in console:
            raise VmFailed(name=name, why="its disk has no boot loader and the version no boot files "
                                          f"(add them with `blockprov boot-files set {ref} ...`); nothing saved")
        if not order:
            raise VmFailed(name=name, why=f"the boot read nothing from its disk ({ended}); console: {console[-800:]}")
        if save:
            await loop.run_in_executor(None, repo.put_profile, manifest.image, manifest.id, order)
        return Recorded(manifest.image, manifest.id, len(order), save, ended, round(seconds, 1), files is not None,
                        console)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PR_SET_PDEATHSIG = 1


def _dies_with_parent() -> None:
    """In qemu's process, before it runs: killed with this process (a recording or preparation that
    is killed, e.g. a background ``profile prepare`` stopped by the operator, leaves no qemu behind)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def boot_until_idle(cmd: list[str], progress: Callable[[], int], console: Path, name: str, *,
                          timeout: float, idle: float) -> tuple[str, float, str]:
    """Run qemu until the boot is over (module docstring): (how it ended, seconds, console tail).
    ``progress()``: how many chunks the boot has read so far (it idles once that stops growing)."""
    with open(console, "wb") as out:
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                                                        preexec_fn=_dies_with_parent)
        except FileNotFoundError:
            raise VmFailed(name=name, why=f"{cmd[0]} is not installed (Debian package qemu-system-x86)") from None
    t0 = last_new = time.monotonic()
    seen = 0
    ended = "timeout"
    cpu: deque[tuple[float, float]] = deque()  # (when, qemu's CPU seconds) over the last ``idle`` seconds
    try:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), POLL)
            now = time.monotonic()
            if proc.returncode is not None:
                ended = "poweroff"
                break
            if NO_BOOT.encode() in _tail_bytes(console):
                ended = "no boot device"
                break
            cpu.append((now, _cpu_seconds(proc.pid)))
            while len(cpu) > 1 and cpu[1][0] <= now - idle:
                cpu.popleft()
            n = progress()
            if n != seen:
                seen, last_new = n, now
            if seen and now - last_new >= idle and now - cpu[0][0] >= idle:
                busy = (cpu[-1][1] - cpu[0][1]) / (now - cpu[0][0])
                if busy < IDLE_CPU:
                    ended = "idle"
                    break
            if now - t0 >= timeout:
                break
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    tail = _tail_bytes(console).decode("utf-8", "replace")
    if ended == "poweroff" and proc.returncode not in (0, None) and not seen:
        raise VmFailed(name=name, why=f"{cmd[0]} exited with status {proc.returncode}: {tail[-800:]}")
    return ended, time.monotonic() - t0, tail
