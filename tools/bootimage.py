"""Build a small bootable Linux test image, offline, from Debian packages only.

Why this exists: the promise blockprov sells ("it boots before the copy finishes, and it is pristine
after every session") is only proven by a real operating system booting from a streamed image. This
script makes such an operating system from what the machine already has, without internet:

* ``DIR/vmlinuz``: the kernel of ``linux-image-amd64``;
* ``DIR/initrd.img``: a tiny initramfs of ``busybox-static``, the few kernel modules the root disk
  needs (virtio_blk and ext4 are modules in Debian's kernel) and the test ``/init``;
* ``DIR/disk.raw``: an ext4 root made with ``mkfs.ext4 -d``, holding a few hundred MB of real files
  copied from a fixed, sorted subset of the machine's /usr (so its size is predictable), a synthetic
  /etc and /home, the golden checksum list ``/etc/bp-golden.sha256`` and the list of files the boot
  reads;
* ``DIR/info.json``: the parameters and figures of the build; a build with the same parameters is
  reused at once (tests and benchmarks call this every run).

The ``/init`` mounts ``/dev/vda``, reads a boot-like set of files (many small reads across the file
system), then acts on ``bp.mode=`` of the kernel command line:

* ``plain``: only the reads (the root is mounted read-only, so read-only peers can boot it too);
* ``dirty``: a "user" creates files in /home, a "virus" overwrites part of a system file and drops
  ``/usr/bin/bp-virus``; sync;
* ``check``: verifies every file of the golden list and reports files of the watched directories the
  list does not have: ``BP-CHECK OK files=N`` or ``BP-CHECK FAIL changed=… extra=…``;
* ``session``: ``check``, then ``dirty`` — an every-day boot of a reboot-to-restore PC whose command
  line stays the same: each boot finds the disk pristine and leaves it dirty;
* ``persist``: a PC that keeps its changes: counts its sessions in ``/home/user/bp-sessions``
  (``BP-PERSIST sessions_before=N``) and writes 256 KiB more each time;
* ``killagent``: kills the in-machine agent serving the root (SIGKILL), then ``check`` and a
  write read back (``BP-KILLED pid=…``): the supervisor brings the agent back;
* ``writer``: writes without end (``BP-WRITING``, ``BP-WROTE n=…``): a power cut's victim;
* ``fio``: fio on a 256 MiB file of the root (``BP-FIO job=… iops=… kbs=…``; an image built with
  ``fio=True``, which holds fio and its libraries);
* ``counter``: never ends: counts in memory, printing ``BP-COUNT n=…`` ten times a second, and takes a
  hostname and a machine-id from the host on the virtio-serial port ``org.blockprov.identity`` (a
  line ``NAME MACHINE-ID``; ``BP-IDENTITY name=… machine-id=…``; the name also written to
  ``/bp-identity``, the machine-id to ``/etc/machine-id``); ``bp.ballast=MB`` first fills that much
  RAM with random data: the running application ``blockprov vm`` clones;
* ``hog``: memory pressure while the root is written: a tmpfs takes all but 48 MiB of the available
  memory, 32 MiB are written to the root, synced and read back (``BP-HOG OK``), for the in-machine
  agent that serves the root (blockprov's network boot);
* ``admin``: a sanctioned change: writes ``/etc/bp-admin-change`` (``ADMIN_CHANGE_CONTENT``) and
  updates the golden list so a later check passes;

and finally prints ``BLOCKPROV-BOOT-DONE mode=… uptime=…`` (guest uptime in seconds, plus sectors read
and written by the guest) and powers off with ``poweroff -f``. Failures print
``BLOCKPROV-BOOT-FAIL mode=… reason=…`` and power off too, so a boot never hangs waiting for a human.

Usage: ``python tools/bootimage.py --out DIR [--size 1G] [--fill-mb 300]``; or ``build(DIR, ...)``.
Standard library only: tests and benchmarks import it before anything else is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blockprov.netboot.initramfs import dependency_order

BUILDER_VERSION = 10  # bump when the image layout changes: cached builds are then rebuilt
MARKER = "BLOCKPROV-BOOT-DONE"
FAIL_MARKER = "BLOCKPROV-BOOT-FAIL"
CHECK_MARKER = "BP-CHECK"
ADMIN_CHANGE_PATH = "/etc/bp-admin-change"
ADMIN_CHANGE_CONTENT = "sanctioned change by the administrator: motd for version 2\n"
VIRUS_PATH = "/usr/bin/bp-virus"
USER_FILES = ("/home/user/Documents/notes.txt", "/home/user/Downloads/download.bin")
WATCHED = ("etc", "usr/bin", "usr/sbin", "home")  # the check covers every file under these
GOLDEN = "etc/bp-golden.sha256"
FIXED_TIME = 1_700_000_000  # every timestamp in the image (deterministic builds)
FS_UUID = "b10c0b0c-0000-4000-8000-00000000b007"
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtio_console")  # plus their dependencies
MAX_FILE = 4 << 20  # larger files are skipped: a boot reads many small files, not a few huge ones
HEAD_BYTES = 16384  # how much of a large file the boot reads (ELF headers, first pages)
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@/-]+$")  # paths the guest's shell handles without quoting
# Share of --fill-mb taken from each part of /usr, in this order (sorted walks, so a fixed subset).
USR_PARTS = (("usr/bin", 0.07), ("usr/sbin", 0.01), ("usr/lib", 0.62), ("usr/share", 0.30))

_INIT = r"""@SHEBANG@
@SETUP@
MODE=plain
for a in $(cat /proc/cmdline); do
    case "$a" in bp.mode=*) MODE="${a#bp.mode=}" ;; esac
