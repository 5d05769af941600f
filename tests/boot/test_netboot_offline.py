"""A network-booted PC boots from its own disk when the repository is down, pristine (issue 13 item 4).

Real peers, as in tests/boot/test_netboot.py (whose qemu helper this reuses): ``blockprov serve`` on
127.0.0.1, the initramfs made by ``boot-files build``, qemu (TCG) whose boot order is the NIC's iPXE
ROM first and the disk second. The first boot provisions the blank disk, copies the whole image
before the boot (``--hydrate before-boot``) and writes the disk's own boot loader, kernel and
initramfs (netboot/loader.py); a dirty session follows (``blockprov.loader=off``: a one-off
session's command line must not become what the PC boots offline — the test image acts on
``bp.mode=``); then the repository is stopped. At the next power-on iPXE cannot fetch its script,
SeaBIOS falls through to the disk, syslinux starts the blockprov initramfs, the agent waits
``blockprov.offline_after`` seconds for the repository, boots OFFLINE from what the disk holds,
restores the disk, and the guest's check passes. The disk holds the whole image from the first
boot, so the sessions run on the native data path (netboot/native.py): the dirty session's writes
are in the copy-on-write store over the golden copy, and the offline restore drops the store.

The PC's disk is a sparse 3 TiB file, so it gets the GPT form (netboot/disk.py: over 2 TiB) and
the offline boot runs syslinux's gptmbr.bin → the FAT partition's SYSLINUX → the initramfs under
SeaBIOS, end to end; the 2 GiB disks of the other netboot tests keep the MBR form booting.

A second, fast test holds SeaBIOS to the loader's crash rule: a disk whose loader is not complete
(never written, or being rewritten: MBR and GPT) is passed over.

Wall time: three TCG boots (the first copies the 1 GiB test image and writes ~23 MB of boot files),
then two firmware-only boots of a few seconds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov.netboot import cowstore
from tests import bootvm
from tests.boot.netboot_helpers import IPXE_ROM, MAC, blank_disk, cache_of, netboot, session_store
from tests.conftest import require_tool, run_cli
from tests.procs import Proc, start_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]  # several TCG boots, on a shared, loaded machine

OFFLINE_AFTER = 4  # seconds the agent waits for the repository before it boots from the disk
BIG = 3 << 40  # a disk over 2 TiB: the GPT form (sparse, a few hundred MiB on the host)
IMAGE_BYTES = 1 << 30  # the test image (tests/boot/conftest.py)


def assign(url: str, mode: str, hydrate: str, *extra: str) -> None:
    run_cli("--repo", url, "host", "assign", MAC, "bootlab:v1", "--policy", "restore", "--hydrate", hydrate,
            "--args", " ".join(["quiet panic=-1", f"blockprov.offline_after={OFFLINE_AFTER}", f"bp.mode={mode}",
                                *extra]))


@pytest.fixture
def offrepo(boot_image: bootvm.bootimage.Built, tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    """A repository of its own (the test stops it): the test image and the blockprov initramfs."""
    assert Path(IPXE_ROM).exists(), f"{IPXE_ROM} missing: install ipxe-qemu (scripts/setup.sh)"
    server, url = start_server(tmp_path / "repo")
    try:
        run_cli("--repo", url, "import", str(boot_image.disk), "bootlab:v1")
        built = json.loads(run_cli("--repo", url, "boot-files", "build", "bootlab:v1", "--output",
                                   str(tmp_path / "initrd.img"), "--json").stdout)
        assert built["build"]["parts"].get("boot loader", 0) > 0, built  # syslinux, mtools, mkfs.fat, mbr.bin
        yield server, url
    finally:
        server.stop()


def test_hydrated_pc_boots_offline_from_its_disk_pristine(offrepo: tuple[Proc, str], tmp_path: Path) -> None:
    server, url = offrepo
    from blockprov.netboot import disk as layout
    from blockprov.netboot import loader

    disk = blank_disk(tmp_path / "pc-disk.raw", BIG)
    # 1. first provisioning: everything copied before the boot, the disk's own loader written
    assign(url, "check", "before-boot")
    first = netboot(disk, url, tmp_path / "console1.log", disk_second=True)
    assert first.check == "OK", first.tail()
    assert "boot loader written to vda1" in first.console, first.tail()
    assert "golden reserve 128 MiB" in first.console, first.tail()
    # the agent made a GPT (sfdisk, which we did not write, agrees) whose boot partition is bootable
    head = layout.read_head(str(disk))
    assert layout.is_gpt(head) and layout.gpt_valid(head) and head[:440] == loader.GPTMBR_BIN.read_bytes()[:440]
    table = json.loads(subprocess.run([require_tool("sfdisk"), "--json", str(disk)], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["partitions"][0].get("attrs") == "LegacyBIOSBootable", table
    assert table["partitions"][3]["size"] * 512 > layout.MBR_LIMIT, table  # the data partition past 2 TiB
    # 2. a dirty session (restore policy: it is what the next boot undoes)
    assign(url, "dirty", "off", "blockprov.loader=off")
    dirty = netboot(disk, url, tmp_path / "console2.log", disk_second=True)
    assert dirty.done.get("mode") == "dirty", dirty.tail()
    assert "boot loader written" not in dirty.console
    # the disk held the whole image: the session ran on the native data path, its writes in the
    # copy-on-write store (the golden copy, the data partition, untouched; the cache's map too)
    assert "native data path" in dirty.console, dirty.tail()
    loaded, _ = cache_of(disk, tmp_path / "after-dirty")
    assert not loaded.chunks.modified_chunks()
    store = session_store(disk, IMAGE_BYTES, loaded.chunk_size)
    changed = len(cowstore.cache_chunks(store, loaded.chunk_size, loaded.chunks.count))
    assert store.valid and changed > 0
    # 3. the repository is gone: the firmware falls through to the disk, the machine boots offline
    server.stop()
    offline = netboot(disk, url, tmp_path / "console3.log", disk_second=True)
    print(f"first boot {first.seconds:.1f} s, dirty session {dirty.seconds:.1f} s ({changed} chunks changed), "
          f"offline boot {offline.seconds:.1f} s")
    # the disk's loader boots the every-day initramfs (netboot/everyday.py): its one question unanswered
    assert "(the disk's own loader: every-day boot" in offline.console, offline.tail()
    assert "OFFLINE: the repository" in offline.console, offline.tail()
    # offline, the restore is the store dropped: nothing to copy, nothing the repository must send
    assert f"{changed} dropped with it (restore)" in offline.console, offline.tail()
    assert "native data path" in offline.console, offline.tail()
    assert offline.check == "OK", offline.tail()  # the dirty change is gone


@pytest.mark.parametrize("state", ["no loader yet", "loader being rewritten", "GPT loader being rewritten"])
def test_the_firmware_passes_over_a_disk_whose_loader_is_not_complete(state: str, tmp_path: Path) -> None:
    """netboot/loader.py's crash rule, against SeaBIOS itself: a disk made by ``initialize`` (boot
    code ``int 0x18``) or whose boot partition is being rewritten (syslinux's mbr.bin, partition 1
    not active; on a GPT disk gptmbr.bin, partition 1 not legacy-BIOS-bootable) is passed over —
    the firmware goes on to its next boot device (here none, so it says so and reboots, which
    ends qemu) instead of running a half-written loader."""
    import uuid

    from blockprov.netboot import disk as layout
    from blockprov.netboot import loader

    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        if state.startswith("GPT"):
            f.truncate(BIG)
            head, tail = layout.gpt(BIG, 1 << 20, uuid.uuid4(), code=loader.GPTMBR_BIN.read_bytes()[:440])
            f.seek(layout.tail_at(BIG // layout.SECTOR))
            f.write(tail)
            f.seek(0)
            f.write(head)
        else:
            f.truncate(512 << 20)
            code = layout.NO_LOADER if state == "no loader yet" else loader.MBR_BIN.read_bytes()[:440]
            f.write(layout.mbr(2 << 30, 1 << 20, code=code, active=False))
    log = tmp_path / "seabios.log"
    subprocess.run([require_tool("qemu-system-x86_64"), "-machine", "accel=tcg", "-m", "128", "-display", "none",
                    "-monitor", "none", "-no-reboot", "-nic", "none", "-boot", "reboot-timeout=1000",
                    "-drive", f"file={image},format=raw,if=virtio", "-debugcon", f"file:{log}",
                    "-global", "isa-debugcon.iobase=0x402"], timeout=120, check=False, capture_output=True)
    text = log.read_text(errors="replace")
    assert "Booting from Hard Disk..." in text, text[-2000:]
    after = text.split("Booting from Hard Disk...", 1)[1]
    assert "No bootable device." in after, text[-2000:]  # it went on past the disk
