"""The every-day boot (issue 24 item 4): a PC whose disk is complete and current boots it in a
few hundred milliseconds of userspace, with no python and no download.

The blockprov initramfs is two gzip members (netboot/initramfs.py): the *fast* part (busybox,
the kernel modules, dmsetup, this module's ``INIT``) and the *rest* (python, blockprov, the
tools of the first provisioning). A network boot loads both; the disk's own loader
(netboot/loader.py) loads only the fast part, and keeps the rest on the boot partition.

``INIT`` is the archive's ``/init``. With python present (a network boot) it hands over to
netboot/machine.py at once. Otherwise (the disk's loader) it tries the every-day boot:

1. finds the disk by blockprov's label, mounts its metadata partition and reads the **plan**
   (``native.env``, written by the in-machine agent whenever it set up the native data path,
   removed whenever the agent path changes the disk: ``write_plan``, ``remove_plan``); the plan
   must be for the version and policy the command line names;
2. asks the repository, in one small request with a short timeout (``ASK_TIMEOUT``), whether
   the disk is still current (``POST /v1/boot/HOST/disk`` with the version and the fingerprint
   of what the disk's loader boots: boot.py's ``disk_verdict`` decides, the same rule that makes
   the iPXE script answer ``exit``); no answer: the repository is out of reach and the PC boots
   what its disk holds (said ``OFFLINE`` on the console);
3. makes the native data path's devices from the plan (netboot/native.py: under ``restore`` the
   last session's copy-on-write store is dropped, its size said; under ``keep`` era goes on
   recording), mounts the root, starts the resident agent in the background (the rest unpacked
   from the boot partition, at the lowest CPU and I/O priority, and only once the machine has
   been quiet for a few seconds, ``QUIET_WAIT``: it must not slow the machine's own boot nor
   the user's first work — measured, bench/RESULTS.md), moves the root and execs the machine's
   init.

Anything else — no plan, a changed version, policy or fingerprint, a re-provision, a failing
step — is the slow path: the rest is unpacked from the boot partition and netboot/machine.py
runs as in a network boot (it updates, restores, reports, rewrites the plan). So the fast path
never changes what the disk holds beyond what a native session would, and any doubt costs only
time.

The plan is a shell file of ``BP_*`` variables (``plan_text``), written atomically; it names
partitions, never device numbers (the shell reads those from /sys at each boot).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from blockprov.durable import atomic_write, fsync_dir

PLAN = "native.env"
ASK_TIMEOUT = 3  # seconds the every-day boot waits for the repository's answer
FAST_MODULE_TIMEOUT = 10  # seconds the disk may take to appear once its driver is loaded
SECURE_BOOT_AT = 0x1EC  # struct boot_params.secure_boot (the x86 boot protocol): 3 on, 2 off, as the EFI stub saw it
RESIDENT_DELAY = 20  # seconds the resident agent waits before it starts: the machine's own boot first
# then it waits for the machine to be quiet (``QUIET_WAIT``): a window of QUIET_WINDOW s with the
# CPU busy less than QUIET_CPU % and the disk less than QUIET_DISK %, for at most QUIET_MOST s
QUIET_WINDOW, QUIET_CPU, QUIET_DISK, QUIET_MOST = 5, 25, 10, 300

# The shell function that waits for a quiet machine (the resident agent's start, above): CPU from
# /proc/stat (busy = all but idle and iowait), the disk from its /sys stat's io_ticks (ms busy).
# Its arguments: the disk, CPU %, disk %, the window and the most it waits (s); it sets WHY. Files
# overridable (BP_STAT, BP_DSTAT) for tests/unit/test_everyday.py. No single quote: it lives in a
# ``sh -c '…'``.
QUIET_WAIT = r"""snap() {
        read -r _c u n s i w q sq st _r <"${BP_STAT:-/proc/stat}"; T=$((u+n+s+i+w+q+sq+st)); B=$((u+n+s+q+sq+st))
        set -- $(cat "${BP_DSTAT:-/sys/block/$1/stat}"); IO=${10}
    }
    quiet_wait() {
        snap "$1"; t=0; WHY="busy for $5 s: starting anyway at idle priority"
        while [ $t -lt "$5" ]; do
            T0=$T; B0=$B; IO0=$IO; sleep "$4"; t=$((t + $4)); snap "$1"
            cpu=$(( 100 * (B - B0) / (T - T0 + 1) )); disk=$(( (IO - IO0) / ($4 * 10) ))
            if [ $cpu -lt "$2" ] && [ $disk -lt "$3" ]; then
                WHY="quiet (CPU $cpu %, disk $disk % busy over $4 s) after $t s"; return 0
            fi
        done
        return 1
    }"""


def plan_text(*, image: str, policy: str, disk: str, parts: Sequence[str], sectors: int, chunk_sectors: int,
              cow: Sequence[tuple[str, int, int]], era_block: int, era_file: str, per_chunk: int = 1) -> str:
    """The plan (see the module docstring): ``parts`` the boot, metadata, reserve and data
    partitions' names, ``cow`` the restore store's pieces (partition, offset, sectors),
    ``chunk_sectors`` the store's chunk, ``per_chunk`` the cache's chunks in one (the console
    counts those). Pure."""
    values = {
        "BP_PLAN": "1", "BP_IMAGE": image, "BP_POLICY": policy, "BP_DISK": disk,
        "BP_BOOT": parts[0], "BP_META": parts[1], "BP_RESERVE": parts[2], "BP_DATA": parts[3],
        "BP_SECTORS": str(sectors), "BP_CHUNK": str(chunk_sectors), "BP_PER_CHUNK": str(per_chunk),
        "BP_COW": " ".join(f"{p}:{off}:{n}" for p, off, n in cow),
        "BP_ERA_BLOCK": str(era_block), "BP_ERA_FILE": era_file,
    }
    return ("# blockprov's every-day boot plan (netboot/everyday.py), written by the in-machine agent\n"
            + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))


def parse_plan(text: str) -> dict[str, str]:
    """A plan's variables (the inverse of ``plan_text``). Pure."""
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            words = shlex.split(v)
            out[k] = words[0] if words else ""
    return out


