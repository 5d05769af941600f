"""A PC whose disk holds the whole image runs at the speed of its disk (issue 24), with qemu as the PC.

Real peers as in tests/boot/test_netboot.py: ``blockprov serve`` on 127.0.0.1, the initramfs of
``boot-files build``, qemu (TCG) whose boot order is the NIC's iPXE ROM first and the disk second
(as a café PC is set). What is checked, each on a blank 2 GiB disk:

* the **every-day boot** under ``restore`` and under ``keep``: once the disk is complete and its
  loader current, the repository's iPXE script answers ``exit``, the firmware boots the disk's
  own loader, its initramfs asks the repository one question and sets up the **native data path**
  (the console says which path it took); nothing else comes from the repository. A ``restore``
  PC finds its disk pristine every boot (bootimage's ``session`` mode: check, then dirty); a
  ``keep`` PC its last session (``persist``);
* a changed assignment (v2 by diff) and a forced re-provision still reach the PC;
* the **kernel's write record** survives a power cut: kill -9 of qemu during a write-heavy keep
  session, then the disk compared with the image chunk by chunk: every chunk that differs is in
  the cache's modified map once the next boot turned the record into it;
* a **snapshot of a running native PC** (``snapshot --instance``), from the resident agent the
  every-day boot started;
* **the agent killed** (SIGKILL) while it serves a lazy PC's root over NBD: its supervisor starts it
  again and reconnects the kernel's NBD device; the system's reads and writes go on.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import (
    DISK_EXIT,
    EVERYDAY,
    OFFLINE,
    admin_version,
    assign,
    blank_disk,
    boot_files_served,
    chunks_served,
    differ_unmarked,
    netboot,
)
from tests.conftest import require_tool, run_cli

pytestmark = [pytest.mark.interop, pytest.mark.timeout(2400)]  # several TCG boots each, on a loaded machine



def boot(disk: Path, url: str, log: Path, **kw: Any) -> Any:
    """One power-on of the PC, NIC first and disk second."""
    return netboot(disk, url, log, disk_second=True, **kw)


def test_everyday_boots_under_restore_then_a_new_version_and_a_reprovision_reach_the_pc(
        boot_image: bootvm.bootimage.Built, netrepo: NetRepo, tmp_path: Path) -> None:
    url, mac = netrepo.url, "52:54:00:12:34:61"
    disk = blank_disk(tmp_path / "pc.raw")
    assign(url, "session", "restore", hydrate="before-boot", mac=mac)
    files_before = boot_files_served(url)
    first = boot(disk, url, tmp_path / "c1.log", mac=mac)
    assert first.check == "OK" and "native data path" in first.console, first.tail()
    assert boot_files_served(url) >= files_before + 2  # the network boot: kernel and initramfs (the counter counts)
    for n in (2, 3, 4):  # every day: the disk's own loader, its session dropped, pristine again
        before, files = chunks_served(url), boot_files_served(url)
        unreachable = n == 4  # the repository out of reach: the disk boots what it holds, restored all the same
        day = boot(disk, url, tmp_path / f"c{n}.log", mac=mac, unreachable=unreachable)
        print(f"every-day restore boot {n}{' (repository unreachable)' if unreachable else ''}: "
              f"{day.seconds:.1f} s; {day.tail(12)}")
        assert EVERYDAY in day.console, day.tail()
        assert (OFFLINE in day.console) == unreachable and (DISK_EXIT in day.console) != unreachable, day.tail()
        assert "dropped with it (restore), nothing copied" in day.console, day.tail()
        assert "native data path: the root is disk vda itself" in day.console, day.tail()
        assert day.check == "OK" and day.done.get("check") == "OK", day.tail()  # the last session is gone
        assert day.number(r"chunks: (\d+) dropped with it") > 0, day.tail()
        assert chunks_served(url) == before  # nothing of the image came from the repository
        assert boot_files_served(url) == files  # nor a kernel or an initramfs
    # a new version reaches the PC: its iPXE is told to boot from the network, the disk is updated by diff
    v2 = admin_version(boot_image.disk, tmp_path)
    run_cli("--repo", url, "import", str(v2), "bootlab:v2n")
    run_cli("--repo", url, "boot-files", "set", "bootlab:v2n", "--kernel", netrepo.built["build"]["kernel"],
            "--initrd", str(netrepo.initrd), "--cmdline", netrepo.built["cmdline"])
    assign(url, "session", "restore", ref="bootlab:v2n", hydrate="before-boot", mac=mac)
    moved = boot(disk, url, tmp_path / "c5.log", mac=mac)
    assert DISK_EXIT not in moved.console and "by diff" in moved.console, moved.tail()
    assert moved.check == "OK" and "native data path" in moved.console, moved.tail()
    assert moved.number(r"BP-CHECK OK files=(\d+)") == first.number(r"BP-CHECK OK files=(\d+)") + 1
    day = boot(disk, url, tmp_path / "c6.log", mac=mac)
    assert EVERYDAY in day.console and day.check == "OK", day.tail()
    # the operator's forced re-provision: a network boot that sets the disk up from scratch
    token = json.loads(run_cli("--repo", url, "host", "reprovision", mac, "--json").stdout)["reprovision"]
    again = boot(disk, url, tmp_path / "c7.log", mac=mac)
    assert DISK_EXIT not in again.console and f"set up again from scratch (request {token})" in again.console, \
        again.tail()
    assert "initializing disk vda" in again.console and again.check == "OK", again.tail()


def test_everyday_boots_under_keep_a_power_cut_and_a_snapshot_of_the_running_pc(
        boot_image: bootvm.bootimage.Built, netrepo: NetRepo, tmp_path: Path) -> None:
    url, mac = netrepo.url, "52:54:00:12:34:62"
    disk = blank_disk(tmp_path / "pc.raw")
    assign(url, "persist", "keep", hydrate="before-boot", mac=mac)
    first = boot(disk, url, tmp_path / "c1.log", mac=mac)
    assert first.done.get("persisted") == "0" and "native data path" in first.console, first.tail()
    before, files = chunks_served(url), boot_files_served(url)
    day = boot(disk, url, tmp_path / "c2.log", mac=mac)
    print(f"every-day keep boot: {day.seconds:.1f} s; {day.tail(12)}")
    assert DISK_EXIT in day.console and EVERYDAY in day.console and "policy keep" in day.console, day.tail()
    assert day.done.get("persisted") == "1", day.tail()  # the last session's file is there: kept
    assert chunks_served(url) == before and boot_files_served(url) == files
    # a power cut during a write-heavy session
    assign(url, "writer", "keep", hydrate="before-boot", mac=mac)
    cut = boot(disk, url, tmp_path / "c3.log", mac=mac, until="BP-WROTE n=40", poll=0.2)
    assert "BP-WROTE n=40" in cut.console and "native data path" in cut.console, cut.tail()
    # the next boot turns the kernel's record into the modified map before anything else
    assign(url, "plain", "keep", hydrate="before-boot", mac=mac)
    after = boot(disk, url, tmp_path / "c4.log", mac=mac)
    assert after.done.get("mode") == "plain", after.tail()
    written = after.number(r"record: (\d+) chunk\(s\) written in place")
    differ, unmarked = differ_unmarked(disk, boot_image.disk, tmp_path / "after")
    print(f"power cut: {written} chunks turned modified at the next boot; {len(differ)} differ from the image, "
          f"{len(unmarked)} of them not marked")
    assert differ and not unmarked, unmarked[:20]
    # a snapshot of the running PC, asked of the resident agent of an every-day boot
    assign(url, "counter", "keep", hydrate="before-boot", mac=mac)
    boot(disk, url, tmp_path / "c5.log", mac=mac, until="BP-COUNT n=5 ")  # its loader for this command line
    answers: list[dict[str, Any]] = []

    def snapshot() -> None:
        p = run_cli("--repo", url, "snapshot", "--instance", "pc-" + mac.replace(":", "-"), "--to", "bootlab:pcsnap",
                    "--wait", "300", "--json")
        answers.append(json.loads(p.stdout))

    running = boot(disk, url, tmp_path / "c6.log", mac=mac, until="resident: bootlab@", action=snapshot,
                   timeout=600)
    assert EVERYDAY in running.console and answers, running.tail()
    out = tmp_path / "snap.raw"
    run_cli("--repo", url, "export", "bootlab:pcsnap", str(out))
    got = subprocess.run([require_tool("debugfs"), "-R", "cat /home/user/bp-sessions", str(out)],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    assert got.strip() == "2", answers  # two persist sessions, both native, in the snapshot
    print(f"snapshot of the running native PC: {answers[0]}")
    # the snapshot moved era onto a snapshot-origin and back (two swaps of its table over one
    # record), then the power was cut: the next boot reads the whole record, and still every
    # chunk that differs from the image is marked
    assert "device-mapper: era" not in running.console, running.tail()  # no complaint of the kernel
    assign(url, "plain", "keep", hydrate="before-boot", mac=mac)
    final = boot(disk, url, tmp_path / "c7.log", mac=mac)
    assert final.done.get("mode") == "plain" and "era_invalidate" not in final.console, final.tail()
    differ, unmarked = differ_unmarked(disk, boot_image.disk, tmp_path / "final")
    assert differ and not unmarked, unmarked[:20]


def test_the_agent_killed_mid_lazy_session_comes_back_and_the_system_goes_on(netrepo: NetRepo,
                                                                             tmp_path: Path) -> None:
    url, mac = netrepo.url, "52:54:00:12:34:63"
    disk = blank_disk(tmp_path / "pc.raw")
    assign(url, "killagent", "restore", hydrate="off", mac=mac)
    t0 = time.monotonic()
    lazy = boot(disk, url, tmp_path / "c1.log", mac=mac)
    print(f"agent killed mid-session: {time.monotonic() - t0:.1f} s; {lazy.tail(16)}")
    assert "NBD data path" in lazy.console and "BP-KILLED pid=" in lazy.console, lazy.tail()
    assert "blockprov-supervisor: the agent died" in lazy.console, lazy.tail()
    assert "/dev/nbd0 reconnected" in lazy.console, lazy.tail()
    assert lazy.check == "OK" and lazy.done.get("killed") == "yes", lazy.tail()  # no I/O error anywhere
    assert "I/O error" not in lazy.console, lazy.tail()
