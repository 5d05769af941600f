"""Customizing a new instance before it is handed out (seed 004 claim 5).

``run_command`` runs an operator's shell command against an instance's NBD export, with the
instance's name, index and NBD URI in its environment (``BLOCKPROV_INSTANCE``,
``BLOCKPROV_INDEX``, ``BLOCKPROV_NBD``); a non-zero exit fails the customization and the caller
does not hand the instance out.

``identity`` is the built-in customizer (``--customize builtin:identity``): inside the instance's
ext4 root file system it writes ``/etc/hostname`` (the instance name) and a fresh random
``/etc/machine-id``, so clones of one golden image do not collide on the network or in systemd.
It needs no kernel nbd module: nbdfuse (libnbd-bin) shows the export as a file through FUSE and
debugfs (e2fsprogs) edits the file system in it. The file system is looked for at the start of
the disk, then in the MBR or GPT partitions.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from blockprov.errors import BlockprovError, CustomizeFailed

BUILTIN_IDENTITY = "builtin:identity"
TIMEOUT = 300.0
_EXT_MAGIC = 0xEF53


def run_command(cmd: str, uri: str, name: str, index: int, timeout: float = TIMEOUT) -> None:
    env = dict(os.environ, BLOCKPROV_INSTANCE=name, BLOCKPROV_INDEX=str(index), BLOCKPROV_NBD=uri)
    try:
        p = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CustomizeFailed(name=name, why=f"{cmd!r} did not finish within {timeout:g} s") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise CustomizeFailed(name=name, why=f"{cmd!r} exited with {p.returncode}" +
                              (": " + " / ".join(tail) if tail else ""))


def customize(cmd: str, uri: str, name: str, index: int) -> None:
    if cmd == BUILTIN_IDENTITY:
        identity(uri, name)
    else:
        run_command(cmd, uri, name, index)


@contextlib.contextmanager
def export_as_file(uri: str, *, read_only: bool = False) -> Iterator[Path]:
    """The export as a regular file, through nbdfuse, for as long as the block lasts."""
    with tempfile.TemporaryDirectory(prefix="blockprov-fuse-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        pidfile = Path(tmp) / "pid"
        proc = subprocess.Popen(["nbdfuse", *(["-r"] if read_only else []), "-P", str(pidfile),
                                 f"{mnt}/disk", uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not pidfile.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else "timed out"
                    raise BlockprovError(msg=f"nbdfuse could not show {uri} as a file: {err.strip()}")
                time.sleep(0.02)
            yield mnt / "disk"
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def find_ext_fs(path: Path) -> int:
    """Byte offset of the first ext2/3/4 file system: whole disk, MBR or GPT partition."""
    with open(path, "rb") as f:
        def is_ext(off: int) -> bool:
            f.seek(off + 1024 + 56)
            raw = f.read(2)
            return len(raw) == 2 and struct.unpack("<H", raw)[0] == _EXT_MAGIC

        if is_ext(0):
            return 0
        f.seek(0)
        mbr = f.read(512)
        starts: list[int] = []
        if len(mbr) == 512 and mbr[510:512] == b"\x55\xaa":
            for k in range(4):
                ptype = mbr[446 + 16 * k + 4]
                (lba,) = struct.unpack_from("<I", mbr, 446 + 16 * k + 8)
                if ptype == 0xEE:  # protective MBR: read the GPT
                    f.seek(512)
                    hdr = f.read(92)
                    if hdr[:8] == b"EFI PART":
                        entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
                        f.seek(entries_lba * 512)
                        table = f.read(min(count, 128) * size)
                        for e in range(min(count, 128)):
                            (first,) = struct.unpack_from("<Q", table, e * size + 32)
                            if first:
                                starts.append(first * 512)
                elif ptype and lba:
                    starts.append(lba * 512)
        for off in starts:
            if is_ext(off):
                return off
    raise BlockprovError(msg="no ext2/3/4 file system found on the disk or in its partitions")


def identity(uri: str, name: str) -> str:
    """Give the instance its own hostname and machine id; returns the machine id."""
    machine_id = uuid.uuid4().hex
    with export_as_file(uri) as disk, tempfile.TemporaryDirectory(prefix="blockprov-id-") as tmp:
        offset = find_ext_fs(disk)
        (Path(tmp) / "hostname").write_text(name + "\n")
        (Path(tmp) / "machine-id").write_text(machine_id + "\n")
        script = Path(tmp) / "cmds"
        script.write_text("".join(
            f"rm /etc/{f}\nwrite {tmp}/{f} /etc/{f}\n"
            f"sif /etc/{f} mode 0100644\nsif /etc/{f} uid 0\nsif /etc/{f} gid 0\n"
            for f in ("hostname", "machine-id")))
        target = f"{disk}?offset={offset}" if offset else str(disk)
        p = subprocess.run(["debugfs", "-w", "-f", str(script), target], capture_output=True, text=True,
                           timeout=TIMEOUT)
        if p.returncode != 0 or "Filesystem opened read/only" in p.stderr:
            raise CustomizeFailed(name=name, why=f"debugfs: {p.stderr.strip()[-300:]}")
        bad = [ln for ln in p.stderr.splitlines() if ln.startswith("write:") or "Could not allocate" in ln]
        if bad:
            raise CustomizeFailed(name=name, why="debugfs: " + " / ".join(bad))
    return machine_id
