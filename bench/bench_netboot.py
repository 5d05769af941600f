"""Network-boot benchmark (issue 13, "Benchmark"): a PC (qemu TCG, the NIC's own iPXE ROM, a blank
virtio disk) boots the test image (tools/bootimage.py, ``bp.mode=plain`` unless said) from the
repository, on loopback and over a 20 ms link. We measure the time from qemu's start to the guest's
``BLOCKPROV-BOOT-DONE`` marker (the machine is usable) and what the repository sent.

Scenarios, each on a fresh blank disk per repeat:

- ``bp-first``: blockprov network boot onto the blank disk, ``hydrate=background`` (the default):
  the machine runs at once, the rest is copied while it works;
- ``bp-before-boot``: blockprov's own ``hydrate=before-boot`` (everything on the disk first);
- ``fog-pc``: the FOG/Clonezilla model in the same PC (bench/fogpc.py): the PC network-boots an
  imaging system (the host's boot assignment to ``lab:fog``: blockprov's kernel and initramfs with
  a busybox ``/fog-init`` appended), which streams the whole raw view through the link onto
  /dev/vda with ``wget | dd``, syncs and powers off; then the PC boots its disk through the disk's
  own boot loader (``lab:fog`` is the test image made bootable by tools/bootdisk.py). Both boots
  and the copy are counted; the copy is also reported alone (the imaging script's console lines);
- ``fog``: a reference that favours the peer: ``qemu-img convert`` of the raw view natively on the
  host, through the same link, onto the blank disk image, then a direct kernel boot of that disk
  (no firmware, no imaging system, no emulated copy);
- ``bp-restore``: on the machine that ``bp-before-boot`` provisioned, a session under ``keep``
  writes 32 MiB (bootimage's ``hog`` mode: ~1.5 % of a 2 GiB image), then the host's policy is
  ``restore`` and the machine reboots: only the chunks the session modified are reset, and
  fetched again when read (or by the background copy);
- ``bp-update``: the host moved to v2 (the administrator's change, tests/boot/netboot_helpers.py
  ``admin_version``): the next boot updates the disk by diff;
- ``plain``: no blockprov at all (issue 24's reference): the same PC, NIC first and disk second as
  a café PC is set, its disk the test image made bootable by tools/bootdisk.py (as ``fog-pc``'s
  disk boot), on a network whose DHCP names no boot file (the NIC's iPXE finds nothing and the
  firmware boots the disk);
- ``everyday-restore``, ``everyday-keep``: issue 24's every-day boot: a PC whose disk blockprov
  provisioned (``before-boot``, once, then one boot that leaves the session's changes) powers on;
  the repository's iPXE script answers ``exit``, the disk's own loader boots the fast initramfs,
  which asks the repository one question and sets up the native data path (``restore``: the last
  session's store dropped). Each sample is the next every-day boot of the same disk.

``plain`` and the every-day rows boot ``bp.mode=dirty`` (the root remounted read-write, every file
read, a user session's writes synced) and are also split into phases (``PHASES``): the firmware
to the NIC's ROM, iPXE (DHCP, and for blockprov its script), the disk's loader and the kernel up
to the initramfs (or the image's init), blockprov's initramfs (modules and disk, the question,
the restore) by the guest's clock, and the image's own init to its marker.

UEFI (issue 25), the same PC on q35 with OVMF (Debian ``ovmf``), each beside its BIOS row above:

- ``uefi-first``: as ``bp-first``, the NIC's EFI iPXE ROM (efi-virtio.rom) instead of SeaBIOS's iPXE;
- ``uefi-http-first``: as ``bp-first``, no iPXE: the firmware's own HTTP boot of the host's boot
  image (``GET /v1/boot/MAC/boot.img``: shim, GRUB, kernel and initramfs in one FAT image), its
  PXE boot options and IPv6 off (OVMF's fw_cfg knobs), as on a PC set to HTTP boot over IPv4;
- ``uefi-before``: as ``bp-before-boot`` through EFI iPXE (provisions the machine of the next row);
- ``uefi-restore``: the every-day boot, as ``bp-restore`` on that UEFI machine.

"Re-imaging" is the ``fog-pc`` row. The restore step (the agent's reset and restore of the
session's chunks: from its "holds blockprov's cache" line to its "restored N of M" line, timed
by the host at 0.2 s) is set against ``fog-pc``'s copy step. What the repository sent is
counted twice: all bytes through the link (bench/wanproxy.py, both links; it includes the iPXE
script, the kernel and the initramfs the firmware fetches) and chunks (the repository's
``blockprov_chunks_served_total``). ``--big-size`` repeats ``--big-scenarios`` (first, fog-pc,
before, restore) on a larger image, on ``--big-links`` (wan), for the trend of the first-boot
ratio with the image's size and the "flat in image size" goal.

Run: ``.venv/bin/python bench/bench_netboot.py [--size 2G] [--big-size 8G] [--repeat 2] [--skip loopback,fog]``.
Results: bench/out/NAME.{json,md}, bench/results/NAME.png (``--name``, default netboot: a run of a few
scenarios, e.g. the UEFI rows beside their BIOS ones, gets a name of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN, WORK, drop_caches, write_results
from fogpc import COPY_DONE, COPY_START, FAIL, FOG_REF, START, FogVersion, add_version
from tests import bootvm
from tests.boot.netboot_helpers import BIOS, MAC, Firmware, admin_version, assign, blank_disk, chunks_served, netboot
from tests.procs import start_server
from wanproxy import ProxyThread, parse_duration, parse_rate

BP = str(VENV_BIN / "blockprov")
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
V1, V2 = "lab:v1", "lab:v2"
POLL = 0.2  # seconds between the host's looks at the console (the restore step's resolution)
# the restore step on the console: the agent found its cache on the disk … restored the session's chunks
RESTORE_FROM, RESTORE_TO = "holds blockprov's cache", "restored "


@dataclass
class Sample:
    seconds: float  # what the user waits: preparation (a copy) plus boot
    prep_seconds: float = 0.0
    down_bytes: int = 0  # repository → PC through the link
    chunks: int = 0  # chunks the repository sent
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Repo:
    """One repository behind one link, holding v1 and v2 with the blockprov boot files."""

    link: str
    proxy: ProxyThread
    server_url: str  # direct: for the CLI and the metrics, not counted by the link
    raw_url: str  # v1's raw view through the link
    image: bootvm.bootimage.Built
    fog: FogVersion
    changed: int  # chunks that differ between v1 and v2
    chunk_size: int
    tmp: Path
    timeout: float

    @property
    def url(self) -> str:
        return self.proxy.url

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int, int]:
        """Run ``fn`` from a zeroed link counter: (its result, bytes the repository sent, chunks)."""
        self.proxy.reset()
        c0 = chunks_served(self.server_url)
        r = fn()
        return r, self.proxy.stats()["down_bytes"], chunks_served(self.server_url) - c0

    def boot(self, disk: Path, name: str, mode: str, policy: str, hydrate: str, ref: str = V1, extra: str = "",
             firmware: Firmware = BIOS, http: bool = False) -> Any:
        """One boot of the PC; ``http``: the firmware's own HTTP boot of the host's boot image."""
        assign(self.server_url, mode, policy, ref=ref, hydrate=hydrate, readahead=None, extra=extra)
        # ?base=: the agent's repository URL through the link too (edk2 sends no port in its Host
        # header, so the repository would name its own port, past the counting proxy)
        port = self.url.rsplit(":", 1)[1]
        bootfile = f"http://10.0.2.2:{port}/v1/boot/{MAC}/boot.img?base=http://10.0.2.2:{port}" if http else None
        b = netboot(disk, self.url, self.tmp / f"{name}.log", timeout=self.timeout, marks=(RESTORE_FROM, RESTORE_TO),
                    poll=POLL, firmware=firmware, bootfile=bootfile)
        if not b.done or b.done.get("mode") != mode:
            raise RuntimeError(f"{name}: no boot marker\n{b.tail(30)}")
        return b


def s_first(r: Repo, i: int) -> Sample:
    disk = blank_disk(r.tmp / f"first-{i}.raw", disk_size(r.image))
    try:
        b, down, chunks = r.measure(lambda: r.boot(disk, "first", "plain", "restore", "background"))
        return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))
    finally:
        disk.unlink(missing_ok=True)


def s_before_boot(r: Repo, i: int) -> Sample:
    """Provisions ``machine-i.raw`` (kept for restore and update)."""
    disk = blank_disk(r.tmp / f"machine-{i}.raw", disk_size(r.image))
    b, down, chunks = r.measure(lambda: r.boot(disk, "before", "plain", "keep", "before-boot"))
    return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))


def uefi(r: Repo, name: str, *, ipxe: bool = True) -> Firmware:
    """OVMF with the PC's NVRAM ``name`` (kept across the boots of one machine)."""
    return Firmware("uefi", r.tmp / f"{name}.nvram", ipxe=ipxe, http_only=not ipxe)


