"""How many chunks need the repository (issue 17 item 4): those no layer holds, overlay over base."""

from __future__ import annotations

from blockprov.cache.maps import BASE_ZERO, MODIFIED, PRESENT, ZERO, ChunkMap
from blockprov.cache.status import needs_repository


def test_a_chunk_needs_the_repository_only_when_no_layer_holds_it() -> None:
    # chunk:     0        1        2             3               4    5
    base = ChunkMap(6, bytearray([PRESENT, 0, ZERO | BASE_ZERO, 0, 0, PRESENT]))
    top = ChunkMap(6, bytearray([0, PRESENT | MODIFIED, 0, ZERO | MODIFIED, 0, MODIFIED]))
    assert needs_repository(base) == 3  # 1, 3, 4
    assert needs_repository(top) == 4  # 0, 2, 4, 5: what it does not hold itself
    assert needs_repository(top, [base]) == 1  # only 4: nobody holds it
    assert needs_repository(top, [base], 0, 4) == 0
    assert needs_repository(top, [base], 4, 6) == 1


def test_the_count_spans_big_maps() -> None:
    n = 1 << 20
    base = ChunkMap(n, bytearray([PRESENT]) * n)
    top = ChunkMap(n)
    assert needs_repository(top) == n and needs_repository(top, [base]) == 0
    base.flags[n - 1] = 0
    assert needs_repository(top, [base]) == 1
