"""PID 1 of the blockprov initramfs: modules, network, the in-machine agent, the switch to the root.

The initramfs's ``/init`` (a few lines of busybox sh, netboot/initramfs.py) mounts /proc, /sys and
/dev and execs ``python3 -m blockprov.netboot.machine``. This module then:

1. loads the kernel modules listed in ``/etc/blockprov/modules`` (in dependency order: the build
   resolved modules.dep), with busybox ``insmod``;
2. brings up the first network interface with busybox ``udhcpc`` (DHCP, as the firmware did; when
   that fails the agent is started all the same: it boots offline from the disk if it can);
3. starts the agent (netboot/inagent.py) through its supervisor (``@blockprov-supervisor``,
   netboot/supervisor.py, which connects the kernel's NBD client to the agent and restarts the
   agent if it dies) and waits for a READY line naming the root's device (/dev/nbd0, or the
   native data path's device-mapper root: netboot/native.py) or ERROR (shown on the console; the
   machine reboots after ``RETRY_SECONDS`` to try again through the firmware's network boot);
4. mounts that device (``ro`` unless the command line says ``rw``, as the kernel does for its own
   root) on /newroot, moves /dev, /proc and /sys into it, moves it onto / and chroots into it,
   then execs the real ``init`` (``init=`` of the command line, else /sbin/init).

Why not busybox's switch_root: it deletes the initramfs's files first, and the agent, which keeps
running from the initramfs, would lose any file it opens later (a module imported lazily on an
error path, the CA bundle, the busybox it runs). Moving the root without deleting costs the
initramfs's RAM (measured by the build, reported by ``boot-files build``) and keeps the agent's
world whole; the agent's root directory remains the initramfs, out of the new root's sight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from blockprov.netboot.daemon import ready_line
from blockprov.netboot.params import parse_cmdline

MODULES_LIST = Path("/etc/blockprov/modules")
# one NBD device (the supervisor's /dev/nbd0: its default 16 take 0.7 s to make under TCG), two loop
# devices (era's record: netboot/native.py)
MODULE_ARGS = {"nbd": ("nbds_max=1",), "loop": ("max_loop=2",)}
UDHCPC_SCRIPT = "/etc/blockprov/udhcpc.sh"
NEWROOT = "/newroot"
READY_TIMEOUT = 3600.0  # before-boot hydration of a large image over a slow link takes a while
RETRY_SECONDS = 30


def say(msg: str) -> None:
    print(f"blockprov: {msg}", flush=True)


def uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0]
    except OSError:
        return "?"


def run(*cmd: str, timeout: float = 60) -> int:
    try:
        return subprocess.run(cmd, timeout=timeout).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"{cmd[0]}: {e}")
        return -1


def load_modules() -> None:
    """insmod each module of the list not loaded yet (the every-day boot's /init may have loaded
    them before it handed over: netboot/everyday.py)."""
    for line in MODULES_LIST.read_text().splitlines() if MODULES_LIST.exists() else []:
        path = line.strip()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        if path and not Path(f"/sys/module/{name}").exists() and run("insmod", path, *MODULE_ARGS.get(name, ())) != 0:
            say(f"insmod {path} failed")


def network() -> str | None:
    """DHCP on the first interface that is not loopback; returns its name."""
    run("ip", "link", "set", "lo", "up")
    for _ in range(100):
        nics = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
        if nics:
            break
        time.sleep(0.1)
    else:
        say("no network interface")
        return None
    nic = nics[0]
    run("ip", "link", "set", nic, "up")
    for attempt in range(1, 6):
        if run("udhcpc", "-i", nic, "-f", "-q", "-n", "-t", "5", "-T", "2", "-s", UDHCPC_SCRIPT, timeout=60) == 0:
            return nic
        say(f"DHCP on {nic} failed (attempt {attempt}); retrying")
    return None


def start_agent(params: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """The agent's supervisor (netboot/supervisor.py), which starts the agent and connects the
    kernel's NBD client to it, and restarts it if it dies; it says READY or ERROR on the pipe."""
    import json

    r, w = os.pipe()
    proc = subprocess.Popen(["@blockprov-supervisor", "-S", "-B", "-m", "blockprov.netboot.supervisor",
                             json.dumps(params), str(w)], executable=sys.executable or "/usr/bin/python3",
                            pass_fds=(w,))
    os.close(w)
    return proc, r


def wait_ready(proc: subprocess.Popen[bytes], r: int) -> str:
    """The supervisor's first line: 'READY nbd|native DEVICE' (the root's device: the kernel's NBD
    client, or the native data path's device-mapper root) or 'ERROR why'."""
    return ready_line(proc, r, READY_TIMEOUT)


def switch_root(cmdline: str, device: str) -> None:
    """Mount ``device`` and make it the root; never returns (execs the real init)."""
    words = cmdline.split()
    opts = "rw" if "rw" in words else "ro"
    fstype = next((w.split("=", 1)[1] for w in words if w.startswith("rootfstype=")), "ext4")
    init = next((w.split("=", 1)[1] for w in words if w.startswith("init=")), "/sbin/init")
    os.makedirs(NEWROOT, exist_ok=True)
    if run("mount", "-t", fstype, "-o", opts, device, NEWROOT) != 0:
        raise OSError(f"cannot mount {device} as the root")
    for d in ("dev", "proc", "sys"):
        if os.path.isdir(f"{NEWROOT}/{d}"):
            run("mount", "--move", f"/{d}", f"{NEWROOT}/{d}")
    os.chdir(NEWROOT)
    if run("mount", "--move", ".", "/") != 0:
        raise OSError("cannot move the new root onto /")
    os.chroot(".")
    os.chdir("/")
    say(f"root mounted ({opts}) at uptime {uptime()} s; starting {init}")
    os.execv(init, [init])


def fail(msg: str) -> None:
    say(f"BLOCKPROV-NETBOOT-FAIL {msg}")
    say(f"rebooting in {RETRY_SECONDS} s to try again")
    time.sleep(RETRY_SECONDS)
    run("reboot", "-f")
    time.sleep(60)


def main() -> None:
    cmdline = Path("/proc/cmdline").read_text()
    params = parse_cmdline(cmdline)
    say(f"initramfs started at uptime {uptime()} s")
    load_modules()
    nic = network()
    if nic is None:  # the agent boots from the disk if it holds blockprov's cache (offline), else says why not
        say("no network (DHCP failed): starting the agent anyway, to boot offline from the disk")
    else:
        say(f"network up on {nic} at uptime {uptime()} s")
    proc, r = start_agent(params)
    line = wait_ready(proc, r)
    if not line.startswith("READY"):
        fail(line.removeprefix("ERROR ").strip())
        return
    words = line.split()
    device = words[2] if len(words) > 2 else "/dev/nbd0"
    say(f"root serving from {device} at uptime {uptime()} s")
    try:
        switch_root(cmdline, device)
    except OSError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