def s_uefi_first(r: Repo, i: int, http: bool = False) -> Sample:
    disk = blank_disk(r.tmp / f"uefi-first-{i}.raw", disk_size(r.image))
    pc = uefi(r, f"uefi-first-{i}", ipxe=not http)
    try:
        b, down, chunks = r.measure(lambda: r.boot(disk, "uefi-first", "plain", "restore", "background", firmware=pc,
                                                   http=http))
        return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))
    finally:
        disk.unlink(missing_ok=True)
        if pc.nvram is not None:
            pc.nvram.unlink(missing_ok=True)


def s_uefi_http_first(r: Repo, i: int) -> Sample:
    return s_uefi_first(r, i, http=True)


def s_uefi_before(r: Repo, i: int) -> Sample:
    """Provisions ``machine-uefi-i.raw`` (kept for uefi-restore)."""
    disk = blank_disk(r.tmp / f"machine-uefi-{i}.raw", disk_size(r.image))
    b, down, chunks = r.measure(lambda: r.boot(disk, "uefi-before", "plain", "keep", "before-boot",
                                               firmware=uefi(r, f"machine-uefi-{i}")))
    return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))


def s_uefi_restore(r: Repo, i: int) -> Sample:
    return s_restore(r, i, uefi(r, f"machine-uefi-{i}"), f"machine-uefi-{i}.raw")


