"""The pure parts of running-VM clones: the template manifest, the checks a clone makes against it
(machine, host memory, files), qemu's command line and the host's memory figures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockprov.errors import CannotWrite, NotEnoughMemory, NotFound, TemplateDamaged, TemplateMismatch
from blockprov.vm import qemu
from blockprov.vm import template as tpl

MACHINE = qemu.Machine(qemu_version="7.2.22", machine="pc-i440fx-7.2", memory=256 << 20, cpus=1,
                       extra_args=("-device", "virtio-rng-pci"), kernel=True, append="console=ttyS0 bp.mode=counter")
TYPES = {"pc": "pc-i440fx-7.2", "pc-i440fx-7.2": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}


def make(tmp_path: Path, memory: bytes = b"m" * 4096, state: bytes = b"s" * 100) -> tuple[tpl.Template, Path]:
    d = tmp_path / "tpl"
    d.mkdir()
    (d / tpl.MEMORY).write_bytes(memory)
    (d / tpl.STATE).write_bytes(state)
    t = tpl.Template(name="tpl", machine=MACHINE, image="lab", version="ab" * 8,
                     memory_file=tpl.seal(d / tpl.MEMORY), state_file=tpl.seal(d / tpl.STATE), from_vm="app",
                     created=1.0)
    (d / tpl.MANIFEST).write_bytes(t.to_json())
    return t, d


def test_manifest_round_trips(tmp_path: Path) -> None:
    t, d = make(tmp_path)
    assert tpl.load(d) == t
    assert (d / tpl.MEMORY).stat().st_mode & 0o222 == 0  # sealed: read-only
    assert tpl.seal(d / tpl.MEMORY, tpl.MEMORY_MODE) == t.memory_file
    assert (d / tpl.MEMORY).stat().st_mode & 0o777 == 0o644  # qemu 7.2 opens it O_RDWR: its owner may


def test_who_may_map_the_memory_file() -> None:
    p = Path("/t/memory")
    assert tpl.memory_refusal(p, 0o100644, 1000, 1000, uid=1000, gids={1000}) is None  # its owner
    assert tpl.memory_refusal(p, 0o100444, 0, 0, uid=0, gids={0}) is None  # root ignores the mode
    why = tpl.memory_refusal(p, 0o100444, 1000, 1000, uid=1000, gids={1000})  # sealed 0444 (before)
    assert why is not None and "read and write" in why and "mode 444" in why
    assert tpl.memory_refusal(p, 0o100644, 0, 0, uid=1000, gids={1000}) is not None  # root's template
    assert tpl.memory_refusal(p, 0o100664, 0, 50, uid=1000, gids={50}) is None  # through its group
    assert tpl.memory_refusal(p, 0o100666, 0, 0, uid=1000, gids=set()) is None


def test_clone_refuses_a_memory_file_it_could_not_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _t, d = make(tmp_path)  # memory sealed 0444, as the first templates were
    monkeypatch.setattr(tpl.os, "geteuid", lambda: 1000)
    with pytest.raises(CannotWrite, match="qemu opens a template's memory file read and write") as e:
        tpl.check_memory_access(d / tpl.MEMORY)
    assert e.value.exit_code == 13


def test_unreadable_or_unknown_manifest_is_damaged(tmp_path: Path) -> None:
    _t, d = make(tmp_path)
    (d / tpl.MANIFEST).write_text("{not json")
    with pytest.raises(TemplateDamaged, match="unreadable"):
        tpl.load(d)
    (d / tpl.MANIFEST).write_text('{"format": 99}')
    with pytest.raises(TemplateDamaged, match="format"):
        tpl.load(d)
    with pytest.raises(NotFound):
        tpl.load(tmp_path / "none")


def test_files_are_verified(tmp_path: Path) -> None:
    t, d = make(tmp_path)
    tpl.verify_files(t, d)
    mem = d / tpl.MEMORY
    mem.chmod(0o644)
    mem.write_bytes(b"m" * 4095 + b"x")
    with pytest.raises(TemplateDamaged, match="BLAKE3"):
        tpl.verify_files(t, d)
    mem.write_bytes(b"m" * 100)
    with pytest.raises(TemplateDamaged, match="100 bytes"):
        tpl.verify_files(t, d)
    mem.unlink()
    with pytest.raises(TemplateDamaged, match="missing"):
        tpl.verify_files(t, d)


def test_the_clones_machine_must_be_the_templates(tmp_path: Path) -> None:
    t, _d = make(tmp_path)
    tpl.check_machine(t, qemu_version="7.2.22", machine_types=TYPES)
    tpl.check_machine(t, qemu_version="7.2.22", machine_types=TYPES, memory=256 << 20, cpus=1,
                      extra_args=("-device", "virtio-rng-pci"))
    cases = [({"qemu_version": "8.0.0"}, "made by qemu 7.2.22"),
             ({"machine_types": {"pc": "pc-i440fx-8.0"}}, "no machine type pc-i440fx-7.2"),
             ({"memory": 512 << 20}, "memory is 256.0 MiB"),
             ({"cpus": 2}, "1 CPU"),
             ({"extra_args": ()}, "qemu arguments")]
    for change, why in cases:
        kw = {"qemu_version": "7.2.22", "machine_types": TYPES, **change}
        with pytest.raises(TemplateMismatch, match=why):
            tpl.check_machine(t, **kw)  # type: ignore[arg-type]


def test_host_memory_is_checked_for_every_clone(tmp_path: Path) -> None:
    t, _d = make(tmp_path)
    per = (256 << 20) + tpl.CLONE_OVERHEAD
    tpl.check_host_memory(t, 3, 3 * per)
    with pytest.raises(NotEnoughMemory, match="3 clone"):
        tpl.check_host_memory(t, 3, 3 * per - 1)
    assert qemu.mem_available("MemTotal: 10 kB\nMemAvailable:   2048 kB\n") == 2 << 20


def test_command_line_shares_or_maps_privately(tmp_path: Path) -> None:
    w = qemu.Wiring(dir=tmp_path / "vm1", disk_uri="nbd+unix:///vm1?socket=/s", mac="52:54:00:00:00:01",
                    memory_path=tmp_path / "memory", share=True, incoming=False, kernel=Path("/k"), initrd=Path("/i"))
    cmd = " ".join(qemu.command(MACHINE, w))
    assert "share=on" in cmd and "accel=tcg" in cmd and "memory-backend=ram" in cmd and "-incoming" not in cmd
    assert "vmgenid" in cmd and "mac=52:54:00:00:00:01" in cmd and cmd.endswith("-device virtio-rng-pci")
    cmd = " ".join(qemu.command(MACHINE, replace(w, share=False, incoming=True)))
    assert "share=off" in cmd and "-S -incoming defer" in cmd
    assert len(qemu.new_mac(set())) == 17


def test_smaps_figures_of_one_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smaps = ("7f00-7f10 rw-p 00000000 08:01 12 /t/memory\nRss: 100 kB\nPss: 40 kB\nShared_Clean: 80 kB\n"
             "Private_Dirty: 20 kB\n7f20-7f30 rw-p 00000000 00:00 0 \nRss: 999 kB\nPss: 999 kB\n")
    real = Path.read_text

    def fake(self: Path, *a: object, **k: object) -> str:
        return smaps if str(self) == "/proc/1/smaps" else real(self, *a, **k)  # type: ignore[arg-type]
    monkeypatch.setattr(Path, "read_text", fake)
    assert qemu.mapping_figures(1, Path("/t/memory")) == {"rss": 100 << 10, "pss": 40 << 10, "shared": 80 << 10,
                                                          "private": 20 << 10}


def test_a_lazy_mount_as_a_user_needs_fusermount3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockprov.vm import lazy

    monkeypatch.setattr(lazy.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(lazy.shutil, "which", lambda name: None)
    with pytest.raises(CannotWrite, match=r"fusermount3.*fuse3") as e:
        lazy.mount(tmp_path / "mnt", "nbd+unix:///x?socket=/nonexistent", 4096)
    assert e.value.exit_code == 13 and not (tmp_path / "mnt").exists()  # refused before anything is made
