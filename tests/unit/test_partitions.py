"""partitions.py: partition tables read as sfdisk and sgdisk (tools we did not write) write them,
malformed ones read as "no table", and the choice of what an instance may keep when it moves to
another version (invariant 8). The update itself on real file systems: tests/interop/test_keep.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockprov.partitions import NONE, SECTOR, Partition, Table, plan_keep, read_table
from tests.conftest import require_tool

MiB = 1 << 20
CS = 64 << 10


def reader(path: Path) -> tuple[object, int]:
    data = path.read_bytes()
    return (lambda off, n: data[off:off + n]), len(data)


def sfdisk_view(path: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of each partition, as sfdisk reads the table."""
    out = json.loads(subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True,
                                    check=True).stdout)
    return sorted((p["start"] * SECTOR, p["size"] * SECTOR) for p in out["partitiontable"]["partitions"]
                  if p.get("type") not in ("5", "f", "85"))


def test_mbr_with_logical_partitions_as_sfdisk_writes_it(tmp_path: Path) -> None:
    require_tool("sfdisk")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(64 * MiB))
    script = "label: dos\n,8M,83\n,8M,b\n,4M,83\n,,E\n,10M,83\n,12M,82\n"  # 4: extended, 5 and 6 in it
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True, capture_output=True)
    read, size = reader(disk)
    t = read_table(read, size)  # type: ignore[arg-type]
    assert t.kind == "mbr"
    assert [(p.start, p.size) for p in t.partitions] == sfdisk_view(disk)
    assert [(p.number, p.type) for p in t.partitions] == [(1, "0x83"), (2, "0x0b"), (3, "0x83"), (5, "0x83"),
                                                          (6, "0x82")]


def test_gpt_as_sgdisk_writes_it_and_its_backup(tmp_path: Path) -> None:
    require_tool("sgdisk")
    disk = tmp_path / "g.img"
    disk.write_bytes(bytes(64 * MiB))
    subprocess.run(["sgdisk", "-n", "1:2048:+16M", "-t", "1:ef00", "-n", "2:0:+20M", "-t", "2:8300",
                    "-n", "3:0:0", "-t", "3:8302", str(disk)], check=True, capture_output=True)
    read, size = reader(disk)
    t = read_table(read, size)  # type: ignore[arg-type]
    assert t.kind == "gpt" and [(p.start, p.size) for p in t.partitions] == sfdisk_view(disk)
    assert t.partitions[0].type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # EFI system
    assert t.partitions[2].type == "933ac7e1-2eb4-4f13-b844-0e14e2aef915"  # Linux /home
    # a primary header whose CRC fails: the backup at the disk's end is read
    raw = bytearray(disk.read_bytes())
    raw[SECTOR + 100] ^= 0xFF  # inside the header's reserved tail, covered by its CRC
    raw[SECTOR + 24] ^= 0x01  # my_lba: breaks the header CRC
    t2 = read_table(lambda off, n: bytes(raw[off:off + n]), size)
    assert t2 == t
    raw[-SECTOR + 16] ^= 0xFF  # the backup's CRC too: no table (nothing is kept), said why
    t3 = read_table(lambda off, n: bytes(raw[off:off + n]), size)
    assert t3.kind == "none" and "CRC" in t3.why


def test_whole_disk_file_systems_have_no_table(tmp_path: Path) -> None:
    require_tool("mkfs.ext4")
    require_tool("mkfs.vfat")
    for mkfs in (["mkfs.ext4", "-q", "-F"], ["mkfs.vfat"]):
        disk = tmp_path / "w.img"
        disk.write_bytes(bytes(32 * MiB))
        subprocess.run([*mkfs, str(disk)], check=True, capture_output=True)
        read, size = reader(disk)
        t = read_table(read, size)  # type: ignore[arg-type]
        assert t.kind == "none" and t.partitions == (), (mkfs, t)


def mbr(*entries: tuple[int, int, int, int], sig: bool = True) -> bytes:
    """Sector 0 with (status, type, first LBA, sectors) entries."""
    s = bytearray(SECTOR)
    for n, (status, ptype, lba, count) in enumerate(entries):
        o = 446 + 16 * n
        s[o], s[o + 4] = status, ptype
        s[o + 8:o + 12] = lba.to_bytes(4, "little")
        s[o + 12:o + 16] = count.to_bytes(4, "little")
    if sig:
        s[510:512] = b"\x55\xaa"
    return bytes(s)


