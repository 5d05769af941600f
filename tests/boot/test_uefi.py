"""PCs as they are sold today (issue 25): UEFI firmware, with and without Secure Boot, network boot
through iPXE's EFI build and through the firmware's own HTTP boot, the disk's own UEFI loader.

Real peers end to end: ``blockprov serve`` on 127.0.0.1 holding the test image and the blockprov
initramfs (``boot-files build``, which stores Debian's signed shim, GRUB and MOK manager with it),
qemu (TCG) on a q35 machine with OVMF (Debian ``ovmf``): its plain build, and its Secure Boot
build with Microsoft's keys enrolled (``OVMF_CODE_4M.secboot.fd``, a per-PC copy of
``OVMF_VARS_4M.ms.fd``, SMM on, the variable flash secure), the NIC's EFI iPXE ROM
(``efi-virtio.rom``) or none (the firmware's own HTTP boot, set to HTTP boot over IPv4 only, as
an operator would: its PXE and IPv6 off). Each PC keeps its NVRAM file
across its boots. The firmware's console (OVMF, iPXE, GRUB) is on the serial port with the
kernel's, so each test reads which path the machine took.

Wall time: OVMF under TCG on a shared machine takes 1.5-3 minutes a boot; the tests make 21 of
them, one at a time, plus four firmware-only boots of under a minute.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov import boot, fat
from blockprov.netboot import cowstore
from blockprov.netboot import disk as layout
from tests import bootvm
from tests.boot.netboot_helpers import (
    BIOS,
    DISK_EXIT,
    EVERYDAY,
    MAC,
    OFFLINE,
    Firmware,
    NetBoot,
    admin_version,
    assign,
    blank_disk,
    boot_bytes_sent,
    boot_files_served,
    cache_of,
    chunks_served,
    differ_unmarked,
    netboot,
    session_store,
)
from tests.conftest import require_file, require_tool, run_cli
from tests.procs import Proc, start_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(3000)]

TIMEOUT = 600.0  # one OVMF boot under TCG on a loaded machine
OFFLINE_AFTER = "blockprov.offline_after=4"  # seconds the agent waits for the repository before it boots from the disk
GRUB_STARTED = "Welcome to GRUB!"
# what the kernel (its lockdown, the key it trusts) and the agent say under Secure Boot; the kernel
# says it only above the test image's ``quiet``: VERBOSE (the EFI stub keeps quiet whatever follows)
SB_LINES = ("Kernel is locked down from EFI Secure Boot", "integrity: Loaded X.509 cert 'Debian Secure Boot CA",
            "firmware: UEFI, Secure Boot on")
VERBOSE = "loglevel=6"
IMAGE_BYTES = 1 << 30  # the test image (tests/boot/conftest.py)


@pytest.fixture
def uefirepo(boot_image: bootvm.bootimage.Built, tmp_path: Path) -> Iterator[tuple[Proc, str, int]]:
    """A repository of its own (a test may stop it): the test image, the blockprov initramfs and
    Debian's signed UEFI loader (its kernel and initramfs also in ``tmp_path``: vmlinuz,
    initrd.img); yields the server, its URL, and the image's non-zero chunks."""
    for f in ("/usr/lib/shim/shimx64.efi.signed", "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"):
        require_file(f)
    server, url = start_server(tmp_path / "repo")
    try:
        run_cli("--repo", url, "import", str(boot_image.disk), "bootlab:v1")
        built = json.loads(run_cli("--repo", url, "boot-files", "build", "bootlab:v1", "--output",
                                   str(tmp_path / "initrd.img"), "--json").stdout)
        assert set(built["efi"]) == set(boot.EFI_FILES), built["efi"]
        (tmp_path / "vmlinuz").symlink_to(built["build"]["kernel"])  # beside initrd.img: for another version
        m = json.loads(run_cli("--repo", url, "show", "bootlab:v1", "--json").stdout)
        yield server, url, m["chunks"] - m["zero_chunks"]
    finally:
        server.stop()


def host(url: str, mac: str = MAC) -> dict[str, object]:
    return dict(json.loads(run_cli("--repo", url, "host", "show", mac, "--json").stdout))


def image_url(url: str, mac: str = MAC) -> str:
    return f"http://10.0.2.2:{url.rsplit(':', 1)[1]}/v1/boot/{mac}/boot.img"


