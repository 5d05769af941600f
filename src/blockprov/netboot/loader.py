"""The disk's own boot loaders: a PC whose network boot fails boots from its disk (offline), on a
BIOS or a UEFI firmware, with or without Secure Boot.

Once the disk holds the whole image (at first provisioning), and again whenever the version's
kernel, initramfs or UEFI loader or the machine's command line change, the in-machine agent
(netboot/inagent.py) writes partition 1 of its disk (netboot/disk.py's layout: an EFI System
Partition, typed 0xEF / "EFI System") as one FAT16 volume laid out by fat.py, which holds two
loaders side by side over the same kernel and initramfs:

* for UEFI (when the version has a UEFI loader, boot.EFI_FILES): ``\\EFI\\BOOT\\BOOTX64.EFI`` —
  the removable-media path every UEFI firmware boots without an NVRAM entry — is shim, beside it
  GRUB and the MOK manager, and ``\\EFI\\debian\\grub.cfg`` boots ``vmlinuz`` and ``fast.img``.
  Under Secure Boot the firmware checks shim (Microsoft's key), shim checks GRUB, GRUB has shim
  check the kernel; the initramfs is not checked (docs/operations.md says what that means). No
  NVRAM entry is written and no fbx64.efi shipped (shim would run it, and it rewrites the
  firmware's boot entries and their order): the firmware's boot order stays the operator's —
  NIC first, then the disk, which the firmware finds by the fallback path;
* for a BIOS: SYSLINUX, installed into that volume by ``syslinux --install`` (which adds
  ``ldlinux.sys`` and ``ldlinux.c32`` through mtools and writes its code into the volume's boot
  sector, keeping its parameters), ``syslinux.cfg``, and syslinux's ``mbr.bin`` in the disk's
  sector 0, which boots the *active* partition — on a GPT disk (over 2 TiB: disk.py) syslinux's
  ``gptmbr.bin``, which boots the partition whose "legacy BIOS bootable" attribute (bit 2) is
  set; below, "the active flag" is that attribute on a GPT disk.

Both loaders boot the kernel and only the initramfs's fast part, ``fast.img`` (netboot/initramfs.py's
first gzip member: netboot/everyday.py's every-day boot, on either firmware); ``rest.img``, the
rest, is what that boot unpacks when it needs python. Both are cut from ``initrd.img`` as it is
written (``split_initramfs``), never fetched or read back; ``initrd.img`` stays whole beside them
(the next loader rewrite reads it back instead of fetching it). A disk whose GRUB was written to
boot the whole ``initrd.img`` (before its UEFI form booted the fast part) still boots, on the slow
path, until its next loader rewrite.

So one disk boots on either firmware: a disk provisioned on a BIOS PC moved into a UEFI one (or
back) boots offline there too. A disk whose loader was written before the UEFI form (SYSLINUX
only, its partition typed 0x0E) gains it at its next network boot on any PC: the record says
which forms it holds (``forms``), and a record without the UEFI form is out of date when the
version has a UEFI loader. Until then a UEFI firmware finds no ``BOOTX64.EFI`` there and passes
the disk over. Both loaders boot the network boot's command line plus ``blockprov.from=disk``;
the firmware tries the network first (the PC's boot order: NIC, then disk), and when that fails
— the repository or the network is down — falls through to the disk, whose loader starts the
same initramfs, and the agent serves what the disk holds (inagent.py: offline boot). The tools
and ``mbr.bin``/``gptmbr.bin`` travel in the initramfs (netboot/initramfs.py); the UEFI loader's
files come from the repository with the kernel and initramfs.

Crash rules (a power cut while the boot partition is rewritten must leave a disk whose firmware
boots a complete loader, or one it passes over to its next boot option, never a half-written
loader):

1. sector 0 is rewritten with the boot partition *not active* and fsync'd (GPT: the primary
   entry array's sector holding the attribute first, then the headers and the backup: disk.py's
   ``boot_writes``): syslinux's ``mbr.bin`` (``gptmbr.bin``) finding no active partition calls
   ``int 0x18`` — the BIOS's "boot failed, try the next device". Then the volume's boot sector
   (its first sector) is zeroed and fsync'd: a UEFI firmware finds no file system on the
   partition, so no ``BOOTX64.EFI``, and tries its next boot option. From here until step 4 the
   disk is passed over by both (the PC boots from the network, or not at all if that is down too);
2. the volume is written, all but its boot sector (fat.py: the files, then the FATs and the
   directories), and fsync'd;
3. ``loader.json`` (what was installed, and where each file lies) is written atomically in the
   metadata file system;
4. the volume's boot sector is written and fsync'd: one sector, written whole by the disk. Only
   now does a UEFI firmware see the file system, complete;
5. ``syslinux --install`` adds SYSLINUX (its files in free clusters, its code in the boot
   sector, one sector write), the partition is fsync'd, and sector 0 is rewritten with the
   partition active (as in 1). Only now does the BIOS boot the disk.

What is installed (``installed``) is what the record names *and* the disk shows: the UEFI form
only while the volume's boot sector makes a file system, the BIOS form only while the flag is on.
A cut anywhere leaves a record whose forms are not all there (the next network boot writes the
loader again) or no usable record at all; the record is written before either form becomes
visible, so a form the firmware boots is always the one the record describes. A cut among a
GPT's writes in 1 or 5 leaves the primary header's CRC stale (the kernel would see no
partitions): the agent's ``disk.mend`` rebuilds the headers and the backup from the primary entry
array before it uses the disk.

When only the command line changed (an update by diff to a version with the same boot files,
another policy), or only some files did, the files in place are read back from where the record
says they lie and checked against the repository's descriptors (boot.BootFile: a digest per
MiB), so such a boot does not fetch 23 MiB of kernel and initramfs again (bench/RESULTS.md); the
volume is then rewritten whole under the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import zlib
from collections.abc import Mapping
from pathlib import Path

from blockprov import boot, fat
from blockprov.boot import BootFile
from blockprov.durable import atomic_write
from blockprov.errors import NetbootError
from blockprov.netboot import disk

MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
GPTMBR_BIN = Path("/usr/lib/syslinux/mbr/gptmbr.bin")  # for a GPT disk (disk.py: over 2 TiB)
SYSLINUX = "syslinux"
RECORD = "loader.json"
FROM_DISK = boot.FROM_DISK
FAST, REST = "fast.img", "rest.img"  # the initramfs's two parts, for SYSLINUX's every-day boot
FORMS = ("bios", "uefi")
SYSLINUX_CFG = "syslinux.cfg"
LABEL = "BPBOOT"
WRITE_PIECE = 1 << 20  # bytes per pwrite of a file onto the partition


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
    loader adds itself, plus ``blockprov.from=disk`` (boot.py's ``disk_cmdline``: the repository
    makes the same line to compare fingerprints). Pure."""
    return boot.disk_cmdline(cmdline)