done
off() { sync; poweroff -f; sleep 10; echo "BLOCKPROV-BOOT-FAIL mode=$MODE reason=poweroff-failed"; }
fail() { echo "BLOCKPROV-BOOT-FAIL mode=$MODE reason=$*"; cd /; umount /root 2>/dev/null; off; }
up() { cut -d' ' -f1 /proc/uptime; }
echo "BLOCKPROV-INIT mode=$MODE uptime=$(up)"
case "$MODE" in
    plain|check) OPTS=ro ;;
    dirty|admin|counter|hog|session|persist|killagent|writer|fio) OPTS=rw ;;
    *) fail "unknown-mode" ;;
esac
dirty() {  # a user session: files in /home, a "virus" overwriting part of a system file and adding its own
    mkdir -p home/user/Documents home/user/Downloads
    echo "user session notes: shopping list, passwords123, homework" >home/user/Documents/notes.txt
    dd if=/dev/urandom of=home/user/Downloads/download.bin bs=65536 count=16 2>/dev/null
    victim=$(cat etc/bp-victim)
    dd if=/dev/urandom of="$victim" bs=4096 count=1 conv=notrunc 2>/dev/null || fail virus-write
    printf '#!/bin/sh\necho you have been pwned\n' >usr/bin/bp-virus
    chmod 755 usr/bin/bp-virus
    sync
    DIRTIED="victim=$victim"
}
check() {  # every file of the golden list as it was, and none the list does not know
    sha256sum -c etc/bp-golden.sha256 2>/dev/null | grep -v ': OK$' | sed 's/: .*$//' >/tmp/bad
    awk '{print $2}' etc/bp-golden.sha256 | sort >/tmp/known
    find ./etc ./usr/bin ./usr/sbin ./home -xdev -type f | grep -v '^\./etc/bp-golden\.sha256$' | sort >/tmp/have
    cat /tmp/known /tmp/known /tmp/have | sort | uniq -u >/tmp/extra
    NKNOWN=$(wc -l </tmp/known)
    if [ -s /tmp/bad ] || [ -s /tmp/extra ]; then
        CH=$(head -n 20 /tmp/bad | tr '\n' ',' | sed 's/,$//')
        EX=$(head -n 20 /tmp/extra | tr '\n' ',' | sed 's/,$//')
        echo "BP-CHECK FAIL changed=$CH extra=$EX nchanged=$(wc -l </tmp/bad) nextra=$(wc -l </tmp/extra)"
        CHECKED="check=FAIL"
    else
        echo "BP-CHECK OK files=$NKNOWN"
        CHECKED="check=OK"
    fi
}
@MOUNT@
MOUNTED=$(up)
# Boot-like reads: directory walk with stats, many small files read whole, heads of larger ones.
ls -lR etc usr/bin usr/sbin home >/dev/null 2>&1
xargs cat <etc/bp-boot-full >/dev/null 2>&1
xargs head -c 16384 <etc/bp-boot-head >/dev/null 2>&1
NFILES=$(cat etc/bp-boot-full etc/bp-boot-head | wc -l)
READDONE=$(up)
EXTRA=""
case "$MODE" in
dirty)
    dirty
    EXTRA="$DIRTIED"
    ;;