def write_plan(meta_dir: Path, text: str) -> None:
    atomic_write(meta_dir / PLAN, text.encode())


def remove_plan(meta_dir: Path) -> None:
    """No every-day boot until the agent writes a plan again (done before the agent path changes
    the disk: a power cut then leaves no plan, and the next boot takes the slow path)."""
    path = meta_dir / PLAN
    if path.exists():
        path.unlink()
        fsync_dir(meta_dir)


INIT = r"""#!/usr/bin/busybox sh
# blockprov initramfs /init (netboot/everyday.py): a network boot (python present) runs
# netboot/machine.py; a boot from the disk's own loader tries the every-day boot first.
/usr/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu PYTHONHOME=/usr
export PYTHONPATH=/usr/lib/blockprov PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
RUN=/run/blockprov
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "blockprov: $*"; }
machine() { exec /usr/bin/python3 -S -B -m blockprov.netboot.machine; say "cannot start python3"; sleep 30; reboot -f; }
[ -x /usr/bin/python3 ] && machine

say "initramfs started at uptime $(up) s (the disk's own loader: every-day boot;" \
    "kernel and initramfs from the disk, none downloaded)"
# the firmware, as netboot/inagent.py's firmware() reads it: the EFI stub's secure_boot byte (3 on, 2 off)
FW=BIOS; [ -d /sys/firmware/efi ] && FW=UEFI
case "$FW$(od -A n -t u1 -j @SB_AT@ -N 1 /sys/kernel/boot_params/data 2>/dev/null | tr -d ' ')" in
UEFI3) FW="UEFI, Secure Boot on" ;; UEFI2) FW="UEFI, Secure Boot off" ;;
esac
say "firmware: $FW"
for w in $(cat /proc/cmdline); do
    case "$w" in
    blockprov.repo=*) REPO=${w#*=} ;; blockprov.host=*) HOST=${w#*=} ;; blockprov.image=*) IMAGE=${w#*=} ;;
    blockprov.policy=*) POLICY=${w#*=} ;; blockprov.token=*) TOKEN=${w#*=} ;; blockprov.disk=*) NAMED=${w#*=} ;;
    blockprov.native=*) NATIVE=${w#*=} ;;
    init=*) INITPROG=${w#*=} ;; rootfstype=*) FSTYPE=${w#*=} ;; rw) OPTS=rw ;;
    esac
done
POLICY=${POLICY:-keep}; INITPROG=${INITPROG:-/sbin/init}; FSTYPE=${FSTYPE:-ext4}; OPTS=${OPTS:-ro}
META=$RUN/meta; BOOT=$RUN/boot; DEVS=$RUN/dev
mkdir -p $META $BOOT $DEVS /newroot

devno() { cat "/sys/class/block/$1/dev"; }
dmno() { dmsetup info -c --noheadings -o major,minor --separator : "$1"; }
mk() { printf "$2" | dmsetup create "$1" && dmsetup mknodes "$1"; }
part() { case "$D" in *[0-9]) echo "${D}p$1" ;; *) echo "$D$1" ;; esac; }
label() {  # blockprov's label: sector 1 (MBR form) or 34 (GPT form)
    for at in 1 34; do
        [ "$(dd if="/dev/$1" bs=512 skip=$at count=1 2>/dev/null | head -c 22)" = "BLOCKPROV-NETBOOT-DISK" ] && return 0
    done
    return 1
}
find_disk() {
    i=0
    while [ $i -lt $((FAST_MODULE_TIMEOUT * 10)) ]; do
        for b in /sys/block/*; do
            n=${b##*/}
            case "$n" in loop*|ram*|dm-*|nbd*|sr*|zram*) continue ;; esac
            [ -n "$NAMED" ] && [ "$n" != "${NAMED#/dev/}" ] && continue
            [ -b "/dev/$n" ] && label "$n" && { D=$n; return 0; }
        done
        usleep 100000; i=$((i + 1))
    done
    return 1
}
undo() {  # what the every-day boot made, before the slow path takes over
    for n in bp-root bp-cow; do dmsetup remove "$n" 2>/dev/null; done
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    umount "$META" 2>/dev/null
}
slow() {
    say "every-day boot not taken: $1; the full initramfs from the disk's boot partition at uptime $(up) s"
    : >/tmp/meta.done  # the background question waits no longer for the metadata partition
    [ -f /tmp/ask.started ] && answer >/dev/null  # the background network job ends first (its udhcpc)
    undo
    if [ -n "$D" ] && mount -t vfat -o ro "/dev/$(part 1)" "$BOOT" && [ -f "$BOOT/rest.img" ]; then
        (cd / && gunzip -c "$BOOT/rest.img" | cpio -idmu 2>/dev/null)
        umount "$BOOT"
        machine
    fi
    say "BLOCKPROV-NETBOOT-FAIL no full initramfs on the disk's boot partition: cannot boot; rebooting in 30 s"
    sleep 30; reboot -f
}
# The repository's verdict on this disk: "disk", "network …", or nothing (out of reach). busybox
# 1.35's wget crashes on a refused connection when given its own -T: the timeout is timeout's.
ask() {
    ip link set lo up
    NIC=""; i=0
    while [ -z "$NIC" ] && [ $i -lt 50 ]; do
        NIC=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); [ -z "$NIC" ] && usleep 100000; i=$((i + 1))
    done
    [ -n "$NIC" ] || return 0
    ip link set "$NIC" up
    udhcpc -i "$NIC" -f -q -n -t 3 -T 1 -s /etc/blockprov/udhcpc.sh >/dev/null 2>&1 || return 0
    echo "blockprov: network up on $NIC at uptime $(up) s" >&2
    i=0  # the loader's record is on the metadata partition, which the main shell mounts meanwhile
    while [ ! -f /tmp/meta.done ] && [ $i -lt @META_WAIT@ ]; do usleep 100000; i=$((i + 1)); done
    FP=$(sed -n 's/.*"fingerprint": *"\([0-9a-f]*\)".*/\1/p' "$META/loader.json" 2>/dev/null)
    BODY="{\"version\": \"$IMAGE\", \"fingerprint\": \"$FP\"}"
    if [ -n "$TOKEN" ]; then
        timeout @ASK@ wget -S -q -O - --header "Authorization: Bearer $TOKEN" \
            --header "Content-Type: application/json" --post-data "$BODY" "$REPO/v1/boot/$HOST/disk?base=$REPO" 2>&1
    else
        timeout @ASK@ wget -S -q -O - --header "Content-Type: application/json" --post-data "$BODY" \
            "$REPO/v1/boot/$HOST/disk?base=$REPO" 2>&1
    fi
}
answer() {  # the background job's answer, waited for (bounded): the repository's verdict
    i=0
    while [ ! -f /tmp/answer.done ] && [ $i -lt $(( (@ASK@ + 15) * 10 )) ]; do usleep 100000; i=$((i + 1)); done
    cat /tmp/answer 2>/dev/null
}
everyday() {
    # modules, then the network and the repository's verdict, in the background: the disk and
    # its devices are made meanwhile (the modules of the disk and of device-mapper first)
    : >/tmp/ask.started
    (for m in $(cat /etc/blockprov/modules); do  # not nbd: its init makes 16 devices (0.7 s under TCG)
         case "$m" in */nbd.ko) ;; */loop.ko) insmod "$m" max_loop=2 2>/dev/null ;; *) insmod "$m" 2>/dev/null ;; esac
     done
     : >/tmp/modules.done; say "modules loaded at uptime $(up) s" >&2
     ask >/tmp/answer 2>/tmp/ask.log; : >/tmp/answer.done) &
    # the modules first (a search meanwhile would take the one CPU from them), then the disk
    i=0; while [ ! -f /tmp/modules.done ] && [ $i -lt 600 ]; do usleep 50000; i=$((i + 1)); done
    find_disk || { WHY="no disk with blockprov's label"; return 1; }
    mount -t ext4 -o rw,noatime "/dev/$(part 2)" "$META" || { WHY="cannot mount /dev/$(part 2)"; return 1; }
    : >/tmp/meta.done
    # native=off after the disk is found: the slow path unpacks the rest from its boot partition
    [ "$NATIVE" = off ] && { WHY="blockprov.native=off"; return 1; }
    [ -f "$META/native.env" ] || { WHY="the disk has no native plan (the agent path last, or not complete)"; return 1; }
    . "$META/native.env"
    [ "$BP_IMAGE" = "$IMAGE" ] || { WHY="the plan is for $BP_IMAGE, the command line names $IMAGE"; return 1; }
    [ "$BP_POLICY" = "$POLICY" ] || { WHY="the plan is for policy $BP_POLICY, not $POLICY"; return 1; }
    say "disk $D found, its plan read at uptime $(up) s"
    if [ "$BP_POLICY" = restore ]; then
        T="" ; at=0
        for p in $BP_COW; do
            n=${p%%:*}; r=${p#*:}; T="$T$at ${r#*:} linear $(devno $n) ${r%%:*}\n"; at=$((at + ${r#*:}))
        done
        mk bp-cow "$T" || { WHY="cannot make bp-cow"; return 1; }
        ROOT="0 $BP_SECTORS snapshot $(devno $BP_DATA) $(dmno bp-cow) P $BP_CHUNK\n"
        N=0
        if mk bp-root "$ROOT"; then  # the last session's store, as the kernel reads it: its size
            set -- $(dmsetup status bp-root)
            case "$4" in
            */*) N=$(( (${4%%/*} - ${5:-0}) / BP_CHUNK * ${BP_PER_CHUNK:-1} )) ;;  # in the cache's chunks
            *) N="all"; say "warning: the last session's copy-on-write store was dropped by the kernel ($4)" ;;
            esac
        fi
    else
        LOOP=$(losetup -f) && losetup "$LOOP" "$META/$BP_ERA_FILE" || { WHY="cannot attach era's record"; return 1; }
        mk bp-root "0 $BP_SECTORS era $(devno ${LOOP#/dev/}) $(devno $BP_DATA) $BP_ERA_BLOCK\n" \
            || { WHY="cannot make bp-root (era)"; return 1; }
    fi
    ANSWER=$(answer)  # wget -S: the status lines, then the answer's one line
    cat /tmp/ask.log 2>/dev/null
    if echo "$ANSWER" | grep -qx disk; then
        say "the repository: the disk is current ($IMAGE) at uptime $(up) s"
    elif echo "$ANSWER" | grep -q '^network'; then
        WHY="the repository: $(echo "$ANSWER" | grep '^network' | head -n 1)"; return 1
    elif echo "$ANSWER" | grep -q 'HTTP/'; then  # answered, but not the question (a 401, a 404): the agent says more
        WHY="the repository answered $(echo "$ANSWER" | grep -o 'HTTP/[0-9.]* [0-9].*' | head -n 1)"; return 1
    else
        say "OFFLINE: the repository $REPO did not answer (waited at most @ASK@ s): booting what disk $D holds"
    fi
    if [ "$BP_POLICY" = restore ]; then  # only now, the repository heard: a policy change would keep the session
        dmsetup remove bp-root 2>/dev/null
        dd if=/dev/zero of=/dev/mapper/bp-cow bs=4096 count=1 conv=fsync 2>/dev/null \
            || { WHY="cannot drop the store"; return 1; }
        mk bp-root "$ROOT" || { WHY="cannot make bp-root"; return 1; }
        say "restore: the last session's chunks: $N dropped with it (restore), nothing copied"
    fi
    say "native data path: the root is disk $D itself, through the kernel (every-day boot, policy $BP_POLICY)"
    mount -t "$FSTYPE" -o "$OPTS" /dev/mapper/bp-root /newroot || { WHY="cannot mount the root"; return 1; }
    say "root serving from /dev/mapper/bp-root at uptime $(up) s"
    return 0
}

everyday || slow "$WHY"
# The resident agent: the rest of the initramfs unpacked, then python, at the lowest priorities,
# RESIDENT_DELAY seconds after the switch and then only once the machine is quiet (QUIET_WAIT:
# under emulation an idle priority is not enough — the vCPU that would halt while the machine
# waits for its disk runs the agent instead, and the host's time goes to it). It runs from this
# root, out of the new root's sight: its device nodes and the boot partition are mounted here
# before the switch moves /dev away.
mount -t devtmpfs bp-dev "$DEVS" 2>/dev/null
mount -t vfat -o ro "/dev/$(part 1)" "$BOOT" 2>/dev/null
BOOT="$BOOT" DEVS="$DEVS" D="$D" sh -c 'renice -n 19 -p $$ >/dev/null 2>&1; ionice -c 3 -p $$ >/dev/null 2>&1
    sleep @DELAY@
    mount --bind "$DEVS" /dev  # /dev, /proc, /sys of this root went with the switch: python reads /dev/urandom
    mount -t proc bp-proc /proc; mount -t sysfs bp-sys /sys  # as it starts, harden() /proc/self
    @QUIET_WAIT@
    quiet_wait "$D" @QUIET_CPU@ @QUIET_DISK@ @QUIET_WINDOW@ @QUIET_MOST@
    echo "blockprov: the resident agent starts at uptime $(cut -d" " -f1 /proc/uptime) s: the machine $WHY"
    cd / && gunzip -c "$BOOT/rest.img" | cpio -idmu 2>/dev/null; umount "$BOOT"
    exec -a @blockprov-supervisor /usr/bin/python3 -S -B -m blockprov.netboot.supervisor --resident' \
    </dev/null >/dev/console 2>&1 &
for d in dev proc sys; do mount --move "/$d" "/newroot/$d"; done
cd /newroot && mount --move . / || { echo "blockprov: cannot move the new root"; sleep 30; reboot -f; }
say "root mounted ($OPTS) at uptime $(cut -d' ' -f1 proc/uptime) s; starting $INITPROG"
exec chroot . "$INITPROG"
""".replace("@ASK@", str(ASK_TIMEOUT)).replace("@SB_AT@", str(SECURE_BOOT_AT)).replace(
    "@META_WAIT@", str((FAST_MODULE_TIMEOUT + 5) * 10)).replace(
    "@DELAY@", str(RESIDENT_DELAY)).replace("@QUIET_WAIT@", QUIET_WAIT).replace(
    "@QUIET_CPU@", str(QUIET_CPU)).replace("@QUIET_DISK@", str(QUIET_DISK)).replace(
    "@QUIET_WINDOW@", str(QUIET_WINDOW)).replace("@QUIET_MOST@", str(QUIET_MOST)).replace(
    "$((FAST_MODULE_TIMEOUT * 10))", str(FAST_MODULE_TIMEOUT * 10))
