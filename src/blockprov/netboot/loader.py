"""The disk's own boot loader: a PC whose network boot fails boots from its disk (offline).

Once the disk holds the whole image (at first provisioning), and again whenever the version's
kernel or initramfs or the machine's command line change, the in-machine agent
(netboot/inagent.py) writes onto partition 1 of its disk (netboot/disk.py's layout):

* a FAT16 file system (``mkfs.fat``) with SYSLINUX installed in it (``syslinux --install``, which
  writes ``ldlinux.sys`` and ``ldlinux.c32`` through mtools: no mount, no vfat module needed);
* the kernel and the blockprov initramfs of the version (downloaded from the repository,
  verified against their descriptors) — kept as its two parts (netboot/initramfs.py): the fast
  part ``fast.img``, which the loader boots (netboot/everyday.py's every-day boot), and the rest
  ``rest.img``, which that boot unpacks when it needs python — and ``syslinux.cfg`` whose command
  line is the network boot's own plus ``blockprov.from=disk`` (boot.py's ``disk_cmdline``);

and into sector 0 syslinux's ``mbr.bin``, which boots the *active* partition — on a GPT disk
(over 2 TiB: disk.py) syslinux's ``gptmbr.bin``, which boots the partition whose "legacy BIOS
bootable" attribute (bit 2) is set, and hands ldlinux the GPT entry; below, "the active flag" is
that attribute on a GPT disk. Which code goes in follows what the disk holds, not its size (an
older disk over 2 TiB keeps its MBR and gets ``mbr.bin``). The firmware tries
the network first (the PC's boot order: NIC, then disk); when that fails — the repository or
the network is down — it falls through to the disk, whose loader starts the same initramfs, and
the agent serves what the disk holds (inagent.py: offline boot). The tools, ``mbr.bin`` and
``gptmbr.bin`` travel in the initramfs (netboot/initramfs.py), so the agent needs nothing else.

Crash rules (a power cut while the boot partition is rewritten must leave a disk that boots or
one the firmware passes over, never a half-written loader it trusts):

1. sector 0 is rewritten with the boot partition *not active* and fsync'd first (GPT: the
   primary entry array's sector holding the attribute is written and fsync'd first, then the
   headers and the backup: disk.py's ``boot_writes``). syslinux's ``mbr.bin`` (``gptmbr.bin``)
   finding no active (bootable) partition calls ``int 0x18`` — the firmware's "boot failed,
   try the next device" — so from here until step 3 the disk is passed over (the machine boots
   from the network, or not at all if that is down too: never from a half-written loader);
2. the file system is made, the loader installed and the files copied (when only the command
   line changed: ``syslinux.cfg`` alone rewritten in place), then the partition is
   fsync'd (the mtools write through their own descriptors; fsync of the block device flushes
   its every dirty page);
3. ``loader.json`` (what was installed) is written atomically in the metadata file system, then
   sector 0 with the partition active, fsync'd (GPT: the attribute's sector first, as in 1).
   Only now does the firmware boot the disk.

A cut between 3's two writes leaves a record of a loader whose flag is off: ``installed`` says
nothing is installed unless the flag is on, so the next network boot writes it again. A cut
among a GPT's writes in 1 or 3 leaves the primary header's CRC stale (the kernel would see no
partitions): the agent's ``disk.mend`` rebuilds the headers and the backup from the primary
entry array before it uses the disk, so the flag is what that array says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import zlib
from pathlib import Path

from blockprov import boot
from blockprov.durable import atomic_write
from blockprov.errors import NetbootError
from blockprov.netboot import disk

MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
GPTMBR_BIN = Path("/usr/lib/syslinux/mbr/gptmbr.bin")  # for a GPT disk (disk.py: over 2 TiB)
MKFS_FAT = "mkfs.fat"
SYSLINUX = "syslinux"
MCOPY = "mcopy"
RECORD = "loader.json"
FAST, REST = "fast.img", "rest.img"  # the initramfs's two parts on the boot partition
FROM_DISK = boot.FROM_DISK


def node_numbers(d: disk.Disk, sys_block: Path = Path("/sys/class/block")) -> dict[str, tuple[int, int]]:
    """(major, minor) of the disk and its boot partition, read while /sys is there (before PID 1
    moves it into the new root: the agent, whose root stays the initramfs, then has no /sys nor /dev)."""
    out = {}
    for name in (d.name, d.part_name(1)):
        major, minor = (sys_block / name / "dev").read_text().strip().split(":")
        out[name] = (int(major), int(minor))
    return out


def private_disk(d: disk.Disk, numbers: dict[str, tuple[int, int]], where: Path) -> disk.Disk:
    """``d`` seen through device nodes of its own in ``where`` (made here: the agent is root)."""
    import stat

    where.mkdir(parents=True, exist_ok=True)
    for name, (major, minor) in numbers.items():
        node = where / name
        if not node.exists():
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
    return dataclasses.replace(d, dev_dir=str(where))


def own_proc(where: Path = Path("/proc")) -> None:
    """A /proc in the agent's root. ``syslinux --install`` (its mtools flavour) opens the partition as
    /proc/PID/fd/N, and after the root switch the agent's root, the initramfs, has an empty /proc
    (PID 1 moved it into the new root): without one of its own, a loader written after the switch
    (background hydration, or a loader out of date) failed with "Can't open /proc/…/fd/3". The mount
    lives in the initramfs's tree, which the new root's processes cannot reach."""
    if (where / "self").exists():
        return
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "proc", "proc", str(where))


def offline_cmdline(cmdline: str) -> str:
    """The command line the disk's loader boots with: the network boot's, without what a
    loader adds itself, plus ``blockprov.from=disk``. Pure."""
    return boot.disk_cmdline(cmdline)


def syslinux_cfg(cmdline: str) -> str:
    """syslinux.cfg: serial console too, no prompt, the one entry: the kernel and the
    initramfs's fast part. Pure."""
    return ("SERIAL 0 115200\nDEFAULT blockprov\nPROMPT 0\nTIMEOUT 0\n"
            f"LABEL blockprov\n  KERNEL vmlinuz\n  INITRD {FAST}\n  APPEND {cmdline}\n")