session)
    # an every-day session of a reboot-to-restore PC with the same command line each boot: the
    # disk is pristine (what the last session did is gone), then this session dirties it
    check
    dirty
    EXTRA="$CHECKED $DIRTIED"
    ;;
persist)
    # an every-day session of a PC that keeps its changes: the count the last session left, plus one
    N=$(cat home/user/bp-sessions 2>/dev/null || echo 0)
    echo $((N + 1)) >home/user/bp-sessions
    dd if=/dev/urandom of=home/user/Downloads/session-$N.bin bs=65536 count=4 2>/dev/null
    sync
    echo "BP-PERSIST sessions_before=$N"
    EXTRA="persisted=$N"
    ;;
admin)
    printf '%s\n' "sanctioned change by the administrator: motd for version 2" >etc/bp-admin-change
    sha256sum ./etc/bp-admin-change >/tmp/admin.sum
    grep -v '  \./etc/bp-admin-change$' etc/bp-golden.sha256 >/tmp/golden.new
    cat /tmp/admin.sum >>/tmp/golden.new
    sort -k2 /tmp/golden.new >etc/bp-golden.sha256
    sync
    ;;
check)
    check
    EXTRA="$CHECKED"
    ;;
hog)
    # Memory pressure while the root is written: a tmpfs takes all but 48 MiB of the available
    # memory (no swap: those pages can go nowhere), then 32 MiB go to the root, are synced, dropped
    # from the page cache and read back through the root device.
    mkdir -p /tmp/hogfs
    mount -t tmpfs -o size=100% hog /tmp/hogfs || fail hog-mount
    N=$(($(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) - 48))
    dd if=/dev/zero of=/tmp/hogfs/fill bs=1M count=$N 2>/dev/null
    LEFT=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
    dd if=/dev/urandom of=home/user/hog.bin bs=1M count=32 2>/dev/null || fail hog-write
    S1=$(md5sum home/user/hog.bin | cut -d' ' -f1)
    sync
    echo 3 >/proc/sys/vm/drop_caches
    S2=$(md5sum home/user/hog.bin | cut -d' ' -f1)
    [ "$S1" = "$S2" ] || fail hog-readback-differs
    rm -f /tmp/hogfs/fill home/user/hog.bin
    umount /tmp/hogfs
    sync
    echo "BP-HOG OK filled_mb=$N available_mb_left=$LEFT"
    EXTRA="hog=OK"
    ;;
killagent)
    # the in-machine agent serving this root over NBD is killed (SIGKILL, as the OOM killer would):
    # its supervisor starts it again and reconnects the kernel's NBD device; the files the check
    # reads that the disk does not hold yet are fetched by the new agent, and a write goes through
    for p in /proc/[0-9]*; do
        case "$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)" in
        @blockprov-agent*) kill -9 "${p#/proc/}" && echo "BP-KILLED pid=${p#/proc/}" ;;
        esac
    done
    check
    dd if=/dev/urandom of=home/user/after-kill.bin bs=1M count=8 2>/dev/null || fail write-after-kill
    S1=$(md5sum home/user/after-kill.bin | cut -d' ' -f1)
    sync
    echo 3 >/proc/sys/vm/drop_caches
    S2=$(md5sum home/user/after-kill.bin | cut -d' ' -f1)
    [ "$S1" = "$S2" ] || fail readback-after-kill
    EXTRA="$CHECKED killed=yes"
    ;;
