"""The device-mapper layers' own cost under emulation (issue 24's fio goal: where does the time go?).

bench/bench_fio.py measures fio in the running OS of a blockprov PC against the plain disk; its
blockprov side has the native data path's device-mapper layers in every request (netboot/native.py:
restore a dm-snapshot whose store is a linear concatenation, keep dm-era over a linear map). This
bench measures those layers alone, with nothing else in the guest: one qemu guest (TCG, 1 vCPU,
1 GiB, Debian's kernel, the virtio disks ``cache=writeback`` raw files as bench_fio's PC) boots a
small initramfs (busybox, dmsetup, fio, the dm modules) and runs the same four fio jobs as
bench_fio's image, on a block device directly (no file system, ``--direct=1``), through each stack:

- ``raw``: the virtio disk itself;
- ``linear``: one dm-linear over it;
- ``restore``: as shipped, a dm-snapshot (persistent, 1 MiB chunks) of the disk whose store is a
  dm-linear concatenation of two ranges of a second disk (the golden reserve, then the room past
  the image);
- ``restore-1cow``: the same snapshot over a store that is one device (no linear below it);
- ``restore-origin``: restore in place, the other way round (not shipped): the root a
  ``snapshot-origin`` of the disk, whose first write of a chunk copies the old content into a
  persistent snapshot on the second disk (restore would merge it back at the next boot): reads and
  rewrites go through one layer to the disk itself;
- ``restore-N``: as shipped but non-persistent (``N``: the exception table in memory only);
- ``restore-nostats``: as shipped, with the kernel's I/O accounting off on its dm devices
  (``/sys/block/dm-N/queue/iostats`` 0);
- ``keep``: as shipped, dm-era (1 MiB blocks) over the disk itself, its metadata on a third disk
  (blockprov keeps it in a file through a loop device);
- ``keep-linear``: dm-era over a dm-linear of the disk (keep as shipped before era went straight
  over the partition: its ``bp-data``);
- ``keep-nostats``: as shipped, with the I/O accounting off on era's device.

Each stack is made afresh (a store or era record emptied), then a 256 MiB layout with 1 MiB writes
as bench_fio's image does (its rate is the ``layout`` row: the first writes, which under restore
copy into the store and under keep commit era's record), then the four jobs once each. Rounds
interleave the stacks, each round's order drawn afresh (seeded, so runs compare), and every disk
is flushed after a stack's layout and after its jobs: no stack always follows the same neighbour
or pays for another's writes on the host. A row's figure is the median over rounds; the ratio to
``raw`` is the median of the rounds' ratios (neighbours in time).

Run: ``nice -n 5 .venv/bin/python bench/bench_dmlayers.py [--rounds 3] [--stacks raw,keep,…]``.
Results: bench/out/dmlayers.{json,md}, bench/results/dmlayers.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_netboot import RESULTS, uptime
from common import OUT, WORK, write_results
from tests import bootvm

from blockprov.netboot import initramfs

STACKS = ("raw", "linear", "restore", "restore-1cow", "restore-origin", "restore-N", "restore-nostats", "keep",
          "keep-linear", "keep-nostats")
JOBS = {"layout": "256 MiB layout, 1 MiB writes, QD4 (first writes)", "rr1": "4 KiB random read, QD1",
        "rr16": "4 KiB random read, QD16", "sr": "1 MiB sequential read, QD4", "sw": "1 MiB sequential write, QD4"}
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "dm_mod", "dm_snapshot", "dm_era")
LINE = re.compile(r"BP-DM stack=(\S+) round=(\d+) job=(\w+) iops=(\d+) kbs=(\d+)")
GIB = 1 << 30

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod "/mods/$m"; done
i=0; while [ ! -b /dev/vdc ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
FIO=/usr/lib/bptest/fio/run
G=2097152  # the image: 1 GiB in sectors
dn() { cat "/sys/block/$1/dev"; }
dmn() { dmsetup info -c --noheadings -o major,minor --separator : "$1"; }
mk() { printf "$2" | dmsetup create "$1" && dmsetup mknodes "$1"; }
zero() { dd if=/dev/zero of="$1" bs=4096 count=1 conv=fsync 2>/dev/null; }
flush() {  # each disk's cache flushed (qemu: its file written back on the host)
    for d in vda vdb vdc; do dd if=/dev/zero of=/dev/$d bs=4096 count=0 conv=notrunc,fsync 2>/dev/null; done
}
COW="0 1048576 linear $(dn vdb) 0\n1048576 1572864 linear $(dn vdb) 1048576\n"
up() {
    case "$1" in
    raw) DEV=/dev/vda ;;
    linear) mk bp-data "0 $G linear $(dn vda) 0\n" && DEV=/dev/mapper/bp-data ;;
    restore) zero /dev/vdb; mk bp-cow "$COW" && mk bp-root "0 $G snapshot $(dn vda) $(dmn bp-cow) P 2048\n" ;;
    restore-1cow) zero /dev/vdb; mk bp-root "0 $G snapshot $(dn vda) $(dn vdb) P 2048\n" ;;
    restore-origin) zero /dev/vdb; mk bp-pit "0 $G snapshot $(dn vda) $(dn vdb) P 2048\n" \
        && mk bp-root "0 $G snapshot-origin $(dn vda)\n" ;;
    restore-N) zero /dev/vdb; mk bp-cow "$COW" && mk bp-root "0 $G snapshot $(dn vda) $(dmn bp-cow) N 2048\n" ;;
    restore-nostats) up restore && nostats ;;
    keep) zero /dev/vdc; mk bp-root "0 $G era $(dn vdc) $(dn vda) 2048\n" ;;
    keep-linear) zero /dev/vdc; mk bp-data "0 $G linear $(dn vda) 0\n" \
        && mk bp-root "0 $G era $(dn vdc) $(dmn bp-data) 2048\n" ;;
    keep-nostats) up keep && nostats ;;
    esac || return 1
    [ -n "$DEV" ] || DEV=/dev/mapper/bp-root
}
nostats() {  # the kernel's per-request I/O accounting off on every dm device of the stack
    for q in /sys/block/dm-*/queue/iostats; do
        [ -f "$q" ] || { echo "BP-DM-NOTE no $q"; return 1; }
        echo 0 >"$q" && echo "BP-DM-NOTE $q=$(cat "$q")"
    done
}
down() { for n in bp-root bp-pit bp-cow bp-data; do dmsetup remove "$n" 2>/dev/null; done; DEV=""; }
out() { awk -F';' -v S="$1" -v R="$2" -v J="$3" \
    '{printf "BP-DM stack=%s round=%s job=%s iops=%d kbs=%d\n", S, R, J, $8+$49, $7+$48}'; }
run() {  # stack round
    up "$1" || { echo "BP-DM-FAIL stack=$1"; down; return; }
    $FIO --name=layout --filename=$DEV --size=256M --rw=write --bs=1M --direct=1 --ioengine=libaio --iodepth=4 \
        --minimal 2>/dev/null | out "$1" "$2" layout
    flush
    for job in "rr1 randread 4k 1" "rr16 randread 4k 16" "sr read 1M 4" "sw write 1M 4"; do
        set -- "$1" "$2" $job
        $FIO --name=$3 --filename=$DEV --size=256M --rw=$4 --bs=$5 --iodepth=$6 --direct=1 --ioengine=libaio \
            --runtime=4 --time_based --ramp_time=1 --minimal 2>/dev/null | out "$1" "$2" "$3"
    done
    flush  # the next stack does not pay for this one's writes on the host
    down
}
r=0
for order in @ORDERS@; do  # each round's order of the stacks, comma-separated (drawn by the host)
    for s in $(echo "$order" | tr , ' '); do
        echo "BP-DM-START stack=$s round=$r uptime=$(cut -d' ' -f1 /proc/uptime)"; run "$s" "$r"
    done
    r=$((r + 1))
done
echo "BP-DM-DONE"
poweroff -f
"""


