"""Copy every chunk of one store into another: the embedded packs into a bucket when a repository
moves to S3 (with ``catalog copy`` for its catalog), or a bucket into another.

Why it is safe to run at any time and again: chunks are content-addressed and immutable, so a copy
only adds what the target lacks, verifies each blob on arrival (a damaged source chunk is reported,
never copied), and a second run copies nothing. Crash rules: the target's own (a PUT or a synced
pack is durable); a run cut short leaves chunks no version names yet, which the next run skips and
which are harmless until the catalog is pointed at the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from blockprov.errors import ChunkCorrupt, ChunkMissing
from blockprov.store.base import ChunkStore

BATCH = 256


@dataclass
class StoreCopyStats:
    chunks: int = 0  # in the source
    copied: int = 0
    bytes_copied: int = 0  # stored (compressed) bytes
    present: int = 0  # already in the target
    damaged: list[str] = field(default_factory=list)  # hex ids of source chunks that failed verification


def copy_store(src: ChunkStore, dst: ChunkStore, progress: Callable[[int], None] | None = None) -> StoreCopyStats:
    """``progress(n)``: ``n`` more stored bytes copied."""
    ids = [cid for cid, _size, _mtime in src.iter_ids()]
    st = StoreCopyStats(chunks=len(ids))
    for i in range(0, len(ids), BATCH):
        batch = ids[i:i + BATCH]
        want = dst.missing(batch)
        st.present += len(batch) - len(want)
        before = st.bytes_copied
        if want:
            try:
                blobs = src.get_blobs(want)
                st.copied += dst.put_blobs(list(zip(want, blobs, strict=True)))
                st.bytes_copied += sum(len(b) for b in blobs)
            except (ChunkCorrupt, ChunkMissing):  # find the bad ones; copy the rest
                for cid in want:
                    try:
                        blob = src.get_blob(cid)
                        st.copied += dst.put_blob(cid, blob)
                        st.bytes_copied += len(blob)
                    except (ChunkCorrupt, ChunkMissing):
                        st.damaged.append(cid.hex())
        if progress is not None:
            progress(st.bytes_copied - before)
    dst.sync()
    return st