def s_fog(r: Repo, i: int) -> Sample:
    disk = r.tmp / f"fog-{i}.raw"
    disk.unlink(missing_ok=True)

    def image_then_boot() -> tuple[float, bootvm.BootResult]:
        t = time.perf_counter()
        # -m 1: with more coroutines qemu 7.2's curl driver hangs in some runs (bench_boot.py)
        subprocess.run(["qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "raw", r.raw_url, str(disk)],
                       check=True, timeout=r.timeout)
        prep = time.perf_counter() - t
        return prep, bootvm.boot(r.image.kernel, r.image.initrd, disk, mode="plain", timeout=r.timeout,
                                 stats=False)

    try:
        (prep, b), down, chunks = r.measure(image_then_boot)
        if not b.ok or b.seconds is None:
            raise RuntimeError(f"fog: the imaged disk did not boot\n{b.tail(20)}")
        return Sample(prep + b.seconds, prep_seconds=prep, down_bytes=down, chunks=chunks)
    finally:
        disk.unlink(missing_ok=True)


def s_fog_pc(r: Repo, i: int) -> Sample:
    """Power on → imaging system → whole-image copy → power off; power on → the disk's own boot."""
    disk = blank_disk(r.tmp / f"fogpc-{i}.raw", disk_size(r.image))

    def image_then_boot() -> tuple[Any, Any]:
        assign(r.server_url, "plain", "keep", ref=FOG_REF, readahead=None)
        img = netboot(disk, r.url, r.tmp / "fogpc-imaging.log", timeout=r.timeout, count=False,
                      marks=(START, COPY_START, COPY_DONE), poll=POLL)
        if COPY_DONE not in img.console or FAIL in img.console:
            raise RuntimeError(f"fog-pc: the imaging system did not finish\n{img.tail(20)}")
        b = netboot(disk, r.url, r.tmp / "fogpc-disk.log", timeout=r.timeout, count=False, disk_first=True)
        if b.done.get("mode") != "plain":
            raise RuntimeError(f"fog-pc: the imaged disk did not boot\n{b.tail(20)}")
        return img, b

    try:
        (img, b), down, chunks = r.measure(image_then_boot)
        if down < r.fog.raw_bytes:
            raise RuntimeError(f"fog-pc: {down} bytes through the link, less than the image ({r.fog.raw_bytes})")
        copy = img.seen[COPY_DONE] - img.seen[COPY_START]
        extra = {"t_imaging_started": img.seen.get(START), "t_copy_start": img.seen[COPY_START],
                 "t_powered_off": img.seconds, "disk_boot": b.seconds,
                 "copy_guest": guest_span(img.console, COPY_START, COPY_DONE)}
        return Sample(img.seconds + b.seconds, prep_seconds=copy, down_bytes=down, chunks=chunks,
                      extra={k: round(v, 1) for k, v in extra.items() if v is not None})
    finally:
        disk.unlink(missing_ok=True)


def guest_span(console: str, a: str, b: str) -> float | None:
    """Seconds between two ``… at uptime S s`` console lines, by the guest's own clock."""
    ta, tb = guest_at(console, a), guest_at(console, b)
    return tb - ta if ta is not None and tb is not None else None


def guest_at(console: str, text: str) -> float | None:
    """The guest's uptime on the first ``… TEXT … at uptime S s`` console line."""
    m = re.search(re.escape(text) + r"[^\n]* at uptime ([\d.]+) s", console)
    return float(m.group(1)) if m else None


def s_restore(r: Repo, i: int, firmware: Firmware = BIOS, machine: str = "") -> Sample:
    disk = r.tmp / (machine or f"machine-{i}.raw")
    r.boot(disk, "session", "hog", "keep", "background", firmware=firmware)  # the session: 32 MiB written to the root
    # blockprov.loader=off: a restore-policy PC boots with the same arguments every time, so its disk's
    # boot loader is current and the agent leaves it alone; the bench changed them (keep → restore,
    # hog → plain), which would make the agent write the loader again (kernel + initramfs fetched)
    b, down, chunks = r.measure(lambda: r.boot(disk, "restore", "plain", "restore", "background",
                                               extra="blockprov.loader=off", firmware=firmware))
    step = (b.seen[RESTORE_TO] - b.seen[RESTORE_FROM]) if RESTORE_TO in b.seen and RESTORE_FROM in b.seen else None
    return Sample(b.seconds, prep_seconds=step or 0.0, down_bytes=down, chunks=chunks,
                  extra=milestones(b) | {"reset": b.number(r"reset on start: (\d+) chunk"),
                                         "restored": b.number(r"restored (\d+) of")})


def s_update(r: Repo, i: int) -> Sample:
    disk = r.tmp / f"machine-{i}.raw"
    try:
        b, down, chunks = r.measure(lambda: r.boot(disk, "update", "plain", "restore", "background", ref=V2))
        if "by diff" not in b.console:
            raise RuntimeError(f"update: no update by diff\n{b.tail(20)}")
        return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b) | {"changed": r.changed})
    finally:
        disk.unlink(missing_ok=True)


# -- issue 24: the every-day boot against a plain disk, by phase --------------------------------------
DAY_MODE = "dirty"
PLAIN_APPEND = f"console=ttyS0 quiet panic=-1 no_timer_check bp.mode={DAY_MODE}"
EVERYDAY_MAC = {"restore": "52:54:00:12:34:e1", "keep": "52:54:00:12:34:e2"}
# console texts timed by the host: the NIC's ROM runs, the firmware turns to the disk, the initramfs
# (blockprov's) or the image's init starts
IPXE_START, TO_DISK = "iPXE initialising devices", "Booting from Hard Disk"
EVERYDAY = "(the disk's own loader: every-day boot"
PHASES = ("firmware", "iPXE", "loader+kernel", "initramfs: modules, disk", "initramfs: question",
          "initramfs: restore, mount", "OS")


