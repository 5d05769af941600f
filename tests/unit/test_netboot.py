"""The host-testable parts of the in-machine agent (issue 13): the kernel command line, the disk's
recognition and layout, the NBD handshake the kernel's client needs, the initramfs archive and
module order. The whole path runs under qemu in tests/boot/test_netboot.py."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from blockprov.device.memory import MemoryDevice
from blockprov.errors import DiskRefused, NetbootError, SourceError, UsageError
from blockprov.nbd.server import NbdServer
from blockprov.netboot import disk, initramfs, kernelnbd
from blockprov.netboot.inagent import instance_name
from blockprov.netboot.params import check_params, parse_cmdline

MiB = 1 << 20


def test_cmdline_words() -> None:
    p = parse_cmdline("console=ttyS0 blockprov.repo=http://10.0.2.2:8420 blockprov.image=lab@abc "
                      "blockprov.host=52:54:00:12:34:56 blockprov.policy=restore quiet blockprov.x\n")
    assert p == {"repo": "http://10.0.2.2:8420", "image": "lab@abc", "host": "52:54:00:12:34:56",
                 "policy": "restore"}
    check_params(p)
    check_params(p | {"reserve": "256M", "offline_after": "4", "loader": "off", "from": "disk"})
    for bad, why in (({"image": "a@b"}, "blockprov.repo"), (p | {"policy": "wipe"}, "expected one of"),
                     (p | {"hydrate": "soon"}, "before-boot"), (p | {"readahead": "lots"}, "4M"),
                     (p | {"reserve": "big"}, "256M"), (p | {"offline_after": "-1"}, "seconds")):
        with pytest.raises(NetbootError, match=why):
            check_params(bad)
    assert instance_name("52:54:00:12:34:56") == "pc-52-54-00-12-34-56"


def _head(*parts: tuple[int, bytes]) -> bytes:
    b = bytearray(68 << 10)
    for off, data in parts:
        b[off:off + len(data)] = data
    return bytes(b)


def test_identify_disks() -> None:
    assert disk.identify(_head()) == "blank"
    assert disk.identify(_head((1080, b"\x53\xef"))) == "ext2/3/4"
    assert disk.identify(_head((512, b"EFI PART"), (510, b"\x55\xaa"))) == "gpt"
    assert disk.identify(_head((4086, b"SWAPSPACE2"))) == "swap"
    ours = _head((0, disk.mbr(2 << 30, MiB)), (512, disk.label({"image": "lab"})))
    assert disk.identify(ours) == "blockprov" and disk.read_label(ours) == {"image": "lab"}
    # the first layout (label version 1): recognised, to be re-initialized knowingly
    old = _head((0, disk.mbr(2 << 30, MiB)), (512, disk.LABEL_MAGIC + struct.pack("<I", 1) + b"{}"))
    assert disk.identify(old) == "blockprov-old"
    # our partition table alone (a setup cut short before the label): not trusted, set up again
    assert disk.identify(_head((0, disk.mbr(2 << 30, MiB)))) == "blank"
    assert disk.identify(_head((510, b"\x55\xaa"))) == "mbr"


def test_mbr_layout() -> None:
    size = 2 << 30
    reserve = disk.reserve_bytes(size, 1 << 30, None)
    assert reserve == 128 * MiB  # 1/8 of the image
    assert disk.reserve_bytes(size, 1 << 30, 4 << 30) == size - disk.FIXED - (1 << 30)  # what the disk has
    assert disk.reserve_bytes(size, size - disk.FIXED - MiB, None) == MiB  # never less than 1 MiB
    m = disk.mbr(size, reserve)
    assert len(m) == 512 and m[510:] == b"\x55\xaa" and m[440:444] == disk.DISK_SIGNATURE
    assert m.startswith(disk.NO_LOADER)  # no loader yet: the firmware is sent on (int 0x18)
    parts = disk.partitions(m)
    assert parts == [(disk.TYPE_BOOT, disk.START, disk.BOOT_BYTES, False),
                     (disk.TYPE_META, disk.START + disk.BOOT_BYTES, disk.META_BYTES, False),
                     (disk.TYPE_RESERVE, disk.FIXED, reserve, False),
                     (disk.TYPE_DATA, disk.FIXED + reserve, size - disk.FIXED - reserve, False)]
    booting = disk.with_boot(m, code=b"\xfa" * 440, active=True)
    assert disk.partitions(booting)[0][3] and booting[:440] == b"\xfa" * 440
    assert booting[440:446] == m[440:446] and booting[447:] == m[447:]  # only the code and the flag change
    old = bytearray(m)
    old[446 + 4] = disk.OLD_TYPE_BOOT  # a disk made before the UEFI loader: its boot partition becomes an ESP
    assert disk.partitions(disk.with_boot(bytes(old), code=b"", active=False))[0][0] == disk.TYPE_BOOT == 0xEF
    d = disk.Disk("vda", size)
    assert (d.boot, d.meta, d.reserve, d.data) == ("/dev/vda1", "/dev/vda2", "/dev/vda3", "/dev/vda4")
    assert d.data_bytes == size - disk.FIXED - MiB
    assert disk.Disk("nvme0n1", size).data == "/dev/nvme0n1p4"


def test_choose_disk() -> None:
    heads = {"/dev/vda": _head((1080, b"\x53\xef")), "/dev/vdb": _head(), "/dev/vdc": _head(),
             "/dev/vdd": _head((512, disk.label({})))}
    small, foreign, blank, ours = (disk.Disk("vdc", 100 * MiB), disk.Disk("vda", 4 << 30),
                                   disk.Disk("vdb", 4 << 30), disk.Disk("vdd", 4 << 30))
    assert disk.choose([foreign, blank, small], 1 << 30, None, heads.__getitem__) == (blank, "blank")
    assert disk.choose([foreign, blank, ours], 1 << 30, None, heads.__getitem__) == (ours, "blockprov")
    with pytest.raises(DiskRefused, match=r"vda: holds ext2/3/4 data blockprov did not write.*vdc: too small"):
        disk.choose([foreign, small], 1 << 30, None, heads.__getitem__)
    # named, a foreign disk is taken (and will be initialized)
    assert disk.choose([foreign, blank], 1 << 30, "/dev/vda", heads.__getitem__) == (foreign, "blank")
    with pytest.raises(DiskRefused, match="no such disk"):
        disk.choose([foreign], 1 << 30, "sdz", heads.__getitem__)
    with pytest.raises(DiskRefused, match="the machine has none"):
        disk.choose([], 1 << 30, None, heads.__getitem__)


def test_handshake_against_blockprov_server(tmp_path: Path) -> None:
    """The kernel client's handshake (NBD_OPT_GO in Python) against blockprov's own server, then
    one READ in the transmission phase the kernel would speak."""
    dev = MemoryDevice(8 * MiB)
    got: dict[str, object] = {}

    def client(path: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            ex = kernelnbd.handshake(s, "")
            got["export"] = ex
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 4096))
            hdr = kernelnbd._recv(s, 16)
            got["reply"] = struct.unpack(">IIQ", hdr)
            got["data"] = kernelnbd._recv(s, 4096)
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 8, 0, 0))  # NBD_CMD_DISC

    async def main() -> None:
        server = NbdServer({"": dev})
        path = await server.start_unix(tmp_path / "nbd.sock")
        th = threading.Thread(target=client, args=(path,))
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.02)
        await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    ex = got["export"]
    assert isinstance(ex, kernelnbd.Export) and ex.size == 8 * MiB and ex.flags & 1  # HAS_FLAGS
    assert got["reply"] == (0x67446698, 0, 7) and got["data"] == bytes(4096)


def test_handshake_refused_export(tmp_path: Path) -> None:
    async def main() -> None:
        server = NbdServer({"only": MemoryDevice(MiB)})
        path = await server.start_unix(tmp_path / "nbd.sock")
        err: list[BaseException] = []

        def client() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(path)
                try:
                    kernelnbd.handshake(s, "other")
                except NetbootError as e:
                    err.append(e)

        th = threading.Thread(target=client)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.02)
        await server.close()
        assert err and "refused export 'other'" in str(err[0])

    asyncio.run(asyncio.wait_for(main(), 30))


def test_module_order_and_archive(tmp_path: Path) -> None:
    (tmp_path / "kernel/fs").mkdir(parents=True)
    (tmp_path / "modules.dep").write_text("kernel/fs/ext4.ko: kernel/fs/jbd2.ko kernel/lib/crc16.ko\n"
                                          "kernel/fs/jbd2.ko:\nkernel/lib/crc16.ko:\nkernel/drivers/nbd.ko:\n")
    order = initramfs.module_order(tmp_path, ("virtio_net", "nbd", "ext4"))
    assert [p.name for p in order] == ["nbd.ko", "jbd2.ko", "crc16.ko", "ext4.ko"]
    (tmp_path / "modules.dep").write_text("kernel/fs/ext4.ko:\n")
    with pytest.raises(NetbootError, match="have no nbd"):
        initramfs.module_order(tmp_path, ("nbd", "ext4"))
    a = initramfs.Archive()
    a.file("usr/lib/x/y.pyc", b"abc")
    a.symlink("lib", "usr/lib")
    data = a.cpio()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and len(data) % 4 == 0
    names = [n for n in a.entries]
    assert {"usr", "usr/lib", "usr/lib/x", "usr/lib/x/y.pyc", "lib"} <= set(names)
    assert initramfs.in_usr("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert initramfs.archive_name("/usr/lib/python3.11/json/__init__.py", []) == "usr/lib/python3.11/json/__init__.py"
    assert initramfs.archive_name("/v/lib/python3.11/site-packages/httpx/_api.py",
                                  ["/v/lib/python3.11/site-packages", "/src"]) == "usr/lib/blockprov/httpx/_api.py"
    assert gzip.decompress(gzip.compress(data)) == data


def bzimage_head(release: str, *, version: int = 0x020F, loadflags: int = 1) -> bytes:
    """The first bytes of a bzImage as the x86 boot protocol lays them out (what find_kernel reads)."""
    head = bytearray(0x4000)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = version.to_bytes(2, "little")
    head[0x211] = loadflags
    head[0x20E:0x210] = (0x3000 - 0x200).to_bytes(2, "little")
    text = f"{release} (builder@host) #1 SMP".encode() + b"\0"
    head[0x3000:0x3000 + len(text)] = text
    return bytes(head)


def test_a_kernel_is_checked_before_anything_is_built(tmp_path: Path) -> None:
    """Issue 27: `boot-files build --kernel small.raw` made an initramfs the PC refused with "Exec
    format error"; now its boot header is read first, and the modules' vermagic must match it."""
    assert initramfs.bzimage_release(bzimage_head("6.1.0-57-amd64")) == "6.1.0-57-amd64"
    for bad, why in ((bytes(1 << 20), "not a Linux kernel"), (b"\x7fELF" + bytes(4092), "not a Linux kernel"),
                     (bzimage_head("x", loadflags=0), "zImage"), (bzimage_head("x", version=0x0104), "zImage"),
                     (b"", "not a Linux kernel")):
        with pytest.raises(ValueError, match=why):
            initramfs.bzimage_release(bad)
    (tmp_path / "small.raw").write_bytes(bytes(1 << 20))
    with pytest.raises(SourceError, match="not a Linux kernel"):
        initramfs.find_kernel(tmp_path / "small.raw")
    (tmp_path / "vmlinuz-odd-name").write_bytes(bzimage_head("6.1.0-99-amd64"))
    assert initramfs.find_kernel(tmp_path / "vmlinuz-odd-name")[1] == "6.1.0-99-amd64"  # the header wins
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "nbd.ko").write_bytes(b"\x7fELF...vermagic=5.10.0-9-amd64 SMP mod_unload \0rest")
    with pytest.raises(UsageError, match=re.escape("are for 5.10.0-9-amd64, the kernel is 6.1.0-99-amd64")):
        initramfs.check_modules_match([mods / "nbd.ko"], "6.1.0-99-amd64")
    initramfs.check_modules_match([mods / "nbd.ko"], "5.10.0-9-amd64")


