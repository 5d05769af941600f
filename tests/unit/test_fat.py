"""fat.py's FAT16 volumes, read by tools we did not write: dosfstools' fsck.fat checks them, mtools
reads every file back, syslinux installs itself into the boot partition's form; and the crash rule's
premise: without its boot sector nothing sees a file system."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from blockprov import fat
from tests.conftest import require_tool

FILES = {"vmlinuz": os.urandom(300_000), "initrd.img": os.urandom(1_000_001), "EFI/BOOT/BOOTX64.EFI": b"shim" * 999,
         "EFI/BOOT/grubx64.efi": b"grub" * 5000, "EFI/debian/grub.cfg": b"set timeout=0\n", "syslinux.cfg": b"",
         "EFI/BOOT/mmx64.efi": os.urandom(4096)}
ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


def write(v: fat.Volume, path: Path, files: dict[str, bytes], *, boot: bool = True, junk: bool = False) -> Path:
    """``v`` written to ``path`` the way the disk's loader writes it: the files and the metadata,
    then (``boot``) the boot sector. ``junk``: the space under it held other data first."""
    with open(path, "wb") as f:
        f.truncate(v.size)
        if junk:
            f.write(b"\xe5" * v.size)  # "deleted entry" bytes: stale directories would show
        for at, _n, what in v.extents()[1:]:
            f.seek(at)
            f.write(what if isinstance(what, bytes) else files[what])
        if boot:
            f.seek(0)
            f.write(v.boot)
    return path


def fsck(path: Path) -> str:
    p = subprocess.run([require_tool("fsck.fat"), "-n", "-v", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.parametrize("size", [None, 128 << 20])
def test_volume_is_a_clean_fat16_whose_files_read_back(tmp_path: Path, size: int | None) -> None:
    v = fat.layout(list((p, len(d)) for p, d in FILES.items()), size=size, hidden=2048 if size else 0,
                   serial=0xB10C, label="BPBOOT")
    img = write(v, tmp_path / "v.img", FILES, junk=size is not None)
    out = fsck(img)
    assert "16 bit entries" in out and ("2048 hidden sectors" in out) == (size is not None), out
    assert v.size == (size or v.size) and v.size % (1 << 20) == 0
    assert fat.MIN_CLUSTERS <= v.clusters <= fat.MAX_CLUSTERS
    for p, data in FILES.items():
        got = subprocess.run([require_tool("mcopy"), "-n", "-i", str(img), f"::{p}", "-"], capture_output=True,
                             env=ENV, timeout=60, check=True).stdout
        assert got == data, p
        at = v.files[p]
        assert at >= v.data_start and (at - v.data_start) % v.cluster == 0  # each file contiguous, from a cluster
    listing = subprocess.run([require_tool("mdir"), "-i", str(img), "::EFI/BOOT"], capture_output=True, text=True,
                             env=ENV, timeout=60, check=True).stdout
    assert "BOOTX64  EFI" in listing and "grubx64  efi" in listing  # case kept by the NT bits
    # the same inputs make the same bytes (the HTTP boot image's ETag relies on it)
    again = fat.layout(list((p, len(d)) for p, d in FILES.items()), size=size, hidden=2048 if size else 0,
                       serial=0xB10C, label="BPBOOT")
    assert again == v


def test_syslinux_installs_into_it_and_it_stays_clean(tmp_path: Path) -> None:
    v = fat.layout([(p, len(d)) for p, d in FILES.items()], size=128 << 20, hidden=2048)
    img = write(v, tmp_path / "v.img", FILES)
    subprocess.run([require_tool("syslinux"), "--install", str(img)], env=ENV, check=True, timeout=60,
                   capture_output=True)
    fsck(img)
    with open(img, "rb") as f:
        sector = f.read(512)
    assert fat.is_fat16(sector) and sector[3:11] == b"SYSLINUX" and sector[54:62] == b"FAT16   "
    got = subprocess.run([require_tool("mcopy"), "-n", "-i", str(img), "::initrd.img", "-"], capture_output=True,
                         env=ENV, timeout=60, check=True).stdout
    assert got == FILES["initrd.img"]  # syslinux took free clusters only


def test_without_its_boot_sector_there_is_no_file_system(tmp_path: Path) -> None:
    """The loader's crash rule for UEFI (netboot/loader.py): everything but sector 0 written is no file system."""
    v = fat.layout([(p, len(d)) for p, d in FILES.items()], size=128 << 20)
    img = write(v, tmp_path / "v.img", FILES, boot=False)
    assert not fat.is_fat16(img.read_bytes()[:512])
    p = subprocess.run([require_tool("mdir"), "-i", str(img), "::"], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert p.returncode != 0
    assert fat.is_fat16(v.boot)


def test_layout_mistakes() -> None:
    with pytest.raises(fat.LayoutError, match=r"not an 8\.3 short name"):
        fat.layout([("EFI/BOOT/bootX64.efi", 1)])
    with pytest.raises(fat.LayoutError, match=r"not an 8\.3 short name"):
        fat.layout([("a-very-long-name.txt", 1)])
    with pytest.raises(fat.LayoutError, match="given twice"):
        fat.layout([("A.TXT", 1), ("a.txt", 2)])
    with pytest.raises(fat.LayoutError, match="both a file and a directory"):
        fat.layout([("EFI", 1), ("EFI/X", 1)])
    with pytest.raises(fat.LayoutError, match=r"need .* clusters"):
        fat.layout([("BIG", 200 << 20)], size=128 << 20)
    with pytest.raises(fat.LayoutError, match="not a FAT16"):
        fat.layout([("A", 1)], size=8 << 20)
    with pytest.raises(fat.LayoutError, match="cluster"):
        fat.layout([("A", 1)], cluster=3000)
    assert not fat.is_fat16(bytes(512)) and not fat.is_fat16(b"")
