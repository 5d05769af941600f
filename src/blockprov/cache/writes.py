"""A cache's writes: every write, zeroing and trim but the common one, in the orders of
operations that keep invariants 1–3 (listed in cache/device.py's docstring).

The device answers the common write itself (every chunk present and already modified: one
pwrite, nothing to journal). Here: first writes (journal ``modified`` durably first), writes
into missing chunks (whole: no fetch; partial: fetched and filled first) and into zero chunks
(rewritten whole), zeroing of whole chunks (journal ``zero`` durably, then punch). Before the
first change of a clean present chunk the layers below are told (``ChunkSource.before_overwrite``:
the golden reserve copies its base content durably first); a chunk a snapshot target may hold
(HELD) journals ``dirty`` durably before its data changes, and a snapshot still reading it gets
its old content first (cache/capture.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blockprov.align import runs, split
from blockprov.cache.core import Core
from blockprov.cache.maps import HELD, MODIFIED, PRESENT, ZERO, Kind
from blockprov.cache.source import Release
from blockprov.errors import NotSupported


class Writes:
    """The slow write paths of one cache (see the module docstring)."""

    def __init__(self, core: Core) -> None:
        self._c = core

    async def _before_overwrite(self, chunks: Sequence[int]) -> Release | None:
        """Tell the layers below which clean present chunks are about to change (the reserve keeps
        their base content); returns what to call once their records are applied."""
        c = self._c
        fl = c.flags
        first = [x for x in chunks if fl[x] & (PRESENT | MODIFIED | ZERO) == PRESENT]
        return await c.source.before_overwrite(first) if first else None

    async def write(self, offset: int, mv: memoryview) -> None:
        c = self._c
        fl = c.flags
        cs = c.cs
        state = c.state
        claims = c.claims
        pieces = list(split(offset, len(mv), cs))
        chunks = sorted({p.chunk for p in pieces})
        while True:
            need = [p.chunk for p in pieces if not p.whole and not fl[p.chunk] & (PRESENT | ZERO)]
            if need:
                await claims.wait_unclaimed(need)
                await c.source.materialize(need)
                continue
            claimed = [x for x in chunks if not fl[x] & PRESENT]
            if claimed:
                await claims.claim(claimed)
                if any(not p.whole and not fl[p.chunk] & (PRESENT | ZERO) for p in pieces):
                    claims.release(claimed)
                    continue
            break
        release: Release | None = None
        try:
            release = await self._before_overwrite(chunks)
            # The journal: modified marks (durable before any data changes), then present marks
            # for whole chunks written into missing ones.
            # A chunk a snapshot target may hold gets ``dirty`` first (maps.HELD).
            # ``modified`` records clear HELD, so the second pass sees only the remaining ones.
            seq = 0
            picks: tuple[tuple[Kind, Callable[[int], int]], ...] = (
                (Kind.MODIFIED, lambda f: not f & MODIFIED), (Kind.DIRTY, lambda f: f & HELD))
            for kind, pick in picks:
                for x, y in runs(ch for ch in chunks if pick(fl[ch])):
                    seq = state.apply(kind, x, y)
                    for ch in range(x, y):
                        c.pending_mod[ch] = seq
            missing = [x for x in claimed if not fl[x] & (PRESENT | ZERO)]
            if c.pending_mod:
                seq = max(seq, max((c.pending_mod.get(x, 0) for x in chunks), default=0))
            if seq > state.durable_seq:
                await state.sync(seq)
            for x in chunks:
                s = c.pending_mod.get(x)
                if s is not None and s <= state.durable_seq:
                    del c.pending_mod[x]
            if c.map.unsynced:
                c.map.touch(chunks[0], chunks[-1] + 1)
            # The data. A claimed zero chunk is rewritten whole (zeros around the new bytes);
            # anything else gets just its piece.
            zero_claimed = {x for x in claimed if fl[x] & ZERO}
            writes: list[tuple[int, bytes | bytearray | memoryview]] = []
            for p in pieces:
                pos = p.offset(cs)
                src = mv[pos - offset:pos - offset + p.length]
                if p.chunk in zero_claimed and not p.whole:
                    buf = bytearray(c.manifest.chunk_length(p.chunk))
                    buf[p.start:p.start + p.length] = src
                    writes.append((p.chunk * cs, buf))
                else:
                    writes.append((pos, src))
            if c.capture is not None:
                c.capture.save_old(chunks)
            await c.pwrite_many(writes)
            if claimed:
                # The chunk's new content must be on disk before the journal may say it is
                # there: otherwise a crash could show a hole instead of old or new data.
                await c.data_sync.sync()
                for x, y in runs(missing):
                    state.apply(Kind.PRESENT, x, y)
                for x, y in runs(sorted(zero_claimed)):
                    state.apply(Kind.UNZERO, x, y)
        finally:
            if claimed:
                claims.release(claimed)
            if release is not None:
                release()
        c.maybe_checkpoint()

    async def zero(self, offset: int, length: int, *, fast_only: bool) -> None:
        c = self._c
        fl = c.flags
        pieces = list(split(offset, length, c.cs))
        partial = [p for p in pieces if not p.whole and not fl[p.chunk] & ZERO]
        if fast_only and partial:
            raise NotSupported(msg="zeroing part of a chunk means writing zeros; not fast")
        whole = [p.chunk for p in pieces if p.whole and not fl[p.chunk] & ZERO]
        if whole:
            await self._zero_chunks(whole)
        for p in partial:
            await self.write(p.offset(c.cs), c.zeros[:p.length])

    async def _zero_chunks(self, chunks: list[int]) -> None:
        c = self._c
        fl = c.flags
        await c.claims.claim(chunks)
        release: Release | None = None
        try:
            todo = [x for x in chunks if not fl[x] & ZERO]
            release = await self._before_overwrite(todo)
            if c.capture is not None:
                c.capture.save_old(todo)
            seq = 0
            spans = runs(todo)
            for x, y in spans:
                seq = c.state.apply(Kind.ZERO, x, y)
            if seq:
                await c.state.sync(seq)
            if spans and c.can_punch:
                await c.run(c.punch_runs, spans)
        finally:
            c.claims.release(chunks)
            if release is not None:
                release()
        c.maybe_checkpoint()
