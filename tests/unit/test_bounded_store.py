"""The site cache's bounded store: least recently used out, rebuilt from its directory, damage dropped."""

from __future__ import annotations

import os
from pathlib import Path

from blockprov import codec
from blockprov.store.bounded import BoundedStore


def blob(n: int) -> tuple[bytes, bytes]:
    data = os.urandom(n)
    return codec.digest(data), codec.encode(data)


def test_budget_and_use_order(tmp_path: Path) -> None:
    items = [blob(1000) for _ in range(5)]
    size = len(items[0][1])
    s = BoundedStore(tmp_path / "c", capacity=3 * size)
    for cid, b in items[:3]:
        s.put(cid, b)
    assert s.get(items[0][0]) == items[0][1]  # 0 is now the most recently used
    s.put(*items[3])  # over budget: 1, the least recently used, goes
    assert s.has(items[0][0]) and not s.has(items[1][0]) and s.has(items[3][0])
    assert s.usage() == (3, 3 * size) and s.evicted == 1
    s.put(*items[3])  # again: nothing changes
    assert s.usage() == (3, 3 * size)
    s.put(codec.digest(b"big"), b"x" * (4 * size))  # larger than the whole budget: not kept
    assert s.usage() == (3, 3 * size)


def test_rebuilt_from_the_directory_after_a_crash(tmp_path: Path) -> None:
    cid, b = blob(500)
    s = BoundedStore(tmp_path / "c", capacity=1 << 20)
    s.put(cid, b)
    # a crash left a temporary file and a blob whose content never reached the disk
    bad_cid, _ = blob(500)
    (tmp_path / "c" / cid.hex()[:2] / f"{cid.hex()}.blob.1.0.tmp").write_bytes(b"half")
    torn = tmp_path / "c" / bad_cid.hex()[:2]
    torn.mkdir(exist_ok=True)
    (torn / f"{bad_cid.hex()}.blob").write_bytes(b"")
    again = BoundedStore(tmp_path / "c", capacity=1 << 20)
    assert again.get(cid) == b and again.has(bad_cid)
    assert not list((tmp_path / "c").rglob("*.tmp"))
    # the torn one is caught by the reader's verification and dropped (the site cache fetches it again)
    assert again.get(bad_cid) == b""
    again.drop(bad_cid)
    assert not again.has(bad_cid) and again.get(bad_cid) is None