def wanted(kernel_id: str, initrd_id: str, cmdline: str) -> dict[str, str]:
    """The loader's record: what it boots, and its fingerprint (boot.py: what the repository
    compares to decide the every-day boot)."""
    line = offline_cmdline(cmdline)
    return {"kernel": kernel_id, "initrd": initrd_id, "cmdline": line,
            "fingerprint": boot.disk_fingerprint(kernel_id, initrd_id, line)}


def split_initramfs(initrd: bytes) -> tuple[bytes, bytes]:
    """The initramfs's fast part (its first gzip member) and the rest (the bytes after it, padding
    dropped). An initramfs of one member is all fast part. Pure."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        d.decompress(initrd, 1 << 20)  # bounded: the output is thrown away, only where it ends matters
        while not d.eof and d.unconsumed_tail:
            d.decompress(d.unconsumed_tail, 1 << 20)
    except zlib.error as e:
        raise NetbootError(f"the initramfs is not gzip'd: {e}") from None
    if not d.eof:
        raise NetbootError("the initramfs's first gzip member is cut short")
    rest = d.unused_data.lstrip(b"\0")
    return initrd[:len(initrd) - len(d.unused_data)], rest


def head(d: disk.Disk) -> bytes:
    """The disk's partition table: sector 0, and a GPT's header and entry array when it has one."""
    return disk.read_head(d.path, disk.GPT_HEAD)


def boot_code(head: bytes) -> bytes:
    """syslinux's boot code for the disk whose first bytes are ``head``: gptmbr.bin for a GPT."""
    path = GPTMBR_BIN if disk.is_gpt(head) else MBR_BIN
    try:
        return path.read_bytes()[:440]
    except OSError as e:
        raise NetbootError(f"{path}: {e.strerror} (the initramfs lacks syslinux's {path.name})") from None


def installed(d: disk.Disk, meta_dir: Path) -> dict[str, str] | None:
    """What the disk's loader boots, or None when it boots nothing (flag off, or no record)."""
    if not disk.partitions(head(d))[0][3]:
        return None
    try:
        got = json.loads((meta_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _set_active(d: disk.Disk, code: bytes, active: bool) -> None:
    fd = os.open(d.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for at, data in disk.boot_writes(os.pread(fd, disk.GPT_HEAD, 0), code=code, active=active):
            os.pwrite(fd, data, at)
            os.fsync(fd)
    finally:
        os.close(fd)


def _run(*cmd: str) -> None:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetbootError(f"{cmd[0]}: {e}") from None
    if p.returncode:
        raise NetbootError(f"{' '.join(cmd[:2])} failed: {p.stderr.decode(errors='replace').strip()[-300:]}")


def install(d: disk.Disk, meta_dir: Path, kernel: bytes | None, initrd: bytes | None, record: dict[str, str],
            work: Path) -> None:
    """Write the loader, the kernel and the initramfs onto ``d``'s boot partition (crash rules above).
    ``kernel`` and ``initrd`` None: only the command line changed (an update by diff to a version
    with the same boot files, another policy): the loader and files in place are kept and only
    ``syslinux.cfg`` is rewritten, under the same rules — so such a boot does not fetch the kernel
    and initramfs again (23 MiB, bench/RESULTS.md)."""
    code = boot_code(head(d))
    files = {"syslinux.cfg": syslinux_cfg(record["cmdline"]).encode()}
    if kernel is not None and initrd is not None:
        need = len(kernel) + len(initrd) + (2 << 20)
        if need > disk.BOOT_BYTES:
            raise NetbootError(f"kernel and initramfs ({need >> 20} MiB) do not fit the boot partition "
                               f"({disk.BOOT_BYTES >> 20} MiB)")
        fast, rest = split_initramfs(initrd)
        files = {"vmlinuz": kernel, FAST: fast, REST: rest, **files}
    _set_active(d, code, False)  # 1. passed over from now on
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name, data in files.items():
            (work / name).write_bytes(data)
        if "vmlinuz" in files:  # 2.
            _run(MKFS_FAT, "-F", "16", "-n", "BPBOOT", d.boot)
            _run(SYSLINUX, "--install", d.boot)
        for name in files:
            _run(MCOPY, "-o", "-i", d.boot, str(work / name), f"::{name}")
    finally:
        for name in files:
            (work / name).unlink(missing_ok=True)
    fd = os.open(d.boot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write(meta_dir / RECORD, json.dumps(record, sort_keys=True).encode())  # 3.
    _set_active(d, code, True)


def same_files(have: dict[str, str] | None, want: dict[str, str]) -> bool:
    """Whether the loader in place (``installed``) holds the kernel and initramfs ``want`` names,
    so only its command line needs rewriting. Pure."""
    return (have is not None and have.get("kernel") == want["kernel"] and have.get("initrd") == want["initrd"]
            and "fingerprint" in have)  # a loader written before the initramfs's two parts has no fast.img
