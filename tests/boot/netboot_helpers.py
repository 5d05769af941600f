"""Helpers of the network-boot tests and of bench/bench_netboot.py: one network boot of a PC (qemu
TCG with a virtio disk and the NIC's own iPXE ROM, bounded), what the repository sent, host
assignment, v2 of the test image, and the chunk map a PC's disk holds.

Why a module and not conftest: bench/bench_netboot.py boots the PC exactly as the tests do and
imports these functions (the benchmark is no pytest run).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import bootvm
from tests.conftest import require_tool, run_cli

MAC = "52:54:00:12:34:5a"
IPXE_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # Debian ipxe-qemu: qemu loads it for virtio-net-pci
OVMF = "/usr/share/OVMF"  # Debian ovmf: UEFI firmware for qemu, 4 MiB flash images
BOOT_TIMEOUT = 300.0
# what the disk's own loader's initramfs says (netboot/everyday.py): the every-day boot, and its
# question unanswered
EVERYDAY = "(the disk's own loader: every-day boot; kernel and initramfs from the disk, none downloaded)"
OFFLINE = "OFFLINE: the repository"
DISK_EXIT = "blockprov: booting this PC's own disk (complete and current)"  # iPXE's script says it, then `exit`
# console lines whose arrival netboot() times: the firmware's fetch of the boot files is done when
# the initramfs starts; the agent serves the root; the image's own init runs
MILESTONES = ("blockprov: initramfs started", "blockprov: root serving", "BLOCKPROV-INIT")


@dataclass(frozen=True)
class Firmware:
    """The PC's firmware. ``bios``: SeaBIOS, qemu's default. ``uefi``: OVMF on a q35 machine.
    ``secure``: OVMF's Secure Boot build with Microsoft's keys enrolled, as shipped PCs have them
    (SMM on, the variable store's flash secure). ``nvram``: the PC's own copy of OVMF's variable
    store, made at its first boot and kept across its boots (a PC keeps its NVRAM). ``ipxe``: the
    NIC's iPXE ROM boots first (BIOS: qemu's default ROM; UEFI: efi-virtio.rom); False: no ROM,
    the firmware's own network boot (UEFI: PXE, then HTTP boot, over IPv4 then IPv6).
    ``http_only``: OVMF set to HTTP boot over IPv4 only (its fw_cfg knobs: the PXE boot options
    and the IPv6 stack off), as a PC whose operator chose HTTP boot, so it does not first wait out
    PXE over IPv4 and IPv6 (minutes under TCG)."""

    kind: str = "bios"
    nvram: Path | None = None
    ipxe: bool = True
    http_only: bool = False

    def args(self) -> list[str]:
        if self.kind == "bios":
            return []
        from tests.conftest import require_file

        secure = self.kind == "secure"
        code = require_file(f"{OVMF}/OVMF_CODE_4M.secboot.fd" if secure else f"{OVMF}/OVMF_CODE_4M.fd")
        template = require_file(f"{OVMF}/OVMF_VARS_4M.ms.fd" if secure else f"{OVMF}/OVMF_VARS_4M.fd")
        assert self.nvram is not None, "a UEFI PC needs its own NVRAM file"
        if not self.nvram.exists():
            shutil.copyfile(template, self.nvram)
        out = ["-machine", "q35,smm=on" if secure else "q35",
               "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
               "-drive", f"if=pflash,format=raw,unit=1,file={self.nvram}"]
        if self.http_only:
            out += [*(a for knob in ("IPv4PXESupport", "IPv6PXESupport", "IPv6Support")
                      for a in ("-fw_cfg", f"name=opt/org.tianocore/{knob},string=no"))]
        return [*out, "-global", "driver=cfi.pflash01,property=secure,value=on"] if secure else out

    def rom(self) -> str:
        """The NIC's ``romfile=`` option ("": qemu's default)."""
        if not self.ipxe:
            return ",romfile="
        return "" if self.kind == "bios" else f",romfile={IPXE_ROM}"


BIOS = Firmware()


@dataclass
class NetBoot:
    console: str
    seconds: float
    done: dict[str, str]
    sent_at_init: int | None  # chunks the repository had sent when the image's own init started
    seen: dict[str, float] = field(default_factory=dict)  # MILESTONES: seconds from qemu's start (±0.5 s)

    @property
    def check(self) -> str | None:
        m = re.search(r"BP-CHECK (\w+)", self.console)
        return m.group(1) if m else None

    def number(self, pattern: str) -> int:
        m = re.search(pattern, self.console)
        assert m, f"no {pattern!r} on the console:\n{self.tail()}"
        return int(m.group(1))

    def tail(self, n: int = 40) -> str:
        return "\n".join([ln for ln in self.console.splitlines() if not ln.startswith("[")][-n:])


def metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return str(r.read().decode())


def chunks_served(url: str) -> int:
    m = re.search(r"^blockprov_chunks_served_total (\S+)$", metrics(url), re.M)
    return int(float(m.group(1))) if m else 0


BOOT_FILE_REQUESTS = (r'^blockprov_http_requests_total\{[^}]*route="/v1/images/\{name\}/versions/\{vid\}/boot/'
                      r'\{which\}"[^}]*\} (\S+)$')
# a version's boot files one by one (iPXE), and the UEFI HTTP boot image that holds them
BOOT_ROUTES = ("/v1/images/{name}/versions/{vid}/boot/{which}", "/v1/boot/{host}/boot.img")


def boot_files_served(url: str) -> int:
    """Requests for a version's boot files (kernel, initramfs) the repository answered: what a
    network boot downloads, and an every-day boot does not."""
    return sum(int(float(m.group(1))) for m in re.finditer(BOOT_FILE_REQUESTS, metrics(url), re.M))


def boot_bytes_sent(url: str) -> int:
    """Bytes the repository sent of boot files (BOOT_ROUTES): megabytes when a PC downloads a kernel
    and an initramfs, a line when the firmware is told to boot its disk."""
    sent = re.finditer(r'^blockprov_http_sent_bytes_total\{route="([^"]*)"\} (\S+)$', metrics(url), re.M)
    return sum(int(float(m.group(2))) for m in sent if m.group(1) in BOOT_ROUTES)


def netboot(disk: Path | None, url: str, console: Path, timeout: float = BOOT_TIMEOUT, mac: str = MAC,
            until: str | None = None, action: Callable[[], object] | None = None, memory: str = "1024",
            watch: Callable[[str], object] | None = None, query: str = "", count: bool = True,
            disk_second: bool = False, disk_first: bool = False, marks: tuple[str, ...] = (),
            poll: float = 0.5, firmware: Firmware = BIOS, bootfile: str | None = None,
            cut_when: Callable[[], bool] | None = None, unreachable: bool = False) -> NetBoot:
    """One network boot of the PC; bounded (qemu is killed at ``timeout``). With ``until``: once
    the console shows that text, ``action()`` runs while the machine is up, then qemu is killed.
    ``disk`` None: a diskless PC. ``watch(console_text)`` is called at every poll (a test reacts
    to the console, e.g. starts the repository late). ``query``: appended to the boot URL (``?retry=5``).
    ``count`` False: the repository's /metrics is not read (it needs a token where tokens are enforced).
    ``disk_second``: the disk is the firmware's second boot device (the NIC stays first);
    ``disk_first``: the disk boots first, the NIC second (a PC booting what its disk holds).
    ``marks``: console texts timed like MILESTONES (in ``seen``), at every ``poll`` seconds.
    ``firmware``: SeaBIOS (the default), OVMF, OVMF with Secure Boot (Firmware). ``bootfile``: the
    DHCP boot file, instead of the boot script's URL (the UEFI HTTP boot image's, say).
    ``cut_when()``, checked at every poll: once true, qemu is killed at once (SIGKILL: a power cut).
    ``unreachable``: the repository is out of the PC's reach (qemu's ``restrict=on``: DHCP still
    answers, naming no boot file, but no packet reaches the host): the NIC's iPXE finds nothing to
    boot and the firmware goes on to the disk.

    The firmware's own messages (SeaBIOS, iPXE, OVMF) reach the serial console too: SeaBIOS mirrors
    its text console to the port named by the fw_cfg file ``etc/sercon-port`` (0x3f8, ttyS0); OVMF
    writes its console to the serial port itself."""
    port = url.rsplit(":", 1)[1]
    console.unlink(missing_ok=True)
    sercon = console.with_name("sercon-port")
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))
    bootfile = bootfile or f"http://10.0.2.2:{port}/v1/boot/{mac}{query}"
    cmd = [require_tool("qemu-system-x86_64"), "-machine", "accel=tcg", *firmware.args(), "-m", memory,
           "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot", "-vga", "none",
           "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
           "-netdev", "user,id=n,restrict=on" if unreachable else f"user,id=n,bootfile={bootfile}",
           # bootindex makes the firmware run the NIC first (tests/interop/test_remote_boot.py)
           "-device", f"virtio-net-pci,netdev=n,mac={mac},bootindex={2 if disk_first else 1}{firmware.rom()}"]
    if disk is not None and (disk_second or disk_first):
        cmd += ["-drive", f"file={disk},format=raw,if=none,id=disk,cache=writeback",
                "-device", f"virtio-blk-pci,drive=disk,bootindex={1 if disk_first else 2}"]
    elif disk is not None:
        cmd += ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]
    t0 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = ""
    at_init = None
    seen: dict[str, float] = {}
    try:
        while time.monotonic() - t0 < timeout and qemu.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            for m in (*MILESTONES, *marks):
                if m not in seen and m in text:
                    seen[m] = time.monotonic() - t0
            if watch is not None:
                watch(text)
            if cut_when is not None and cut_when():
                break
            if count and at_init is None and "BLOCKPROV-INIT" in text:
                with contextlib.suppress(OSError):  # a repository the test stopped has no counter
                    at_init = chunks_served(url)
            if until is not None and until in text:
                if action is not None:
                    action()
                break
            if bootvm.MARKER in text or bootvm.FAIL_MARKER in text or "BLOCKPROV-NETBOOT-FAIL" in text:
                break
            time.sleep(poll)
        seconds = time.monotonic() - t0
        if bootvm.MARKER in text:  # the guest powers off right after the marker
            with contextlib.suppress(subprocess.TimeoutExpired):
                qemu.wait(timeout=30)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(timeout=30)
    text = console.read_text(errors="replace") if console.exists() else ""
    m = re.search(re.escape(bootvm.MARKER) + r"(.*)$", text, re.M)
    done = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv) if m else {}
    return NetBoot(console=text, seconds=seconds, done=done, sent_at_init=at_init, seen=seen)


def admin_version(image: Path, tmp_path: Path) -> Path:
    """v2 of the test image: the administrator's sanctioned change (bootimage's ``admin`` mode),
    made offline with debugfs — a new file, and the golden list that knows it."""
    v2 = tmp_path / "v2.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(v2)], check=True, timeout=120)
    debugfs = require_tool("debugfs")
    golden = subprocess.run([debugfs, "-R", "cat /etc/bp-golden.sha256", str(v2)], capture_output=True,
                            check=True, timeout=60).stdout.decode()
    content = bootvm.bootimage.ADMIN_CHANGE_CONTENT.encode()
    lines = [ln for ln in golden.splitlines() if ln.strip()]
    lines.append(f"{hashlib.sha256(content).hexdigest()}  .{bootvm.bootimage.ADMIN_CHANGE_PATH}")
    (tmp_path / "admin").write_bytes(content)
    (tmp_path / "golden").write_text("".join(ln + "\n" for ln in sorted(lines, key=lambda ln: ln.split()[1])))
    (tmp_path / "cmds").write_text(f"write {tmp_path / 'admin'} {bootvm.bootimage.ADMIN_CHANGE_PATH}\n"
                                   "rm /etc/bp-golden.sha256\n"
                                   f"write {tmp_path / 'golden'} /etc/bp-golden.sha256\n")
    subprocess.run([debugfs, "-w", "-f", str(tmp_path / "cmds"), str(v2)], capture_output=True, check=True,
                   timeout=60)
    return v2


def assign(url: str, mode: str, policy: str, ref: str = "bootlab:v1", hydrate: str = "off", mac: str = MAC,
           readahead: str | None = "0", extra: str = "") -> None:
    """``host assign`` with the test image's ``bp.mode``. ``readahead`` 0 (the tests' default): the
    agent fetches exactly what the guest reads, so the tests' counts are exact; None: the agent's
    default (the benchmark). ``extra``: more kernel arguments. ``no_timer_check``: under TCG on a
    loaded host the kernel's IO-APIC timer check fails and it panics at 0.03 s (bench/RESULTS.md)."""
    args = ["quiet", "panic=-1", "no_timer_check",
            *([f"blockprov.readahead={readahead}"] if readahead is not None else []),
            f"bp.mode={mode}", *extra.split()]
    run_cli("--repo", url, "host", "assign", mac, ref, "--policy", policy, "--hydrate", hydrate,
            "--args", " ".join(args))


