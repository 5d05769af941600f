"""The native data path's pure parts (netboot/dm.py tables and status lines, netboot/cowstore.py,
netboot/native.py's geometry, netboot/nbdlink.py's netlink codec) and the cache's steps for writes
made past it (``mark_written``, ``mark_rewritten``, a snapshot reading its point in time elsewhere).

The kernel side (device-mapper, dm-era, the NBD netlink family) runs in the boot tests
(tests/boot/test_netboot_native.py): the host kernel has neither dm-era nor nbd.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from blockprov import codec
from blockprov.agent import lifecycle
from blockprov.device.base import result_bytes
from blockprov.errors import DeviceMapperError, NetlinkError
from blockprov.imaging.importer import import_image
from blockprov.netboot import cowstore, dm, nbdlink, resident
from blockprov.netboot.native import ERA_BLOCK, STORE_CHUNK, Geometry, Part, era_meta_bytes
from blockprov.repo.local import LocalRepository
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.conftest import make_image

CS = 64 << 10
SIZE = 4 << 20  # 64 chunks


# -- tables and status lines --------------------------------------------------------------------------
def test_tables_name_devices_by_number_and_join_pieces() -> None:
    t = dm.concat([("254:3", 0, 2048), ("254:4", 4096, 0), ("254:4", 8192, 1000)])
    assert t == "0 2048 linear 254:3 0\n2048 1000 linear 254:4 8192"
    assert dm.table_length(t) == 3048
    assert dm.snapshot(100, "254:4", "253:0", 128) == "0 100 snapshot 254:4 253:0 P 128"
    assert dm.snapshot(100, "254:4", "254:3", 128, persistent=False).endswith(" N 128")
    assert dm.era(100, "7:0", "253:1", 2048) == "0 100 era 7:0 253:1 2048"


def test_snapshot_status_lines() -> None:
    st = dm.parse_snapshot_status("0 2097152 snapshot 17664/131072 256")
    assert st.valid and (st.used, st.size, st.meta) == (17664, 131072, 256) and not st.merged
    assert dm.parse_snapshot_status("0 2097152 snapshot-merge 256/262144 256").merged
    bad = dm.parse_snapshot_status("0 2097152 snapshot Invalid")
    assert not bad.valid and bad.why == "Invalid"
    with pytest.raises(DeviceMapperError):
        dm.parse_snapshot_status("0 100 linear 254:4 0")


def test_era_status_and_invalidate_output() -> None:
    assert dm.parse_era_status("0 2097152 era 8 13/4096 3 19") == dm.EraStatus(era=3, held=19)
    assert dm.parse_era_status("0 2097152 era 8 10/4096 1 -").held is None
    xml = ('<blocks>\n  <block block="0"/>\n  <range begin="124" end = "126"/>\n  <block block="1600"/>\n'
           '</blocks>\n')
    assert dm.parse_era_blocks(xml) == [(0, 1), (124, 126), (1600, 1601)]
    assert dm.parse_era_blocks("<blocks>\n</blocks>\n") == []
    with pytest.raises(DeviceMapperError):
        dm.parse_era_blocks("era_invalidate: bad checksum")
    # 16 chunks of 64 KiB in a 1 MiB era block; chunks past the image are left out
    assert dm.chunks_of_blocks([(1, 2), (3, 4)], 16, 60) == [*range(16, 32), *range(48, 60)]


# -- the restore store's table -------------------------------------------------------------------------
def store_bytes(entries: list[tuple[int, int]], chunk_sectors: int = 8, *, valid: int = 1) -> bytes:
    """A dm-snapshot persistent store with ``entries`` (old, new) in its areas, as the kernel lays it."""
    cb = chunk_sectors * 512
    per = cb // 16
    areas = max(1, -(-(len(entries) + 1) // per))
    out = bytearray(cb * (1 + areas * (per + 1)))
    struct.pack_into("<IIII", out, 0, cowstore.MAGIC, valid, 1, chunk_sectors)
    for k, (old, new) in enumerate(entries):
        area, slot = divmod(k, per)
        struct.pack_into("<QQ", out, (1 + area * (per + 1)) * cb + slot * 16, old, new)
    return bytes(out)


def test_the_store_table_is_read_across_areas_and_ends_at_its_first_empty_entry() -> None:
    cb = 8 * 512  # 256 entries an area
    entries = [(1000 + k, 2 + k) for k in range(300)]  # spills into the second area
    raw = store_bytes(entries)
    store = cowstore.read_store(raw[:512], lambda n: raw[n * cb:(n + 1) * cb])
    assert store.formatted and store.valid and store.chunk_sectors == 8
    assert store.chunks == tuple(1000 + k for k in range(300))
    # dm-snapshot chunks of 4 KiB within the cache's 64 KiB chunks
    assert cowstore.cache_chunks(store, CS, 100) == sorted({(1000 + k) * 4096 // CS for k in range(300)})
    assert cowstore.cache_chunks(store, CS, 70) == list(range(62, 70))  # those of the image only
    invalid = cowstore.read_store(store_bytes(entries[:5], valid=0)[:512], lambda n: raw[n * cb:(n + 1) * cb])
    assert invalid.formatted and not invalid.valid
    assert not cowstore.read_store(bytes(512), lambda n: b"").formatted  # a dropped store
    assert not cowstore.read_store(b"BLOCKPROV-RESERVE\n" + bytes(494), lambda n: b"").formatted


def test_a_corrupt_store_cannot_loop() -> None:
    cb = 8 * 512
    head = struct.pack("<IIII", cowstore.MAGIC, 1, 1, 8)
    full = struct.pack("<QQ", 7, 9) * (cb // 16)  # never an empty entry
    store = cowstore.read_store(head, lambda n: full, limit=1000)
    assert len(store.chunks) <= 1000 + cb // 16


# -- geometry ------------------------------------------------------------------------------------------
def test_the_restore_store_is_the_reserve_then_the_room_past_the_image() -> None:
    g = Geometry(Part("vda4", "254:4", 5_000_000), Part("vda3", "254:3", 262144), image=2_097_152, chunk=CS)
    assert g.tail == 2_097_152 and g.chunk_sectors == 128 and g.per_era_block == ERA_BLOCK // CS
    assert g.cow_table() == "0 262144 linear 254:3 0\n262144 2902016 linear 254:4 2097152"
    tight = Geometry(Part("vda4", "254:4", 2_097_200), Part("vda3", "254:3", 2048), image=2_097_152, chunk=CS)
    assert tight.cow_table() == "0 2048 linear 254:3 0"  # no whole MiB past the image
    # the store's chunk is 1 MiB (STORE_CHUNK): a 1 MiB request stays one through the snapshot
    assert g.store_sectors == STORE_CHUNK // 512 == 2048
    assert g.restore_table("253:0") == "0 2097152 snapshot 254:4 253:0 P 2048"
    assert g.merge_table("253:0") == "0 2097152 snapshot-merge 254:4 253:0 P 2048"
    big = Geometry(Part("vda4", "254:4", 5_000_000), Part("vda3", "254:3", 262144), image=2_097_152, chunk=4 << 20)
    assert big.store_sectors == 8192  # never smaller than the cache's chunk
    assert era_meta_bytes(1 << 30) == 8 << 20 and era_meta_bytes(2 << 40) > 32 << 20


def test_a_running_keep_root_moves_onto_a_snapshot_origin_and_back_with_its_record() -> None:
    """keep's root is era straight over the partition; a point in time moves it onto bp-data
    (a snapshot-origin) for the snapshot only: same metadata device, length and block."""
    g = Geometry(Part("vda4", "254:4", 5_000_000), Part("vda3", "254:3", 262144), image=2_097_152, chunk=CS)
    assert g.era_table("7:0") == "0 2097152 era 7:0 254:4 2048"
    live = "0 2097152 era 7:0 254:4 2048"
    assert dm.parse_era_table(live) == dm.EraTable(2_097_152, "7:0", "254:4", 2048)
    S = dm.Step
    on = g.pit_on_steps(live)
    assert on == [S("suspend", "bp-root"), S("create", "bp-pit", "0 2097152 snapshot 254:4 254:3 N 128"),
                  S("create", "bp-data", "0 2097152 snapshot-origin 254:4"),
                  S("reload", "bp-root", "0 2097152 era 7:0 <bp-data> 2048"), S("resume", "bp-root")]
    assert dm.resolve(on[3].table, {"bp-data": "253:2"}) == "0 2097152 era 7:0 253:2 2048"
    # the snapshot's pit made before its origin (the origin finds its snapshots as it resumes),
    # both while the root is suspended: no write reaches the partition between them
    off = g.pit_off_steps("0 2097152 era 7:0 253:2 2048")
    assert off == [S("suspend", "bp-root"), S("reload", "bp-root", live), S("resume", "bp-root")]
    for bad in ("0 100 linear 254:4 0", "0 100 era 7:0 254:4", "8 100 era 7:0 254:4 2048"):
        with pytest.raises(DeviceMapperError):
            dm.parse_era_table(bad)


FAKE_DMSETUP = """#!/bin/sh
# records each call; "info" answers a number; the call matching $FAKE_FAIL fails
echo "$*" >>"$FAKE_LOG"
case "$1" in create|reload) cat >/dev/null ;; esac
if [ -n "$FAKE_FAIL" ] && [ "$*" = "$FAKE_FAIL" ]; then
    echo "device-mapper: $1 ioctl failed: Invalid argument" >&2; exit 1
