"""A cache's lifecycle steps: what reset, snapshot, update and hydration change in the chunk map.

agent/lifecycle.py and agent/hydrate.py orchestrate (upload, commit, pacing); every change of
chunk states they need is a step here, called through the device (cache/device.py), so the
cache keeps its invariants in one place. Each step runs quiesced where the map must hold still
(``quiesced``: requests that may fetch or change chunks wait, those in flight finish, the layers
below go idle), and its crash rules are stated where it is written:

- Reset (invariant 5): journal ``reset`` of the modified runs → fsync; holes are punched
  afterwards, only when no client can still be sending an old piece of the data file.
- Capture (snapshot, invariant 4): chunks of the snapshot get HELD, so a later write journals
  ``dirty`` durably before its data changes and first saves the old content (cache/capture.py).
- Base switch (update, rebase): the new manifest is written as manifest-<id>.json, one
  checkpoint switches version, digest and flags atomically, then the file is renamed into place.
- Writes made past the cache (a PC's native data path, netboot/native.py): ``mark_written``
  journals ``modified`` and ``unzero`` for the chunks the kernel recorded and syncs before it
  returns, so the caller may forget the kernel's record only afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from blockprov import codec
from blockprov.align import runs
from blockprov.cache.capture import Capture
from blockprov.cache.concurrency import gated
from blockprov.cache.core import Core
from blockprov.cache.files import io_error
from blockprov.cache.maps import BASE_ZERO, HELD, MODIFIED, PRESENT, ZERO, ChunkMap, Kind
from blockprov.cache.opening import MANIFEST_NAME, manifest_digest, next_manifest_name
from blockprov.cache.status import needs_repository
from blockprov.durable import atomic_write, fsync_dir
from blockprov.errors import CacheError, DeviceIOError
from blockprov.manifest import Manifest


class Steps:
    """The lifecycle steps of one cache (see the module docstring)."""

    def __init__(self, core: Core) -> None:
        self._c = core
        self._gate = core.gate

    @contextlib.asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Hold new reads that would fetch and every change back, wait for those in flight and for
        the layers below to go idle: inside, the map changes only by the caller's hand.

        Reads of local chunks go on (they only look at the map); a read that was handed a piece of
        the data file just before may still be sending it (see ``reset`` on hole punching).
        """
        self._c.check_open()
        async with self._gate.closed():
            await self._c.source.idle()
            yield

    @gated
    async def fetch_chunks(self, indices: Sequence[int], *, background: bool = False) -> int:
        """Make these chunks local (missing ones fetched and stored, their data synced: a caller
        may hand the data area to a reader past this agent's page cache, as the PC's native data
        path does); returns how many were missing. ``background`` (hydration): client reads go
        first (``ChunkSource.materialize``)."""
        fl = self._c.flags
        need = [i for i in indices if not fl[i] & (PRESENT | ZERO)]
        if need:
            await self._c.source.materialize(need, background=background)
            await self._c.sync_fills()
        return len(need)

    async def settle(self) -> None:
        """Wait until fetches and fills in flight (read-ahead included) and hole punching are done."""
        await self._c.source.idle()
        while self._c.punches:
            await asyncio.gather(*self._c.punches, return_exceptions=True)

    def layers_below(self) -> list[ChunkMap]:
        return self._c.source.maps_below()

    # -- reset -------------------------------------------------------------------------------------
    async def reset(self, *, eager: bool, punch: bool, overlay: bool) -> Reset:
        """Every modified chunk back to the base (invariant 5); cost ∝ modified chunks.

        Order: journal ``reset`` of the modified runs → fsync; that is the reset. Holes are
        punched afterwards in the background (space only: a reset chunk is missing or zero, so its
        old bytes are never read again; punching a flushed extent costs ~0.2 ms a chunk, which
        clients should not wait for). ``punch=False`` when a client may still be sending a piece
        of the data file it was handed before the reset. Eager: fetch the reset chunks now
        (outside the quiesce: clients are served meanwhile), which reuses their blocks instead;
        an overlay's reset chunks read through its base again: nothing to fetch.
        """
        c = self._c
        fl = c.flags
        async with self.quiesced():
            spans = list(c.map.runs_where(MODIFIED))
            for x, y in spans:
                c.state.apply(Kind.RESET, x, y)
            if spans:
                await c.state.sync()
            c.pending_mod.clear()
        if spans and punch and not eager and c.can_punch:
            task = asyncio.ensure_future(self._punch_reset(spans))
            c.punches.add(task)
            task.add_done_callback(c.punches.discard)
        n = sum(y - x for x, y in spans)
        refetch = [i for x, y in spans for i in range(x, y)
                   if not fl[i] & (PRESENT | ZERO)] if eager and not overlay else []
        if refetch:
            await self.fetch_chunks(refetch)
        c.maybe_checkpoint()
        # Until the reset chunks are local again their reads need the repository: say how many
        # (and how many chunks in all), so a reset before going offline is not a silent trap.
        below = self.layers_below()
        again = sum(needs_repository(c.map, below, x, y) for x, y in spans)
        return Reset(chunks_reset=n, chunks_refetched=len(refetch), reset_from_repository=again,
                     chunks_from_repository=needs_repository(c.map, below))

    async def _punch_reset(self, spans: list[tuple[int, int]]) -> None:
        """Free the blocks of reset chunks, a group at a time under the chunks' claims, so a fill
        or a write of one of them (it is missing now) cannot land between the check and the punch."""
        c = self._c
        fl = c.flags
        for x, y in spans:
            for a in range(x, y, 64):
                group = list(range(a, min(y, a + 64)))
                await c.claims.claim(group)
                try:
                    free = runs(i for i in group if not fl[i] & PRESENT)
                    if free and c.can_punch and c.fd >= 0:
                        await c.run(c.punch_runs, free)
                finally:
                    c.claims.release(group)

    # -- snapshots (invariant 4) --------------------------------------------------------------
    async def begin_snapshot(self, target: str) -> Pending:
        """Step 1 of a snapshot for ``target`` (agent/lifecycle.py has the whole story), quiesced:
        the modified chunks S and their write generations are taken; S's chunks get HELD, so a
        later write journals ``dirty`` durably before its data changes and first saves the old
        content for the snapshot (cache/capture.py); a checkpoint makes generations, HELD and the
        target durable. Read S with ``read_snapshot``, end with ``end_snapshot``."""
        c = self._c
        cmap = c.map
        async with self.quiesced():
            t = cmap.add_target(target)
            fl = cmap.flags
            modified = [i for a, b in cmap.runs_where(MODIFIED) for i in range(a, b)]
            assert cmap.gens is not None
            gens = {i: cmap.gens[i] for i in modified}
            unsynced = sum(1 for i in modified if cmap.is_unsynced(t, i))
            data = [i for i in modified if fl[i] & (PRESENT | ZERO) == PRESENT]
            zeroed = [i for i in modified if fl[i] & ZERO]
            cap = c.capture = Capture(data, c.read_chunk)
            for i in (*cap.pending, *modified):
                fl[i] |= HELD
            await c.checkpoint(clean=False)
        return Pending(target, t, c.manifest, modified, gens, unsynced, data, zeroed, cap,
                       c.state.meta.snapshots.get(target))

    def read_snapshot(self, pending: Pending, indices: Sequence[int]) -> list[bytes]:
        """Content of chunks of ``pending`` as they were when it began (on the event loop)."""
        c = self._c
        if c.fd < 0:
            raise DeviceIOError(msg="cache is closed")
        try:
            return pending.capture.read(indices)
        except OSError as e:
            raise io_error(e, f"reading {c.data_path}") from e

    def end_snapshot(self, pending: Pending) -> None:
        """No more reads of ``pending``: writes stop saving old content for it."""
        if self._c.capture is pending.capture:
            self._c.capture = None

    async def acknowledge(self, pending: Pending, version: str, *, rebase: Manifest | None = None) -> int:
        """Step 4: the repository acknowledged ``pending`` as ``version``. ``synced`` records clear
        the target's unsynced bit of each chunk whose generation did not move (a chunk written
        since keeps it); the version is recorded for the target; with ``rebase`` (the snapshot's
        manifest) it becomes the base, its chunks no longer modified but those written since.
        Returns how many chunks were written during the snapshot."""
        c = self._c
        cmap = c.map
        self.end_snapshot(pending)
        for i in pending.modified:
            c.state.apply(Kind.SYNCED, i, 0, pending.gens[i], target=pending.index)
        still = sum(1 for i in pending.modified if cmap.is_unsynced(pending.index, i))
        meta = c.state.meta
        c.state.meta = replace(meta, snapshots={**meta.snapshots, pending.target: version})
        if rebase is None:
            await c.checkpoint(clean=False)
            return still
        async with self.quiesced():
            assert cmap.gens is not None
            flags = bytearray(cmap.flags)
            for i in pending.modified:
                f = flags[i]
                if cmap.gens[i] != pending.gens[i]:
                    flags[i] = (f & ~BASE_ZERO) | (BASE_ZERO if rebase.is_zero(i) else 0)
                elif f & ZERO:
                    flags[i] = ZERO | BASE_ZERO
                else:
                    flags[i] = f & PRESENT
            await self._switch_base(rebase, flags)
        return still

    # -- base switches ---------------------------------------------------------------------------
    async def switch_base(self, new: Manifest, changed: Sequence[int], *,
                          keep_modified: bool | Callable[[int], bool] = False) -> Switched:
        """Make ``new`` (another version of the image, whose chunks ``changed`` differ) the base,
        quiesced: a changed chunk that is not modified holds no data any more (it reads ``new``'s
        from below); a modified chunk is kept over the new base when ``keep_modified`` says so
        (for each chunk, when it is a function), else it is back to ``new``'s content. Returns
        what was local and changed (to fetch again, to stay as local as before) and the modified
        chunks."""
        keep = keep_modified if callable(keep_modified) else (lambda i: bool(keep_modified))
        cmap = self._c.map
        async with self.quiesced():
            flags = bytearray(cmap.flags)
            refetch = [i for i in changed if flags[i] & (PRESENT | ZERO) and not flags[i] & MODIFIED
                       and not new.is_zero(i)]
            modified = [i for a, b in cmap.runs_where(MODIFIED) for i in range(a, b)]
            kept = [i for i in modified if keep(i)]
            for i in changed:
                if not flags[i] & MODIFIED:
                    flags[i] = base_flags(new, i)
            for i in modified:
                flags[i] = base_flags(new, i)
            for i in kept:
                flags[i] = (cmap.flags[i] & ~BASE_ZERO) | (BASE_ZERO if new.is_zero(i) else 0)
            await self._switch_base(new, flags)
        return Switched(refetch, modified, kept)

    async def _switch_base(self, new: Manifest, flags: bytearray) -> None:
        """Make ``new`` the base version with these chunk flags, in one atomic checkpoint (called
        quiesced, with ``flags`` such that every present chunk holds ``new``'s data or is modified).

        Crash rules: the new manifest is written as manifest-<id>.json first, then the checkpoint
        switches meta (version, digest, flags) atomically, then the file is renamed to
        manifest.json; ``open`` finds either name. A crash before the checkpoint leaves the old base.
        """
        c = self._c
        if (new.size, new.chunk_size) != (c.size, c.cs):
            raise CacheError(f"{new.image}@{new.id} has another size or chunk size than the cache")
        nxt = c.cache_dir / next_manifest_name(new.id)
        await c.run(atomic_write, nxt, new.to_json())
        c.flags[:] = flags
        c.pending_mod.clear()
        c.state.meta = replace(c.state.meta, version=new.id, manifest_digest=manifest_digest(new))
        c.manifest = new
        c.source.manifest = new
        await c.checkpoint(clean=False)

        def install() -> None:
            os.replace(nxt, c.cache_dir / MANIFEST_NAME)
            fsync_dir(c.cache_dir)

        await c.run(install)

    async def switch_base_cache(self, base_cache: str | os.PathLike[str], sealed: Sequence[int]) -> None:
        """Put this overlay over another base cache of the same version that holds the content of
        its ``sealed`` chunks (written there by the caller, flushed and closed), in one atomic
        checkpoint, quiesced: those chunks are no longer modified and read as a fresh overlay of
        the new base would (zeros are local, data reads through), so every chunk reads the same
        before and after. A crash before the checkpoint leaves the old base and flags. The open
        base is not swapped: close the overlay and open it over the new one.

        Used to seal a clone's customization into its pristine state (clones/clones.py)."""
        c = self._c
        if c.state.meta.base_cache is None:
            raise CacheError(f"{c.cache_dir} is not an overlay: it has no base cache to switch")
        async with self.quiesced():
            flags = bytearray(c.flags)
            for i in sealed:
                flags[i] = ZERO | BASE_ZERO if flags[i] & ZERO else 0
            c.flags[:] = flags
            c.pending_mod.clear()
            c.state.meta = replace(c.state.meta, base_cache=str(Path(base_cache).resolve()))
            await c.checkpoint(clean=False)

    # -- writes made past the cache ----------------------------------------------------------------
    async def mark_written(self, chunks: Sequence[int], *, compare: bool = True) -> list[int]:
        """Chunks the machine wrote straight to the data file, past the cache (a PC's native data
        path: netboot/native.py turns the kernel's write record into this call), become what a
        write through the cache makes them: modified, holding their data (present, no longer
        zero), unsynced for every snapshot target, their write generations moved — so a snapshot
        sends them, a reset brings them back, an update by diff sees them, and a snapshot being
        acknowledged keeps them unsynced. ``compare``: a chunk not modified so far that still
        holds its base content (the kernel records blocks larger than a chunk, or the machine
        wrote back what was there) is left as it is (invariant 1 holds for it as it is). Journaled
        and synced before it returns. Returns the chunks marked."""
        c = self._c
        m = c.manifest
        todo = sorted({i for i in chunks if 0 <= i < m.count})
        async with self.quiesced():
            if compare:
                fl = c.flags

                def differing() -> list[int]:
                    out = []
                    for i in todo:
                        if fl[i] & MODIFIED:
                            out.append(i)
                            continue
                        data = c.read_chunk(i)
                        same = codec.is_zero(data) if m.is_zero(i) else codec.digest(data) == m.digest_at(i)
                        if not same:
                            out.append(i)
                    return out

                try:
                    todo = await c.run(differing)
                except OSError as e:
                    raise io_error(e, f"reading {c.data_path}") from e
            for x, y in runs(todo):
                c.state.apply(Kind.MODIFIED, x, y)
                c.state.apply(Kind.UNZERO, x, y)
            if todo:
                await c.state.sync()
        c.maybe_checkpoint()
        return todo

    async def mark_rewritten(self, chunks: Sequence[int]) -> None:
        """Modified chunks written again past the cache (after a native snapshot's point in time,
        netboot/native.py): their write generations move and they are unsynced for every target
        again (journal ``dirty``), so the snapshot being acknowledged does not mark them synced."""
        c = self._c
        todo = sorted({i for i in chunks if 0 <= i < c.manifest.count and c.flags[i] & MODIFIED})
        async with self.quiesced():
            for x, y in runs(todo):
                c.state.apply(Kind.DIRTY, x, y)
            if todo:
                await c.state.sync()

    # -- what lifecycle records --------------------------------------------------------------------
    async def sync_fills(self) -> None:
        """Make the journal's records durable now (fills are journaled without a sync)."""
        await self._c.state.sync()

    async def record_hydrated(self) -> None:
        """Every chunk became local: recorded (``status``'s ``hydrated``) by a checkpoint."""
        c = self._c
        c.state.meta = replace(c.state.meta, hydrated=time.time())
        await c.checkpoint(clean=False)

    def record_repository(self, url: str) -> None:
        """The repository the cache is served from now (its next attach uses it): in meta at the
        next checkpoint."""
        c = self._c
        c.state.meta = replace(c.state.meta, repository=url)


