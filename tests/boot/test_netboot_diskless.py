"""A diskless PC (issue 13 item 6): ``blockprov.disk=none`` keeps the cache in RAM, bounded.

Real peers as in test_netboot.py (qemu TCG, the NIC's iPXE ROM, ``blockprov serve``), but the PC
has no disk at all. With the default budget (half of its 1 GiB) the machine boots and its own
check passes; with a budget its boot fills, the console says the RAM cache is full, the
session's writes get I/O errors — and the machine is neither hung nor OOM-killed: its init runs
to its end.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import bootvm
from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import assign, netboot

# a boot under TCG takes 1–3 min on a loaded 2-core machine: the default 300 s is too tight for a test of two boots
pytestmark = [pytest.mark.interop, pytest.mark.timeout(1500)]

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
    """64 MiB: the boot's own reads fill it; they go on working (fetched, not kept), and the
    session's writes then fail with I/O errors — said on the console, and the machine goes on."""
    mac = "52:54:00:12:34:7b"
    assign(netrepo.url, "dirty", "restore", mac=mac, extra="blockprov.disk=none blockprov.ram=64M")
    b = netboot(None, netrepo.url, tmp_path / "console.log", mac=mac, timeout=600)
    assert "at most 64 MiB" in b.console, b.tail()
    assert "error: the RAM cache is full (64 MiB, blockprov.ram)" in b.console, b.tail()
    assert b.console.count("no space left") <= 4, b.tail()  # said a few times, not once per miss
    # the guest kernel's view of the failed writes
    assert re.search(r"I/O error, dev nbd0, sector \d+ op 0x1:\(WRITE\)", b.console), b.tail()
    assert "Killed process" not in b.console and "Out of memory" not in b.console, b.tail()
    # the reads went on working and the machine's init ran to its end: errors, not a hang
    assert b.done.get("mode") == "dirty" or bootvm.FAIL_MARKER in b.console, b.tail()
    print(f"diskless, 64 MiB: full; the session's writes failed with I/O errors; ended after {b.seconds:.0f} s")