def syslinux_cfg(cmdline: str) -> str:
    """syslinux.cfg: serial console too, no prompt, the one entry: the kernel and the initramfs's
    fast part. Pure."""
    return ("SERIAL 0 115200\nDEFAULT blockprov\nPROMPT 0\nTIMEOUT 0\n"
            f"LABEL blockprov\n  KERNEL /{boot.VOLUME_PATHS['kernel']}\n  INITRD /{FAST}\n  APPEND {cmdline}\n")


def wanted(kernel_id: str, initrd_id: str, cmdline: str, efi: Mapping[str, str] | None = None) -> dict[str, object]:
    """The record of the loader a disk should hold: the files' ids (``efi``: the UEFI loader's, by
    name; none: no UEFI form), the command line, the forms, and the fingerprint of what it boots
    (boot.disk_fingerprint: what the repository compares to decide the every-day boot). Pure."""
    line = offline_cmdline(cmdline)
    out: dict[str, object] = {"kernel": kernel_id, "initrd": initrd_id, "cmdline": line,
                              "forms": ["bios", "uefi"] if efi else ["bios"],
                              "fingerprint": boot.disk_fingerprint(kernel_id, initrd_id, line)}
    if efi:
        out["efi"] = dict(sorted(efi.items()))
    return out


def comparable(record: Mapping[str, object] | None) -> dict[str, object] | None:
    """A record without where its files lie (``at``): what ``wanted`` makes, to compare. Pure."""
    return None if record is None else {k: v for k, v in record.items() if k != "at"}


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


def present_forms(active: bool, volume_sector: bytes, record: Mapping[str, object]) -> list[str]:
    """The forms of ``record`` the disk shows: ``bios`` while the flag is on, ``uefi`` while the
    volume's boot sector makes a file system. A record from before the forms (SYSLINUX only) is
    the BIOS form. Pure."""
    forms = record.get("forms", ["bios"])
    shown = {"bios": active, "uefi": fat.is_fat16(volume_sector)}
    return [f for f in FORMS if isinstance(forms, list) and f in forms and shown[f]]


