"""An instance's lifecycle on top of its cache: reset to the base, snapshots, updates.

Each operation is a short quiesced step that changes the chunk map (cache/device.py's
``quiesced``: requests that would fetch or change chunks wait, the ones in flight finish) plus
work done while clients are served. They run one at a time per cache (``lifecycle_lock``) and
work the same in a running agent (asked through the control socket) and on a stopped cache
(agent/offline.py opens it in-process).

Snapshot (docs/architecture.md, invariant 4; seed 000 claims 10–12, 19–22):

1. Quiesced: the modified chunks S and their write generations are taken; S's chunks get HELD, so
   any write to one of them journals ``dirty`` durably before its data changes and first saves
   the old content for the snapshot (``Capture``); a checkpoint makes generations, HELD and the
   target durable. The new version is S's content at this instant (a crash-consistent image).
2. Served meanwhile: S is read, hashed and compressed; only chunks the repository lacks are
   uploaded (usually exactly the chunks this target has not received).
3. The repository commits the version and answers with its id: the acknowledgement.
4. Only then ``synced`` records clear the target's unsynced bit of each chunk whose generation is
   unchanged; a chunk written after step 1 keeps it. A checkpoint records the version per target.

A crash anywhere leaves chunks unsynced that may already be in the repository: running the
snapshot again uploads nothing twice (the repository's missing-chunk answer) and commits.

Update moves the base to another version of the image: chunks that differ and were not modified
are dropped and (eagerly) fetched again, unchanged chunks stay; modified chunks are discarded
(back to the new base), except those ``keep`` chooses. Keeping a modified chunk over another
version is a merge of two file systems unless the chunk lies in a partition the new version leaves
unchanged (invariant 8): agent/keep.py makes that choice; this module never keeps one on its own.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from blockprov import codec
from blockprov.cache import CacheDevice
from blockprov.codec import DIGEST_SIZE, ZERO_DIGEST
from blockprov.errors import CacheMismatch, NotFound, UsageError
from blockprov.manifest import Manifest
from blockprov.manifest import diff as manifest_diff
from blockprov.names import parse_ref, target_name
from blockprov.repo.base import Repository
from blockprov.results import keyed, omit_none

SNAPSHOT_GROUP_BYTES = 16 << 20  # read, hash and upload in groups of this size
Progress = Callable[[int], None]
Reader = Callable[[list[int]], Awaitable[list[bytes]]]  # chunks' content at a snapshot's point in time


@dataclass(frozen=True)
class ResetResult:
    version: str  # the base version the instance is back to
    chunks_reset: int
    chunks_refetched: int
    seconds: float
    # How many of the reset chunks, and how many in all, only the repository can give now (agents
    # of older versions do not say).
    reset_from_repository: int | None = omit_none()
    chunks_from_repository: int | None = omit_none()


@dataclass(frozen=True)
class SnapshotResult:
    version: str  # the acknowledged version (the one the instance equals, when unchanged)
    image: str
    tag: str
    target: str
    unchanged: bool  # the repository held this content already: nothing committed
    chunks_modified: int
    chunks_unsynced_before: int
    chunks_sent: int
    bytes_sent: int
    bytes_modified: int
    chunks_written_during: int  # written while it ran: they stay unsynced for the next one
    rebased: bool
    seconds: float


@dataclass(frozen=True)
class UpdateResult:
    version: str
    from_version: str = keyed("from")
    chunks_changed: int = 0
    chunks_refetched: int = 0
    bytes_fetched: int = 0
    modified_kept: int = 0
    modified_discarded: int = 0
    seconds: float = 0.0


async def reset(dev: CacheDevice, *, eager: bool = False, punch: bool = True) -> ResetResult:
    async with dev.lifecycle_lock:
        t0 = time.monotonic()
        done = await dev.reset_chunks(eager=eager, punch=punch)
        return ResetResult(version=dev.manifest.id, chunks_reset=done.chunks_reset,
                           chunks_refetched=done.chunks_refetched, seconds=round(time.monotonic() - t0, 6),
                           reset_from_repository=done.reset_from_repository,
                           chunks_from_repository=done.chunks_from_repository)


def _encode_group(datas: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    """(id, blob) per chunk; all-zero chunks get the zero marker and no blob (worker thread)."""
    out: list[tuple[bytes, bytes | None]] = []
    for data in datas:
        if codec.is_zero(data):
            out.append((ZERO_DIGEST, None))
        else:
            out.append((codec.digest(data), codec.encode(data)))
    return out


async def snapshot(dev: CacheDevice, repo: Repository, to: str, *, target: str = "default",
                   rebase: bool = False, progress: Progress | None = None, read: Reader | None = None,
                   before_acknowledge: Callable[[], Awaitable[None]] | None = None) -> SnapshotResult:
    """Send the instance's modified chunks and commit them as version ``to`` (``NAME:TAG``).

    ``read`` and ``before_acknowledge`` are for writes made past the cache (a PC's native data
    path, netboot/native.py): ``read(chunks)`` returns their content at the snapshot's point in
    time from elsewhere than the cache's capture (a device-mapper snapshot), and
    ``before_acknowledge()`` runs once the repository committed, before the target's chunks are
    marked synced, to mark those written since the point in time (``mark_rewritten``)."""
    ref = parse_ref(to)
    if ref.tag is None:
        raise UsageError(f"snapshot needs NAME:TAG to name the new version, not {to!r}")
    if rebase and ref.name != dev.manifest.image:
        raise UsageError(f"--rebase needs a snapshot into the instance's own image ({dev.manifest.image}), "
                         f"not {ref.name}")
    if rebase and dev.overlay:
        raise UsageError("an overlay instance keeps its shared base: snapshot it without --rebase and clone the "
                         "new version")
    target_name(target)
    loop = asyncio.get_running_loop()
    async with dev.lifecycle_lock:
        t0 = time.monotonic()
        base = dev.manifest
        pending = await dev.begin_snapshot(target)
        data_chunks = pending.data_chunks
        try:
            ids = bytearray(base.chunks)
            for i in pending.zeroed:
                ids[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = ZERO_DIGEST
            per = max(1, SNAPSHOT_GROUP_BYTES // base.chunk_size)
            sent_bytes = sent_chunks = 0
            for k in range(0, len(data_chunks), per):
                group = data_chunks[k:k + per]
                datas: list[bytes] = []
                for j in range(0, len(group), 16):  # 1 MiB at a time on the event loop, then let others run
                    if read is not None:
                        datas += await read(group[j:j + 16])
                        continue
                    datas += dev.read_snapshot(pending, group[j:j + 16])
                    await asyncio.sleep(0)
                coded = await loop.run_in_executor(None, _encode_group, datas)
                blobs: dict[bytes, bytes] = {}
                for i, (cid, blob) in zip(group, coded, strict=True):
                    ids[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = cid
                    if blob is not None:
                        blobs[cid] = blob
                if blobs:
                    lacking = await loop.run_in_executor(None, repo.missing, list(blobs))
                    items = [(cid, blobs[cid]) for cid in lacking]
                    if items:
                        await loop.run_in_executor(None, functools.partial(repo.put_blobs, items, trusted=True))
                    sent_chunks += len(items)
                    sent_bytes += sum(len(b) for _, b in items)
                if progress is not None:
                    progress(sum(len(d) for d in datas))
            same_image = ref.name == base.image
            new = Manifest(image=ref.name, size=base.size, chunk_size=base.chunk_size, chunks=bytes(ids),
                           parent=base.id if same_image else None,
                           labels={"snapshot-of": f"{base.image}@{base.id}", "snapshot-target": target})
            equal = await _equal_version(repo, base, new, pending.last_snapshot)
            if equal is None:
                vid = await loop.run_in_executor(None, repo.commit, new, ref.tag)  # the acknowledgement
            else:  # the repository holds this content already: name it, commit nothing
                new, vid = equal, equal.id
                await loop.run_in_executor(None, repo.set_tag, ref.name, ref.tag, vid)
        finally:
            dev.end_snapshot(pending)
        # Acknowledged: clear what the target now holds (a generation that moved stays unsynced).
        if before_acknowledge is not None:
            await before_acknowledge()
        still = await dev.acknowledge(pending, vid, rebase=new if rebase else None)
        return SnapshotResult(version=vid, image=ref.name, tag=ref.tag, target=target, unchanged=equal is not None,
                              chunks_modified=len(pending.modified), chunks_unsynced_before=pending.unsynced_before,
                              chunks_sent=sent_chunks, bytes_sent=sent_bytes,
                              bytes_modified=sum(base.chunk_length(i) for i in data_chunks),
                              chunks_written_during=still, rebased=rebase, seconds=round(time.monotonic() - t0, 6))


async def _equal_version(repo: Repository, base: Manifest, new: Manifest, last: str | None) -> Manifest | None:
    """The version ``new``'s content already is, if the repository has one: the instance's base
    version (nothing modified, or written back as it was) or the target's last snapshot (nothing
    written since). A snapshot of an unchanged instance then answers with that version instead of
    committing one more identical version each time it runs."""
    if new.image == base.image and new.chunks == base.chunks:
        return base
    if last is None or last == base.id:
        return None
    try:
        prev = await asyncio.get_running_loop().run_in_executor(None, repo.resolve, f"{new.image}@{last}")
    except NotFound:  # removed since, or the last snapshot went into another image
        return None
    same = (prev.image, prev.size, prev.chunk_size, prev.chunks) == (new.image, new.size, new.chunk_size, new.chunks)
    return prev if same else None


# Given the chunks that differ between the versions and the instance's modified chunks (both
# sorted), the modified chunks to keep over the new version; it may raise to refuse the update.
# Called while the device is quiesced (inside ``switch_base``), so the modified set cannot grow
# behind its back; not called when nothing is modified.
Keeper = Callable[[list[int], list[int]], Collection[int]]


async def update(dev: CacheDevice, new: Manifest, *, keep: Keeper | None = None,
                 eager: bool = True) -> UpdateResult:
    """Move the instance to ``new`` (another version of its image), fetching only what differs;
    the modified chunks go back to ``new`` but for those ``keep`` returns."""
    async with dev.lifecycle_lock:
        t0 = time.monotonic()
        old = dev.manifest
        if dev.overlay:
            raise UsageError("an overlay instance follows its shared base: make a clone of the new version instead")
        if new.image != old.image:
            raise CacheMismatch(path=str(dev.cache_dir), held=f"{old.image}@{old.id}",
                                wanted=f"a version of {new.image}")
        if new.id == old.id:
            return UpdateResult(version=new.id, from_version=old.id)
        changed = manifest_diff(old, new)
        chosen: list[set[int]] = []

        def kept(i: int) -> bool:  # switch_base asks per modified chunk, quiesced: decide once, on the first
            if not chosen:
                assert keep is not None
                modified = dev.chunks.modified_chunks()
                choice = set(keep(sorted(changed), modified))
                if not choice <= set(modified):
                    raise UsageError("an update can keep only modified chunks")
                chosen.append(choice)
            return i in chosen[0]

        # The instance stays as local as it was: changed chunks it held (data or zeros) come again.
        switched = await dev.switch_base(new, changed, keep_modified=kept if keep is not None else False)
        refetch, modified = switched.refetch, switched.modified
        before = dev.totals()["bytes_fetched"]
        if eager and refetch:
            await dev.fetch_chunks(refetch)
        return UpdateResult(version=new.id, from_version=old.id, chunks_changed=len(changed),
                            chunks_refetched=len(refetch) if eager else 0,
                            bytes_fetched=dev.totals()["bytes_fetched"] - before,
                            modified_kept=len(switched.kept), modified_discarded=len(modified) - len(switched.kept),
                            seconds=round(time.monotonic() - t0, 6))
