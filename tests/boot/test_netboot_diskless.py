"""A diskless PC (issue 13 item 6): ``blockprov.disk=none`` keeps the cache in RAM, bounded.

Real peers as in test_netboot.py (qemu TCG, the NIC's iPXE ROM, ``blockprov serve``), but the PC
has no disk at all. With the default budget (half of its 1 GiB) the machine boots and its own
check passes; with a budget its check cannot fit in, the console says the RAM cache is full, the
machine gets I/O errors for what does not fit — and it is neither hung nor OOM-killed: its init
runs to its end (BLOCKPROV-BOOT-DONE with the check failed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import assign, netboot

pytestmark = pytest.mark.interop

MAC = "52:54:00:12:34:7a"


def test_diskless_pc_boots_with_its_cache_in_ram(netrepo: NetRepo, tmp_path: Path) -> None:
    assign(netrepo.url, "check", "restore", mac=MAC, extra="blockprov.disk=none")
    b = netboot(None, netrepo.url, tmp_path / "console.log", mac=MAC, timeout=600)
    assert b.check == "OK", b.tail()
    assert "diskless (blockprov.disk=none): the cache is in RAM, at most" in b.console, b.tail()
    assert "initializing disk" not in b.console and "RAM cache is full" not in b.console
    budget = b.number(r"the cache is in RAM, at most (\d+) MiB")
    total = b.number(r"at most \d+ MiB of the machine's (\d+) MiB")
    assert budget == total // 2, b.tail()
    print(f"diskless: RAM cache of {budget} MiB (machine {total} MiB); BOOT-DONE after {b.seconds:.0f} s")


def test_diskless_ram_exhausted_is_an_error_not_a_hang(netrepo: NetRepo, tmp_path: Path) -> None:
    mac = "52:54:00:12:34:7b"
    assign(netrepo.url, "check", "restore", mac=mac, extra="blockprov.disk=none blockprov.ram=128M")
    b = netboot(None, netrepo.url, tmp_path / "console.log", mac=mac, timeout=600)
    assert "at most 128 MiB" in b.console, b.tail()
    assert "error: the RAM cache is full (128 MiB, blockprov.ram)" in b.console, b.tail()
    assert "I/O error" in b.console, b.tail()  # the guest kernel's view of the failed reads
    assert "Killed process" not in b.console and "Out of memory" not in b.console, b.tail()
    # the machine's init ran to its end: errors, not a hang
    assert b.check == "FAIL" and b.done.get("check") == "FAIL", b.tail()
    print(f"diskless, 128 MiB: full, the check failed with I/O errors; BOOT-DONE after {b.seconds:.0f} s")
