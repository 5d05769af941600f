"""Who may touch a chunk when: per-chunk claims and the quiesce gate of a ``CacheDevice``.

State transitions of one chunk (fill, write into a missing or zero chunk, zeroing) hold a
per-chunk claim (``Claims``), taken in ascending chunk order, so two of them never interleave;
fills never wait for a claim, they skip claimed chunks. Reads take no claim and never await on
the hot path: a present chunk is one flags lookup and one ``FileSegment`` (the NBD server
sendfiles it), a zero chunk is a slice of a shared zero buffer. Reads that race with an
overlapping write may see either version, as with any disk.

Lifecycle steps (reset, snapshot, update) need the chunk map to hold still: they close the
``Gate``, which holds back new requests that may fetch or change chunks and waits for those
already inside. Only the device's entry points pass the gate (``gated``): an inner call waiting
at a closed gate would deadlock the quiesce waiting for its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class Claims:
    """Per-chunk transition claims: a chunk index → a future resolved when its claim is released."""

    def __init__(self) -> None:
        self._busy: dict[int, asyncio.Future[None]] = {}

    def __contains__(self, chunk: int) -> bool:
        return chunk in self._busy

    async def claim(self, chunks: list[int]) -> None:
        """Take the claims of these chunks, in ascending order (no deadlock), waiting for holders."""
        loop = asyncio.get_running_loop()
        taken: list[int] = []
        try:
            for c in chunks:
                while (f := self._busy.get(c)) is not None:
                    await asyncio.shield(f)
                self._busy[c] = loop.create_future()
                taken.append(c)
        except BaseException:
            self.release(taken)
            raise

    def take(self, chunks: Iterable[int]) -> None:
        """Claim chunks the caller saw unclaimed, without waiting (fills skip claimed chunks)."""
        loop = asyncio.get_running_loop()
        for c in chunks:
            self._busy[c] = loop.create_future()

    def release(self, chunks: Iterable[int]) -> None:
        for c in chunks:
            f = self._busy.pop(c, None)
            if f is not None and not f.done():
                f.set_result(None)

    async def wait_unclaimed(self, chunks: Iterable[int]) -> None:
        for c in chunks:
            while (f := self._busy.get(c)) is not None:
                await asyncio.shield(f)


class Gate:
    """Open unless a lifecycle step holds it closed; counts the requests inside."""

    def __init__(self) -> None:
        self.closing: asyncio.Future[None] | None = None  # set while closed; resolved when it opens
        self.active = 0
        self._drain: asyncio.Future[None] | None = None

    def leave(self) -> None:
        self.active -= 1
        drain = self._drain
        if not self.active and drain is not None and not drain.done():
            drain.set_result(None)

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        """Close the gate (after any other holder opened it) and wait until no request is inside."""
        loop = asyncio.get_running_loop()
        while (other := self.closing) is not None:
            await asyncio.shield(other)
        gate = self.closing = loop.create_future()
        try:
            while self.active:
                self._drain = loop.create_future()
                await self._drain
            yield
        finally:
            self._drain = None
            self.closing = None
            gate.set_result(None)


class _HasGate(Protocol):
    _gate: Gate


S = TypeVar("S", bound=_HasGate)


def gated(fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
          ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """An entry point that may fetch or change chunks: it waits while the gate is closed and is
    counted while it runs, so that closing the gate can wait for it."""

    async def wrapper(self: S, /, *args: P.args, **kw: P.kwargs) -> T:
        gate = self._gate
        while (closing := gate.closing) is not None:
            await asyncio.shield(closing)
        gate.active += 1
        try:
            return await fn(self, *args, **kw)
        finally:
            gate.leave()

    functools.update_wrapper(wrapper, fn)
    return wrapper
