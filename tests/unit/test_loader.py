"""netboot/loader.py on files standing in for a PC's disk and its boot partition (MBR and GPT): the
volume holds both loaders, read by tools we did not write (fsck.fat, mtools, sfdisk); what is read
back instead of fetched; and the crash rules, tried at every write a rewrite makes: a cut leaves a
disk whose UEFI firmware finds no file system or a complete one, whose BIOS flag is on only over a
complete SYSLINUX, and whose record never claims a form the disk does not show. The firmware itself
passing over a cut disk is tests/boot/test_uefi.py's (OVMF) and test_netboot_offline.py's (SeaBIOS)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov import boot, fat
from blockprov.errors import NetbootError
from blockprov.netboot import disk, loader
from tests.conftest import require_tool

MiB = 1 << 20
ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")
FAST = gzip.compress(os.urandom(MiB // 2 + 7), compresslevel=1, mtime=0)  # the initramfs's two parts
REST = gzip.compress(os.urandom(3 * MiB // 2 + 2), compresslevel=1, mtime=0)
FILES = {"kernel": os.urandom(3 * MiB + 5), "initrd": FAST + bytes(-len(FAST) % 4) + REST, boot.SHIM: b"MZshim" * 1000,
         boot.GRUB: os.urandom(MiB + 3), boot.MOK_MANAGER: b"MZmm" * 500}
CMDLINE = "console=ttyS0 blockprov.policy=restore blockprov.repo=http://r:1 initrd=initrd.img"


def ids(files: dict[str, bytes]) -> dict[str, str]:
    return {n: boot.split(x, n, lambda _i: None).id for n, x in files.items()}


def record(files: dict[str, bytes], cmdline: str = CMDLINE) -> dict[str, object]:
    i = ids(files)
    return loader.wanted(i["kernel"], i["initrd"], cmdline, {n: i[n] for n in boot.EFI_FILES if n in i})


def make_disk(tmp: Path, size: int, *, old_type: bool = False) -> tuple[disk.Disk, Path]:
    """A blank disk of ours as ``initialize`` leaves it (boot partition inactive, no file system);
    partition 1 is a file of its own (the kernel's partition device, standing in)."""
    dev, meta = tmp / "dev", tmp / "meta"
    dev.mkdir(parents=True)
    meta.mkdir()
    d = disk.Disk("vda", size, str(dev))
    with open(d.path, "wb") as f:
        f.truncate(size)
        if d.gpt:
            head, tail = disk.gpt(size, MiB, uuid.uuid4())
            if old_type:
                head = head[:1024] + disk.OLD_GPT_BOOT.bytes_le + head[1040:]
            f.seek(disk.tail_at(size // disk.SECTOR))
            f.write(tail)
            f.seek(0)
            f.write(head)
        else:
            m = bytearray(disk.mbr(size, MiB))
            if old_type:
                m[446 + 4] = disk.OLD_TYPE_BOOT
            f.write(m)
    with open(d.boot, "wb") as f:
        f.truncate(disk.BOOT_BYTES)
    return d, meta


def mcopy(part: str, path: str) -> bytes:
    return subprocess.run([require_tool("mcopy"), "-n", "-i", part, f"::{path}", "-"], capture_output=True,
                          env=ENV, timeout=60, check=True).stdout


def test_config_and_record() -> None:
    off = loader.offline_cmdline(CMDLINE + " BOOT_IMAGE=/vmlinuz")
    assert off == "console=ttyS0 blockprov.policy=restore blockprov.repo=http://r:1 blockprov.from=disk"
    assert loader.offline_cmdline(off) == off  # booted from the disk: the same line, so no rewrite
    assert loader.offline_cmdline("kernel " + CMDLINE) == off  # iPXE's EFI build names the image first
    assert loader.wanted("k", "i", CMDLINE) == loader.wanted("k", "i", off) == {
        "kernel": "k", "initrd": "i", "cmdline": off, "forms": ["bios"],
        "fingerprint": boot.disk_fingerprint("k", "i", off)}  # what the repository compares (every-day boot)
    both = loader.wanted("k", "i", CMDLINE, {boot.SHIM: "s", boot.GRUB: "g"})
    assert both["forms"] == ["bios", "uefi"] and both["efi"] == {boot.GRUB: "g", boot.SHIM: "s"}
    assert loader.comparable({**both, "at": {}}) == both
    cfg = loader.syslinux_cfg(off)
    assert "KERNEL /vmlinuz" in cfg and "INITRD /fast.img" in cfg and f"APPEND {off}\n" in cfg
    # a record from before the forms is the BIOS form; a form shows only while the disk shows it
    valid = fat.layout([("A", 1)]).boot
    assert loader.present_forms(True, bytes(512), {"kernel": "k"}) == ["bios"]
    assert loader.present_forms(False, valid, both) == ["uefi"] and loader.present_forms(True, valid, both) == [
        "bios", "uefi"]
    assert loader.present_forms(False, bytes(512), both) == []


@pytest.mark.parametrize("size", [2 << 30, 3 << 40], ids=["mbr", "gpt"])
def test_both_loaders_on_one_efi_system_partition(size: int, tmp_path: Path) -> None:
    d, meta = make_disk(tmp_path, size, old_type=True)  # typed as before the UEFI loader: it becomes an ESP
    want = record(FILES)
    assert loader.installed(d, meta) is None
    loader.install(d, meta, FILES, want)
    got = loader.installed(d, meta)
    assert loader.comparable(got) == want and got is not None and set(got["at"]) >= set(boot.VOLUME_PATHS.values())
    head = loader.head(d)
    code = (loader.GPTMBR_BIN if d.gpt else loader.MBR_BIN).read_bytes()[:440]
    parts = disk.partitions(head)
    assert head[:440] == code and parts[0][3] and parts[0][0] == (disk.GPT_BOOT if d.gpt else 0xEF)
    assert not d.gpt or disk.gpt_valid(head)
    table = json.loads(subprocess.run([require_tool("sfdisk"), "--json", d.path], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)["partitiontable"]
    assert table["partitions"][0]["type"].upper() in ("EF", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), table
    fsck = subprocess.run([require_tool("fsck.fat"), "-n", d.boot], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout
    assert mcopy(d.boot, "EFI/BOOT/BOOTX64.EFI") == FILES[boot.SHIM]
    assert mcopy(d.boot, "EFI/BOOT/grubx64.efi") == FILES[boot.GRUB]
    assert mcopy(d.boot, "vmlinuz") == FILES["kernel"] and mcopy(d.boot, "initrd.img") == FILES["initrd"]
    assert mcopy(d.boot, loader.FAST) == FAST and mcopy(d.boot, loader.REST) == REST  # SYSLINUX's every-day boot
    grub = mcopy(d.boot, boot.GRUB_CFG).decode()
    assert f"linux /vmlinuz {want['cmdline']}\n" in grub and "blockprov.from=disk" in grub
    assert mcopy(d.boot, "syslinux.cfg").decode() == loader.syslinux_cfg(str(want["cmdline"]))
    assert mcopy(d.boot, "ldlinux.sys")  # SYSLINUX installed itself into the same volume
    assert disk.read_head(d.boot, 512)[3:11] == b"SYSLINUX"


def test_files_in_place_are_read_back_not_fetched(tmp_path: Path) -> None:
    d, meta = make_disk(tmp_path, 2 << 30)
    loader.install(d, meta, FILES, record(FILES))
    have = loader.installed(d, meta)
    descriptors = {n: boot.split(x, n, lambda _i: None) for n, x in FILES.items()}
    assert loader.read_back(d, have, descriptors) == FILES
    # another command line: the same files, read back; another kernel: that one is not
    newer = {**FILES, "kernel": os.urandom(MiB)}
    back = loader.read_back(d, have, {n: boot.split(x, n, lambda _i: None) for n, x in newer.items()})
    assert "kernel" not in back and back["initrd"] == FILES["initrd"]
    # a file the disk damaged is not taken (its digests do not match): fetched again
    at = have["at"][boot.VOLUME_PATHS["initrd"]]  # type: ignore[index]
    with open(d.boot, "r+b") as f:
        f.seek(at[0] + MiB + 7)
        f.write(b"\0")
    assert "initrd" not in loader.read_back(d, have, descriptors)
    assert loader.read_back(d, None, descriptors) == {} and loader.read_back(d, {"kernel": "x"}, descriptors) == {}
    # a version without a UEFI loader: the BIOS form only
    bios = {"kernel": FILES["kernel"], "initrd": FILES["initrd"]}
    loader.install(d, meta, bios, record(bios))
    assert loader.installed(d, meta)["forms"] == ["bios"]  # type: ignore[index]
    with pytest.raises(subprocess.CalledProcessError):
        mcopy(d.boot, "EFI/BOOT/BOOTX64.EFI")


def test_a_failed_syslinux_leaves_the_bios_flag_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, meta = make_disk(tmp_path, 2 << 30)
    monkeypatch.setattr(loader, "SYSLINUX", "false")
    with pytest.raises(NetbootError, match="false"):
        loader.install(d, meta, FILES, record(FILES))
    assert not disk.partitions(loader.head(d))[0][3]
    assert loader.installed(d, meta)["forms"] == ["uefi"]  # type: ignore[index]  # complete for UEFI, not BIOS


class Log:
    """The writes an install makes, in order, to replay any prefix of them: a pwrite (which file,
    where, what), the record's atomic write, syslinux's run (its whole effect on the partition)."""

    def __init__(self, tmp: Path, d: disk.Disk) -> None:
        self.tmp, self.d = tmp, d
        self.events: list[tuple[Any, ...]] = []
        self.paths: dict[int, str] = {}

    @contextlib.contextmanager
    def recording(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        real_open, real_pwrite, real_write, real_run = os.open, os.pwrite, loader.atomic_write, loader._run

        def opened(path: Any, *a: Any, **k: Any) -> int:
            fd = real_open(path, *a, **k)
            self.paths[fd] = str(path)
            return fd

        def pwrite(fd: int, data: bytes, at: int) -> int:
            self.events.append(("pwrite", self.paths[fd], at, bytes(data)))
            return real_pwrite(fd, data, at)

        def atomic(path: Path, data: bytes) -> None:
            self.events.append(("record", bytes(data)))
            real_write(path, data)

        def run(*cmd: str) -> None:
            real_run(*cmd)
            snap = self.tmp / f"after-syslinux-{len(self.events)}"
            subprocess.run(["cp", "--sparse=always", self.d.boot, str(snap)], check=True)
            self.events.append(("syslinux", str(snap)))

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(loader, "atomic_write", atomic)
        monkeypatch.setattr(loader, "_run", run)
        try:
            yield
        finally:
            monkeypatch.undo()


def test_a_cut_at_any_write_of_a_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loader A installed, then rewritten to B (another kernel and command line); the rewrite is
    cut after each of its writes in turn. At every cut: the UEFI view (the volume's boot sector)
    is no file system, or B's complete volume; the BIOS flag is on only over B complete with
    SYSLINUX; ``installed`` names only forms the disk shows, and B's only once written whole."""
    d, meta = make_disk(tmp_path / "d", 2 << 30)
    files_a = FILES
    files_b = {**FILES, "kernel": os.urandom(2 * MiB + 1)}
    rec_a, rec_b = record(files_a), record(files_b, CMDLINE + " quiet")
    loader.install(d, meta, files_a, rec_a)
    before = tmp_path / "before"
    before.mkdir()
    for src in (d.path, d.boot):
        subprocess.run(["cp", "--sparse=always", src, str(before)], check=True)
    shutil.copytree(meta, before / "meta")
    log = Log(tmp_path, d)
    with log.recording(monkeypatch):
        loader.install(d, meta, files_b, rec_b)
    _vol, content = loader.volume(files_b, rec_b)
    kinds = [e[0] for e in log.events]
    assert kinds.count("syslinux") == 1 and kinds.count("record") == 1 and len(kinds) > 20
    zeroed = next(i for i, e in enumerate(log.events) if e[0] == "pwrite" and e[1] == d.boot and e[2] == 0) + 1
    cut = tmp_path / "cut"  # the disk as the cut after n writes leaves it: one more write each round
    (cut / "dev").mkdir(parents=True)
    c = disk.Disk("vda", d.size, str(cut / "dev"))
    for src in (d.path, d.boot):
        subprocess.run(["cp", "--sparse=always", str(before / Path(src).name), str(cut / "dev")], check=True)
    shutil.copytree(before / "meta", cut / "meta")
    for n in range(len(log.events) + 1):
        if n:
            ev = log.events[n - 1]
            if ev[0] == "pwrite":
                with open(cut / "dev" / Path(ev[1]).name, "r+b") as f:
                    f.seek(ev[2])
                    f.write(ev[3])
            elif ev[0] == "record":
                (cut / "meta" / loader.RECORD).write_bytes(ev[1])
            else:
                shutil.copyfile(ev[1], c.boot)
        sector = disk.read_head(c.boot, 512)
        active = disk.partitions(loader.head(c))[0][3]
        have = loader.installed(c, cut / "meta")
        if fat.is_fat16(sector):  # a UEFI firmware sees a file system: A's untouched, or B's whole
            if n < zeroed:  # only the BIOS flag went off yet
                assert mcopy(c.boot, "vmlinuz") == files_a["kernel"] and loader.comparable(
                    {**(have or {}), "forms": rec_a["forms"]}) == rec_a, n
                assert active == (n == 0), n
                continue
            for path, data in content.items():
                assert mcopy(c.boot, path) == data, (n, path)
            assert loader.comparable(have) is not None and have is not None and "uefi" in have["forms"]
            assert {k: v for k, v in have.items() if k not in ("at", "forms")} == {
                k: v for k, v in rec_b.items() if k != "forms"}, n
        else:
            assert have is None or have["forms"] == ["bios"], n
        if active:  # the BIOS boots SYSLINUX: A's before the rewrite began, B's once it ended
            assert n in (0, len(log.events)) and mcopy(c.boot, "ldlinux.sys"), n
        assert (loader.comparable(have) == rec_b) == (n == len(log.events)), n