def blank_disk(path: Path, size: int = 2 << 30) -> Path:
    """A blank (sparse) disk for the PC: by default the tests' 2 GiB."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def cache_of(disk: Path, tmp_path: Path) -> tuple[Any, int]:
    """The cache the PC's disk holds (its metadata partition's cache directory, replayed as an
    agent would, nothing written: a ``StoppedCache``) and the byte offset of its data partition."""
    from blockprov.cache import load_state
    from blockprov.netboot import disk as layout

    tmp_path.mkdir(parents=True, exist_ok=True)
    meta = tmp_path / "meta.img"
    with open(disk, "rb") as src, open(meta, "wb") as dst:
        parts = layout.partitions(src.read(layout.GPT_HEAD))  # boot, metadata, golden reserve, data (MBR or GPT)
        src.seek(parts[1][1])
        dst.write(src.read(parts[1][2]))
    # replay the file system's journal as the kernel's mount would (debugfs reads without it)
    fsck = subprocess.run([require_tool("e2fsck"), "-fy", str(meta)], capture_output=True, timeout=120)
    assert fsck.returncode in (0, 1), fsck.stdout
    out = tmp_path / "meta"
    out.mkdir()
    subprocess.run([require_tool("debugfs"), "-R", f"rdump /cache {out}", str(meta)], capture_output=True,
                   check=True, timeout=60)
    return load_state(out / "cache"), parts[3][1]


def differ_unmarked(disk: Path, image: Path, tmp_path: Path) -> tuple[list[int], list[int]]:
    """The chunks whose bytes on the PC's disk differ from the image's, and those of them the
    modified map of the cache the disk holds (``cache_of``) does not mark: what a keep PC wrote in place must
    all be in the map once the kernel's record was turned into it (netboot/native.py)."""
    loaded, data_at = cache_of(disk, tmp_path)
    cs = loaded.chunk_size
    differ = []
    with open(disk, "rb") as d, open(image, "rb") as img:
        for i in range(loaded.chunks.count):
            d.seek(data_at + i * cs)
            img.seek(i * cs)
            if d.read(cs) != img.read(cs):
                differ.append(i)
    return differ, [i for i in differ if not loaded.chunks.modified(i)]


