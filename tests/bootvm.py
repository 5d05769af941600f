"""Boot the test image (tools/bootimage.py) in qemu, bounded, and read what the guest said.

Why a helper and not inline qemu commands: every boot test and the boot benchmark need the same
things done right — TCG only (on these machines /dev/kvm is a paravirtual KVM that hangs a stock
kernel), direct kernel boot, the serial console captured line by line with the time each marker
line arrived, a hard timeout that kills qemu and still returns the console tail, and the guest's
own I/O figures (qemu's ``query-blockstats`` over QMP, taken after the guest powered off and before
qemu quits, thanks to ``-no-shutdown``).

The root disk is either a raw file or any URI qemu opens (``nbd+unix:///NAME?socket=…``,
``nbd://…``, ``http://…``); ``drive_spec`` replaces the whole ``-drive`` value for special cases
(qemu's curl driver options).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bootdisk  # noqa: E402
import bootimage  # noqa: E402  (tools/ is not a package: it must run with nothing installed)

MARKER = bootimage.MARKER
FAIL_MARKER = bootimage.FAIL_MARKER
CHECK_MARKER = bootimage.CHECK_MARKER
QEMU = "qemu-system-x86_64"
IMAGE_DIR = Path(os.environ.get("BLOCKPROV_BOOTIMAGE_DIR", ROOT / ".cache" / "bootimage"))


@dataclass
class BootResult:
    """What one boot did: ``ok`` when the guest printed the done marker and no failure marker."""

    ok: bool
    output: str
    seconds: float | None  # from qemu's start to the marker line (None: no marker)
    mode: str
    fields: dict[str, str] = field(default_factory=dict)  # key=value pairs of the marker line
    check: str | None = None  # "OK" / "FAIL" for mode=check
    check_line: str = ""
    timed_out: bool = False
    returncode: int | None = None
    total_seconds: float = 0.0  # until qemu exited
    blockstats: dict[str, Any] = field(default_factory=dict)  # qemu's counters of the root drive
    command: list[str] = field(default_factory=list)

    def tail(self, lines: int = 40) -> str:
        """The end of the console, for assertion messages."""
        return "\n".join(self.output.splitlines()[-lines:])

    @property
    def guest_read_bytes(self) -> int:
        """Bytes the guest read from its root disk (qemu's blockstats, else the guest's own count)."""
        if "rd_bytes" in self.blockstats:
            return int(self.blockstats["rd_bytes"])
        return int(self.fields.get("rd_kb", 0)) * 1024


def build_image(out: Path | None = None, *, size: str = "1G", fill_mb: int = 300,
                fio: bool = False) -> bootimage.Built:
    """Build (or reuse) the boot image; safe from parallel test workers (the builder locks).
    ``fio``: with fio and its libraries in it (the bench's I/O in the running system)."""
    return bootimage.build(out or IMAGE_DIR / f"{size}-{fill_mb}{'-fio' if fio else ''}", size=size,
                           fill_mb=fill_mb, fio=fio)


def bootable_disk(img: bootimage.Built, out: Path, append: str) -> Path:
    """The test image's disk with its own boot loader (tools/bootdisk.py) booting ``append``, at ``out``."""
    return bootdisk.make_bootable(img.disk, img.kernel, img.initrd, out, append)


def _drive_value(target: str | Path, cache: str, readonly: bool) -> str:
    """``-drive`` value for a raw file or a URI; commas in it are doubled as qemu's option syntax wants."""
    s = str(target).replace(",", ",,")
    return f"file={s},format=raw,if=virtio,id=root,cache={cache}" + (",readonly=on" if readonly else "")


def qemu_command(kernel: Path, initrd: Path, drive: str, *, mode: str, extra_append: str = "",
                 qmp: Path | None = None, memory: str = "512") -> list[str]:
    """The qemu command line of a test boot (also printed by the benchmark, to be reproducible)."""
    append = f"console=ttyS0 quiet panic=-1 bp.mode={mode} {extra_append}".strip()
    cmd = [QEMU, "-machine", "accel=tcg", "-m", memory, "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", append, "-drive", drive]
    if qmp is not None:
        cmd += ["-no-shutdown", "-qmp", f"unix:{qmp},server=on,wait=off"]
    return cmd


def boot(kernel: Path, initrd: Path, drive_uri_or_file: str | Path | None = None, *, mode: str = "plain",
         extra_append: str = "", timeout: float = 120, cache: str = "writeback", readonly: bool = False,
         drive_spec: str | None = None, stats: bool = True, progress: Callable[[], int] | None = None,
         stall_timeout: float = 60) -> BootResult:
    """Boot once; never hangs longer than ``timeout`` (qemu is killed, the console tail returned).

    ``progress`` (e.g. bytes a proxy carried) lets a caller end a boot early that made no progress for
    ``stall_timeout`` seconds: qemu 7.2's curl driver sometimes stops forever with requests in flight."""
    if drive_spec is None:
        if drive_uri_or_file is None:
            raise ValueError("give a drive (file or URI) or drive_spec")
        drive_spec = _drive_value(drive_uri_or_file, cache, readonly)
    elif "id=" not in drive_spec:
        drive_spec += ",id=root"
    qdir = Path(tempfile.mkdtemp(prefix="bpq", dir="/tmp"))  # short: unix socket paths are ≤ 107 bytes
    qmp = qdir / "qmp.sock" if stats else None
    cmd = qemu_command(kernel, initrd, drive_spec, mode=mode, extra_append=extra_append, qmp=qmp)
    lines: list[str] = []
    marker_at: list[float] = []
    done = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if (MARKER in line or FAIL_MARKER in line) and not marker_at:
                marker_at.append(time.monotonic())
                done.set()
        done.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    blockstats: dict[str, Any] = {}
    timed_out = False
    try:
        deadline = t0 + timeout
        last, last_change = progress() if progress else 0, time.monotonic()
        while not done.wait(1.0):
            now = time.monotonic()
            if progress is not None:
                cur = progress()
                if cur != last:
                    last, last_change = cur, now
                elif now - last_change > stall_timeout:
                    lines.append(f"bootvm: no progress for {stall_timeout:g} s: stalled, killed")
                    timed_out = True
                    break
            if now > deadline:
                lines.append(f"bootvm: no marker after {timeout:g} s: killed")
                timed_out = True
                break
        if not timed_out and marker_at and qmp is not None:
            # The guest powers off right after the marker; -no-shutdown keeps qemu up for our questions.
            blockstats = _qmp_blockstats(qmp, proc, deadline=time.monotonic() + 15)
        if not timed_out:
            # A qemu stuck after the marker is killed below; the boot itself was fine.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        th.join(5)
        shutil.rmtree(qdir, ignore_errors=True)
    output = "\n".join(lines)
    return _result(output, marker_at[0] - t0 if marker_at else None, mode, timed_out, proc.returncode,
                   time.monotonic() - t0, blockstats, cmd)


def _result(output: str, seconds: float | None, mode: str, timed_out: bool, rc: int | None, total: float,
            blockstats: dict[str, Any], cmd: list[str]) -> BootResult:
    fields: dict[str, str] = {}
    ok = False
    check, check_line = None, ""
    for line in output.splitlines():
        i = line.find(MARKER)
        if i >= 0:
            fields = dict(kv.split("=", 1) for kv in line[i + len(MARKER):].split() if "=" in kv)
            ok = True
        if FAIL_MARKER in line:
            ok = False
            fields.setdefault("reason", line.split("reason=", 1)[-1])
        j = line.find(CHECK_MARKER + " ")
        if j >= 0:
            check_line = line[j:]
            check = check_line.split()[1]
    return BootResult(ok=ok and not timed_out, output=output, seconds=seconds if ok else None, mode=mode,
                      fields=fields, check=check, check_line=check_line, timed_out=timed_out, returncode=rc,
                      total_seconds=total, blockstats=blockstats, command=cmd)


def _qmp_blockstats(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """The root drive's ``query-blockstats`` once the guest has stopped, then ``quit``; {} on trouble."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            f = s.makefile("rwb")

            def ask(cmd: str) -> Any:
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while time.monotonic() < deadline:
                    msg = json.loads(f.readline() or b"{}")
                    if not msg:
                        return None
                    if "return" in msg or "error" in msg:
                        return msg.get("return")
                return None

            f.readline()  # greeting
            ask("qmp_capabilities")
            while time.monotonic() < deadline and proc.poll() is None:  # wait for the power-off
                st = ask("query-status")
                if not st or st.get("status") in ("shutdown", "guest-panicked", "internal-error"):
                    break
                time.sleep(0.05)
            out: dict[str, Any] = {}
            for dev in ask("query-blockstats") or []:
                if dev.get("device") == "root" or dev.get("qdev", "").endswith("root"):
                    out = dict(dev.get("stats", {}))
            with contextlib.suppress(OSError, ValueError):
                ask("quit")
            return out
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    """``python tests/bootvm.py DRIVE [MODE]``: build the image if needed and boot it once (by hand)."""
    args = argv if argv is not None else sys.argv[1:]
    img = build_image()
    r = boot(img.kernel, img.initrd, args[0] if args else img.disk, mode=args[1] if len(args) > 1 else "check",
             readonly=not args)
    print(r.tail())
    print(json.dumps({"ok": r.ok, "seconds": r.seconds, "fields": r.fields, "check": r.check,
                      "blockstats": {k: r.blockstats.get(k) for k in ("rd_bytes", "wr_bytes", "rd_operations")}}))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