writer)
    # writes without end (a power cut is expected: the test kills qemu): files of random data, synced
    # now and then, and some overwritten, so the disk changes everywhere the session touches
    mkdir -p home/user/w
    echo "BP-WRITING"
    i=0
    while true; do
        dd if=/dev/urandom of=home/user/w/f$((i % 40)).bin bs=65536 count=$((i % 7 + 1)) 2>/dev/null
        i=$((i + 1))
        [ $((i % 5)) = 0 ] && sync && echo "BP-WROTE n=$i"
    done
    ;;
fio)
    # the bench's I/O in the running system (bench/bench_fio.py): fio on a 256 MiB file of the
    # root file system, direct I/O, each job a few seconds (fio and its libraries: built with --fio).
    # chroot into the root (the working directory): as the initramfs's init the root is at /root
    FIO="chroot . /usr/lib/bptest/fio/run"
    [ -x usr/lib/bptest/fio/run ] || fail no-fio-in-this-image
    $FIO --name=layout --filename=/fio.dat --size=256M --rw=write --bs=1M --direct=1 --ioengine=libaio \
        --iodepth=4 --minimal >/dev/null 2>&1 || fail fio-layout
    sync
    for job in "rr1 randread 4k 1" "rr16 randread 4k 16" "sr read 1M 4" "sw write 1M 4"; do
        set -- $job
        for k in 1 2 3; do
            R=$($FIO --name=$1 --filename=/fio.dat --size=256M --rw=$2 --bs=$3 --iodepth=$4 --direct=1 \
                --ioengine=libaio --runtime=${FIORUN:-4} --time_based --ramp_time=1 --minimal 2>/dev/null)
            echo "$R" | awk -F';' -v J="$1" -v K="$k" \
                '{printf "BP-FIO job=%s run=%s iops=%d kbs=%d\n", J, K, $8+$49, $7+$48}'
        done
    done
    EXTRA="fio=done"
    ;;
counter)
    # A running application for VM clones (blockprov vm): its state (n) lives only in memory, it
    # never powers off, and it takes an identity (hostname, machine-id) from the host on the
    # virtio-serial port org.blockprov.identity, writing it to its disk (/bp-identity,
    # /etc/machine-id) so each clone's disk differs.
    PORT=""
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.blockprov.identity ] && PORT="/dev/${p##*/}"
    done
    if [ -n "$PORT" ]; then
        # read gets EOF at once while no host is connected: poll, never spin
        (while true; do
            if read -r line <"$PORT" && [ -n "$line" ]; then echo "$line" >/tmp/ident.new; mv /tmp/ident.new /tmp/ident
            else sleep 1; fi
        done) &
    fi
    for a in $(cat /proc/cmdline); do  # bp.ballast=MB: random data held in RAM, as a warm service's caches
        case "$a" in bp.ballast=*) dd if=/dev/urandom of=/tmp/ballast bs=1M count="${a#bp.ballast=}" 2>/dev/null ;; esac
    done
    echo "BP-COUNTER-START port=$PORT"
    n=0
    ident=""
    while true; do
        n=$((n + 1))
        if [ -f /tmp/ident ] && [ "$(cat /tmp/ident)" != "$ident" ]; then
            ident=$(cat /tmp/ident)
            set -- $ident  # "NAME [MACHINE-ID]"
            hostname "$1"
            echo "$1" >bp-identity
            [ -n "$2" ] && echo "$2" >/etc/machine-id && echo "$2" >etc/machine-id  # the running system's, the disk's
            sync
            echo "BP-IDENTITY name=$1 machine-id=${2:-none} n=$n"
        fi
        echo "BP-COUNT n=$n host=$(hostname)"
        usleep 100000
    done
    ;;