def esp(disk: Path, tmp: Path) -> Path:
    """The disk's boot partition, copied out; checked by tools we did not write: sfdisk says it is
    an EFI System Partition, fsck.fat finds it clean, mtools reads shim at the fallback path."""
    table = json.loads(subprocess.run([require_tool("sfdisk"), "--json", str(disk)], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)["partitiontable"]
    first = table["partitions"][0]
    assert first["type"].upper() in ("EF", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), table
    part = tmp / "esp.img"
    with open(disk, "rb") as src, open(part, "wb") as dst:
        src.seek(first["start"] * 512)
        dst.write(src.read(first["size"] * 512))
    fsck = subprocess.run([require_tool("fsck.fat"), "-n", str(part)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout
    shim = subprocess.run([require_tool("mcopy"), "-n", "-i", str(part), "::EFI/BOOT/BOOTX64.EFI", "-"],
                          capture_output=True, check=True, timeout=60,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    assert shim == Path("/usr/lib/shim/shimx64.efi.signed").read_bytes()
    return part


def esp_sector(disk: Path) -> bytes:
    with open(disk, "rb") as f:
        f.seek(layout.START)
        return f.read(512)


def test_uefi_pc_boots_through_ipxe_lazily_is_restored_and_boots_offline_pristine(
        uefirepo: tuple[Proc, str, int], tmp_path: Path) -> None:
    """Issue 25's first two tests: a UEFI PC with a blank disk network-boots through iPXE's EFI build,
    runs lazily, is restored at its next boot (which also copies the rest of the image and writes
    the disk's own loaders); the next boot is the every-day boot (iPXE told `exit`, the ESP's GRUB,
    nothing downloaded); a dirty session; then, the repository stopped, the firmware falls through to the disk's
    EFI System Partition (shim, GRUB, the initramfs's fast part: the every-day boot, its question
    unanswered), and the PC comes up pristine (the disk holds the whole image: the native data
    path, whose restore drops the session's copy-on-write store)."""
    server, url, nonzero = uefirepo
    pc = Firmware("uefi", tmp_path / "nvram.fd")
    disk = blank_disk(tmp_path / "pc-disk.raw")
    # 1. first boot, lazily, a dirty session (restore policy: the next boot undoes it)
    assign(url, "dirty", "restore", extra=OFFLINE_AFTER)
    base = chunks_served(url)
    first = netboot(disk, url, tmp_path / "console1.log", firmware=pc, disk_second=True, timeout=TIMEOUT)
    assert first.done.get("mode") == "dirty", first.tail()
    assert "iPXE" in first.console and "firmware: UEFI" in first.console, first.tail()
    at_init = None if first.sent_at_init is None else first.sent_at_init - base
    assert at_init is not None and at_init < nonzero // 10, first.tail()  # it ran on a sliver of the image
    assert host(url)["firmware"] == "uefi"  # iPXE's ${platform} on the initrd's URL: efi
    # 2. restored at the next boot, the rest of the image copied before it, the disk's loaders written
    assign(url, "check", "restore", hydrate="before-boot", extra=OFFLINE_AFTER)
    restored = netboot(disk, url, tmp_path / "console2.log", firmware=pc, disk_second=True, timeout=TIMEOUT)
    assert restored.check == "OK", restored.tail()
    reset = restored.number(r"reset on start: (\d+) chunk")
    assert reset > 0 and "boot loader written to vda1 (BIOS and UEFI)" in restored.console, restored.tail()
    esp(disk, tmp_path)
    # 2b. the disk complete and current: iPXE's script is `exit`, the firmware boots the ESP (the every-day boot)
    files = boot_files_served(url)
    day = netboot(disk, url, tmp_path / "console2b.log", firmware=pc, disk_second=True, timeout=TIMEOUT)
    for line in (DISK_EXIT, GRUB_STARTED, EVERYDAY, "the repository: the disk is current", "native data path"):
        assert line in day.console, (line, day.tail())
    assert day.check == "OK" and boot_files_served(url) == files, day.tail()
    # 3. a dirty session whose command line the disk does not take (loader=off); the disk holds the
    # whole image, so it runs on the native data path: its writes in the copy-on-write store
    assign(url, "dirty", "restore", extra=f"{OFFLINE_AFTER} blockprov.loader=off")
    dirty = netboot(disk, url, tmp_path / "console3.log", firmware=pc, disk_second=True, timeout=TIMEOUT)
    assert dirty.done.get("mode") == "dirty" and "boot loader written" not in dirty.console, dirty.tail()
    assert "native data path" in dirty.console, dirty.tail()
    loaded, _ = cache_of(disk, tmp_path / "after-dirty")
    store = session_store(disk, IMAGE_BYTES, loaded.chunk_size)
    changed = len(cowstore.cache_chunks(store, loaded.chunk_size, loaded.chunks.count))
    assert store.valid and changed > 0
    # 4. the repository is gone: iPXE, then the firmware's own network boot fail; the disk boots
    server.stop()
    # after iPXE gives up, OVMF waits out its own PXE and HTTP boot over IPv4 and IPv6 before the disk
    # (175-416 s under TCG at load 20): this boot gets twice the others' limit
    off = netboot(disk, url, tmp_path / "console4.log", firmware=pc, disk_second=True, timeout=2 * TIMEOUT)
    print(f"UEFI: first boot {first.seconds:.0f} s ({at_init} of {nonzero} chunks at init), restore + copy "
          f"{restored.seconds:.0f} s ({reset} reset), dirty {dirty.seconds:.0f} s ({changed} changed), "
          f"offline {off.seconds:.0f} s")
    text = off.console
    assert GRUB_STARTED in text and text.index(GRUB_STARTED) > text.index("iPXE"), off.tail()
    assert EVERYDAY in text and OFFLINE in text and "firmware: UEFI" in text, off.tail()
    assert f"{changed} dropped with it (restore)" in text and "native data path" in text, off.tail()
    assert off.check == "OK", off.tail()  # the dirty change is gone


def test_firmware_http_boot_with_no_ipxe(uefirepo: tuple[Proc, str, int], tmp_path: Path) -> None:
    """The firmware's own UEFI HTTP boot, no iPXE anywhere: the DHCP boot file is the host's boot
    image (GET /v1/boot/MAC/boot.img), which OVMF downloads into a RAM disk and boots (shim,
    GRUB, the kernel and the initramfs in it); the same agent runs; the host is recorded UEFI."""
    _server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:6b"
    pc = Firmware("uefi", tmp_path / "nvram.fd", ipxe=False, http_only=True)
    assign(url, "check", "keep", mac=mac)
    b = netboot(blank_disk(tmp_path / "pc-disk.raw"), url, tmp_path / "console.log", mac=mac, firmware=pc,
                bootfile=image_url(url, mac), timeout=TIMEOUT)
    assert b.check == "OK", b.tail()
    assert "Start HTTP Boot over IPv4" in b.console and f"/v1/boot/{mac}/boot.img" in b.console, b.tail()
    assert "iPXE" not in b.console and GRUB_STARTED in b.console, b.tail()
    h = host(url, mac)
    assert h["firmware"] == "uefi" and h["last_boot_version"], h
    started = b.seen.get("blockprov: initramfs started")
    print(f"UEFI HTTP boot: BOOT-DONE after {b.seconds:.0f} s; the initramfs started after {started or 0:.0f} s")


def http_boot_pc(url: str, tmp_path: Path, mac: str) -> tuple[Path, Callable[[int], NetBoot]]:
    """A UEFI PC set to the firmware's own HTTP boot over IPv4 (no iPXE), a blank disk its second
    boot option: the disk, and its ``power_on(n)`` (console n)."""
    pc = Firmware("uefi", tmp_path / "nvram.fd", ipxe=False, http_only=True)
    disk = blank_disk(tmp_path / "pc-disk.raw")

    def power_on(n: int) -> NetBoot:
        return netboot(disk, url, tmp_path / f"console{n}.log", mac=mac, firmware=pc, bootfile=image_url(url, mac),
                       disk_second=True, timeout=TIMEOUT)

    return disk, power_on


def sent_so_far(url: str, mac: str) -> tuple[int, int, int, Any]:
    """What the repository has sent (chunks, bytes of boot files, boot-file requests) and the host's last boot."""
    return chunks_served(url), boot_bytes_sent(url), boot_files_served(url), host(url, mac)["last_boot"]


def assert_everyday_from_the_esp(day: NetBoot, url: str, mac: str, before: tuple[int, int, int, Any],
                                 policy: str) -> None:
    """The every-day boot through the firmware's HTTP boot: a 404 for the boot image (the disk complete
    and current), then the ESP's GRUB, the initramfs's one question, the native data path under
    ``policy``; since ``before`` (sent_so_far) the 404's line was all the repository sent of boot
    files (no image, kernel or initramfs), no chunk; the disk's question recorded the boot."""
    text = day.console
    assert "Client Error: 404 Not Found" in text and GRUB_STARTED in text, day.tail()
    assert text.index("Client Error: 404") < text.index(GRUB_STARTED), day.tail()  # the network passed, then the disk
    for line in (EVERYDAY, "firmware: UEFI", "the repository: the disk is current",
                 "native data path: the root is disk vda itself", f"(every-day boot, policy {policy})"):
        assert line in text, (line, day.tail())
    chunks, sent, files, last_boot = before
    assert boot_bytes_sent(url) - sent < 1024 and boot_files_served(url) == files, (sent, boot_bytes_sent(url))
    assert chunks_served(url) == chunks
    assert host(url, mac)["last_boot"] > last_boot  # the disk's question recorded the boot


def test_firmware_http_boot_every_day_from_the_esp_then_a_new_version_by_diff(
        uefirepo: tuple[Proc, str, int], boot_image: bootvm.bootimage.Built, tmp_path: Path) -> None:
    """Issue 25's short every-day boot on UEFI, through the firmware's own HTTP boot (no iPXE): a PC
    provisioned over it (the whole image before the boot, the disk's loaders written) is answered a
    404 for its boot image once its disk is complete and current; OVMF boots its next option, the
    disk's EFI System Partition, whose GRUB boots the initramfs's fast part: the every-day boot's
    one question, the native data path, the last session dropped (restore), no kernel, initramfs
    or chunk downloaded. Then a new version reaches the PC: the image is served again and the disk
    is updated by diff, only the chunks that differ fetched."""
    _server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:6f"
    _disk, power_on = http_boot_pc(url, tmp_path, mac)
    assign(url, "session", "restore", hydrate="before-boot", mac=mac)
    first = power_on(1)
    assert first.check == "OK" and "boot loader written to vda1 (BIOS and UEFI)" in first.console, first.tail()
    assert "native data path" in first.console and "Start HTTP Boot over IPv4" in first.console, first.tail()
    before = sent_so_far(url, mac)
    day = power_on(2)
    print(f"UEFI HTTP boot: provisioned in {first.seconds:.0f} s, every-day boot {day.seconds:.0f} s; {day.tail(12)}")
    assert_everyday_from_the_esp(day, url, mac, before, "restore")
    assert "dropped with it (restore), nothing copied" in day.console, day.tail()
    assert day.check == "OK" and day.number(r"chunks: (\d+) dropped with it") > 0, day.tail()
    # a new version: the firmware gets the image again, the agent updates the disk by diff
    v2 = admin_version(boot_image.disk, tmp_path)
    run_cli("--repo", url, "import", str(v2), "bootlab:v2u")
    run_cli("--repo", url, "boot-files", "set", "bootlab:v2u", "--kernel", str(tmp_path / "vmlinuz"), "--initrd",
            str(tmp_path / "initrd.img"), "--cmdline", "console=tty0 console=ttyS0", "--no-prepare")
    changed = len(json.loads(run_cli("--repo", url, "diff", "bootlab:v1", "bootlab:v2u", "--json").stdout)["changed"])
    assign(url, "session", "restore", ref="bootlab:v2u", hydrate="before-boot", mac=mac)
    before = chunks_served(url)
    moved = power_on(3)
    fetched = chunks_served(url) - before
    print(f"new version: {changed} chunks differ, {fetched} sent; {moved.seconds:.0f} s")
    assert "Client Error" not in moved.console and "by diff" in moved.console, moved.tail()
    assert moved.check == "OK" and "native data path" in moved.console, moved.tail()
    assert moved.number(r"BP-CHECK OK files=(\d+)") == first.number(r"BP-CHECK OK files=(\d+)") + 1
    assert 0 < fetched <= changed + 16, moved.tail()  # the slack: fills lost to the last power-off (test_netboot)


def test_firmware_http_boot_every_day_under_keep_keeps_the_session_and_its_record(
        uefirepo: tuple[Proc, str, int], boot_image: bootvm.bootimage.Built, tmp_path: Path) -> None:
    """The native data path under ``keep`` on UEFI, as tests/boot/test_netboot_native.py checks it on
    BIOS: a PC provisioned over the firmware's HTTP boot (its session writes a file in place, dm-era
    recording); its every-day boot from the ESP (a 404, no boot file, no chunk) finds that file
    (kept) and writes more; the next boot the repository serves (another command line) turns the
    kernel's record of both sessions into the cache's modified map before anything else: every
    chunk of the disk that differs from the image is marked."""
    _server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:70"
    disk, power_on = http_boot_pc(url, tmp_path, mac)
    assign(url, "persist", "keep", hydrate="before-boot", mac=mac)
    first = power_on(1)
    assert first.done.get("persisted") == "0" and "native data path" in first.console, first.tail()
    assert "boot loader written to vda1 (BIOS and UEFI)" in first.console, first.tail()
    before = sent_so_far(url, mac)
    day = power_on(2)
    assert_everyday_from_the_esp(day, url, mac, before, "keep")
    assert day.done.get("persisted") == "1", day.tail()  # the last session's file is there: kept
    assign(url, "plain", "keep", hydrate="before-boot", mac=mac)
    after = power_on(3)
    assert "Client Error" not in after.console and after.done.get("mode") == "plain", after.tail()
    written = after.number(r"record: (\d+) chunk\(s\) written in place")
    differ, unmarked = differ_unmarked(disk, boot_image.disk, tmp_path / "after")
    print(f"UEFI keep: provisioned in {first.seconds:.0f} s, every-day boot {day.seconds:.0f} s, the next "
          f"{after.seconds:.0f} s: {written} chunks turned modified, {len(differ)} differ from the image, "
          f"{len(unmarked)} of them not marked")
    assert written > 0 and differ and not unmarked, unmarked[:20]


def test_secure_boot_pc_boots_the_signed_chain_from_the_network_and_its_disk(
        uefirepo: tuple[Proc, str, int], boot_image: bootvm.bootimage.Built, tmp_path: Path) -> None:
    """Issue 25's Secure Boot test: OVMF's Secure Boot build with Microsoft's keys; the firmware's
    own HTTP boot (the NIC's iPXE is unsigned) runs Microsoft-signed shim → Debian-signed GRUB →
    Debian-signed kernel (locked down) → blockprov's initramfs; then, the repository stopped, the
    same chain from the disk's EFI System Partition (its every-day boot). A kernel whose signature no longer matches is
    refused by that chain (what Secure Boot verifies: the kernel yes, the initramfs no)."""
    server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:6c"
    pc = Firmware("secure", tmp_path / "nvram.fd", ipxe=False, http_only=True)
    disk = blank_disk(tmp_path / "pc-disk.raw")
    # a version whose kernel was changed by one byte: its signature no longer matches
    tampered = tmp_path / "vmlinuz-tampered"
    kernel = bytearray((tmp_path / "vmlinuz").read_bytes())
    kernel[len(kernel) // 2] ^= 0xFF
    tampered.write_bytes(kernel)
    run_cli("--repo", url, "import", str(boot_image.disk), "bootlab:tampered")
    run_cli("--repo", url, "boot-files", "set", "bootlab:tampered", "--kernel", str(tampered), "--initrd",
            str(tmp_path / "initrd.img"), "--cmdline", "console=tty0 console=ttyS0", "--no-prepare")
    assign(url, "check", "restore", ref="bootlab:tampered", mac=mac)
    refused = netboot(disk, url, tmp_path / "console0.log", mac=mac, firmware=pc, bootfile=image_url(url, mac),
                      until="bad shim signature", timeout=TIMEOUT)
    assert "bad shim signature" in refused.console and "Linux version" not in refused.console, refused.tail()
    # the signed chain from the network, the disk provisioned and given its loaders
    assign(url, "check", "restore", hydrate="before-boot", extra=f"{OFFLINE_AFTER} {VERBOSE}", mac=mac)
    net = netboot(disk, url, tmp_path / "console1.log", mac=mac, firmware=pc, bootfile=image_url(url, mac),
                  disk_second=True, timeout=TIMEOUT)
    assert net.check == "OK", net.tail()
    for line in SB_LINES:
        assert line in net.console, (line, net.tail())
    assert "boot loader written to vda1 (BIOS and UEFI)" in net.console, net.tail()
    # and from its disk, the repository stopped
    server.stop()
    own = netboot(disk, url, tmp_path / "console2.log", mac=mac, firmware=pc, bootfile=image_url(url, mac),
                  disk_second=True, timeout=TIMEOUT)
    for line in (*SB_LINES, EVERYDAY, OFFLINE, GRUB_STARTED):
        assert line in own.console, (line, own.tail())
    assert own.check == "OK", own.tail()
    print(f"Secure Boot: network {net.seconds:.0f} s, disk {own.seconds:.0f} s; tampered kernel refused")


def test_a_loader_rewrite_cut_by_kill_9_and_the_firmware_falls_through(uefirepo: tuple[Proc, str, int],
                                                                       tmp_path: Path) -> None:
    """netboot/loader.py's crash rule under UEFI, with real firmware: a UEFI PC's disk gets its
    loaders; its command line changes, so the next boot rewrites them; qemu is killed (kill -9, a
    power cut) as soon as the rewrite has begun. The disk then shows no file system where the ESP
    was and its BIOS flag is off; at the next power-on, the disk first, OVMF finds nothing to boot
    on it and falls through to its next boot option, the network, whose boot rewrites the loaders."""
    _server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:6d"
    pc = Firmware("uefi", tmp_path / "nvram.fd")
    disk = blank_disk(tmp_path / "pc-disk.raw")
    assign(url, "check", "keep", hydrate="before-boot", mac=mac)
    first = netboot(disk, url, tmp_path / "console1.log", mac=mac, firmware=pc, disk_second=True, timeout=TIMEOUT)
    assert first.check == "OK" and "boot loader written to vda1" in first.console, first.tail()
    assert fat.is_fat16(esp_sector(disk))
    assign(url, "check", "keep", hydrate="before-boot", mac=mac, extra="bp.note=rewritten")
    cut = netboot(disk, url, tmp_path / "console2.log", mac=mac, firmware=pc, disk_second=True, timeout=TIMEOUT,
                  poll=0.05, cut_when=lambda: not fat.is_fat16(esp_sector(disk)))
    assert "boot loader written" not in cut.console and cut.check is None, cut.tail()
    assert not fat.is_fat16(esp_sector(disk))  # the rewrite had begun: no file system there
    assert not layout.partitions(layout.read_head(str(disk), layout.GPT_HEAD))[0][3]  # nor the BIOS flag
    again = netboot(disk, url, tmp_path / "console3.log", mac=mac, firmware=pc, disk_first=True, timeout=TIMEOUT)
    text = again.console
    m = re.search(r'failed to load Boot\d+ "UEFI Misc Device[^"]*"', text)
    assert m is not None and m.start() < text.index("iPXE"), again.tail()  # the disk first, passed over
    assert GRUB_STARTED not in text, again.tail()
    assert again.check == "OK" and "boot loader written to vda1 (BIOS and UEFI)" in text, again.tail()
    assert fat.is_fat16(esp_sector(disk))
    esp(disk, tmp_path)
    print(f"kill -9 {cut.seconds:.1f} s into the rewriting boot; the next boot fell through to the network")


def test_a_bios_provisioned_disk_moves_to_a_uefi_pc_and_back(uefirepo: tuple[Proc, str, int],
                                                              tmp_path: Path) -> None:
    """A disk provisioned on a BIOS PC (SeaBIOS) holds both loaders; moved into a UEFI PC (OVMF)
    while the repository is down, it boots offline from its ESP through GRUB, pristine; moved back,
    it boots offline through SYSLINUX; both boot the initramfs's fast part, the every-day boot
    (netboot/everyday.py), its question unanswered. (An older disk with SYSLINUX
    alone gains the UEFI loader at its next network boot on any PC; until then OVMF passes it over:
    the firmware-only test below.)"""
    server, url, _nonzero = uefirepo
    mac = "52:54:00:12:34:6e"
    disk = blank_disk(tmp_path / "pc-disk.raw")
    assign(url, "check", "restore", hydrate="before-boot", extra=OFFLINE_AFTER, mac=mac)
    bios = netboot(disk, url, tmp_path / "console1.log", mac=mac, firmware=BIOS, disk_second=True, timeout=TIMEOUT)
    assert bios.check == "OK" and "firmware: BIOS" in bios.console, bios.tail()
    assert "boot loader written to vda1 (BIOS and UEFI)" in bios.console, bios.tail()
    server.stop()
    uefi = netboot(disk, url, tmp_path / "console2.log", mac=mac, firmware=Firmware("uefi", tmp_path / "nvram.fd"),
                   disk_second=True, timeout=TIMEOUT)
    for line in (GRUB_STARTED, "firmware: UEFI", EVERYDAY, OFFLINE):
        assert line in uefi.console, (line, uefi.tail())
    assert uefi.check == "OK", uefi.tail()
    back = netboot(disk, url, tmp_path / "console3.log", mac=mac, firmware=BIOS, disk_second=True, timeout=TIMEOUT)
    for line in (EVERYDAY, OFFLINE, "firmware: BIOS"):
        assert line in back.console, (line, back.tail())
    assert GRUB_STARTED not in back.console and back.check == "OK", back.tail()


def firmware_only(image: Path, log: Path, until: str, *, seconds: float = 240) -> str:
    """OVMF booting ``image`` alone (no NIC), its console read until ``until`` shows (then qemu is
    killed), bounded."""
    pc = Firmware("uefi", log.with_suffix(".nvram"))
    log.unlink(missing_ok=True)
    qemu = subprocess.Popen([require_tool("qemu-system-x86_64"), "-machine", "accel=tcg", *pc.args(), "-m", "256",
                             "-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot",
                             "-serial", f"file:{log}", "-drive", f"file={image},format=raw,if=virtio"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and qemu.poll() is None:
            if log.exists() and until in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
    finally:
        qemu.kill()
        qemu.wait(timeout=30)
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.parametrize("state", ["being rewritten", "SYSLINUX only (an older disk)", "complete"])
def test_ovmf_boots_the_esp_only_when_its_uefi_loader_is_complete(state: str, tmp_path: Path) -> None:
    """The firmware's side of the crash rule, firmware-only: a disk whose boot partition is being
    rewritten (its volume's boot sector zeroed: netboot/loader.py step 1), or holds SYSLINUX alone
    (a disk provisioned before the UEFI loader), is passed over — OVMF's option for the disk fails
    and it goes on to its next one (here its UEFI shell); a complete one starts shim, then GRUB."""
    from blockprov.netboot import loader

    image = blank_disk(tmp_path / "disk.raw")  # 2 GiB, sparse: the table's partitions end within it
    d = layout.Disk("vda", 2 << 30, str(tmp_path / "dev"))
    (tmp_path / "dev").mkdir()
    (tmp_path / "meta").mkdir()
    part = Path(d.boot)
    with open(part, "wb") as f:
        f.truncate(layout.BOOT_BYTES)
    Path(d.path).write_bytes(layout.mbr(2 << 30, 1 << 20))
    # the initramfs gzip'd: the loader keeps its fast part apart (netboot/loader.py split_initramfs)
    files = {"kernel": b"not a kernel" * 1000, "initrd": gzip.compress(b"not an initramfs" * 1000, mtime=0)}
    if state != "SYSLINUX only (an older disk)":
        files |= {n: Path(p).read_bytes() for n, p in boot.DEBIAN_EFI.items()}
    ids = {n: boot.split(x, n, lambda _i: None).id for n, x in files.items()}
    loader.install(d, tmp_path / "meta", files, loader.wanted(ids["kernel"], ids["initrd"], "console=ttyS0",
                                                              {n: ids[n] for n in boot.EFI_FILES if n in ids}))
    if state == "being rewritten":
        with open(part, "r+b") as f:
            f.write(bytes(512))
    with open(image, "r+b") as f:
        f.write(Path(d.path).read_bytes()[:512])
        f.seek(layout.START)
        f.write(part.read_bytes())
    if state == "complete":
        text = firmware_only(image, tmp_path / "ovmf.log", GRUB_STARTED)
        assert GRUB_STARTED in text, text[-3000:]
        return
    text = firmware_only(image, tmp_path / "ovmf.log", "EFI Internal Shell")
    assert re.search(r'failed to load Boot\d+ "UEFI Misc Device[^"]*".*Not Found', text), text[-3000:]
    assert "EFI Internal Shell" in text and GRUB_STARTED not in text, text[-3000:]