def copy_with_libs(root: Path, binary: str) -> None:
    """``binary`` and the libraries ldd lists, each at its own path under ``root``."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True, timeout=60).stdout
    for path in [binary, *re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", out)]:
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(path), dest)
        os.chmod(dest, 0o755)


def build_initramfs(tmp: Path, rounds: int, stacks: tuple[str, ...] = STACKS) -> tuple[Path, Path]:
    """The guest's kernel and its initramfs (busybox, dmsetup, fio, the dm modules, INIT)."""
    kernel, release = initramfs.find_kernel()
    root = tmp / "root"
    for d in ("bin", "proc", "sys", "dev", "mods", "usr/lib/bptest"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = next(p for p in initramfs.BUSYBOX if p.exists())
    shutil.copyfile(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    os.symlink("/bin/busybox", root / bootvm.bootimage.ROOT_BUSYBOX)  # fio's run script's shell
    copy_with_libs(root, shutil.which("dmsetup") or "/usr/sbin/dmsetup")
    bootvm.bootimage.add_fio(root)
    mods = initramfs.module_order(Path("/lib/modules") / release, MODULES, needed=MODULES[3:])
    for m in mods:
        shutil.copyfile(m, root / "mods" / m.name)
    (root / "mods" / "order").write_text("\n".join(m.name for m in mods) + "\n")
    orders = [",".join(random.Random(1000 + r).sample(stacks, len(stacks))) for r in range(rounds)]
    (root / "init").write_text(INIT.replace("@ORDERS@", " ".join(orders)))
    os.chmod(root / "init", 0o755)
    listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing, capture_output=True,
                          check=True).stdout
    initrd = tmp / "initrd.gz"
    initrd.write_bytes(gzip.compress(cpio, compresslevel=1))
    return kernel, initrd


def boot(kernel: Path, initrd: Path, tmp: Path, timeout: float) -> str:
    disks = {"vda": GIB, "vdb": GIB + GIB // 4, "vdc": 64 << 20}
    cmd = ["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "1024", "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1 no_timer_check"]
    for name, size in disks.items():
        path = tmp / f"{name}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        cmd += ["-drive", f"file={path},format=raw,if=virtio,cache=writeback"]
    log = tmp / "console.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > end:
                    raise RuntimeError(f"the guest did not finish in {timeout:.0f} s")
                text = log.read_bytes().decode(errors="replace")
                done = sum(1 for _ in LINE.finditer(text))
                print(f"\r  {done} figures", end="", flush=True)
                time.sleep(5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    print()
    return log.read_bytes().decode(errors="replace")


def rows_of(samples: dict[tuple[str, str], dict[int, int]], kbs: dict[tuple[str, str], dict[int, int]]
            ) -> list[dict[str, Any]]:
    med = statistics.median
    rows = []
    for job, label in JOBS.items():
        raw = samples.get(("raw", job), {})
        for stack in STACKS:
            got = samples.get((stack, job), {})
            if not got:
                continue
            ratios = [v / raw[r] for r, v in sorted(got.items()) if raw.get(r)]
            rows.append({"job": label, "stack": stack, "IOPS": med(got.values()),
                         "MiB/s": round(med(kbs[(stack, job)].values()) / 1024, 1),
                         "/ raw": round(med(ratios), 3) if ratios else "-",
                         "rounds (IOPS)": "/".join(str(v) for _r, v in sorted(got.items()))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--timeout", type=float, default=3600, help="longest the guest may take (s)")
    ap.add_argument("--name", default="dmlayers", help="the results' name (default dmlayers)")
    ap.add_argument("--stacks", default=",".join(STACKS), help="the stacks measured, comma-separated (default all)")
    a = ap.parse_args()
    stacks = tuple(a.stacks.split(","))
    if "raw" not in stacks or not set(stacks) <= set(STACKS):
        ap.error(f"--stacks: raw and any of {', '.join(STACKS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = {"start": uptime()}
    print(f"load at start: {load['start']}", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="dmlayers-"))
    try:
        kernel, initrd = build_initramfs(tmp, a.rounds, stacks)
        t0 = time.monotonic()
        console = boot(kernel, initrd, tmp, a.timeout)
        seconds = time.monotonic() - t0
    finally:
        load["end"] = uptime()
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.name}-console.log").write_text(console)
    if "BP-DM-DONE" not in console:
        raise SystemExit(f"the guest did not finish:\n{console[-3000:]}")
    samples: dict[tuple[str, str], dict[int, int]] = {}
    kbs: dict[tuple[str, str], dict[int, int]] = {}
    for stack, rnd, job, iops, kb in LINE.findall(console):
        samples.setdefault((stack, job), {})[int(rnd)] = int(iops)
        kbs.setdefault((stack, job), {})[int(rnd)] = int(kb)
    failed = re.findall(r"BP-DM-FAIL stack=(\S+)", console)
    rows = rows_of(samples, kbs)
    meta = {"qemu": "qemu-system-x86_64 -machine accel=tcg -m 1024, 1 vCPU, Debian's kernel, three virtio-blk disks "
                    "(cache=writeback, raw files): vda 1 GiB (the image), vdb 1.25 GiB (the store), vdc 64 MiB "
                    "(era's metadata)",
            "fio": "on the block device, 256 MiB, --direct=1 --ioengine=libaio --ramp_time=1 --runtime=4 "
                   "--time_based; each job once per stack and round",
            "rounds": a.rounds, "seconds": round(seconds), "load": load, "failed": failed,
            "notes": sorted({n.strip() for n in re.findall(r"BP-DM-NOTE (.*)", console)}),
            "command": f"nice -n 5 .venv/bin/python bench/bench_dmlayers.py --rounds {a.rounds} --stacks {a.stacks}"}
    md = write_results(a.name, rows, meta)
    (OUT / f"{a.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(md, RESULTS / f"{a.name}.md")
    print(md.read_text(), flush=True)


if __name__ == "__main__":
    main()