esac
@FINISH@
set -- $STAT
IO="rd_kb=$(($3 / 2)) wr_kb=$(($7 / 2))"
echo "BLOCKPROV-BOOT-DONE mode=$MODE uptime=$(up) mounted=$MOUNTED readdone=$READDONE files=$NFILES $IO $EXTRA"
off
"""

# The init of the initramfs (direct kernel boot, root disk on /dev/vda) and the init of the root
# file system itself (/sbin/init, run when an initramfs such as blockprov's network boot switched
# root to the image: /proc, /sys, /dev are already mounted, the root is read-only).
_AS_INITRD = {
    "@SHEBANG@": "#!/bin/busybox sh\n# blockprov boot-test init (initramfs). Mounts /dev/vda, reads like a boot, "
                 "acts on bp.mode=, powers off.",
    "@SETUP@": "/bin/busybox mkdir -p /proc /sys /dev /root /tmp /bin\n/bin/busybox --install -s /bin\n"
               "export PATH=/bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n"
               "mount -t devtmpfs dev /dev 2>/dev/null",
    "@MOUNT@": 'for m in $(cat /etc/bp-modules); do insmod "/lib/modules/$m" || echo "bp: insmod $m failed"; done\n'
               "i=0\nwhile [ ! -b /dev/vda ] && [ $i -lt 300 ]; do usleep 50000; i=$((i + 1)); done\n"
               "[ -b /dev/vda ] || fail no-/dev/vda\n"
               'mount -t ext4 -o "$OPTS" /dev/vda /root || fail mount-failed\ncd /root || fail no-root',
    "@FINISH@": "cd /\numount /root || fail umount-failed\nSTAT=$(cat /sys/block/vda/stat)",
}
ROOT_BUSYBOX = "usr/lib/bptest/busybox"
_AS_ROOT = {
    "@SHEBANG@": f"#!/{ROOT_BUSYBOX} sh\n# blockprov boot-test init (/sbin/init of the root file system): "
                 "reads like a boot, acts on bp.mode=, powers off.",
    "@SETUP@": f"/{ROOT_BUSYBOX} mount -t tmpfs tmp /tmp\n/{ROOT_BUSYBOX} mkdir -p /tmp/bin\n"
               f"/{ROOT_BUSYBOX} --install -s /tmp/bin\nexport PATH=/tmp/bin",
    "@MOUNT@": 'mount -o "remount,$OPTS" / || fail remount-failed\n'
               # the root's device by number (/proc/self/mountinfo): a mapped root's node may be anywhere
               "ROOTDEV=$(awk '$5 == \"/\" {d=$3} END {print d}' /proc/self/mountinfo)\ncd / || fail no-root",
    "@FINISH@": "cd /\nsync\nmount -o remount,ro / || fail remount-ro-failed\n"
                'STAT=$(cat "/sys/dev/block/$ROOTDEV/stat")',
}


def init_script(as_root: bool = False) -> str:
    """The test init, for the initramfs (``INIT``) or as the root file system's ``/sbin/init``."""
    text = _INIT
    for k, v in (_AS_ROOT if as_root else _AS_INITRD).items():
        text = text.replace(k, v)
    return text


INIT = init_script(False)
ROOT_INIT = init_script(True)


@dataclass
class Built:
    """Paths of a finished build and its info.json contents."""

    out: Path
    disk: Path
    kernel: Path
    initrd: Path
    info: dict[str, object]


# ---------------------------------------------------------------------------------------------------------------
# Inputs from the machine


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' → bytes (binary units, as blockprov's CLI)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def find_kernel() -> tuple[Path, str]:
    """The newest /boot/vmlinuz-* whose modules are installed (linux-image-amd64 installs both)."""
    found: list[tuple[tuple[int, ...], Path, str]] = []
    for p in Path("/boot").glob("vmlinuz-*"):
        release = p.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / release / "modules.dep").exists():
            key = tuple(int(x) for x in re.findall(r"\d+", release))
            found.append((key, p, release))
    if not found:
        raise SystemExit("bootimage: no kernel in /boot with modules in /lib/modules: "
                         "apt-get install linux-image-amd64 (scripts/setup.sh does)")
    _key, path, release = max(found)
    return path, release