def phases(b: Any) -> dict[str, float]:
    """The boot's phases in seconds (see the module docstring): host-timed up to the initramfs or
    the image's init, the guest's clock after."""
    init_at = float(re.search(r"BLOCKPROV-INIT \S+ uptime=([\d.]+)", b.console).group(1))  # type: ignore[union-attr]
    out = {"firmware": b.seen[IPXE_START], "iPXE": b.seen[TO_DISK] - b.seen[IPXE_START],
           "OS": float(b.done["uptime"]) - init_at}
    start = guest_at(b.console, "initramfs started")
    if start is None:  # no blockprov: the loader, the kernel and the image's own initrd up to its init
        out["loader+kernel"] = b.seen["BLOCKPROV-INIT"] - b.seen[TO_DISK]
        return {k: round(v, 2) for k, v in out.items()}
    found, answer = guest_at(b.console, "its plan read"), guest_at(b.console, "the repository: the disk is current")
    mounted = guest_at(b.console, "root serving")
    out["loader+kernel"] = b.seen["blockprov: initramfs started"] - b.seen[TO_DISK]
    if found is not None and answer is not None and mounted is not None:
        out["initramfs: modules, disk"] = found - start
        out["initramfs: question"] = max(0.0, answer - found)  # what the boot waited for the answer
        out["initramfs: restore, mount"] = mounted - max(found, answer)
    return {k: round(v, 2) for k, v in out.items()}


def s_plain(r: Repo, i: int) -> Sample:
    disk = r.tmp / "plain.raw"
    if not disk.exists():
        bootvm.bootable_disk(r.image, disk, PLAIN_APPEND)
    b = netboot(disk, r.url, r.tmp / "plain.log", timeout=r.timeout, count=False, disk_second=True,
                unreachable=True, marks=(IPXE_START, TO_DISK), poll=POLL)
    if b.done.get("mode") != DAY_MODE:
        raise RuntimeError(f"plain: the disk did not boot\n{b.tail(20)}")
    return Sample(b.seconds, extra={"phases": phases(b)})


def s_everyday(r: Repo, policy: str) -> Sample:
    mac = EVERYDAY_MAC[policy]
    disk = r.tmp / f"everyday-{policy}.raw"
    if not disk.exists():  # provisioned once, then a session: every sample is the next day's boot
        blank_disk(disk, disk_size(r.image))
        assign(r.server_url, DAY_MODE, policy, ref=V1, hydrate="before-boot", readahead=None, mac=mac)
        for n in (1, 2):
            b = netboot(disk, r.url, r.tmp / f"everyday-{policy}-{n}.log", timeout=r.timeout, count=False,
                        disk_second=True, mac=mac)
            if b.done.get("mode") != DAY_MODE or "native data path" not in b.console:
                raise RuntimeError(f"everyday-{policy}: provisioning boot {n} did not end native\n{b.tail(20)}")
    b, down, chunks = r.measure(lambda: netboot(disk, r.url, r.tmp / f"everyday-{policy}.log", timeout=r.timeout,
                                                count=False, disk_second=True, mac=mac,
                                                marks=(IPXE_START, TO_DISK), poll=POLL))
    if b.done.get("mode") != DAY_MODE or EVERYDAY not in b.console or "native data path" not in b.console:
        raise RuntimeError(f"everyday-{policy}: not an every-day boot on the native path\n{b.tail(20)}")
    extra: dict[str, Any] = {"phases": phases(b)}
    if policy == "restore":
        extra["dropped"] = b.number(r"chunks: (\d+) dropped with it")
    return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=extra)


def s_everyday_restore(r: Repo, i: int) -> Sample:
    return s_everyday(r, "restore")


def s_everyday_keep(r: Repo, i: int) -> Sample:
    return s_everyday(r, "keep")


def milestones(b: Any) -> dict[str, Any]:
    """When the firmware had fetched the boot files (the initramfs starts), the agent served the
    root and the image's own init ran: seconds from qemu's start."""
    names = {"blockprov: initramfs started": "t_initramfs", "blockprov: root serving": "t_serving",
             "BLOCKPROV-INIT": "t_init"}
    out: dict[str, Any] = {names[k]: round(v, 1) for k, v in b.seen.items() if k in names}
    # The agent (re)wrote the disk's own boot loader before the marker: what it fetched for it (files
    # the disk held already are read back; its record holds the command line, which scenarios change).
    m = re.search(r"boot loader written to \S+ \([A-Z ]+\): .*; fetched (\d+) KiB", b.console)
    if m:
        out["loader_mib"] = round(int(m.group(1)) / 1024, 1)
    return out


SCENARIOS: list[tuple[str, str, Callable[[Repo, int], Sample]]] = [
    ("first", "blockprov first boot, blank disk (background hydration)", s_first),
    ("fog-pc", "FOG/Clonezilla in the PC: netboot imaging system, whole-image copy, power off, disk boot", s_fog_pc),
    ("before", "blockprov hydrate=before-boot, blank disk", s_before_boot),
    ("fog", "reference, favours the peer: host-native qemu-img convert, then direct kernel boot", s_fog),
    ("restore", "blockprov restore reboot after a 32 MiB session", s_restore),
    ("update", "blockprov update v1→v2 at boot", s_update),
    ("uefi-first", "UEFI (OVMF, EFI iPXE): blockprov first boot, blank disk (background hydration)", s_uefi_first),
    ("uefi-http-first", "UEFI firmware HTTP boot, no iPXE: blockprov first boot, blank disk", s_uefi_http_first),
    ("uefi-before", "UEFI (OVMF, EFI iPXE): blockprov hydrate=before-boot, blank disk", s_uefi_before),
    ("uefi-restore", "UEFI (OVMF, EFI iPXE): blockprov restore reboot after a 32 MiB session", s_uefi_restore),
    ("plain", "plain disk, no blockprov (its own loader; NIC first, no boot file)", s_plain),
    ("everyday-restore", "blockprov every-day boot, restore (the disk's loader, native path)", s_everyday_restore),
    ("everyday-keep", "blockprov every-day boot, keep (the disk's loader, native path)", s_everyday_keep),
]
RESTORE_KEYS = {"restore": "machine-{i}.raw", "update": "machine-{i}.raw", "uefi-restore": "machine-uefi-{i}.raw"}


