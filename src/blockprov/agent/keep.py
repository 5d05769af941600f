"""What an instance keeps of its session when it moves to another version (invariant 8; issue 27
item 0).

Keeping modified chunks over another version's base merges two file systems block by block, which
no file system survives (partitions.py says why). So an update that keeps the session's changes
keeps only the modified chunks of partitions the new version leaves unchanged — a user-data
partition survives image updates — and the rest:

* ``update --keep-modified`` on a host agent (``update`` here, through cli/instance.py or the
  control socket): refused (KeepWouldMerge, exit 5) when any modified chunk lies outside those
  partitions, naming the partitions and what to do (snapshot the instance first, then ``--force``
  resets them). Nothing is changed by a refusal.
* a ``keep`` PC moved to another version at boot (``move``, called by netboot/inagent.py): the
  session is first kept as a version in the repository (a snapshot of the PC, nothing lost), then
  the PC moves with only the kept partitions' chunks. When that snapshot cannot be made (the
  PC's token lacks the ``write`` scope, the repository refuses), the PC does not move: it boots
  the version it holds, as it was, and says why. ``blockprov.on_move=discard`` on the PC's
  command line skips the snapshot and resets those chunks.

The tables come from three places: the version the instance leaves and the one it moves to (read
from the repository, each chunk verified), and the instance's own disk (the session may have
changed the table). Reading them is I/O; deciding is partitions.py, pure.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from blockprov import codec
from blockprov.agent import lifecycle
from blockprov.cache import CacheDevice
from blockprov.device.base import FileSegment
from blockprov.errors import BlockprovError, KeepWouldMerge
from blockprov.manifest import Manifest
from blockprov.manifest import diff as manifest_diff
from blockprov.partitions import KeepPlan, Parser, Table, parse_table, plan_keep
from blockprov.repo.base import Repository
from blockprov.results import inline, omit_none

SNAPSHOT_TARGET = "kept"  # the snapshot target a moving PC's session goes to


async def _drive(gen: Parser, read: Callable[[int, int], Awaitable[bytes]]) -> Table:
    try:
        req = next(gen)
        while True:
            req = gen.send(await read(*req))
    except StopIteration as stop:
        table: Table = stop.value
        return table


def _version_reader(repo: Repository, m: Manifest) -> Callable[[int, int], bytes]:
    """Bytes of version ``m`` at any offset, from the repository (every chunk verified)."""
    def read(offset: int, length: int) -> bytes:
        end = min(m.size, offset + length)
        if offset >= end:
            return b""
        first, last = offset // m.chunk_size, (end - 1) // m.chunk_size
        wanted = [i for i in range(first, last + 1) if not m.is_zero(i)]
        blobs = dict(zip(wanted, repo.get_blobs([m.digest_at(i) for i in wanted]), strict=True))
        data = b"".join(codec.decode(blobs[i], m.digest_at(i)) if i in blobs else bytes(m.chunk_length(i))
                        for i in range(first, last + 1))
        base = first * m.chunk_size
        return data[offset - base:end - base]
    return read


async def version_table(repo: Repository, m: Manifest) -> Table:
    read = _version_reader(repo, m)
    loop = asyncio.get_running_loop()

    async def aread(offset: int, length: int) -> bytes:
        return await loop.run_in_executor(None, read, offset, length)
    return await _drive(parse_table(m.size), aread)


async def device_table(dev: CacheDevice) -> Table:
    """The table as the instance's disk holds it now (its missing chunks are fetched)."""
    async def aread(offset: int, length: int) -> bytes:
        length = max(0, min(length, dev.size - offset))
        if length == 0:
            return b""
        out = []
        for piece in await dev.read(offset, length):
            if isinstance(piece, FileSegment):
                out.append(os.pread(piece.fd, piece.length, piece.offset))
            else:
                out.append(bytes(piece))
        return b"".join(out)
    return await _drive(parse_table(dev.size), aread)


async def tables(dev: CacheDevice, repo: Repository, new: Manifest) -> tuple[Table, Table, Table]:
    """(the version left, the version moved to, the instance's disk now)."""
    return await version_table(repo, dev.manifest), await version_table(repo, new), await device_table(dev)


@dataclass(frozen=True)
class PartitionKept:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str
    modified_chunks: int
    kept: bool
    why: str


@dataclass(frozen=True)
class KeepReport:
    """What an update kept of the modified chunks, partition by partition (``plan_keep``)."""

    table: str  # the partition table found ("none": a whole-disk file system)
    why: str
    kept_chunks: int
    reset_chunks: int
    partitions: list[PartitionKept] = field(default_factory=list)


@dataclass(frozen=True)
class VersionRef:
    image: str
    tag: str
    version: str


@dataclass(frozen=True)
class KeptUpdate:
    """An update's result (lifecycle.py), with what it kept and, for a moving PC, the version its
    session was kept as first."""

    update: lifecycle.UpdateResult = inline()
    keep: KeepReport | None = omit_none()
    snapshot: VersionRef | None = omit_none()


