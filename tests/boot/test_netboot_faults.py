"""Faults at a PC's network boot (issue 13, "Bad input and faults"), with real qemu + its iPXE ROM.

- An unknown host: the repository answers iPXE a script that prints why on the machine's console
  and asks again after ``?retry=`` seconds (boot.retry_script); once the host is assigned, the
  machine that was waiting boots, without a power cycle.
- The repository down at first boot (after the firmware fetched the boot files, before the
  in-machine agent reached it): the agent says so on the console and retries with backoff; the
  repository is started late and the machine then comes up.

Each boot is bounded (qemu is killed at its timeout); timeouts are generous (TCG, shared CPUs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import bootvm
from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import assign, blank_disk, netboot
from tests.conftest import run_cli
from tests.procs import Proc, start_server

# a boot under TCG takes 1–3 min on a loaded 2-core machine: the default 300 s is too tight for a test of two boots
pytestmark = [pytest.mark.interop, pytest.mark.timeout(1500)]

RETRY = 5


def test_unknown_host_is_told_why_and_boots_once_assigned(netrepo: NetRepo, tmp_path: Path) -> None:
    mac = "52:54:00:12:34:6a"
    disk = blank_disk(tmp_path / "disk.raw")
    waits: list[int] = []

    def watch(console: str) -> None:
        # assign the host once the machine has shown the reason twice (it is looping, not stuck)
        n = console.count("blockprov: no boot assignment for host")
        if n >= 2 and not waits:
            waits.append(n)
            assign(netrepo.url, "check", "restore", mac=mac)

    b = netboot(disk, netrepo.url, tmp_path / "console.log", mac=mac, query=f"?retry={RETRY}", watch=watch,
                timeout=600)
    assert waits, b.tail()
    assert f"asking the repository again in {RETRY} s" in b.console, b.tail()
    assert b.check == "OK", b.tail()
    # one power-on: SeaBIOS started once, iPXE chained its own boot script again and again
    assert b.console.count("SeaBIOS (version") == 1, b.tail()
    print(f"unknown host: the reason shown {waits[0]} times, then assigned; BOOT-DONE after {b.seconds:.0f} s")


def test_repository_down_at_first_boot_is_retried_until_it_is_back(boot_image: bootvm.bootimage.Built,
                                                                   netrepo: NetRepo, tmp_path: Path) -> None:
    mac = "52:54:00:12:34:6b"
    data = tmp_path / "repo"
    run_cli("--data", str(data), "import", str(boot_image.disk), "bootlab:v1")
    run_cli("--data", str(data), "boot-files", "set", "bootlab:v1", "--kernel", netrepo.built["build"]["kernel"],
            "--initrd", str(netrepo.initrd), "--cmdline", netrepo.built["cmdline"])
    server, url = start_server(data)
    port = int(url.rsplit(":", 1)[1])
    assign(url, "check", "keep", mac=mac)
    servers: list[Proc] = [server]
    events: list[str] = []

    def watch(console: str) -> None:
        # the firmware has fetched the boot files: take the repository away before the agent asks
        if not events and "blockprov: initramfs started" in console:
            servers[-1].stop()
            events.append("stopped")
        # the agent has said so twice (backoff 1 s, 2 s, …): bring the repository back
        elif events == ["stopped"] and console.count("; retrying in ") >= 2:
            servers.append(start_server(data, port=port)[0])
            events.append("started")

    disk = blank_disk(tmp_path / "disk.raw")
    try:
        b = netboot(disk, url, tmp_path / "console.log", mac=mac, watch=watch, timeout=600)
    finally:
        servers[-1].stop()
    assert events == ["stopped", "started"], b.tail()
    tries = re.findall(r"repository \S+ unreachable \(.*\); retrying in (\d+) s", b.console)
    assert len(tries) >= 2 and [int(t) for t in tries[:2]] == [1, 2], b.tail()  # backoff
    assert b.check == "OK", b.tail()
    print(f"repository down: {len(tries)} retries shown ({', '.join(tries)} s), then BOOT-DONE after {b.seconds:.0f} s")
