"""Check a repository: every chunk a version or a boot file names is stored and intact.

Why it exists: every read verifies its chunk, so damage is never served, but it is found only when
someone reads that chunk, perhaps the morning a lab boots. ``blockprov check`` reads every chunk
the catalog names once, ahead of time (what ``zpool scrub`` or ``restic check --read-data`` do),
and names the versions that are damaged.

Repair: with ``drop_damaged`` the damaged chunks are removed from the store. They then count as
missing, so the next import of an image that holds their content (or any upload) stores them
again, verified. Without it they stay. Then ``import`` skips them because the store lists them,
and only a verified upload of that chunk replaces them (store/base.py ``put_blob``).

Crash rules: a check only reads; ``drop_damaged`` deletes through the store's own ``delete_many``
(its crash rules hold). A check that runs while uploads and gc run may see a chunk vanish between
the listing and the read (gc) and report it missing: run it again on a quiet repository before
acting on a missing chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from blockprov import codec
from blockprov.errors import ChunkCorrupt, ChunkMissing
from blockprov.repo.local import LocalRepository

BATCH = 256


@dataclass
class CheckReport:
    versions: int = 0
    chunks: int = 0  # distinct chunks named by versions and boot files (zero chunks are never stored)
    bytes_read: int = 0  # stored bytes read and verified
    missing: list[str] = field(default_factory=list)  # hex ids
    damaged: list[str] = field(default_factory=list)
    affected: list[str] = field(default_factory=list)  # NAME@ID of versions that name a bad chunk, "boot files"
    dropped: int = 0
    unindexed_bytes: int = 0  # pack space holding no indexed chunk (removed chunks, a failed import): gc's
    unindexed_packs: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged


def _verify(item: tuple[bytes, bytes]) -> bool:
    cid, blob = item
    try:
        codec.decode_view(blob, cid)
        return True
    except ChunkCorrupt:
        return False


def check_repository(repo: LocalRepository, *, drop_damaged: bool = False, workers: int = 4,
                     progress: Callable[[int], None] | None = None) -> CheckReport:
    """``progress(n)``: ``n`` more stored bytes verified."""
    rep = CheckReport()
    named: set[bytes] = set()
    for m in repo.catalog.all_manifests():
        rep.versions += 1
        named |= m.unique_digests()
    boot = repo.registry.boot_piece_ids()
    named |= boot
    named.discard(codec.ZERO_DIGEST)
    ids = sorted(named)
    rep.chunks = len(ids)
    missing = set(repo.store.missing(ids))
    damaged: set[bytes] = set()
    present = [c for c in ids if c not in missing]
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(present), BATCH):
            batch = present[i:i + BATCH]
            try:
                blobs = repo.store.get_blobs(batch)
            except (ChunkMissing, ChunkCorrupt):  # one bad record spoils the batch read: one by one
                blobs = []
                for c in batch:
                    try:
                        blobs.append(repo.store.get_blob(c))
                    except ChunkMissing:
                        missing.add(c)
                        blobs.append(b"")
                    except ChunkCorrupt:
                        blobs.append(b"")
            for c, good in zip(batch, pool.map(_verify, zip(batch, blobs, strict=True)), strict=True):
                if not good and c not in missing:
                    damaged.add(c)
            n = sum(len(b) for b in blobs)
            rep.bytes_read += n
            if progress is not None:
                progress(n)
    bad = missing | damaged
    rep.missing = sorted(c.hex() for c in missing)
    rep.damaged = sorted(c.hex() for c in damaged)
    if bad:
        rep.affected = sorted(f"{m.image}@{m.id}" for m in repo.catalog.all_manifests() if m.unique_digests() & bad)
        if boot & bad:
            rep.affected.append("boot files")
    if drop_damaged and damaged:
        repo.store.delete_many(sorted(damaged))
        repo.store.sync()
        rep.dropped = len(damaged)
    unindexed = getattr(repo.store, "unindexed_bytes", None)  # the pack store's dead space; S3 has none
    if unindexed is not None:
        rep.unindexed_bytes, rep.unindexed_packs = unindexed()
    return rep
