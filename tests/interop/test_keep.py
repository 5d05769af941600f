"""Keeping a session's changes across a move to another version, on real file systems (issue 27
item 0, invariant 8).

The test disk has two partitions made by sfdisk and mkfs.ext4 (tools we did not write): a system
partition the new version changes (it adds a file) and a user-data partition it leaves exactly as
it was. A session writes a file into each through the agent's export (nbdfuse + debugfs, no
boot). Then:

* ``update --keep-modified`` refuses (exit 5), naming the partitions, and changes nothing;
* with ``--force`` it keeps the data partition's chunks and resets the system partition's; then
  ``e2fsck -fn`` (e2fsprogs) passes on each partition, the file the new version added reads as
  the new version wrote it (the issue saw it read the session's file: a cross-linked block), the
  session's data file survives and its system file is gone;
* a session that touched only the data partition moves without ``--force``;
* the PC's path (agent/keep.py ``move``): the session is kept as a version first, then the disk
  moves clean, in-process on the same disk (the network-boot test does it in a real PC with a
  whole-disk file system: tests/boot/test_netboot.py);
* a whole-disk file system keeps nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov.agent import keep
from blockprov.clones.customize import export_as_file
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.results import to_dict
from tests.caches import open_cache
from tests.conftest import require_tool, run_cli
from tests.procs import start_agent

pytestmark = pytest.mark.interop

MiB = 1 << 20
SYSTEM_AT, SYSTEM_MIB = 1, 24  # partition 1: MiB offset and size
DATA_AT, DATA_MIB = 25, 23  # partition 2
DISK_MIB = 48
V2_FILE = bytes(range(256)) * 1024  # 256 KiB the new version adds to its system partition
SESSION = b"written by the session " * 12000  # ~270 KiB: several chunks, in each partition


def mkfs(path: Path, mib: int, files: dict[str, bytes], label: str) -> Path:
    tree = path.with_suffix(".d")
    tree.mkdir()
    for name, content in files.items():
        (tree / name).write_bytes(content)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
    # fixed UUID and hash seed: two builds from the same files differ only where the files do
    subprocess.run([require_tool("mkfs.ext4"), "-q", "-F", "-L", label, "-U", "clear", "-E",
                    "hash_seed=00000000-0000-0000-0000-000000000001", "-d", str(tree), str(path)],
                   check=True, capture_output=True,
                   env={"E2FSPROGS_FAKE_TIME": "1700000000", "PATH": "/usr/sbin:/usr/bin"})
    return path


def disk(path: Path, system: Path, data: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_MIB * MiB)
    table = f"label: dos\nlabel-id: 0x1234abcd\n{SYSTEM_AT * 2048},{SYSTEM_MIB * 2048},83\n" \
            f"{DATA_AT * 2048},{DATA_MIB * 2048},83\n"
    subprocess.run([require_tool("sfdisk"), "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    with open(path, "r+b") as f:
        for at, part in ((SYSTEM_AT, system), (DATA_AT, data)):
            f.seek(at * MiB)
            f.write(part.read_bytes())
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """v1 and v2 of a two-partition disk (v2 adds a file to the system partition, its data
    partition is byte for byte v1's) and a whole-disk ext4 one."""
    t = tmp_path_factory.mktemp("keep")
    data = mkfs(t / "data.ext4", DATA_MIB, {"notes.txt": b"the user's data partition\n"}, "data")
    base = {"os-release": b"ID=testos\nVERSION=1\n", "hostname": b"pc\n"}
    v1 = disk(t / "v1.img", mkfs(t / "sys1.ext4", SYSTEM_MIB, base, "system"), data)
    v2 = disk(t / "v2.img", mkfs(t / "sys2.ext4", SYSTEM_MIB, base | {"v2-added.bin": V2_FILE}, "system"), data)
    whole = mkfs(t / "whole.ext4", 16, base, "whole")
    yield v1, v2, whole
    shutil.rmtree(t, ignore_errors=True)


def fs(disk_file: Path, at_mib: int) -> str:
    return f"{disk_file}?offset={at_mib * MiB}"


def write_file(disk_file: Path, at_mib: int, name: str, content: bytes, tmp: Path) -> None:
    src = tmp / f"{name}.src"
    src.write_bytes(content)
    subprocess.run([require_tool("debugfs"), "-w", "-R", f"write {src} {name}", fs(disk_file, at_mib)],
                   check=True, capture_output=True, timeout=60)


def cat(disk_file: Path, at_mib: int, name: str) -> bytes:
    return subprocess.run([require_tool("debugfs"), "-R", f"cat {name}", fs(disk_file, at_mib)],
                          check=True, capture_output=True, timeout=60).stdout


def fsck_clean(disk_file: Path, at_mib: int) -> None:
    p = subprocess.run([require_tool("e2fsck"), "-fn", fs(disk_file, at_mib)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, f"e2fsck of the partition at {at_mib} MiB:\n{p.stdout}\n{p.stderr}"


def test_update_keep_modified_keeps_only_the_partition_the_update_leaves_alone(
        images: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, v2, _whole = images
    data = tmp_path / "repo"
    run_cli("import", str(v1), "two:v1", data=data)
    run_cli("import", str(v2), "two:v2", data=data)
    cache, sock = tmp_path / "cache", Path(f"/tmp/bp-keep-{tmp_path.name[-20:]}.sock")
    agent, banner = start_agent(cache, "two:v1", sock, "--no-register", data=data)
    try:
        uri = next(str(a) for a in banner["addresses"] if str(a).startswith("nbd+unix"))  # type: ignore[attr-defined]
        with export_as_file(uri) as d:  # the session: a file in each partition
            write_file(d, SYSTEM_AT, "session-sys.bin", SESSION, tmp_path)
            write_file(d, DATA_AT, "session-data.bin", SESSION, tmp_path)
        before = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
        p = run_cli("update", "--cache", str(cache), "--to", "two:v2", "--keep-modified", check=False)
        assert p.returncode == 5, (p.stdout, p.stderr)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "merge two file systems" in err and "Nothing was changed" in err
        assert "partition 1" in err and "changes" in err and "--force" in err, err
        after = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
        assert (after["version"], after["chunks_modified"]) == (before["version"], before["chunks_modified"])
        assert run_cli("update", "--cache", str(cache), "--to", "two:v2", "--force", check=False).returncode == 2
        out = json.loads(run_cli("update", "--cache", str(cache), "--to", "two:v2", "--keep-modified", "--force",
                                 "--json").stdout)
        plan = out["keep"]
        assert plan["table"] == "mbr" and [(q["number"], q["kept"]) for q in plan["partitions"]] == [(1, False),
                                                                                                  (2, True)]
        assert out["modified_kept"] == plan["partitions"][1]["modified_chunks"] > 0
        assert out["modified_discarded"] > 0
        with export_as_file(uri, read_only=True) as d:
            fsck_clean(d, SYSTEM_AT)
            fsck_clean(d, DATA_AT)
            assert cat(d, SYSTEM_AT, "v2-added.bin") == V2_FILE  # not the session's blocks
            assert cat(d, DATA_AT, "session-data.bin") == SESSION  # the user's data survived the update
            assert cat(d, DATA_AT, "notes.txt") == b"the user's data partition\n"
            assert cat(d, SYSTEM_AT, "session-sys.bin") == b""  # gone with the old system
        # a session that touched only the data partition moves back to v1 without --force
        with export_as_file(uri) as d:
            write_file(d, DATA_AT, "more.bin", SESSION[:5000], tmp_path)
        text = run_cli("update", "--cache", str(cache), "--to", "two:v1", "--keep-modified").stdout
        assert "partition 2" in text and "kept — the new version leaves it unchanged" in text, text
        with export_as_file(uri, read_only=True) as d:
            fsck_clean(d, SYSTEM_AT)
            fsck_clean(d, DATA_AT)
            assert cat(d, DATA_AT, "more.bin") == SESSION[:5000] and cat(d, DATA_AT, "session-data.bin") == SESSION
            assert cat(d, SYSTEM_AT, "v2-added.bin") == b""
    finally:
        agent.stop()


def test_a_whole_disk_file_system_can_only_be_reset(images: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _v1, _v2, whole = images
    data = tmp_path / "repo"
    run_cli("import", str(whole), "w:v1", data=data)
    changed = tmp_path / "w2.ext4"
    shutil.copy(whole, changed)
    write_file(changed, 0, "v2.txt", b"v2\n", tmp_path)
    run_cli("import", str(changed), "w:v2", data=data)
    cache, sock = tmp_path / "cache", Path(f"/tmp/bp-keepw-{tmp_path.name[-20:]}.sock")
    agent, banner = start_agent(cache, "w:v1", sock, "--no-register", data=data)
    try:
        uri = next(str(a) for a in banner["addresses"] if str(a).startswith("nbd+unix"))  # type: ignore[attr-defined]
        with export_as_file(uri) as d:
            write_file(d, 0, "mine.txt", b"mine\n", tmp_path)
    finally:
        agent.stop()
    # on the stopped cache (opened in-process): the same refusal, the same plan
    p = run_cli("update", "--cache", str(cache), "--to", "w:v2", "--keep-modified", "--json", check=False)
    body = json.loads(p.stderr)
    assert p.returncode == 5 and body["error"] == "KeepWouldMerge" and "whole-disk" in body["message"]
    out = json.loads(run_cli("update", "--cache", str(cache), "--to", "w:v2", "--keep-modified", "--force",
                             "--json").stdout)
    assert out["modified_kept"] == 0 and out["keep"]["table"] == "none"


def test_a_keep_pc_keeps_its_session_as_a_version_then_moves_clean(images: tuple[Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    """agent/keep.py ``move`` (what a keep PC does at boot) on the same two-partition disk."""
    v1, v2, _whole = images
    repo = LocalRepository(tmp_path / "repo")
    said: list[str] = []

    async def main() -> None:
        m1, _ = await asyncio.to_thread(import_image, repo, v1, "two:v1")
        m2id, _ = await asyncio.to_thread(import_image, repo, v2, "two:v2")
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("two:v1"))
        try:
            session = bytearray(SESSION[:64 << 10])
            await dev.write(SYSTEM_AT * MiB + 8 * MiB, bytes(session))  # raw writes into both partitions
            await dev.write(DATA_AT * MiB + 8 * MiB, bytes(session))
            moved = await keep.move(dev, repo, repo.resolve("two:v2"), host="52:54:00:aa:bb:cc", on_move="snapshot",
                                    say=said.append)
            assert moved is not None and dev.manifest.id == m2id
            out = to_dict(moved)
            snap = out["snapshot"]
            assert snap["tag"].startswith("kept-52-54-00-aa-bb-cc-") and out["modified_kept"] == 1
            assert [q["kept"] for q in out["keep"]["partitions"]] == [False, True]
            kept = repo.resolve(f"two:{snap['tag']}")
            assert kept.parent == m1 and kept.labels["snapshot-of"] == f"two@{m1}"
        finally:
            await dev.close()
        assert any("keeping the session as two:kept-" in s for s in said), said
        assert any("kept 1 modified chunk(s), reset 1" in s for s in said), said

    try:
        asyncio.run(main())
        exported = tmp_path / "kept.img"
        kept_tag = next(t for t in repo.images()[0].tags if t.startswith("kept-"))
        run_cli("export", f"two:{kept_tag}", str(exported), data=tmp_path / "repo")
        assert exported.read_bytes()[SYSTEM_AT * MiB + 8 * MiB:][:64 << 10] == SESSION[:64 << 10]
    finally:
        repo.close()


def test_what_the_update_did_before_corrupts_the_system_partition(images: tuple[Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    """The control: keeping every modified chunk over v2 (the block-level merge the update used to
    make) leaves the system partition cross-linked — the checks above would catch it."""
    from blockprov.agent import lifecycle
    from blockprov.device.base import FileSegment

    v1, v2, _whole = images
    repo = LocalRepository(tmp_path / "repo")
    merged = tmp_path / "merged.img"
    session = tmp_path / "session.img"
    shutil.copy(v1, session)
    write_file(session, SYSTEM_AT, "session-sys.bin", SESSION, tmp_path)

    async def main() -> None:
        await asyncio.to_thread(import_image, repo, v1, "two:v1")
        await asyncio.to_thread(import_image, repo, v2, "two:v2")
        dev = await open_cache(tmp_path / "c", repo, repo.resolve("two:v1"))
        try:
            raw, old = session.read_bytes(), v1.read_bytes()
            cs = dev.manifest.chunk_size
            for off in range(0, len(raw), cs):  # the session's writes: the chunks debugfs changed
                if raw[off:off + cs] != old[off:off + cs]:
                    await dev.write(off, raw[off:off + cs])
            await lifecycle.update(dev, repo.resolve("two:v2"), keep=lambda _changed, modified: modified)
            with open(merged, "wb") as f:
                for piece in await dev.read(0, dev.size):
                    f.write(os.pread(piece.fd, piece.length, piece.offset) if isinstance(piece, FileSegment)
                            else bytes(piece))
        finally:
            await dev.close()

    try:
        asyncio.run(main())
    finally:
        repo.close()
    p = subprocess.run([require_tool("e2fsck"), "-fn", fs(merged, SYSTEM_AT)], capture_output=True, timeout=120)
    assert p.returncode != 0 or cat(merged, SYSTEM_AT, "v2-added.bin") != V2_FILE