def base_flags(new: Manifest, i: int) -> int:
    """Flags of a chunk that holds no data and equals ``new``'s chunk i."""
    return ZERO | BASE_ZERO if new.is_zero(i) else 0


@dataclass
class Pending:
    """A snapshot between ``begin_snapshot`` and ``acknowledge``: what it sends and what it found."""

    target: str
    index: int  # the target's index in the chunk map
    base: Manifest  # the base version when it began
    modified: list[int]  # the chunks S it sends
    gens: dict[int, int]  # their write generations when it began
    unsynced_before: int  # how many of them the target had not received
    data_chunks: list[int]  # S's chunks with data (read them with ``read_snapshot``)
    zeroed: list[int]  # S's chunks that read as zeros
    capture: Capture
    last_snapshot: str | None  # the version the target's last acknowledged snapshot made


@dataclass(frozen=True)
class Reset:
    """What ``reset`` did."""

    chunks_reset: int  # the modified chunks, back to the base
    chunks_refetched: int  # of them fetched again at once (eager)
    reset_from_repository: int  # of them, how many now need the repository to be read
    chunks_from_repository: int  # chunks in all that need the repository to be read


@dataclass(frozen=True)
class Switched:
    """What ``switch_base`` did."""

    refetch: list[int]  # chunks that were local and changed: fetch them again to stay as local
    modified: list[int]  # the chunks that were modified
    kept: list[int]  # of those, the ones kept over the new base
