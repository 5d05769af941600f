"""The pack store's own rules: pending blobs are indexed only after they are durable, the index
can be rebuilt from the packs, compaction keeps every live chunk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.errors import ChunkCorrupt, ChunkMissing
from blockprov.store.pack import PackChunkStore


def blob(i: int, n: int = 5000) -> tuple[bytes, bytes, bytes]:
    data = (i.to_bytes(4, "little") * (n // 4 + 1))[:n]
    return codec.digest(data), codec.encode(data), data


def test_pending_visible_in_process_indexed_after_sync(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    cid, b, data = blob(1)
    assert s.put_blobs([(cid, b)], trusted=True) == 1
    assert s.has(cid) and s.get(cid) == data
    other = PackChunkStore(tmp_path)  # another process's view: not indexed yet
    assert not other.has(cid)
    s.sync()
    assert other.has(cid) and other.get(cid) == data
    s.close()
    other.close()


def test_crash_before_sync_loses_only_unindexed_blobs(tmp_path: Path) -> None:
    code = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from blockprov.store.pack import PackChunkStore
from tests.unit.test_pack_store import blob
s = PackChunkStore({str(tmp_path)!r})
s.put_blobs([blob(1)[:2]], trusted=True)
s.sync()
s.put_blobs([blob(2)[:2]], trusted=True)
os._exit(0)  # dies without syncing the second
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    s = PackChunkStore(tmp_path)
    assert s.has(blob(1)[0]) and not s.has(blob(2)[0])
    assert s.get(blob(1)[0]) == blob(1)[2]
    # the index can be rebuilt from the packs alone; the unindexed but whole record comes back too
    (tmp_path / "index.sqlite").unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    s2 = PackChunkStore(tmp_path)
    assert s2.rebuild_index() == (2, 0)
    assert s2.get(blob(2)[0]) == blob(2)[2]


def test_torn_tail_is_ignored_by_rebuild(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    for i in range(3):
        s.put_blobs([blob(i)[:2]], trusted=True)
    s.close()
    pack = next((tmp_path / "packs").glob("*.pack"))
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 10)
    (tmp_path / "index.sqlite").unlink()
    s2 = PackChunkStore(tmp_path)
    assert s2.rebuild_index() == (2, 0)
    with pytest.raises(ChunkMissing):
        s2.get(blob(2)[0])


def test_untrusted_put_verifies_and_repairs(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    cid, b, _data = blob(7)
    with pytest.raises(ChunkCorrupt):
        s.put_blobs([(cid, codec.encode(b"other"))])
    assert not s.has(cid)
    assert s.put_blobs([(cid, b)]) == 1
    assert s.put_blobs([(cid, b)]) == 0


def test_compaction_keeps_live_chunks(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    items = [blob(i, 20000) for i in range(50)]
    s.put_blobs([(c, b) for c, b, _ in items], trusted=True)
    s.sync()
    s._writer = None  # start a new pack so the first one can be compacted
    for c, _, _ in items[:40]:
        s.delete(c)
    before = sum(p.stat().st_size for p in (tmp_path / "packs").glob("*.pack"))
    freed = s.compact()
    after = sum(p.stat().st_size for p in (tmp_path / "packs").glob("*.pack"))
    assert freed > 0 and after < before / 2
    fresh = PackChunkStore(tmp_path)
    for c, _, data in items[40:]:
        assert fresh.get(c) == data
    for c, _, _ in items[:40]:
        assert not fresh.has(c)
    assert os.listdir(tmp_path / "packs")


def test_get_blobs_batched_matches_single_reads(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    items = [blob(i, 3000 + i) for i in range(300)]
    s.put_blobs([(c, b) for c, b, _ in items[:150]], trusted=True)
    s.sync()
    s.put_blobs([(c, b) for c, b, _ in items[150:]], trusted=True)  # some pending, some indexed
    ids = [*(c for c, _, _ in reversed(items)), items[5][0]]  # any order, repeats allowed
    assert s.get_blobs(ids) == [s.get_blob(c) for c in ids]
    with pytest.raises(ChunkMissing):
        s.get_blobs([items[0][0], codec.digest(b"absent")])


def test_concurrent_writers_rotate_and_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many threads appending while packs rotate and syncs run (small limits make both frequent)."""
    from concurrent.futures import ThreadPoolExecutor

    from blockprov.store import pack

    monkeypatch.setattr(pack, "PACK_TARGET_BYTES", 64 << 10)
    monkeypatch.setattr(pack, "FLUSH_BYTES", 200 << 10)
    import random

    s = PackChunkStore(tmp_path)
    datas = [random.Random(i).randbytes(7000) for i in range(600)]  # incompressible: packs fill up
    items = [(codec.digest(d), codec.encode(d), d) for d in datas]

    def work(k: int) -> None:
        part = items[k::6]
        for j in range(0, len(part), 5):
            s.put_blobs([(c, b) for c, b, _ in part[j:j + 5]], trusted=True)
            if j % 20 == 0:
                s.sync()

    with ThreadPoolExecutor(6) as ex:
        list(ex.map(work, range(6)))
    s.close()
    fresh = PackChunkStore(tmp_path)
    assert fresh.missing([c for c, _, _ in items]) == []
    for c, _, data in items:
        assert fresh.get(c) == data
    assert len(list((tmp_path / "packs").glob("*.pack"))) > 5


def test_rebuild_skips_a_damaged_record_and_goes_on(tmp_path: Path) -> None:
    s = PackChunkStore(tmp_path)
    for i in range(3):
        s.put_blobs([blob(i)[:2]], trusted=True)
    s.sync()
    _pack, offset, length = s._locate(blob(1)[0]) or (0, 0, 0)
    s.close()
    pack = next((tmp_path / "packs").glob("*.pack"))
    with open(pack, "r+b") as f:  # bit rot in the middle record's payload
        f.seek(offset + length // 2)
        b = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    (tmp_path / "index.sqlite").unlink()
    s2 = PackChunkStore(tmp_path)
    assert s2.rebuild_index() == (2, 1)
    assert s2.get(blob(0)[0]) == blob(0)[2] and s2.get(blob(2)[0]) == blob(2)[2]
    with pytest.raises(ChunkMissing):
        s2.get(blob(1)[0])
