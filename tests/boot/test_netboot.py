"""A PC network-boots onto its own disk (issue 13), with qemu standing in for the PC.

Real peers end to end: ``blockprov serve`` on 127.0.0.1, the blockprov initramfs made by
``boot-files build``, qemu (TCG) with a blank 2 GiB virtio disk whose virtio-net NIC boots through
its own iPXE option ROM from ``bootfile=http://10.0.2.2:PORT/v1/boot/MAC`` (qemu's user network
maps 10.0.2.2 to the host's loopback). Inside the guest: the Debian kernel, the blockprov init
(DHCP, disk, agent, kernel NBD client, root switch), then the test image's own /sbin/init
(tools/bootimage.py) printing BP-CHECK and BLOCKPROV-BOOT-DONE.

What the repository sent is read from its own counter ``blockprov_chunks_served_total``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import MAC, admin_version, assign, blank_disk, cache_of, chunks_served, netboot
from tests.conftest import require_tool, run_cli

# four to five boots per test under TCG on a shared 2-core machine: 300 s (the default) is not enough
pytestmark = [pytest.mark.interop, pytest.mark.timeout(1800)]

def test_pc_boots_from_the_network_onto_its_blank_disk_then_restores(boot_image: bootvm.bootimage.Built,
                                                                     netrepo: NetRepo, tmp_path: Path) -> None:
    url, initrd, built, nonzero = netrepo.url, netrepo.initrd, netrepo.built, netrepo.nonzero
    disk = blank_disk(tmp_path / "pc-disk.raw")
    # 1. first boot onto the blank disk, nothing copied ahead: the guest's check passes while
    #    the disk holds only what the boot read
    assign(url, "check", "restore")
    base = chunks_served(url)  # the repository is shared by this module's tests
    first = netboot(disk, url, tmp_path / "console1.log")
    assert first.check == "OK" and first.done.get("check") == "OK", first.tail()
    assert "initializing disk vda" in first.console
    sent1 = chunks_served(url) - base
    at_init = None if first.sent_at_init is None else first.sent_at_init - base
    print(f"first boot: BLOCKPROV-BOOT-DONE after {first.seconds:.1f} s (root mounted at guest uptime "
          f"{first.done.get('mounted')} s); chunks sent: {at_init} when the image's init started, "
          f"{sent1} by the end of its check (which reads every file it checks, and a boot's worth more); "
          f"the image has {nonzero} non-zero chunks")
    # the machine runs its own init having fetched a sliver of the image; its check, which reads
    # a good part of the image's files, still runs with the disk partly unfetched
    assert at_init is not None and at_init < nonzero // 10, first.tail()
    assert 0 < sent1 < nonzero * 3 // 4, "the disk was fetched whole: not a lazy boot"

    # 2. a dirty session (the disk keeps it: policy keep)
    assign(url, "dirty", "keep")
    dirty = netboot(disk, url, tmp_path / "console2.log")
    assert dirty.done.get("mode") == "dirty", dirty.tail()
    assert "holds blockprov's cache" in dirty.console
    sent2 = chunks_served(url)

    # 3. reboot-to-restore: pristine, and only the chunks the session modified came back
    assign(url, "check", "restore")
    restored = netboot(disk, url, tmp_path / "console3.log")
    assert restored.check == "OK", restored.tail()
    reset = restored.number(r"reset on start: (\d+) chunk")
    sent3 = chunks_served(url) - sent2
    print(f"restore boot: {reset} chunks reset, {sent3} chunks sent, BOOT-DONE after {restored.seconds:.1f} s")
    # only the reset chunks come back (a reset chunk that is all zeros in the image is not even
    # sent); the slack covers fills of the last second before a power-off, whose journal
    # records were not yet synced (netboot/inagent.py, sync_fills): those are fetched again
    assert reset > 0 and sent3 <= reset + 16, restored.tail()

    # 4. the host moves to v2 (the administrator's change, made offline): the next boot updates
    #    the disk by diff and runs v2, and the repository sends no more than the changed chunks
    v2 = admin_version(boot_image.disk, tmp_path)
    run_cli("--repo", url, "import", str(v2), "bootlab:v2")
    run_cli("--repo", url, "boot-files", "set", "bootlab:v2", "--kernel", built["build"]["kernel"],
            "--initrd", str(initrd), "--cmdline", built["cmdline"])
    changed = len(json.loads(run_cli("--repo", url, "diff", "bootlab:v1", "bootlab:v2", "--json").stdout)[
        "changed"])
    before = chunks_served(url)
    assign(url, "check", "restore", "bootlab:v2")
    moved = netboot(disk, url, tmp_path / "console4.log")
    golden = int(restored.number(r"BP-CHECK OK files=(\d+)"))
    assert moved.check == "OK" and moved.number(r"BP-CHECK OK files=(\d+)") == golden + 1, moved.tail()
    assert "by diff" in moved.console, moved.tail()
    sent4 = chunks_served(url) - before
    print(f"update boot: {changed} chunks differ between v1 and v2, {sent4} sent; "
          f"BOOT-DONE after {moved.seconds:.1f} s")
    # the slack: fills of the previous boot's last moments, lost to its power-off (see step 3)
    assert 0 < sent4 <= changed + 16, moved.tail()

    agents = json.loads(run_cli("--repo", url, "agents", "--json").stdout)
    assert any(a["instance"] == "pc-" + MAC.replace(":", "-") and a["info"].get("host") == MAC
               for a in agents), agents


def test_before_boot_hydration_and_memory_pressure(netrepo: NetRepo, tmp_path: Path) -> None:
    """``--hydrate before-boot`` (the FOG model: everything on the disk first), then the guest fills
    its memory (a tmpfs of all but 48 MiB) while it writes to and reads back from its root: the
    agent serving that root (memory locked, PR_SET_IO_FLUSHER) keeps it working."""
    mac = "52:54:00:12:34:5b"
    disk = blank_disk(tmp_path / "pc2-disk.raw")
    assign(netrepo.url, "hog", "keep", hydrate="before-boot", mac=mac)
    before = chunks_served(netrepo.url)
    hog = netboot(disk, netrepo.url, tmp_path / "console.log", mac=mac)
    assert hog.done.get("hog") == "OK" and "BP-HOG OK" in hog.console, hog.tail()
    total = hog.number(r"hydrated before the boot: \d+/(\d+) chunks")
    assert hog.number(r"hydrated before the boot: (\d+)/\d+ chunks") == total, hog.tail()
    assert hog.sent_at_init is not None and hog.sent_at_init - before >= netrepo.unique
    assert "warning:" not in hog.console, hog.tail()  # mlockall, PR_SET_IO_FLUSHER, oom_score_adj all took
    print(f"before-boot: {hog.sent_at_init - before} chunks before the image's init; "
          f"{re.search(r'BP-HOG OK.*', hog.console).group(0)}; BOOT-DONE after {hog.seconds:.1f} s")


def test_keep_survives_reboots_and_the_repository_snapshots_a_running_pc(boot_image: bootvm.bootimage.Built,
                                                                        netrepo: NetRepo, tmp_path: Path) -> None:
    """``--policy keep``: an administrator's change survives the reboot, and while the PC runs the
    repository asks its agent for a snapshot (``snapshot --instance``), which becomes a version
    holding the change. Then the host moves to another version (issue 27 item 0): the image is a
    whole-disk file system, so nothing of the session can be kept over it — the session is kept as
    a version first, then the PC boots the new version clean (never a merge of the two)."""
    mac = "52:54:00:12:34:5c"
    disk = blank_disk(tmp_path / "pc3-disk.raw")
    assign(netrepo.url, "admin", "keep", mac=mac)
    admin = netboot(disk, netrepo.url, tmp_path / "console1.log", mac=mac)
    assert admin.done.get("mode") == "admin", admin.tail()
    # this session copies the rest of the image in the background while it counts: once the disk holds
    # all of it, the agent writes the disk's own boot loader -- after the root switch, from the initramfs's
    # root, which then has neither /dev nor /proc of its own (the path a PC provisioned by default takes)
    assign(netrepo.url, "counter", "keep", hydrate="background", mac=mac)
    answers: list[dict[str, Any]] = []
    console2 = tmp_path / "console2.log"
    loader_line = re.compile(r"boot loader written to vda1|boot loader was not written.*")

    def snapshot_then_loader() -> None:
        p = run_cli("--repo", netrepo.url, "snapshot", "--instance", "pc-" + mac.replace(":", "-"),
                    "--to", "bootlab:pc3", "--wait", "120", "--json")
        answers.append(json.loads(p.stdout))
        end = time.monotonic() + 420
        while time.monotonic() < end and not loader_line.search(console2.read_text(errors="replace")):
            time.sleep(1.0)

    running = netboot(disk, netrepo.url, console2, mac=mac, until="BP-COUNT n=20 ", action=snapshot_then_loader)
    assert answers, running.tail()
    assert "reset on start" not in running.console
    assert "boot loader written to vda1" in running.console, running.tail()
    out = tmp_path / "pc3.raw"
    run_cli("--repo", netrepo.url, "export", "bootlab:pc3", str(out))
    got = subprocess.run([require_tool("debugfs"), "-R", f"cat {bootvm.bootimage.ADMIN_CHANGE_PATH}", str(out)],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    assert got == bootvm.bootimage.ADMIN_CHANGE_CONTENT, answers
    changed = json.loads(run_cli("--repo", netrepo.url, "diff", "bootlab:v1", "bootlab:pc3", "--json").stdout)
    print(f"keep + snapshot --instance: {len(changed['changed'])} chunks differ from v1; answer {answers[0]}")

    v2 = admin_version(boot_image.disk, tmp_path)
    run_cli("--repo", netrepo.url, "import", str(v2), "bootlab:keep2")
    run_cli("--repo", netrepo.url, "boot-files", "set", "bootlab:keep2", "--kernel", netrepo.built["build"]["kernel"],
            "--initrd", str(netrepo.initrd), "--cmdline", netrepo.built["cmdline"])
    assign(netrepo.url, "check", "keep", "bootlab:keep2", mac=mac)
    moved = netboot(disk, netrepo.url, tmp_path / "console3.log", mac=mac)
    assert moved.check == "OK", moved.tail()  # the new version, pristine: nothing of the session laid over it
    assert "no partition can be kept" in moved.console and "whole-disk file system" in moved.console, moved.tail()
    kept = re.search(r"kept the session as bootlab:(kept-52-54-00-12-34-5c-\S+) = ([0-9a-f]{16})", moved.console)
    assert kept is not None, moved.tail()
    assert "kept 0 modified chunk(s), reset" in moved.console, moved.tail()
    out = tmp_path / "kept.raw"
    run_cli("--repo", netrepo.url, "export", f"bootlab:{kept.group(1)}", str(out))
    got = subprocess.run([require_tool("debugfs"), "-R", f"cat {bootvm.bootimage.ADMIN_CHANGE_PATH}", str(out)],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    assert got == bootvm.bootimage.ADMIN_CHANGE_CONTENT  # the session, kept: nothing lost
    agents = json.loads(run_cli("--repo", netrepo.url, "agents", "--json").stdout)
    move = next(a["info"].get("last_move") for a in agents if a["instance"] == "pc-" + mac.replace(":", "-"))
    assert move and move["moved"] and move["snapshot"]["version"] == kept.group(2), agents
    assert f"session kept as bootlab:{kept.group(1)}" in move["summary"]


def test_power_cut_during_hydration_resumes_and_serves_nothing_wrong(boot_image: bootvm.bootimage.Built,
                                                                     netrepo: NetRepo, tmp_path: Path) -> None:
    """kill -9 of the whole VM (a power cut) while the image is copied in the background: the disk
    holds the image's content wherever its map says present, and the next boot resumes."""
    mac = "52:54:00:12:34:5d"
    disk = blank_disk(tmp_path / "pc4-disk.raw")
    assign(netrepo.url, "counter", "keep", hydrate="background", mac=mac)
    before = chunks_served(netrepo.url)

    def hydrating() -> None:  # let the background copy get well under way, then cut the power
        end = time.monotonic() + 120
        while chunks_served(netrepo.url) - before < netrepo.unique // 3 and time.monotonic() < end:
            time.sleep(0.2)

    cut = netboot(disk, netrepo.url, tmp_path / "console1.log", mac=mac, until="blockprov-agent: serving",
                  action=hydrating)
    assert "blockprov-agent: serving" in cut.console, cut.tail()
    loaded, data_at = cache_of(disk, tmp_path / "cut")
    ch = loaded.chunks
    present = [i for i in range(ch.count) if ch.present(i) and not ch.modified(i)]
    cs = loaded.chunk_size
    assert netrepo.unique // 10 < len(present) < netrepo.nonzero - 100, f"{len(present)} present: not mid-copy"
    with open(disk, "rb") as d, open(boot_image.disk, "rb") as img:
        for i in present:
            d.seek(data_at + i * cs)
            img.seek(i * cs)
            assert d.read(cs) == img.read(cs), f"chunk {i} is marked present but differs from the image"
    # the next boot resumes: it starts with what the map held, and the guest's check passes
    assign(netrepo.url, "check", "keep", hydrate="background", mac=mac)
    again = netboot(disk, netrepo.url, tmp_path / "console2.log", mac=mac)
    assert again.check == "OK", again.tail()
    at_start = again.number(r"present=(\d+)/\d+ chunks")
    assert at_start >= len(present), again.tail()
    print(f"power cut: {len(present)} chunks present and equal to the image after kill -9; the next boot "
          f"started with {at_start} local and passed its check")