def report_of(plan: KeepPlan) -> KeepReport:
    return KeepReport(table=plan.kind, why=plan.why, kept_chunks=len(plan.keep), reset_chunks=len(plan.drop),
                      partitions=[PartitionKept(number=p.partition.number, start=p.partition.start,
                                                size=p.partition.size, type=p.partition.type,
                                                modified_chunks=p.modified, kept=p.kept, why=p.why)
                                  for p in plan.partitions])


def keeper(found: tuple[Table, Table, Table], new: Manifest, *, force: bool, plans: list[KeepPlan],
           refusal: Callable[[KeepPlan], str]) -> lifecycle.Keeper:
    """The choice ``lifecycle.update`` makes while quiesced: the plan over the modified set of that
    moment (appended to ``plans``); refused with ``refusal(plan)`` unless ``force`` when a
    modified chunk would have to be reset."""
    def keep(changed: list[int], modified: list[int]) -> Collection[int]:
        plan = plan_keep(*found, new.chunk_size, new.size, changed, modified)
        plans.append(plan)
        if plan.drop and not force:
            raise KeepWouldMerge(refusal(plan))
        return plan.keep
    return keep


async def update(dev: CacheDevice, repo: Repository, new: Manifest, *, keep_modified: bool, force: bool = False,
                 eager: bool = True, where: str = "the instance") -> KeptUpdate:
    """``update``, keeping modified chunks only where that is sound (see the module's docstring)."""
    if not keep_modified:
        return KeptUpdate(update=await lifecycle.update(dev, new, eager=eager))
    found = await tables(dev, repo, new)
    plans: list[KeepPlan] = []
    old = dev.manifest

    def refusal(plan: KeepPlan) -> str:
        kept = [p.partition.label() for p in plan.partitions if p.kept]
        return (f"update --keep-modified refused: {len(plan.drop)} modified chunk(s) of {where} lie outside the "
                f"partitions {new.image}@{new.id[:12]} leaves unchanged, and keeping them over it would merge two "
                f"file systems — {plan.summary()}. Nothing was changed. Keep them as a version first (blockprov "
                f"snapshot --to {old.image}:TAG), then update again with --force to reset them"
                + (f" (kept: {', '.join(kept)})" if kept else "") + ", or update without --keep-modified")
    out = await lifecycle.update(dev, new, eager=eager, keep=keeper(found, new, force=force, plans=plans,
                                                                     refusal=refusal))
    return KeptUpdate(update=out, keep=report_of(plans[-1]) if plans else None)


def kept_tag(host: str | None, now: float | None = None) -> str:
    """The tag a moving PC's session is kept under: ``kept-HOST-YYYYmmddTHHMMSSZ``."""
    who = "".join(c if c.isalnum() else "-" for c in (host or "pc"))[:60]
    return f"kept-{who}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}"


async def move(dev: CacheDevice, repo: Repository, new: Manifest, *, host: str | None, on_move: str,
               say: Callable[[str], None]) -> KeptUpdate | None:
    """A ``keep`` PC moved to ``new`` at boot (see the module's docstring). Returns the update's
    result with ``keep`` (the plan) and ``snapshot`` (the version the session was kept as, if
    one was needed), or None when the PC stays on its version (said on the console)."""
    found = await tables(dev, repo, new)
    modified = dev.chunks.modified_chunks()
    preview = plan_keep(*found, new.chunk_size, new.size, manifest_diff(dev.manifest, new), modified)
    snap: lifecycle.SnapshotResult | None = None
    if preview.drop and on_move == "snapshot":
        tag = kept_tag(host)
        say(f"the session changed {len(preview.drop)} chunk(s) that {new.image}@{new.id[:12]} cannot keep "
            f"({preview.summary()}): keeping the session as {dev.manifest.image}:{tag} first")
        try:
            snap = await lifecycle.snapshot(dev, repo, f"{dev.manifest.image}:{tag}", target=SNAPSHOT_TARGET)
        except BlockprovError as e:
            say(f"NOT UPDATED to {new.image}@{new.id[:12]}: the session could not be kept as a version ({e}); "
                f"booting {dev.manifest.image}@{dev.manifest.id[:12]} as it was, with its changes. A keep PC "
                "needs a token of the write scope to keep its session when it moves (host assign … --args "
                "blockprov.token=TOKEN), or blockprov.on_move=discard to reset those changes instead")
            return None
        say(f"kept the session as {snap.image}:{snap.tag} = {snap.version} ({snap.chunks_sent} chunk(s) "
            "sent); moving clean")
    elif preview.drop:
        say(f"blockprov.on_move=discard: the session's {len(preview.drop)} chunk(s) outside the partitions "
            f"{new.image}@{new.id[:12]} leaves unchanged are reset, not kept")
    plans: list[KeepPlan] = []
    out = await lifecycle.update(dev, new, keep=keeper(found, new, force=True, plans=plans, refusal=str))
    plan = plans[-1] if plans else preview
    say(f"kept {out.modified_kept} modified chunk(s), reset {out.modified_discarded}: {plan.summary()}")
    kept_as = None if snap is None else VersionRef(image=snap.image, tag=snap.tag, version=snap.version)
    return KeptUpdate(update=out, keep=report_of(plan), snapshot=kept_as)