def find_busybox() -> Path:
    """busybox-static's binary: it must be static, since the initramfs holds no libc."""
    for cand in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if cand.exists() and _is_static_elf(cand):
            return cand
    raise SystemExit("bootimage: no static busybox: apt-get install busybox-static (scripts/setup.sh does)")


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP (no dynamic loader needed)."""
    with open(path, "rb") as f:
        h = f.read(64)
        if h[:4] != b"\x7fELF" or h[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", h, 32)
        phentsize, phnum = struct.unpack_from("<HH", h, 54)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", ph, i * phentsize)[0] != 3 for i in range(phnum))


def module_load_order(release: str, names: tuple[str, ...] = MODULES) -> list[Path]:
    """The .ko files for ``names`` and their dependencies, in an order insmod can load them."""
    base = Path("/lib/modules") / release
    order, missing = dependency_order((base / "modules.dep").read_text(), names)
    if missing:
        raise SystemExit(f"bootimage: kernel {release} has no module {missing[0]} (is it built in? then drop it)")
    return [base / m for m in order]


# ---------------------------------------------------------------------------------------------------------------
# The initramfs


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)) entries; fixed owners and times.

    Written here rather than with cpio(1) so device nodes (/dev/console) need no root privileges and
    the archive is byte-for-byte reproducible."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, FIXED_TIME, len(data), 0, 0, rdev[0], rdev[1],
            len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for i, (name, mode, data, rdev) in enumerate(entries, start=1):
        put(name, mode, data, rdev, i)
    put("TRAILER!!!", 0, b"", (0, 0), 0)
    return out.getvalue()


def make_initrd(busybox: Path, modules: list[Path]) -> bytes:
    """gzip'd cpio: busybox, the modules (flat, with their load order in /etc/bp-modules), /init."""
    d, x, r = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (n, d, b"", (0, 0)) for n in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "sys", "tmp")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)))
    entries.append(("bin/busybox", x, busybox.read_bytes(), (0, 0)))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    for m in modules:
        entries.append((f"lib/modules/{m.name}", r, m.read_bytes(), (0, 0)))
    entries.append(("etc/bp-modules", r, "".join(m.name + "\n" for m in modules).encode(), (0, 0)))
    entries.append(("init", x, INIT.encode(), (0, 0)))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(cpio_newc(entries))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# The root file system


ETC_FILES = {
    "etc/hostname": "bp-guest\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tbp-guest\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:User:/home/user:/bin/sh\n",
    "etc/group": "root:x:0:\nusers:x:100:\nuser:x:1000:\n",
    "etc/fstab": "/dev/vda / ext4 defaults 0 1\n",
    "etc/motd": "blockprov golden test image\n",
    "etc/os-release": 'PRETTY_NAME="blockprov test image"\nID=bptest\nVERSION_ID=1\n',
    "etc/profile": "export PATH=/usr/bin:/usr/sbin:/bin:/sbin\n",
    "etc/resolv.conf": "nameserver 127.0.0.1\n",
    "home/user/.profile": "export PS1='user$ '\n",
    "home/user/Documents/readme.txt": "Welcome to the lab machine. Files you save are gone at the next session.\n",
    "root/.profile": "export PS1='# '\n",
}
EMPTY_DIRS = ("dev", "proc", "sys", "tmp", "mnt", "var/log", "var/tmp", "home/user/Downloads")


def _usable(p: str) -> int:
    """Size of a regular, world-readable file with a shell-safe name, else -1."""
    try:
        st = os.lstat(p)
    except OSError:
        return -1
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o004 or st.st_size > MAX_FILE:
        return -1
    if not SAFE_NAME.match(p):
        return -1
    return st.st_size


def select_usr(fill: int) -> list[tuple[str, int]]:
    """A fixed, sorted subset of /usr: (absolute path, size), about ``fill`` bytes in all."""
    picked: list[tuple[str, int]] = []
    for part, share in USR_PARTS:
        budget = int(fill * share)
        used = 0
        for dirpath, dirs, files in os.walk("/" + part):
            dirs.sort()
            dirs[:] = [d for d in dirs if SAFE_NAME.match(d) and d not in ("__pycache__",)]
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                n = _usable(p)
                if n < 0 or used + n > budget:
                    continue
                picked.append((p, n))
                used += n
            if used >= budget * 0.995:
                break
    return picked


def _unit(path: str, salt: str) -> float:
    """A deterministic pseudo-random number in [0, 1) for a path (which files the boot reads)."""
    return int.from_bytes(hashlib.sha256((salt + path).encode()).digest()[:4], "big") / 2**32