fi
[ "$1" = info ] && echo "253:9"
exit 0
"""


@pytest.mark.parametrize("fail", [None, "create bp-data", "reload bp-root", "resume bp-root"])
def test_a_failed_swap_never_leaves_the_root_suspended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fail: str | None) -> None:
    """``Mapper.apply`` (through a stand-in ``dmsetup`` that records its calls): whatever step
    fails, the root is resumed (its file system is not left frozen), a table loaded but not live
    is cleared first, and the devices the steps made are removed."""
    fake = tmp_path / "dmsetup"
    fake.write_text(FAKE_DMSETUP)
    fake.chmod(0o755)
    log = tmp_path / "log"
    monkeypatch.setattr(dm, "DMSETUP", str(fake))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", fail or "")
    g = Geometry(Part("vda4", "254:4", 5_000_000), Part("vda3", "254:3", 262144), image=2_097_152, chunk=CS)
    m = dm.Mapper(str(tmp_path))
    if fail is None:
        m.apply(g.pit_on_steps("0 2097152 era 7:0 254:4 2048"))
    else:
        with pytest.raises(DeviceMapperError, match="Invalid argument"):
            m.apply(g.pit_on_steps("0 2097152 era 7:0 254:4 2048"))
    calls = [c for c in log.read_text().splitlines() if not c.startswith(("info", "mknodes"))]
    head = ["suspend bp-root", "create bp-pit", "create bp-data", "reload bp-root", "resume bp-root"]
    after = {None: [],
             "create bp-data": ["resume bp-root", "remove bp-pit"],  # bp-data was never made
             "reload bp-root": ["resume bp-root", "remove bp-data", "remove bp-pit"],
             "resume bp-root": ["clear bp-root", "resume bp-root", "remove bp-data", "remove bp-pit"]}[fail]
    upto = head.index(fail) + 1 if fail else len(head)
    assert calls == head[:upto] + after


# -- netlink -------------------------------------------------------------------------------------------
def test_netlink_requests_and_replies_round_trip() -> None:
    req = nbdlink.encode(0x1A, nbdlink.CMD_CONNECT, nbdlink.u32(nbdlink.ATTR_INDEX, 0) + nbdlink.sockets([5, 6]), 3)
    (msg,) = list(nbdlink.messages(req))
    assert (msg.kind, msg.seq, msg.command) == (0x1A, 3, nbdlink.CMD_CONNECT)
    a = msg.attrs()
    assert struct.unpack("=I", a[nbdlink.ATTR_INDEX])[0] == 0
    items = [dict(nbdlink.attributes(v)) for _k, v in nbdlink.attributes(a[nbdlink.ATTR_SOCKETS])]
    assert [struct.unpack("=I", i[nbdlink.SOCK_FD])[0] for i in items] == [5, 6]
    err = struct.pack("=IHHII", 36, nbdlink.NLMSG_ERROR, 0, 3, 0) + struct.pack("=i", -22) + bytes(16)
    (e,) = list(nbdlink.messages(err))
    assert e.error == 22
    grp = (nbdlink.attr(nbdlink.CTRL_ATTR_MCAST_GRP_NAME, b"nbd_mc_group\0")
           + nbdlink.u32(nbdlink.CTRL_ATTR_MCAST_GRP_ID, 9))
    fam = nbdlink.attr(nbdlink.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x1A)) + nbdlink.attr(
        nbdlink.CTRL_ATTR_MCAST_GROUPS, nbdlink.attr(1, grp, nested=True), nested=True)
    (r,) = list(nbdlink.messages(nbdlink.encode(0x10, 1, fam, 1)))
    assert nbdlink.family_of(r) == (0x1A, {"nbd_mc_group": 9})
    with pytest.raises(NetlinkError):
        list(nbdlink.attributes(b"\x40\x00\x01\x00"))  # an attribute longer than its message


# -- writes made past the cache --------------------------------------------------------------------------
@pytest.fixture
def golden(tmp_path: Path) -> Any:
    repo = LocalRepository(tmp_path / "repo")
    src = make_image(tmp_path / "g.img", SIZE, seed=7, data_fraction=0.8, pattern_every=CS)
    import_image(repo, src, "lab:v1")
    yield repo, src
    repo.close()


def write_past(cache_dir: Path, chunk: int, data: bytes) -> None:
    """What the kernel does on the native path: the data file written, the cache not told."""
    fd = os.open(cache_dir / "data", os.O_WRONLY)
    try:
        os.pwrite(fd, data, chunk * CS)
    finally:
        os.close(fd)


def test_mark_written_marks_what_differs_from_the_base_and_survives_a_restart(golden: Any, tmp_path: Path) -> None:
    repo, src = golden
    m = repo.resolve("lab:v1")
    base = src.read_bytes()

    async def main() -> None:
        c = tmp_path / "c"
        dev = await open_cache(c, repo, m)
        await dev.fetch_chunks(list(range(m.count)))
        await lifecycle.snapshot(dev, repo, "lab:s0")  # a target exists: marks make chunks unsynced for it
        zero = next(i for i in range(m.count) if m.is_zero(i))
        write_past(c, 3, b"\x5a" * CS)
        write_past(c, zero, b"\x01" * CS)  # a zero chunk of the image gets data
        write_past(c, 5, base[5 * CS:6 * CS])  # written back as it was
        marked = await dev.mark_written([3, 4, 5, 6, zero])  # an era block covers more than was written
        assert marked == sorted([3, zero])
        ch = dev.chunks
        assert ch.modified(3) and ch.present(3) and ch.modified(zero) and not ch.zero(zero)
        assert not ch.modified(5) and not ch.modified(4)
        assert sorted(ch.unsynced_chunks("default")) == sorted([3, zero])
        got = b"".join([result_bytes(await dev.read(i * CS, CS)) for i in (3, zero)])
        assert got == b"\x5a" * CS + b"\x01" * CS
        await dev.close()
        dev = await open_cache(c, repo)  # journaled: the marks are there after a restart
        assert dev.chunks.modified_chunks() == sorted([3, zero])
        await dev.close()

    asyncio.run(main())


def test_a_snapshot_of_writes_past_the_cache_is_point_in_time(golden: Any, tmp_path: Path) -> None:
    """netboot/native.py's snapshot: the content is read from a point-in-time view elsewhere, and
    chunks written after that point are marked rewritten before the acknowledgement: they stay
    unsynced, the others are synced."""
    repo, _src = golden
    m = repo.resolve("lab:v1")

    async def main() -> None:
        c = tmp_path / "c"
        dev = await open_cache(c, repo, m)
        await dev.fetch_chunks(list(range(m.count)))
        for i in (2, 9):
            write_past(c, i, bytes([i]) * CS)
        await dev.mark_written([2, 9])
        frozen = {i: bytes([i]) * CS for i in (2, 9)}  # the point in time

        async def read(indices: list[int]) -> list[bytes]:
            return [frozen[i] for i in indices]

        async def later() -> None:  # chunk 9 written again after the point in time
            write_past(c, 9, b"\xee" * CS)
            await dev.mark_rewritten([9, 30])  # 30 is not modified: nothing to do for it

        out = to_dict(await lifecycle.snapshot(dev, repo, "lab:s1", read=read, before_acknowledge=later))
        assert out["chunks_modified"] == 2 and out["chunks_written_during"] == 1
        assert dev.chunks.unsynced_chunks("default") == [9] and not dev.chunks.modified(30)
        new = repo.resolve("lab:s1")
        assert new.digest_at(9) == codec.digest(bytes([9]) * CS)  # the point in time, not the later write
        await dev.close()

    asyncio.run(main())


def test_the_resident_agent_converts_only_while_the_machine_is_quiet(tmp_path: Path) -> None:
    stat, dstat = tmp_path / "stat", tmp_path / "dstat"
    stat.write_text("cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 100 5 50 1000 20 1 2 3 0 0\nintr 1\n")
    dstat.write_text("1 0 2 3 4 0 5 6 0 700 800 0 0 0 0\n")
    before = resident.load_now(dstat, stat)
    assert before == (100 + 5 + 50 + 1 + 2 + 3, 1181, 700)
    busy_cpu = (before[0] + 200, before[1] + 500, before[2])  # 40 % of 5 s
    busy_disk = (before[0] + 10, before[1] + 500, before[2] + 1000)  # 20 % of 5 s
    quiet = (before[0] + 50, before[1] + 500, before[2] + 200)  # 10 %, 4 %
    assert not resident.is_quiet(before, busy_cpu, 5.0) and not resident.is_quiet(before, busy_disk, 5.0)
    assert resident.is_quiet(before, quiet, 5.0)