def session_store(disk: Path, image_size: int, chunk: int) -> Any:
    """The restore session's copy-on-write store as the PC's disk file holds it (netboot/native.py:
    the golden reserve partition, then the data partition past the image), read with
    netboot/cowstore.py: which chunks the native session wrote (a ``cowstore.Store``)."""
    from blockprov.netboot import cowstore
    from blockprov.netboot import disk as layout
    from blockprov.netboot.native import Geometry, Part

    with open(disk, "rb") as f:
        parts = layout.partitions(f.read(layout.GPT_HEAD))
        start = {"reserve": parts[2][1], "data": parts[3][1]}
        geo = Geometry(Part("data", "", parts[3][2] // 512), Part("reserve", "", parts[2][2] // 512),
                       image_size // 512, chunk)
        pieces = [(start[p.name] + off * 512, n * 512) for p, off, n in geo.cow_pieces()]

        def read(offset: int, length: int) -> bytes:
            out, at = b"", 0
            for base, size in pieces:
                if offset < at + size and len(out) < length:
                    f.seek(base + max(0, offset - at))
                    out += f.read(min(size - max(0, offset - at), length - len(out)))
                at += size
            return out

        head = read(0, 512)
        probe = cowstore.read_store(head, lambda n: b"")
        cb = probe.chunk_bytes
        return cowstore.read_store(head, lambda n: read(n * cb, cb)) if probe.formatted else probe