@pytest.mark.parametrize("sector0, why", [
    (mbr((0, 0x83, 2048, 4096), sig=False), "no partition table"),
    (mbr((0x12, 0x83, 2048, 4096)), "no partition table"),  # boot code where a status byte must be
    (mbr((0, 0x83, 2048, 1 << 30)), "outside the disk"),
    (mbr((0, 0x83, 2048, 4096), (0, 0x83, 4000, 4096)), "overlap"),
    (mbr((0, 0x83, 0, 4096)), "outside the disk"),  # over the table itself
    (mbr((0, 0x05, 2048, 8192)), "logical partitions"),  # an extended partition whose record is not one
])
def test_malformed_tables_read_as_none(sector0: bytes, why: str) -> None:
    disk = sector0 + bytes(16 * MiB - SECTOR)
    t = read_table(lambda off, n: disk[off:off + n], len(disk))
    assert t.kind == "none" and why in t.why, t


def test_an_extended_chain_that_loops_reads_as_none() -> None:
    ebr = bytearray(mbr((0, 0x83, 2048, 100), (0, 0x05, 0, 4096)))  # links to itself
    disk = bytearray(mbr((0, 0x05, 2048, 8192)) + bytes(16 * MiB - SECTOR))
    disk[2048 * SECTOR:2049 * SECTOR] = ebr
    t = read_table(lambda off, n: bytes(disk[off:off + n]), len(disk))
    assert t.kind == "none" and "malformed" in t.why


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.integers(min_value=0, max_value=1 << 40))
def test_garbage_never_raises(head: bytes, size: int) -> None:
    t = read_table(lambda off, n: head[off:off + n], size)
    assert t.kind in ("mbr", "gpt", "none")
    for p in t.partitions:
        assert p.start >= SECTOR and p.end <= size


# -- what may be kept ------------------------------------------------------------------------------
def part(n: int, start_mib: int, size_mib: int, ptype: str = "0x83") -> Partition:
    return Partition(n, start_mib * MiB, size_mib * MiB, ptype)


SYSTEM, DATA = part(1, 1, 30), part(2, 31, 33)
TWO = Table("mbr", (SYSTEM, DATA))
DISK = 64 * MiB


def chunks(p: Partition) -> range:
    return range(p.start // CS, p.end // CS)


def test_a_user_data_partition_the_update_leaves_alone_is_kept() -> None:
    sys_mod, data_mod = [chunks(SYSTEM)[3], chunks(SYSTEM)[9]], [chunks(DATA)[0], chunks(DATA)[40]]
    plan = plan_keep(TWO, TWO, TWO, CS, DISK, changed=[chunks(SYSTEM)[9], chunks(SYSTEM)[100]],
                     modified=[0, *sys_mod, *data_mod])  # chunk 0: the session wrote the table's sector
    assert plan.keep == frozenset(data_mod) and plan.drop == (0, *sys_mod)
    assert [(p.partition.number, p.kept, p.modified) for p in plan.partitions] == [(1, False, 2), (2, True, 2)]
    assert "changes 2 chunk(s)" in plan.partitions[0].why and plan.kept_partitions == (2,)
    assert "partition 2" in plan.summary() and "kept" in plan.summary()


def test_nothing_is_kept_without_a_table_or_where_the_table_moved() -> None:
    data_mod = [chunks(DATA)[1]]
    plan = plan_keep(NONE, NONE, NONE, CS, DISK, changed=[], modified=data_mod)
    assert plan.kind == "none" and not plan.keep and "whole-disk" in plan.summary()
    grown = Table("mbr", (SYSTEM, part(2, 31, 32)))  # the new version resized the data partition
    assert not plan_keep(TWO, grown, TWO, CS, DISK, [], data_mod).keep
    retyped = Table("mbr", (SYSTEM, part(2, 31, 33, "0x07")))
    assert not plan_keep(TWO, retyped, TWO, CS, DISK, [], data_mod).keep
    plan = plan_keep(TWO, TWO, Table("mbr", (SYSTEM,)), CS, DISK, [], data_mod)  # the session deleted it
    assert not plan.keep and "session changed the partition table" in plan.partitions[1].why
    assert plan_keep(TWO, TWO, TWO, CS, DISK, [], data_mod).keep == frozenset(data_mod)


def test_a_chunk_shared_with_a_partition_that_is_reset_spoils_the_partition() -> None:
    """4 MiB chunks over partitions that meet mid-chunk: keeping the shared chunk would lay the
    session's bytes over the reset partition, resetting it would revert part of the kept one."""
    big = 4 * MiB
    a, b = Partition(1, 1 * MiB, 9 * MiB, "0x83"), Partition(2, 10 * MiB, 22 * MiB, "0x83")  # meet inside chunk 2
    t = Table("mbr", (a, b))
    size = 32 * MiB
    plan = plan_keep(t, t, t, big, size, changed=[0], modified=[2, 5])  # partition 1 changes (chunk 0)
    assert not plan.keep and plan.drop == (2, 5)
    assert "shares with a region that is reset" in plan.partitions[1].why
    plan = plan_keep(t, t, t, big, size, changed=[0], modified=[5])  # the shared chunk untouched: b kept
    assert plan.keep == frozenset({5})
