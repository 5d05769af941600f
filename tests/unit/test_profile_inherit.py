"""Boot profile inheritance, pure (catalog/inherit.py): translation by offset and by chunk id."""

from __future__ import annotations

from blockprov.catalog import inherit
from blockprov.codec import ZERO_DIGEST
from blockprov.manifest import Manifest

KiB = 1024


def manifest(ids: list[int], chunk_size: int = 64 * KiB, **kw: object) -> Manifest:
    """Chunk ``k`` holds a made-up id from ``ids[k]`` (0: an all-zero chunk)."""
    raw = b"".join(ZERO_DIGEST if x == 0 else x.to_bytes(32, "big") for x in ids)
    return Manifest(image="lab", size=len(ids) * chunk_size, chunk_size=chunk_size, chunks=raw, **kw)  # type: ignore[arg-type]


def test_same_offsets_changed_chunks_stay_zeros_go_moved_ones_follow() -> None:
    donor = manifest([1, 2, 3, 4, 5, 6, 7, 8])
    child = manifest([1, 2, 99, 4, 0, 6, 3, 8])  # 2 changed, 4 zeroed, donor's 3 moved to 6
    assert inherit.translate([2, 4, 0, 7], donor, child) == [2, 6, 0, 7]
    assert inherit.translate([7, 7, 9, -1], donor, child) == [7]  # out of range and repeats dropped


def test_other_chunk_size_maps_by_bytes() -> None:
    donor = manifest([1, 2, 3, 4], chunk_size=128 * KiB)
    child = manifest([10, 11, 20, 21, 30, 31, 40, 41], chunk_size=64 * KiB)
    assert inherit.shared_fraction([2], donor, child) == 0.0
    # Nothing shared by id: not inherited at all (unrelated content).
    assert inherit.translate([2, 0], donor, child) is None
    child = manifest([1, 1, 2, 2, 3, 3, 4, 4], chunk_size=64 * KiB)
    assert inherit.translate([2, 0], donor, child) == [4, 5, 0, 1]


def test_too_little_shared_inherits_nothing() -> None:
    donor = manifest([1, 2, 3, 4])
    assert inherit.translate([0, 1, 2, 3], donor, manifest([1, 20, 30, 40])) is None
    assert inherit.translate([0, 1, 2, 3], donor, manifest([1, 2, 30, 40])) == [0, 1, 2, 3]


def test_donors_and_merge() -> None:
    m = manifest([1], parent="0123456789abcdef", labels={"snapshot-of": "gold@fedcba9876543210",
                                                         "profile-from": "bad"})
    assert inherit.donors(m) == [("lab", "0123456789abcdef"), ("gold", "fedcba9876543210")]
    assert inherit.donors(manifest([1])) == []
    assert inherit.merge([5, 1], [1, 2, 5, 3]) == [5, 1, 2, 3]
