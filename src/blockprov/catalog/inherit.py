"""Boot profiles a version inherits: no version starts cold that need not (issue 15 item 1).

A version made from another — a snapshot (``parent``, or ``snapshot-of`` when it went to another
image), an update or a pool's configured version (both snapshots), an import under an image that
has versions (``parent``: the version its tag pointed at, else the newest), an import under a new
name that shares most chunks with an existing version (``profile-from``, set by the importer) —
boots like it. Until it records a profile of its own, its profile is its donor's, translated:

* by offset: the donor's chunk ``i`` covers bytes ``[i × cs, (i + 1) × cs)``; the child's chunks
  covering those bytes take its place in the order (same chunk size: the same index). A chunk
  that changed is still what a boot reads there, so it stays, at the same position;
* by chunk id: a donor chunk whose id is no longer at its offset but is elsewhere in the child,
  at an index whose content is new there (data that moved, not a copy that was always there),
  brings that index along, right after;
* all-zero chunks of the child are dropped (nothing to fetch) and each index appears once.

A donor is used only when most of its profile still means something in the child: at least
:data:`MIN_SHARED` of the profile's chunks have their id in the child. An import of unrelated
content under an old tag inherits nothing. The donor's own profile may itself be inherited (a
chain of snapshots), up to :data:`MAX_DEPTH` versions back.

Nothing is stored for an inherited profile: it is computed when asked for (catalog/machines.py,
``Registry.get_profile``), so a donor that records a better profile later is followed. When the
child records its own, that is stored merged: its order first, then the inherited chunks it did
not read (cheap insurance for what this boot skipped, prefetched last).

Pure: manifests in, indices out; the catalog does the looking up.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockprov.codec import ZERO_DIGEST
from blockprov.manifest import Manifest

MIN_SHARED = 0.5  # fraction of the donor profile's chunks whose id must be in the child
MAX_DEPTH = 8  # versions walked back through donors of donors
PROFILE_FROM = "profile-from"  # label naming a donor IMAGE@ID (the importer sets it)
SNAPSHOT_OF = "snapshot-of"  # label a snapshot carries: its base IMAGE@ID


def donors(m: Manifest) -> list[tuple[str, str]]:
    """The versions ``m`` may inherit a profile from, most direct first: (image, version id)."""
    out: list[tuple[str, str]] = []
    if m.parent:
        out.append((m.image, m.parent))
    for label in (SNAPSHOT_OF, PROFILE_FROM):
        ref = m.labels.get(label, "")
        image, sep, vid = ref.partition("@")
        if sep and image and vid and (image, vid) not in out:
            out.append((image, vid))
    return out


def shared_fraction(order: Sequence[int], donor: Manifest, child: Manifest) -> float:
    """Of the donor profile's chunks, the fraction whose id the child holds anywhere."""
    if not order:
        return 0.0
    ids = child.unique_digests()
    hits = sum(1 for i in order if donor.is_zero(i) or donor.digest_at(i) in ids)
    return hits / len(order)


def translate(order: Sequence[int], donor: Manifest, child: Manifest) -> list[int] | None:
    """The donor's profile as indices of the child (module docstring), or None when the child
    shares too little of it (``MIN_SHARED``)."""
    if shared_fraction(order, donor, child) < MIN_SHARED:
        return None
    dcs, ccs = donor.chunk_size, child.chunk_size
    where: dict[bytes, int] | None = None  # child index of each id, built on the first moved chunk
    seen = bytearray(child.count)
    out: list[int] = []

    def add(j: int) -> None:
        if not seen[j]:
            seen[j] = 1
            if child.digest_at(j) != ZERO_DIGEST:
                out.append(j)

    for i in order:
        if not 0 <= i < donor.count:
            continue
        lo = i * dcs
        hi = min(lo + dcs, donor.size)
        first, last = lo // ccs, min((hi + ccs - 1) // ccs, child.count)
        for j in range(first, last):
            add(j)
        d = donor.digest_at(i)
        if d == ZERO_DIGEST or (dcs == ccs and i < child.count and child.digest_at(i) == d):
            continue
        if where is None:
            where = {}
            for j, cid in enumerate(child.digests()):
                if dcs != ccs or j >= donor.count or donor.digest_at(j) != cid:  # new at j
                    where.setdefault(cid, j)
        j = where.get(d, -1)
        if j >= 0 and not (dcs == ccs and j < donor.count and donor.digest_at(j) == d):
            add(j)
    return out


def merge(own: Sequence[int], inherited: Sequence[int]) -> list[int]:
    """A version's own recorded order, then the inherited chunks it did not read."""
    mine = set(own)
    return [*own, *(i for i in inherited if i not in mine)]