def populate(root: Path, fill: int) -> dict[str, object]:
    """Fill the staging directory; returns figures for info.json."""
    files = select_usr(fill)
    for src, _n in files:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755 if os.stat(src).st_mode & 0o111 else 0o644)
    for rel, text in ETC_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chmod(p, 0o644)
    for rel in EMPTY_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    # the root can be switched to (blockprov's network boot): busybox and /sbin/init in the image
    bb = root / ROOT_BUSYBOX
    bb.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(find_busybox(), bb)
    os.chmod(bb, 0o755)
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    (root / "usr/sbin/init").write_text(ROOT_INIT)
    os.chmod(root / "usr/sbin/init", 0o755)
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/sbin", root / "sbin")
    # What the boot reads: small files whole (~ a third), the first 16 KiB of larger ones (~ half).
    full, head, read_bytes = [], [], 0
    for src, n in files:
        rel = src.lstrip("/")
        u = _unit(rel, "boot")
        if n <= 131072 and u < 0.30:
            full.append(rel)
            read_bytes += n
        elif n > 131072 and u < 0.45:
            head.append(rel)
            read_bytes += HEAD_BYTES
    (root / "etc/bp-boot-full").write_text("".join(p + "\n" for p in full))
    (root / "etc/bp-boot-head").write_text("".join(p + "\n" for p in head))
    victim = next(src for src, n in files if src.startswith("/usr/bin/") and n >= 8192)
    (root / "etc/bp-victim").write_text(victim.lstrip("/") + "\n")
    # The golden list: every file of the watched directories, as "sha256  ./path" (sha256sum -c format).
    lines = []
    for w in WATCHED:
        for dirpath, _dirs, fs in os.walk(root / w):
            for f in fs:
                p = Path(dirpath) / f
                rel = p.relative_to(root).as_posix()
                if rel == GOLDEN or p.is_symlink():
                    continue
                lines.append((f"./{rel}", hashlib.sha256(p.read_bytes()).hexdigest()))
    lines.sort()
    (root / GOLDEN).write_text("".join(f"{h}  {p}\n" for p, h in lines))
    for dirpath, dirs, fs in os.walk(root, topdown=False):
        for name in fs + dirs:
            os.utime(os.path.join(dirpath, name), (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    os.utime(root, (FIXED_TIME, FIXED_TIME))
    return {"files": len(files) + len(ETC_FILES), "file_bytes": sum(n for _s, n in files),
            "boot_full_files": len(full), "boot_head_files": len(head), "boot_read_bytes_estimate": read_bytes,
            "golden_files": len(lines), "victim": "/" + victim.lstrip("/")}


def make_disk(path: Path, root: Path, size: int) -> None:
    """ext4 of ``size`` bytes from ``root`` with fixed UUID, hash seed and timestamps."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_TIME), MKE2FS_CONFIG="/etc/mke2fs.conf")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "bproot", "-U", FS_UUID, "-E",
                    f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(root), str(path)],
                   check=True, env=env, stdin=subprocess.DEVNULL, timeout=600)


# ---------------------------------------------------------------------------------------------------------------
# Build with cache


FIO = Path("/usr/bin/fio")
FIO_DIR = "usr/lib/bptest/fio"


def add_fio(root: Path) -> None:
    """fio and every library it links (ldd) under FIO_DIR, run through the dynamic loader with that
    directory as its library path (``FIO_DIR/run``): the bench's I/O inside the running system.
    About 84 MB of libraries (fio links the ceph, gluster and rdma engines), so only in images
    built with ``fio=True``."""
    if not FIO.exists():
        raise SystemExit("bootimage: no /usr/bin/fio: apt-get install fio (scripts/setup.sh does)")
    d = root / FIO_DIR
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIO, d / "fio")
    os.chmod(d / "fio", 0o755)
    out = subprocess.run(["ldd", str(FIO)], capture_output=True, text=True, check=True, timeout=60).stdout
    loader = ""
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            shutil.copyfile(os.path.realpath(m.group(1)), d / Path(m.group(1)).name)
            if "ld-linux" in m.group(1):
                loader = Path(m.group(1)).name
                os.chmod(d / loader, 0o755)  # run executes it: copyfile leaves it without the x bit
    (d / "run").write_text(f"#!/{ROOT_BUSYBOX} sh\nexec /{FIO_DIR}/{loader} --library-path /{FIO_DIR} "
                           f"/{FIO_DIR}/fio \"$@\"\n")
    os.chmod(d / "run", 0o755)


def _params(size: int, fill_mb: int, fio: bool = False) -> dict[str, object]:
    kernel, release = find_kernel()
    bb = find_busybox()
    return {"builder": BUILDER_VERSION, "size": size, "fill_mb": fill_mb, "fio": fio, "kernel_release": release,
            "kernel_bytes": kernel.stat().st_size,
            "busybox_sha256": hashlib.sha256(bb.read_bytes()).hexdigest(),
            "init_sha256": hashlib.sha256((INIT + ROOT_INIT).encode()).hexdigest()}


def _cached(out: Path, params: dict[str, object]) -> Built | None:
    try:
        info = json.loads((out / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("params") != params:
        return None
    b = Built(out, out / "disk.raw", out / "vmlinuz", out / "initrd.img", info)
    sizes = info.get("sizes", {})
    for p in (b.disk, b.kernel, b.initrd):
        if not p.exists() or p.stat().st_size != sizes.get(p.name):
            return None
    return b


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One builder per directory at a time (parallel test workers share the cache)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(out: Path | str, *, size: int | str = "1G", fill_mb: int = 300, quiet: bool = True,
          fio: bool = False) -> Built:
    """Build (or reuse) the image in ``out``; returns its paths. Safe to call from parallel processes."""
    out = Path(out).resolve()
    size_b = parse_size(size) if isinstance(size, str) else int(size)
    if fill_mb * (1 << 20) > size_b * 0.8:
        raise SystemExit(f"bootimage: --fill-mb {fill_mb} does not fit a {size_b >> 20} MiB disk")
    params = _params(size_b, fill_mb, fio)
    with _locked(out):
        done = _cached(out, params)
        if done is not None:
            return done
        t0 = time.monotonic()
        kernel, release = find_kernel()
        stage = out / ".build"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            (out / "info.json").unlink(missing_ok=True)
            mods = module_load_order(release)
            (stage / "initrd.img").write_bytes(make_initrd(find_busybox(), mods))
            shutil.copyfile(kernel, stage / "vmlinuz")
            root = stage / "root"
            root.mkdir()
            figures = populate(root, fill_mb << 20)
            if fio:
                add_fio(root)
            make_disk(stage / "disk.raw", root, size_b)
            shutil.rmtree(root)
            for name in ("disk.raw", "vmlinuz", "initrd.img"):
                os.replace(stage / name, out / name)
            info: dict[str, object] = {
                "params": params, "sizes": {n: (out / n).stat().st_size for n in ("disk.raw", "vmlinuz",
                                                                                   "initrd.img")},
                "modules": [m.name for m in mods], "build_seconds": round(time.monotonic() - t0, 2),
                "marker": MARKER, "admin_change": {"path": ADMIN_CHANGE_PATH, "content": ADMIN_CHANGE_CONTENT},
                "virus": VIRUS_PATH, "user_files": list(USER_FILES), "watched": ["/" + w for w in WATCHED],
                **figures}
            tmp = out / "info.json.tmp"
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, out / "info.json")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if not quiet:
            print(f"bootimage: built {out} in {info['build_seconds']} s", file=sys.stderr)
        return Built(out, out / "disk.raw", out / "vmlinuz", out / "initrd.img", info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the bootable blockprov test image (offline, Debian packages).")
    ap.add_argument("--out", required=True, type=Path, help="output directory (reused when complete)")
    ap.add_argument("--size", default="1G", help="virtual disk size (default 1G)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files copied from /usr (default 300)")
    a = ap.parse_args(argv)
    t = time.monotonic()
    b = build(a.out, size=a.size, fill_mb=a.fill_mb, quiet=False)
    print(json.dumps({"disk": str(b.disk), "kernel": str(b.kernel), "initrd": str(b.initrd),
                      "seconds": round(time.monotonic() - t, 2), **{k: b.info[k] for k in (
                          "files", "file_bytes", "golden_files", "boot_read_bytes_estimate", "build_seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
