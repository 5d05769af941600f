"""Property test: random read / write / zero / trim / flush / reopen / crash sequences on a
CacheDevice read back exactly like a bytearray model, and invariant 1 holds throughout."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockprov import codec
from blockprov.cache import CacheDevice
from blockprov.device.base import result_bytes
from tests.caches import open_cache
from tests.unit.test_cache_support import DictRepo, make_image

CS = 4096
CHUNKS = 12
TAIL = 1536
SIZE = CHUNKS * CS + TAIL

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 3 * CS)


def clip(offset: int, length: int) -> tuple[int, int]:
    return offset, min(length, SIZE - offset)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="bp-cache-model-"))
        self.repo = DictRepo()
        self.manifest, content = make_image(self.repo, chunks=CHUNKS, tail=TAIL, zero_every=3, dup_every=4)
        self.model = bytearray(content)
        self.loop = asyncio.new_event_loop()
        self.dev = self._open(manifest=True)

    def _open(self, manifest: bool = False) -> CacheDevice:
        return self.loop.run_until_complete(open_cache(
            self.dir, self.repo, self.manifest if manifest else None, readahead=4 * CS))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        offset, length = clip(offset, length)
        assert result_bytes(self.run(self.dev.read(offset, length))) == self.model[offset:offset + length]

    @rule(offset=offsets, length=lengths, byte=st.integers(1, 255), fua=st.booleans())
    def write(self, offset: int, length: int, byte: int, fua: bool) -> None:
        offset, length = clip(offset, length)
        data = bytes([byte]) * length
        self.run(self.dev.write(offset, data, fua=fua))
        self.model[offset:offset + length] = data

    @rule(offset=offsets, length=lengths, trim=st.booleans())
    def zero(self, offset: int, length: int, trim: bool) -> None:
        offset, length = clip(offset, length)
        if trim:
            self.run(self.dev.trim(offset, length))
        else:
            self.run(self.dev.write_zeroes(offset, length, may_trim=True))
        self.model[offset:offset + length] = bytes(length)

    @rule(cuts=st.lists(st.integers(0, SIZE // 512), min_size=2, max_size=10, unique=True),
          kinds=st.lists(st.sampled_from(["w", "z", "r", "t"]), min_size=10, max_size=10))
    def concurrent(self, cuts: list[int], kinds: list[str]) -> None:
        """Disjoint ranges (often sharing chunks) operated on at once."""
        bounds = sorted(c * 512 for c in cuts)
        ops = []
        reads = []
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            kind = kinds[k]
            if kind == "w":
                data = bytes([(k * 37) % 255 + 1]) * (b - a)
                ops.append(self.dev.write(a, data))
                self.model[a:b] = data
            elif kind in "zt":
                ops.append(self.dev.write_zeroes(a, b - a) if kind == "z" else self.dev.trim(a, b - a))
                self.model[a:b] = bytes(b - a)
            else:
                reads.append((len(ops), a, b))
                ops.append(self.dev.read(a, b - a))
        before = bytes(self.model)

        async def all_ops() -> list[Any]:
            return await asyncio.gather(*ops)

        results = self.run(all_ops())
        for idx, a, b in reads:
            assert result_bytes(results[idx]) == before[a:b]

    @rule()
    def flush(self) -> None:
        self.run(self.dev.flush())

    @rule()
    def reopen(self) -> None:
        self.run(self.dev.close())
        self.dev = self._open()

    @rule()
    def crash_after_flush(self) -> None:
        """Flush, then stop without close (no checkpoint, no clean mark): replay must restore."""
        self.run(self.dev.flush())
        dev = self.dev
        self.run(dev.abandon())
        self.dev = self._open()

    @precondition(lambda self: self.dev is not None)
    @rule()
    def read_everything_twice_costs_no_second_fetch(self) -> None:
        assert result_bytes(self.run(self.dev.read(0, SIZE))) == self.model
        self.run(self.dev.settle())
        calls = self.repo.call_count
        assert result_bytes(self.run(self.dev.read(0, SIZE))) == self.model
        assert self.repo.call_count == calls

    @invariant()
    def present_chunks_hold_manifest_data_or_are_modified(self) -> None:
        self.run(self.dev.settle())
        ch = self.dev.chunks
        m = self.manifest
        fd = os.open(self.dev.data_path, os.O_RDONLY)
        try:
            for i in range(m.count):
                if ch.present(i) and not ch.modified(i) and not ch.zero(i):
                    data = os.pread(fd, m.chunk_length(i), i * CS)
                    want = m.digest_at(i)
                    assert (codec.is_zero(data) if want == codec.ZERO_DIGEST else codec.digest(data) == want), i
        finally:
            os.close(fd)

    def teardown(self) -> None:
        try:
            self.run(self.dev.close())
            assert self.run(self._reopen_and_read()) == self.model
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _reopen_and_read(self) -> bytes:
        dev = await open_cache(self.dir, self.repo)
        try:
            return result_bytes(await dev.read(0, SIZE))
        finally:
            await dev.close()


CacheMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheModel = CacheMachine.TestCase
