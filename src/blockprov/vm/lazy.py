"""A lazy template's memory: the repository's memory version shown as a file, fetched on first touch.

Why it works: a clone maps its template's memory file privately (``share=off``) and, resumed with
``x-ignore-shared``, reads a page of it only when the guest touches that page. When the file is an
NBD export shown through FUSE (``nbdfuse``), each first touch becomes a read of the export, which is
an overlay instance of the memory version in the VM directory's clones directory: the chunk is
fetched from the repository once (verified by its id), kept in the shared base cache, and the page
then lives in the host's page cache, shared by every clone that maps the file. The rest of the
memory is hydrated in the background (the base cache's ``hydrate``) so a repository outage later
does not stall a guest on a page it never touched before.

Why an overlay instance rather than the base: nbdfuse opens the file read-write (qemu 7.2 opens a
``share=off`` mem-path read-write although it never writes it), and the disks agent serves
instances, not bases. Nothing is ever written to it.

Crash rules: the mount is ephemeral state: nbdfuse runs detached with a pid file; a mount whose
process died (or whose disks agent stopped) is unmounted and mounted again by the next ``vm clone``;
``unmount`` is called when the disks agent stops.

Privileges: root mounts directly; any other user needs fuse3's ``fusermount3`` (checked before
anything is mounted) and access to /dev/fuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from blockprov.durable import ensure_dir
from blockprov.errors import CannotWrite
from blockprov.vm import qemu

PIDFILE = "nbdfuse.pid"


def mounted(mnt: Path, size: int) -> bool:
    """True when the mount's nbdfuse lives and its file has the memory's size."""
    try:
        pid = int((mnt.parent / PIDFILE).read_text().strip())
        return Path(f"/proc/{pid}").exists() and (mnt / "memory").stat().st_size == size
    except (OSError, ValueError):
        return False


def _fusermount() -> str | None:
    """What unmounts (and lets nbdfuse mount) a FUSE file system as a user: fuse3's setuid helper.
    Root mounts directly and needs none."""
    return None if os.geteuid() == 0 else shutil.which("fusermount3")


def unmount(mnt: Path, timeout: float = 10.0) -> None:
    """Unmount, retried while the mount is busy (a clone's qemu that just quit may still be
    releasing its mapping of the file), for at most ``timeout`` seconds."""
    helper = _fusermount()
    cmd = [helper, "-u", "-q", str(mnt)] if helper else ["umount", str(mnt)]
    deadline = time.monotonic() + timeout
    while True:
        subprocess.run(cmd, capture_output=True, check=False, timeout=30)
        if not mnt.is_mount() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (mnt.parent / PIDFILE).unlink(missing_ok=True)


def mount(mnt: Path, uri: str, size: int, timeout: float = 30.0) -> Path:
    """The export at ``uri`` as ``mnt/memory`` (mounted now unless it is already and alive)."""
    if mounted(mnt, size):
        return mnt / "memory"
    if os.geteuid() != 0 and _fusermount() is None:
        raise CannotWrite(path=str(mnt), why="a user (not root) mounts FUSE through fusermount3, which is not "
                                             "installed (Debian package fuse3); or clone without --lazy")
    unmount(mnt)  # a stale mount (its nbdfuse or its export gone): the next one starts clean
    ensure_dir(mnt)
    pidfile = mnt.parent / PIDFILE
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    # nbdfuse writes its pid file once the file system is mounted: that is the readiness signal.
    qemu.spawn(["nbdfuse", "-P", str(pidfile), f"{mnt}/memory", uri], mnt.parent / "nbdfuse.log",
               pidfile.exists, "nbdfuse of a lazy template's memory", timeout)
    return mnt / "memory"