def test_blockprov_initramfs_is_recognised() -> None:
    """`vm run` refuses a version whose initrd is the network-boot initramfs: told from its first entries."""
    from blockprov.boot import INITRAMFS_MARK, is_blockprov_initramfs

    a = initramfs.Archive()
    a.file("init", b"#!/bin/sh\n", 0o755)
    a.file(INITRAMFS_MARK, b"#!/bin/sh\n", 0o755)
    a.file("usr/lib/big", os.urandom(3 << 20))  # the mark is found without unpacking the rest
    assert is_blockprov_initramfs(gzip.compress(a.cpio()))
    other = initramfs.Archive()
    other.file("init", b"#!/bin/sh\n", 0o755)
    assert not is_blockprov_initramfs(gzip.compress(other.cpio()))
    assert not is_blockprov_initramfs(b"\x28\xb5\x2f\xfd not gzip") and not is_blockprov_initramfs(b"")


def test_firmware_and_secure_boot(tmp_path: Path) -> None:
    """What the agent says of the machine's firmware: /sys/firmware/efi, and the Secure Boot state the
    EFI stub left in the boot parameters (byte 0x1ec: 3 enabled, 2 disabled)."""
    from blockprov.netboot.inagent import SECURE_BOOT_AT, firmware

    assert firmware(tmp_path) == ("bios", None)
    (tmp_path / "firmware" / "efi").mkdir(parents=True)
    assert firmware(tmp_path) == ("uefi", None)  # no boot parameters: not known
    params = tmp_path / "kernel" / "boot_params" / "data"
    params.parent.mkdir(parents=True)
    for mode, said in ((3, "on"), (2, "off"), (1, None)):
        params.write_bytes(bytes(SECURE_BOOT_AT) + bytes([mode]) + bytes(100))
        assert firmware(tmp_path) == ("uefi", said)
