"""Make the test image boot from its own boot loader: no ``-kernel``, only the disk (issue 14).

Why this shape: the test image (tools/bootimage.py) is an ext4 file system on the whole disk, which
its ``/init`` mounts as ``/dev/vda``; changing that would touch every boot test. An ext4 file system
leaves its first 1024 bytes unused (the boot area), so the disk stays what it is and gains:

* sector 0: syslinux's MBR code (``mbr.bin``, 440 bytes) and a partition table with one active
  partition, which the BIOS (SeaBIOS) loads and runs;
* after the ext4 file system (from a 1 MiB boundary): that partition, a FAT file system made by
  ``mkfs.fat`` on a file, with syslinux installed by ``syslinux --install`` (through mtools: no
  mount, no root) and the kernel, the initrd and ``syslinux.cfg`` copied in with ``mcopy``.

Booting it: SeaBIOS → MBR → the partition's syslinux → the kernel and initrd with the command line
of ``syslinux.cfg`` (console on the serial port) → the same ``/init``, which mounts ``/dev/vda``
(the whole disk: ext4 ignores the partition after its end). Debian packages: syslinux,
syslinux-common (``mbr.bin``), mtools, dosfstools (scripts/setup.sh installs them).

Usage: ``python tools/bootdisk.py --image DIR --out disk.raw [--append "…"]`` or ``make_bootable(...)``.
Standard library only, like bootimage.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
TOOLS = {"mkfs.fat": "dosfstools", "syslinux": "syslinux", "mcopy": "mtools"}
ALIGN = 1 << 20
FAT_TYPE = 0x0E  # FAT16, LBA addressed
MARGIN = 4 << 20  # room in the FAT partition beyond the kernel and initrd


def _need() -> None:
    for tool, pkg in TOOLS.items():
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: install the Debian package {pkg} (scripts/setup.sh does)")
    if not MBR_CODE.is_file():
        raise SystemExit(f"{MBR_CODE} is missing: install the Debian package syslinux-common")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def make_bootable(disk: Path, kernel: Path, initrd: Path, out: Path, append: str) -> Path:
    """Write to ``out`` a copy of the whole-disk ext4 image ``disk`` that boots ``kernel`` and
    ``initrd`` with the command line ``append`` through its own MBR and syslinux."""
    _need()
    ext4 = disk.stat().st_size
    start = (ext4 + ALIGN - 1) // ALIGN * ALIGN
    size = (kernel.stat().st_size + initrd.stat().st_size + MARGIN + ALIGN - 1) // ALIGN * ALIGN
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "boot.fat"
        _run("mkfs.fat", "-F", "16", "-n", "BPBOOT", "-C", str(part), str(size // 1024))
        _run("syslinux", "--install", str(part))
        cfg = Path(tmp) / "syslinux.cfg"
        cfg.write_text(f"SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
                       f"  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {append}\n")
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
            _run("mcopy", "-i", str(part), str(src), f"::{name}")
        tmp_out = out.with_name(out.name + ".part")
        _run("cp", "--sparse=always", str(disk), str(tmp_out))  # keeps the holes: images are mostly empty
        with open(tmp_out, "r+b") as f:
            f.truncate(start + size)
            f.seek(start)
            f.write(part.read_bytes())
            code = MBR_CODE.read_bytes()[:440]
            # One partition entry: active, CHS fields unused (0xFE/0xFFFF: "use LBA"), FAT16 LBA.
            entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", FAT_TYPE, b"\xfe\xff\xff",
                                start // 512, size // 512)
            f.seek(0)
            f.write(code.ljust(440, b"\0") + b"\0" * 6 + entry + b"\0" * 48 + b"\x55\xaa")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_out, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True, help="a tools/bootimage.py build directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--append", default="console=ttyS0 quiet panic=-1 bp.mode=plain")
    a = ap.parse_args()
    make_bootable(a.image / "disk.raw", a.image / "vmlinuz", a.image / "initrd.img", a.out, a.append)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
