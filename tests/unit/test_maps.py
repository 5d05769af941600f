"""cache/maps.py: flag semantics of every record kind, range queries, snapshot bookkeeping, size."""

from __future__ import annotations

import time

import pytest

from blockprov.cache.maps import (
    BASE_ZERO,
    MODIFIED,
    PRESENT,
    ZERO,
    ChunkMap,
    Kind,
    base_zero_flags,
)


def test_base_zero_flags_marks_only_aligned_zero_ids() -> None:
    z = bytes(32)
    # id 1 ends with 16 zero bytes and id 2 starts with 16: a zero run straddling them is no marker.
    ids = b"\x01" * 32 + b"\x02" * 16 + bytes(16) + bytes(16) + b"\x03" * 16 + z + b"\x04" * 32 + z
    flags = base_zero_flags(ids)
    assert list(flags) == [0, 0, 0, ZERO | BASE_ZERO, 0, ZERO | BASE_ZERO]


def test_record_kinds_change_flags_as_documented() -> None:
    m = ChunkMap(6, bytearray([0, 0, ZERO | BASE_ZERO, 0, 0, 0]))
    m.apply(Kind.PRESENT, 0, 2)
    assert m.flags[0] == m.flags[1] == PRESENT
    m.apply(Kind.MODIFIED, 1, 3)
    assert m.flags[1] == PRESENT | MODIFIED
    assert m.flags[2] == ZERO | BASE_ZERO | MODIFIED  # a zero chunk about to be written stays zero
    m.apply(Kind.UNZERO, 2, 3)
    assert m.flags[2] == PRESENT | MODIFIED | BASE_ZERO
    m.apply(Kind.ZERO, 0, 2)
    assert m.flags[0] == m.flags[1] == ZERO | MODIFIED
    m.apply(Kind.RESET, 0, 3)
    assert list(m.flags[:3]) == [0, 0, ZERO | BASE_ZERO]
    m.apply(Kind.PRESENT, 3, 5)
    m.apply(Kind.DROP, 4, 5)
    assert m.flags[3] == PRESENT and m.flags[4] == 0
    with pytest.raises(ValueError):
        m.apply(Kind.PRESENT, 5, 7)
    with pytest.raises(ValueError):
        m.apply(Kind.REBASE, 0, 0, 1)


def test_range_queries() -> None:
    m = ChunkMap(20)
    m.apply(Kind.PRESENT, 2, 5)
    m.apply(Kind.PRESENT, 8, 9)
    m.apply(Kind.ZERO, 10, 12)
    assert m.count_where(PRESENT) == 4
    assert m.count_where(PRESENT, a=3, b=9) == 3
    assert list(m.runs_where(PRESENT)) == [(2, 5), (8, 9)]
    assert list(m.runs_where(PRESENT, a=3, b=8)) == [(3, 5)]
    assert list(m.runs_where(ZERO)) == [(10, 12)]
    assert m.first_missing(0) == 0
    assert m.first_missing(2) == 5
    assert m.first_missing(10) == 12
    assert m.first_where(PRESENT, start=5) == 8
    assert m.first_where(PRESENT, start=9) == -1
    assert m.all_match(PRESENT, PRESENT, 2, 5)
    assert not m.all_match(PRESENT, PRESENT, 2, 6)
    assert m.all_match(PRESENT | ZERO, 0, 12, 20)
    assert m.counts() == {"total": 20, "present": 4, "modified": 2, "zero": 2, "missing": 14}


def test_targets_generations_and_synced() -> None:
    m = ChunkMap(20)
    m.apply(Kind.MODIFIED, 3, 6)
    t = m.add_target("backup")
    assert [i for i in range(20) if m.is_unsynced(t, i)] == [3, 4, 5]
    assert m.gens is not None
    m.touch(5, 18)  # crosses byte boundaries of the bitset
    assert m.count_unsynced(t) == 15
    gen5 = m.gens[5]
    m.apply(Kind.SYNCED, 5, 0, gen5 - 1, target=t)  # an older generation: stays unsynced
    assert m.is_unsynced(t, 5)
    m.apply(Kind.SYNCED, 5, 0, gen5, target=t)
    assert not m.is_unsynced(t, 5)
    m.apply(Kind.DIRTY, 5, 6)
    assert m.is_unsynced(t, 5) and m.gens[5] == gen5 + 1
    c = m.copy()
    assert c.flags == m.flags and c.unsynced == m.unsynced and c.gens == m.gens


def test_large_map_is_small_and_fast() -> None:
    n = 1_600_000  # 100 GiB at 64 KiB
    m = ChunkMap(n)
    t0 = time.perf_counter()
    m.apply(Kind.PRESENT, 0, n)
    m.apply(Kind.MODIFIED, n // 2, n)
    counts = m.counts()
    runs = list(m.runs_where(MODIFIED))
    elapsed = time.perf_counter() - t0
    assert counts["present"] == n and counts["modified"] == n // 2 and runs == [(n // 2, n)]
    assert len(m.flags) == n  # one byte per chunk
    assert elapsed < 1.0
