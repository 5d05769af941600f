"""What makes the agents' long polls cheap (``…/requests/next?wait=``, ``…/requests/{id}?wait=``).

Long polls wait on the event loop, never on a pool thread, and wake at once for a change made
through this process (``Wakeup``). Changes made by other servers are seen through the catalog:
every ``POLL`` s one query (``ReadySet``) tells all of this process's waiting agents whether a
request is ready for them; only those agents then take it. A thousand agents waiting therefore cost
one query per ``POLL``, not a thousand. The routes using them are in routes/agents.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from blockprov.catalog.machines import Registry
from blockprov.errors import UsageError

Run = Callable[..., Awaitable[Any]]
POLL = 0.15  # seconds between re-reads of the catalog during a long poll
MAX_WAIT = 30.0  # longest long poll; agents poll again


class Wakeup:
    """Wakes this process's long polls when this process changed the request queue."""

    def __init__(self) -> None:
        # One event per event loop: uvicorn has one, but an app may be driven from several
        # (Starlette's TestClient starts a loop per request), and an asyncio.Event is bound to one.
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            events, self._events = self._events, {}
        here = _running_loop()
        for loop, ev in events.items():
            if loop is here:
                ev.set()
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody is waiting there
                    loop.call_soon_threadsafe(ev.set)

    async def wait(self, timeout: float) -> bool:
        """True when woken by ``notify``, False when the timeout ran out."""
        loop = asyncio.get_running_loop()
        with self._lock:
            ev = self._events.get(loop)
            if ev is None:
                ev = self._events[loop] = asyncio.Event()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except TimeoutError:
            return False


class ReadySet:
    """Which instances have a request ready, read from the catalog at most once per ``POLL`` for all
    of this process's long polls (the first waiter to find it stale refreshes it; the others use it)."""

    def __init__(self, registry: Registry, run: Run) -> None:
        self.registry = registry
        self.run = run
        self._ready: set[str] = set()
        self._at = -float("inf")
        self._refreshing = False
        self._lock = threading.Lock()

    async def has(self, instance: str) -> bool:
        with self._lock:
            refresh = time.monotonic() - self._at >= POLL and not self._refreshing
            self._refreshing |= refresh
        if refresh:
            try:
                ready = await self.run(self.registry.ready_instances)
            finally:
                with self._lock:
                    self._refreshing = False
            with self._lock:
                self._ready, self._at = ready, time.monotonic()
        return instance in self._ready


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def wait_param(wait: float) -> float:
    if not 0 <= wait <= MAX_WAIT:  # also refuses NaN
        raise UsageError(f"wait must be 0 to {MAX_WAIT:g} seconds, not {wait}")
    return wait