def installed(d: disk.Disk, meta_dir: Path) -> dict[str, object] | None:
    """What the disk's loader boots, as its record says (forms: only those the disk shows), or
    None when it boots nothing."""
    try:
        got = json.loads((meta_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(got, dict):
        return None
    forms = present_forms(disk.partitions(head(d))[0][3], disk.read_head(d.boot, fat.SECTOR), got)
    return {**got, "forms": forms} if forms else None


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


def volume(files: Mapping[str, bytes], record: Mapping[str, object]) -> tuple[fat.Volume, dict[str, bytes]]:
    """The boot partition's volume for ``files`` (``kernel``, ``initrd`` and the UEFI loader's,
    by boot.BOOT_FILES name) and ``record`` (its command line): the layout and each path's bytes. Pure."""
    cmdline = str(record["cmdline"])
    grub = boot.grub_cfg(cmdline.split(), "booting from this disk (the network boot failed or was skipped)", FAST)
    fast, rest = split_initramfs(files["initrd"])
    content = boot.volume_files(files, grub, [(SYSLINUX_CFG, syslinux_cfg(cmdline).encode()), (FAST, fast),
                                              (REST, rest)])
    serial = zlib.crc32(json.dumps(comparable(record), sort_keys=True).encode())
    vol = fat.layout([(p, len(x)) for p, x in content], size=disk.BOOT_BYTES, hidden=disk.START // disk.SECTOR,
                     label=LABEL, serial=serial)
    return vol, dict(content)


def install(d: disk.Disk, meta_dir: Path, files: Mapping[str, bytes], record: Mapping[str, object]) -> None:
    """Write the loaders, the kernel and the initramfs onto ``d``'s boot partition under the crash
    rules above. ``files``: ``kernel``, ``initrd`` and, for the UEFI form, the UEFI loader's
    (boot.EFI_FILES); ``record``: what ``wanted`` made for them."""
    need = sum(len(x) for x in files.values()) + len(files["initrd"]) + (2 << 20)  # the initramfs twice: whole, parts
    if need > disk.BOOT_BYTES:
        raise NetbootError(f"the boot files ({need >> 20} MiB) do not fit the boot partition "
                           f"({disk.BOOT_BYTES >> 20} MiB)")
    try:
        vol, content = volume(files, record)
    except fat.LayoutError as e:
        raise NetbootError(f"the boot partition's volume: {e}") from None
    code = boot_code(head(d))
    _set_active(d, code, False)  # 1. the BIOS passes the disk over from now on …
    fd = os.open(d.boot, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(fat.SECTOR), 0)  # … and UEFI finds no file system
        os.fsync(fd)
        for at, length, what in vol.extents()[1:]:  # 2. everything but the boot sector
            data = what if isinstance(what, bytes) else content[what]
            for off in range(0, length, WRITE_PIECE):
                os.pwrite(fd, data[off:off + WRITE_PIECE], at + off)
        os.fsync(fd)
        where = {p: [vol.files[p], vol.sizes[p]] for p in vol.files}
        atomic_write(meta_dir / RECORD, json.dumps({**record, "at": where}, sort_keys=True).encode())  # 3.
        os.pwrite(fd, vol.boot, 0)  # 4. UEFI boots it from now on
        os.fsync(fd)
    finally:
        os.close(fd)
    forms = record.get("forms")
    if isinstance(forms, list) and "bios" in forms:
        _run(SYSLINUX, "--install", d.boot)  # 5.
        fd = os.open(d.boot, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the mtools write through their own descriptors; this flushes the device's pages
        finally:
            os.close(fd)
        _set_active(d, code, True)


def read_back(d: disk.Disk, have: Mapping[str, object] | None, want: Mapping[str, BootFile]) -> dict[str, bytes]:
    """The files of ``want`` (boot.BOOT_FILES name → descriptor) that the installed loader
    ``have`` holds with the same content, read from where its record says they lie and checked
    against the descriptors; the others are left out (the caller fetches them)."""
    out: dict[str, bytes] = {}
    at = have.get("at") if have else None
    if not isinstance(at, dict) or not have:
        return out
    efi = have.get("efi")
    ids = {"kernel": have.get("kernel"), "initrd": have.get("initrd"), **(efi if isinstance(efi, dict) else {})}
    fd = os.open(d.boot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name, f in want.items():
            place = at.get(boot.VOLUME_PATHS[name])
            if ids.get(name) != f.id or not isinstance(place, list) or len(place) != 2 or place[1] != f.size:
                continue
            data = os.pread(fd, f.size, int(place[0]))
            if len(data) == f.size and boot.split(data, name, lambda _items: None) == f:
                out[name] = data
    finally:
        os.close(fd)
    return out
