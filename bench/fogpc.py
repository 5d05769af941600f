"""The FOG/Clonezilla model run in the benchmark's own PC (bench/bench_netboot.py, ``fog-pc``).

What FOG and Clonezilla do, and what this module builds to do the same in the same emulated PC
(qemu TCG, 1 vCPU, 1 GiB, the virtio-net iPXE ROM, the blank disk, the same link):

1. the PC network-boots an *imaging system*: iPXE asks the repository for its boot script (the
   host's ordinary boot assignment, to a version whose boot files are the imaging system's), then
   fetches a kernel and an initramfs through the link. The imaging initramfs is blockprov's own
   (the one the repository serves for a blockprov boot: same kernel, same modules, same size on the
   wire) with a small newc cpio appended — the kernel unpacks concatenated archives — holding
   ``/fog-init``, a busybox sh script started by ``rdinit=/fog-init`` instead of blockprov's python;
2. ``/fog-init`` loads the NIC and disk modules, brings up DHCP and streams the version's raw HTTP
   view (``/v1/images/NAME/raw/@ID``, the whole virtual disk, zeros included: FOG's model writes
   the whole image) with busybox ``wget -O -`` into ``dd of=/dev/vda bs=4M``, syncs and powers the
   PC off. Its console lines (``fog-pc: … at uptime S s``) time the copy in the guest;
3. the PC is powered on again and boots from its disk through the disk's own boot loader: the
   version imaged is the test image made bootable by tools/bootdisk.py (its MBR and a FAT
   partition with syslinux, the kernel and the initramfs after the ext4 file system), so the
   second boot is SeaBIOS → MBR → syslinux → the test image's ``/init``, no ``-kernel``.

What is *not* modelled, and which way it leans: the second power-on boots the disk first (a FOG PC
set to network-boot first would run iPXE again and get a "no task: boot the local disk" menu from
the FOG server: a few seconds more for FOG); partclone writes only used blocks where this copies
the whole disk (what the brief's model says; the zeros cost link bytes and guest time).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests import bootvm  # bench_netboot.py puts the repository's root on sys.path

from blockprov.netboot.initramfs import Archive  # the same newc writer as the real build

FOG_REF = "lab:fog"
# the second boot's command line (syslinux.cfg of the imaged disk): the test image's plain boot
DISK_APPEND = "console=ttyS0 quiet panic=-1 bp.mode=plain"
IMAGING_CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/fog-init"
START, COPY_START, COPY_DONE, FAIL = ("fog-pc: imaging system started", "fog-pc: copy start", "fog-pc: copy done",
                                      "BLOCKPROV-NETBOOT-FAIL fog-pc")

FOG_INIT = """#!/usr/bin/busybox sh
# The FOG/Clonezilla model's imaging system (bench/fogpc.py): DHCP, the whole raw image onto the
# disk with native tools, sync, power off.
/usr/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
say() { echo "fog-pc: $* at uptime $(cut -d' ' -f1 /proc/uptime) s"; }
die() { echo "BLOCKPROV-NETBOOT-FAIL fog-pc: $*"; sync; poweroff -f; sleep 30; }
say "imaging system started"
for m in $(cat /etc/blockprov/modules); do insmod "$m" 2>/dev/null; done
ip link set lo up
n=0
while [ -z "$nic" ] && [ $n -lt 100 ]; do nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); n=$((n+1)); \
[ -z "$nic" ] && sleep 0.1; done
[ -n "$nic" ] || die "no network interface"
ip link set "$nic" up
udhcpc -i "$nic" -f -q -n -t 5 -T 2 -s /etc/blockprov/udhcpc.sh >/dev/null 2>&1 || die "no DHCP on $nic"
for w in $(cat /proc/cmdline); do
    case "$w" in blockprov.repo=*) repo="${w#*=}" ;; blockprov.image=*) img="${w#*=}" ;; esac
done
[ -n "$repo" ] && [ -n "$img" ] || die "no blockprov.repo/blockprov.image on the command line"
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || die "no disk /dev/vda"
url="$repo/v1/images/${img%@*}/raw/@${img#*@}"
say "copy start: $url onto /dev/vda"
set -o pipefail
wget -q -O - "$url" | dd of=/dev/vda bs=4M 2>/tmp/dd.log || die "copy failed: $(tail -n 2 /tmp/dd.log | tr '\\n' ' ')"
sync
say "copy done: $(tail -n 2 /tmp/dd.log | tr '\\n' ' ')"
poweroff -f
sleep 30
"""


def imaging_initrd(base: Path, out: Path) -> Path:
    """blockprov's initramfs ``base`` with ``/fog-init`` appended as a second (gzip'd) newc archive."""
    a = Archive()
    a.file("fog-init", FOG_INIT.encode(), 0o755)
    data = base.read_bytes()
    out.write_bytes(data + b"\0" * (-len(data) % 4) + gzip.compress(a.cpio(), mtime=0))
    return out


@dataclass
class FogVersion:
    ref: str
    raw_bytes: int  # the raw view's size: what the copy writes


def add_version(cli: Callable[..., str], data: Path, image: bootvm.bootimage.Built, kernel: str, base_initrd: Path,
                tmp: Path) -> FogVersion:
    """Import the bootable test image as ``lab:fog`` with the imaging system as its boot files.
    ``cli(*args)`` runs blockprov's CLI and returns its stdout."""
    disk = bootvm.bootable_disk(image, tmp / "fog-bootable.raw", DISK_APPEND)
    try:
        cli("--data", str(data), "import", str(disk), FOG_REF)
    finally:
        disk.unlink(missing_ok=True)
    initrd = imaging_initrd(base_initrd, tmp / "fog-initrd.img")
    cli("--data", str(data), "boot-files", "set", FOG_REF, "--kernel", kernel, "--initrd", str(initrd),
        "--cmdline", IMAGING_CMDLINE)
    show = json.loads(cli("--data", str(data), "show", FOG_REF, "--json"))
    return FogVersion(FOG_REF, int(show["size"]))