def disk_size(image: bootvm.bootimage.Built) -> int:
    """The PC's blank disk: the image plus blockprov's metadata partition, rounded up to 1 GiB."""
    need = image.disk.stat().st_size + (128 << 20)
    return -(-need // (1 << 30)) * (1 << 30)


def cli(*args: str, timeout: float = 600) -> str:
    return subprocess.run([BP, *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def make_repo(data: Path, image: bootvm.bootimage.Built, v2: Path, initrd: Path | None,
              fog: bool) -> tuple[Path, FogVersion]:
    """Import v1 and v2 into ``data`` (embedded) and give both the blockprov boot files; the
    initramfs is built once (``boot-files build``) and set on later repositories. With ``fog``:
    also ``lab:fog``, the bootable test image with the imaging system as its boot files."""
    cli("--data", str(data), "import", str(image.disk), V1)
    cli("--data", str(data), "import", str(v2), V2)
    if initrd is None:
        out = data.parent / "initrd.img"
        built = json.loads(cli("--data", str(data), "boot-files", "build", V1, "--output", str(out), "--json"))
        (data.parent / "built.json").write_text(json.dumps(built))
    else:
        out = initrd
        built = json.loads((initrd.parent / "built.json").read_text())
        cli("--data", str(data), "boot-files", "set", V1, "--kernel", built["build"]["kernel"], "--initrd", str(out),
            "--cmdline", built["cmdline"])
    cli("--data", str(data), "boot-files", "set", V2, "--kernel", built["build"]["kernel"], "--initrd", str(out),
        "--cmdline", built["cmdline"])
    fv = (add_version(cli, data, image, built["build"]["kernel"], out, data.parent) if fog
          else FogVersion(FOG_REF, 0))
    return out, fv


def run_link(link: str, rtt: float, rate: float | None, image: bootvm.bootimage.Built, v2: Path, tmp: Path,
             keys: list[str], repeat: int, timeout: float, retries: int, initrd: Path | None,
             size: str, once: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Every scenario of ``keys`` ``repeat`` times (those in ``once``: one time), in rounds: a round
    runs each scenario that still needs a sample, restore and update on the machine its before
    provisioned."""
    data = tmp / f"repo-{link}-{size}" / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    initrd, fog = make_repo(data, image, v2, initrd, "fog-pc" in keys)
    changed = len(json.loads(cli("--data", str(data), "diff", V1, V2, "--json"))["changed"])
    show = json.loads(cli("--data", str(data), "show", V1, "--json"))
    server, url = start_server(data)
    rows, raw = [], {}
    try:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        with ProxyThread((host, int(port)), rtt=rtt, rate=rate) as proxy:
            raw_url = json.loads(cli("--repo", proxy.url, "show", V1, "--json"))["raw_url"]
            r = Repo(link, proxy, url, raw_url, image, fog, changed, int(show["chunk_size"]), tmp, timeout)
            samples: dict[str, list[Sample]] = {k: [] for k in keys}
            failures: dict[str, list[str]] = {k: [] for k in keys}
            want = {k: 1 if k in once else repeat for k in keys}
            for i in range(repeat + retries):
                if all(len(samples[k]) >= want[k] for k in keys):
                    break
                for key, label, fn in SCENARIOS:
                    if key not in keys or len(samples[key]) >= want[key]:
                        continue
                    if key in RESTORE_KEYS and not (tmp / RESTORE_KEYS[key].format(i=i)).exists():
                        continue  # needs the machine ``before`` (``uefi-before``) provisioned in this round
                    drop_caches()
                    try:
                        s = fn(r, i)
                    except (RuntimeError, AssertionError, subprocess.SubprocessError, OSError) as e:
                        failures[key].append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                        print(f"  {link:8} {size:4} {label:58} FAILED: {str(e)[-1500:]}", flush=True)
                        continue
                    samples[key].append(s)
                    print(f"  {link:8} {size:4} {label:58} {s.seconds:7.1f} s, sent {s.down_bytes / MIB:8.1f} MiB, "
                          f"{s.chunks} chunks {s.extra or ''}", flush=True)
                for f in (tmp / f"machine-{i}.raw", tmp / f"machine-uefi-{i}.raw", tmp / f"machine-uefi-{i}.nvram"):
                    f.unlink(missing_ok=True)
            for key, label, _fn in SCENARIOS:
                if key in keys:
                    rows.append(row(link, size, key, label, samples[key], failures[key]))
                    raw[f"{link}/{size}/{key}"] = [s.__dict__ for s in samples[key]]
    finally:
        server.stop()
        shutil.rmtree(data.parent / "data", ignore_errors=True)
    raw[f"{link}/{size}/image"] = {"chunks": show["chunks"], "zero_chunks": show["zero_chunks"],
                                   "chunk_size": show["chunk_size"], "changed_v1_v2": changed}
    return rows, raw, initrd


STEP = {"fog": "copy", "fog-pc": "copy", "restore": "restore step", "uefi-restore": "restore step"}


def row(link: str, size: str, key: str, label: str, samples: list[Sample], failures: list[str]) -> dict[str, Any]:
    med = statistics.median
    note = [f"{len(failures)} failed: {failures[0][:100]}"] if failures else []
    if not samples:
        return {"link": link, "image": size, "scenario": label, "seconds": "-", "step s": "-", "repo sent MiB": "-",
                "loader MiB": "-", "chunks sent": "-", "note": "; ".join(note) or "not run"}
    step: float | str = med(s.prep_seconds for s in samples) if key in STEP else "-"
    if key in STEP:
        note.append(f"step = {STEP[key]}")
    for k, what in (("reset", "chunks reset"), ("restored", "restored"), ("changed", "chunks differ"),
                    ("dropped", "chunks of the last session dropped")):
        if any(k in s.extra for s in samples):
            note.append(f"{med(s.extra[k] for s in samples):.0f} {what}")
    for k, what in (("t_initramfs", "initramfs"), ("t_serving", "root served"), ("t_init", "image's init"),
                    ("t_imaging_started", "imaging system"), ("t_copy_start", "copy start"),
                    ("t_powered_off", "powered off")):
        if all(k in s.extra for s in samples):
            note.append(f"{what} at {med(s.extra[k] for s in samples):.1f} s")
    if any("loader_mib" in s.extra for s in samples):
        n = sum("loader_mib" in s.extra for s in samples)
        note.append(f"disk's boot loader rewritten in {n} of {len(samples)} "
                    f"({max(s.extra.get('loader_mib', 0) for s in samples):.1f} MiB of kernel + initramfs fetched)")
    if all("disk_boot" in s.extra for s in samples):
        note.append(f"then the disk's boot {med(s.extra['disk_boot'] for s in samples):.1f} s")
    if all("copy_guest" in s.extra for s in samples):
        note.append(f"copy by the guest's clock {med(s.extra['copy_guest'] for s in samples):.1f} s")
    if all("phases" in s.extra for s in samples):
        note.append("phases " + ", ".join(f"{p} {v:.2f}" for p, v in phase_medians(samples).items()))
    if len(samples) > 1:
        note.append("samples " + "/".join(f"{s.seconds:.1f}" for s in samples))
        if key in STEP:
            note.append("steps " + "/".join(f"{s.prep_seconds:.1f}" for s in samples))
    return {"link": link, "image": size, "scenario": label, "seconds": med(s.seconds for s in samples),
            "step s": step, "repo sent MiB": med(s.down_bytes for s in samples) / MIB,
            "loader MiB": med(s.extra.get("loader_mib", 0.0) for s in samples),
            "chunks sent": med(s.chunks for s in samples), "note": "; ".join(note)}


def phase_medians(samples: list[Sample]) -> dict[str, float]:
    """Each phase's median over the samples that have it, in PHASES order."""
    return {p: statistics.median(vals) for p in PHASES
            if (vals := [s.extra["phases"][p] for s in samples if p in s.extra.get("phases", {})])}


def goals(rows: list[dict[str, Any]], boot_file_mib: float, changed: dict[str, int], chunk_mib: float,
          size: str, big: str) -> list[str]:
    """The issue's goals on the medians. Re-imaging = ``fog-pc`` (the same PC); the host-native
    ``fog`` row is a reference only."""
    def get(link: str, sz: str, key: str, col: str) -> float | None:
        label = next(lab for k, lab, _ in SCENARIOS if k == key)
        r = next((r for r in rows if r["link"] == link and r["image"] == sz and r["scenario"] == label), None)
        return float(r[col]) if r and isinstance(r[col], (int, float)) else None

    out = []

    def check(text: str, a: float | None, b: float | None, limit: float) -> None:
        if a is not None and b:  # else not measured in this run (the RESULTS section says what was skipped)
            out.append(f"{text}: {a:.4g} / {b:.4g} = {a / b:.3f} — {'met' if a / b <= limit else 'NOT met'}")

    sizes = list(dict.fromkeys((size, big)))
    for link in ("wan", "loopback"):
        what = "the goal" if link == "wan" else "not a goal"
        for sz in sizes:
            check(f"first usable boot ≤ 0.3× the FOG model in the PC ({link}, {sz}, {what}; seconds)",
                  get(link, sz, "first", "seconds"), get(link, sz, "fog-pc", "seconds"), 0.3)
            check(f"  reference: vs the host-native FOG copy that favours the peer ({link}, {sz}; seconds)",
                  get(link, sz, "first", "seconds"), get(link, sz, "fog", "seconds"), 0.3)
        ratios = [(sz, a / b) for sz in sizes if (a := get(link, sz, "first", "seconds")) is not None
                  and (b := get(link, sz, "fog-pc", "seconds"))]
        if len(ratios) > 1:
            out.append(f"first / fog-pc with image size ({link}): "
                       + ", ".join(f"{sz} {q:.3f}" for sz, q in ratios))
    for link in ("wan", "loopback"):
        for sz in sizes:
            check(f"restore at boot ≤ 0.02× re-imaging, bytes sent ({link}, {sz})",
                  get(link, sz, "restore", "repo sent MiB"), get(link, sz, "fog-pc", "repo sent MiB"), 0.02)
            loader = get(link, sz, "restore", "loader MiB")
            if loader:
                check(f"  the same without the loader's rewrite ({loader:.1f} MiB; {link}, {sz})",
                      (get(link, sz, "restore", "repo sent MiB") or 0) - loader,
                      get(link, sz, "fog-pc", "repo sent MiB"), 0.02)
            check(f"restore step ≤ 0.02× the re-imaging copy step, seconds ({link}, {sz})",
                  get(link, sz, "restore", "step s"), get(link, sz, "fog-pc", "step s"), 0.02)
            check(f"  whole reboots, restore vs re-imaging, seconds ({link}, {sz}; not the goal's measure)",
                  get(link, sz, "restore", "seconds"), get(link, sz, "fog-pc", "seconds"), 0.02)
        a, b = get(link, size, "restore", "repo sent MiB"), get(link, big, "restore", "repo sent MiB")
        if a is not None and b is not None and big != size:
            sa, sb = get(link, size, "restore", "step s"), get(link, big, "restore", "step s")
            out.append(f"restore flat in image size ({link}): bytes {size} {a:.1f} MiB, {big} {b:.1f} MiB "
                       f"({b / a if a else 0:.2f}×); step {sa or 0:.2f} s vs {sb or 0:.2f} s — "
                       f"{'met' if b <= 1.25 * a + 1 else 'NOT met'} (bytes)")
    for link in ("loopback", "wan"):
        for policy in ("restore", "keep"):
            check(f"every-day boot ≤ 1.15× the plain disk ({policy}, {link}, {size}; seconds)",
                  get(link, size, f"everyday-{policy}", "seconds"), get(link, size, "plain", "seconds"), 1.15)
    for link in ("wan", "loopback"):
        ch = changed.get(link)
        sent = get(link, size, "update", "chunks sent")
        check(f"update chunks sent ≤ 1.1× the changed chunks ({link})", sent, ch, 1.1)
        mib = get(link, size, "update", "repo sent MiB")
        if mib is not None and ch:
            loader = get(link, size, "update", "loader MiB") or 0.0
            # the agent's "boot loader written" line may come after the marker: then not seen, though fetched
            rewrite = (f", {mib - boot_file_mib - loader:.2f} MiB besides the disk's boot loader's rewrite "
                       f"({loader:.1f} MiB)") if loader else ""
            out.append(f"update bytes sent ({link}): {mib:.1f} MiB in all, {mib - boot_file_mib:.2f} MiB besides the "
                       f"kernel and initramfs ({boot_file_mib:.1f} MiB, fetched by the firmware at every boot)"
                       f"{rewrite}; changed chunks {ch} × {chunk_mib:g} MiB = {ch * chunk_mib:.2f} MiB")
    for link in ("wan", "loopback"):  # UEFI beside BIOS, the same run (not goals: what the firmware costs)
        for uefi_key, bios_key, what in (("uefi-first", "first", "first boot, EFI iPXE"),
                                         ("uefi-http-first", "first", "first boot, firmware HTTP boot"),
                                         ("uefi-before", "before", "before-boot provisioning"),
                                         ("uefi-restore", "restore", "every-day (restore) boot")):
            a, b = get(link, size, uefi_key, "seconds"), get(link, size, bios_key, "seconds")
            if a is not None and b:
                out.append(f"UEFI vs BIOS, {what} ({link}, {size}): {a:.4g} s / {b:.4g} s = {a / b:.2f}×; sent "
                           f"{get(link, size, uefi_key, 'repo sent MiB') or 0:.1f} vs "
                           f"{get(link, size, bios_key, 'repo sent MiB') or 0:.1f} MiB")
    return out


SHORT = dict(zip((label for _k, label, _f in SCENARIOS),
                 ("bp first", "FOG in the PC", "bp before-boot", "FOG host-native (ref.)", "bp restore", "bp update",
                  "UEFI first", "UEFI HTTP first", "UEFI before-boot", "UEFI restore",
                  "plain disk", "bp every-day restore", "bp every-day keep"), strict=True))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["image"], r["scenario"]) for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(18, 6))
    width = 0.8 / max(1, len(links))
    for ax, col, ylabel in ((axes[0], "seconds", "seconds from qemu start to the boot marker"),
                            (axes[1], "repo sent MiB", "MiB the repository sent (log)")):
        for i, link in enumerate(links):
            vals = []
            for g in groups:
                r = next((r for r in rows if r["link"] == link and (r["image"], r["scenario"]) == g), None)
                vals.append(float(r[col]) if r and isinstance(r[col], (int, float)) else 0.0)
            xs = [j + (i - (len(links) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=link)
            if col == "seconds":  # the copy / restore step inside the bar, hatched
                steps = []
                for g in groups:
                    r = next((r for r in rows if r["link"] == link and (r["image"], r["scenario"]) == g), None)
                    steps.append(float(r["step s"]) if r and isinstance(r.get("step s"), (int, float)) else 0.0)
                ax.bar(xs, steps, width, fill=False, hatch="//", edgecolor="black", linewidth=0,
                       label="copy / restore step" if i == 0 else None)
            for bar, v in zip(bars, vals, strict=True):
                if v:
                    ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([textwrap.fill(f"{SHORT.get(g[1], g[1])} {g[0]}", 12) for g in groups], fontsize=7)
        ax.set_ylabel(ylabel)
        if col != "seconds":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="virtual size of the test image (default 2G)")
    ap.add_argument("--big-size", default="8G", help="a larger image for the trend with size (default 8G)")
    ap.add_argument("--big-scenarios", default="first,fog-pc,before,restore",
                    help="scenarios run on the larger image (default first,fog-pc,before,restore)")
    ap.add_argument("--big-links", default="wan", help="links the larger image runs on (default wan)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files in the image (default 300)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--big-repeat", type=int, default=None, help="repeats on the larger image (default --repeat)")
    ap.add_argument("--loopback-repeat", type=int, default=None, help="repeats on loopback (default --repeat)")
    ap.add_argument("--once", default="", help="comma list of scenarios sampled once, whatever --repeat")
    ap.add_argument("--skip", default="", help="comma list of scenarios (" + ",".join(k for k, _l, _f in SCENARIOS)
                                               + ") and/or links (loopback,wan) and/or big")
    ap.add_argument("--rtt", default="20ms", help="round-trip time of the link (default 20ms)")
    ap.add_argument("--rate", default="1gbit", help="bandwidth of the link (default 1gbit)")
    ap.add_argument("--timeout", type=float, default=900, help="longest one boot (or the imaging run) may take (s)")
    ap.add_argument("--retries", type=int, default=1, help="extra rounds when runs failed")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from bench/out/NAME.json")
    ap.add_argument("--name", default="netboot", help="the results' name (bench/out/NAME.*, bench/results/NAME.png)")
    a = ap.parse_args()
    if a.plot_only:
        saved = json.loads((OUT / f"{a.name}.json").read_text())
        plot(saved["rows"], RESULTS / f"{a.name}.png", title(saved["meta"]["repeats"]))
        return
    skip = set(filter(None, a.skip.split(",")))
    once = set(filter(None, a.once.split(",")))
    keys = [k for k, _l, _f in SCENARIOS if k not in skip]
    big_keys = [k for k in keys if k in a.big_scenarios.split(",")]
    links = {"wan": (parse_duration(a.rtt), parse_rate(a.rate)), "loopback": (0.0, None)}
    # the goal's link first, both sizes: a run cut short by its deadline still has the figures that matter
    plan = []
    for link in (k for k in links if k not in skip):
        repeat = a.loopback_repeat or a.repeat if link == "loopback" else a.repeat
        plan.append((a.size, link, keys, repeat))
        if "big" not in skip and a.big_size != a.size and link in a.big_links.split(","):
            plan.append((a.big_size, link, big_keys, a.big_repeat or repeat))
    load_start = uptime()
    print(f"load at start: {load_start}", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="netboot-"))
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    initrd: Path | None = None
    images: dict[str, tuple[bootvm.bootimage.Built, Path]] = {}
    boot_file_mib = 0.0
    meta: dict[str, Any] = {
        "image": f"tools/bootimage.py, {a.size} (and {a.big_size}), {a.fill_mb} MB of files from /usr; "
                 "fog-pc images it made bootable (tools/bootdisk.py: MBR + syslinux partition after the ext4)",
        "links": f"{a.rtt} RTT, {a.rate} via bench/wanproxy.py, and loopback (the counting proxy, no delay)",
        "qemu": "qemu-system-x86_64 -machine accel=tcg -m 1024, 1 vCPU, virtio-net with its iPXE ROM "
                "(-netdev user,bootfile=…/v1/boot/MAC), blank virtio disk; fog-pc: the same PC, its second "
                "power-on boots the disk first (its MBR and syslinux); the host-native fog reference boots its "
                "disk by direct kernel boot (-m 512); UEFI rows: q35 with OVMF (Debian ovmf, OVMF_CODE_4M.fd, a per-PC "
                "NVRAM copy), the NIC's EFI iPXE ROM (efi-virtio.rom) or none (the firmware's HTTP boot of "
                "/v1/boot/MAC/boot.img, PXE and IPv6 off)",
        "repeats": a.repeat, "big repeats": a.big_repeat or a.repeat,
        "loopback repeats": a.loopback_repeat or a.repeat, "cpus": os.cpu_count(),
        "load at start": load_start,
        "command": f"python bench/bench_netboot.py --size {a.size} --big-size {a.big_size} --repeat {a.repeat}"
                   + (f" --big-repeat {a.big_repeat}" if a.big_repeat else "")
                   + (f" --loopback-repeat {a.loopback_repeat}" if a.loopback_repeat else "")
                   + (f" --big-scenarios {a.big_scenarios}" if a.big_scenarios != ap.get_default("big_scenarios")
                      else "")
                   + (f" --big-links {a.big_links}" if a.big_links != ap.get_default("big_links") else "")
                   + (f" --once {a.once}" if a.once else "") + (f" --skip {a.skip}" if a.skip else "")
                   + (f" --name {a.name}" if a.name != "netboot" else ""),
    }
    try:
        for size, link, ks, repeat in plan:
            if size not in images:
                image = bootvm.build_image(size=size, fill_mb=a.fill_mb)
                vdir = tmp / f"v2-{size}"
                vdir.mkdir()
                images[size] = (image, admin_version(image.disk, vdir))
                print(f"image {size}: {image.info['files']} files, {int(image.info['file_bytes']) / 1e6:.0f} MB",
                      flush=True)
            image, v2 = images[size]
            rtt, rate = links[link]
            r, rw, initrd = run_link(link, rtt, rate, image, v2, tmp, ks, repeat, a.timeout, a.retries, initrd, size,
                                     once)
            rows += r
            raw |= rw
            built = json.loads((initrd.parent / "built.json").read_text())
            boot_file_mib = (Path(built["build"]["kernel"]).stat().st_size + initrd.stat().st_size) / MIB
            # after every link and size: a run stopped later still leaves its figures
            files = f"{boot_file_mib:.1f} MiB (kernel + initramfs)"
            write_all(a.name, rows, raw, meta | {"load at end": uptime(), "boot files per network boot": files},
                      boot_file_mib, a.size, a.big_size, a.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {OUT / (a.name + '.json')}, {OUT / (a.name + '.md')}, {RESULTS / (a.name + '.png')}")


def title(repeats: int) -> str:
    return (f"PC network boot under TCG (medians of up to {repeats} samples; the table says how many): "
            "time to usable and bytes sent")


def write_all(name: str, rows: list[dict[str, Any]], raw: dict[str, Any], meta: dict[str, Any], boot_file_mib: float,
              size: str, big: str, repeat: int) -> None:
    changed = {k.split("/")[0]: int(v["changed_v1_v2"]) for k, v in raw.items()
               if k.endswith("/image") and f"/{size}/" in k}
    chunk_mib = next((int(v["chunk_size"]) / MIB for k, v in raw.items() if k.endswith("/image")), 1.0)
    g = goals(rows, boot_file_mib, changed, chunk_mib, size, big)
    write_results(name, rows, meta | {"goals": "; ".join(g)})
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": g, "samples": raw},
                                                 indent=2, default=str))
    print("\n".join(g), flush=True)
    plot(rows, RESULTS / f"{name}.png", title(repeat))


if __name__ == "__main__":
    main()
