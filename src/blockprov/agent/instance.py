"""The control operations of one instance (a cache device and its repository): reset, snapshot,
update, hydrate, profile and status. The single-instance agent (agent.py) and the clones agent
(clones/clones.py) both expose them on each instance's control socket, so ``blockprov reset --cache DIR``
and friends work the same whoever serves the instance."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from blockprov.agent import control, keep, lifecycle
from blockprov.agent.hydrate import MAX_HOLD_REST, MIN_RATE, HydrationStatus, Hydrator
from blockprov.cache import CacheDevice, DeviceStatus
from blockprov.errors import BlockprovError, UsageError
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository
from blockprov.results import inline, omit_none

log = logging.getLogger("blockprov.agent")
T = TypeVar("T")
AUTO_PROFILE_AFTER = 120.0  # seconds of a first session whose reads become the version's boot profile
PROFILE_SHOWN = 16  # first indices of the prefetched profile shown in status


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (a long poll) in a daemon thread: unlike an executor's worker, it
    never holds up the process's exit while it waits at the repository."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, err: BaseException | None) -> None:
        if fut.done():
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)

    def work() -> None:
        err: BaseException | None
        try:
            value = fn(*args)
        except BaseException as e:
            value, err = None, e
        else:
            err = None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, value, err)

    threading.Thread(target=work, daemon=True, name="blockprov-poll").start()
    return await fut


def catch_stop_signals(stop: asyncio.Event) -> None:
    """From now on SIGINT/SIGTERM set ``stop`` instead of killing the process. An agent process calls
    this before it starts serving, so a signal that arrives between its banner and ``wait_for_stop``
    (a supervisor stopping it at once) still ends in a clean shutdown, not an unclean cache."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def wait_for_stop(stop: asyncio.Event) -> None:
    """Wait for ``stop``, or SIGINT/SIGTERM (which set it): an agent process's life."""
    loop = asyncio.get_running_loop()
    catch_stop_signals(stop)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


class InstanceOps:
    def __init__(self, device: CacheDevice, repo: Repository, *, connections: Callable[[], int],
                 hydrate: bool = False, hydrate_rate: float | None = None, use_profile: bool = True,
                 auto_profile: bool = False, profile_after: float = AUTO_PROFILE_AFTER,
                 resolve: Callable[[str], Manifest] | None = None) -> None:
        self.device = device
        self.repo = repo
        # where a version to move to is looked up (the agent's: through its site's peers when it has some)
        self._resolve = resolve or repo.resolve
        self._connections = connections
        self._hydrate = hydrate
        self._hydrate_rate = hydrate_rate
        self._use_profile = use_profile
        self._auto_profile = auto_profile
        self._profile_after = profile_after
        self._profile_task: asyncio.Task[None] | None = None
        self.profile_saved = False
        self.hydrator: Hydrator | None = None
        # The boot profile prefetched at start: its length, whether it was inherited from the
        # version this one was made from (catalog/inherit.py), its first indices (for status).
        self.prefetch: PrefetchInfo | None = None

    def handlers(self) -> dict[str, control.Handler]:
        return {"reset": self._op_reset, "snapshot": self._op_snapshot, "update": self._op_update,
                "hydrate": self._op_hydrate, "profile": self._op_profile}

    async def start(self) -> None:
        """Prefetch in the version's boot profile order (and hydrate everything when asked): its
        own, else the one it inherits from the version it was made from (catalog/inherit.py). A
        cold cache of a version that has no profile of its own yet records one for everybody else
        (merged with the inherited one by the repository)."""
        if self.device.overlay:
            return  # an overlay reads through its shared base: there is nothing to copy into it
        cold = self.device.chunks.counts()["present"] == 0 and not self.device.profile()
        order = await self._start_hydration(self._hydrate_rate, full=self._hydrate)
        own = bool(order) and await self._has_own_profile()
        self.prefetch = PrefetchInfo(chunks=len(order), inherited=bool(order) and not own, first=order[:PROFILE_SHOWN])
        if self._auto_profile and cold and not own:
            self._profile_task = asyncio.ensure_future(self._save_profile_later())

    async def _has_own_profile(self) -> bool:
        m = self.device.manifest
        try:
            return bool(await self._run(functools.partial(self.repo.get_profile, m.image, m.id, inherit=False)))
        except BlockprovError:
            return True  # cannot tell: record nothing rather than overwrite someone's

    async def stop(self) -> None:
        if self._profile_task is not None:
            self._profile_task.cancel()
            await asyncio.gather(self._profile_task, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):  # a repository that is down must not hold the stop up
                await asyncio.wait_for(self._save_profile(), 10.0)  # the session ended first: its reads are the profile
        if self.hydrator is not None:
            await self.hydrator.stop()

    async def _save_profile_later(self) -> None:
        await asyncio.sleep(self._profile_after)
        await self._save_profile()
        self._profile_task = None

    async def _save_profile(self) -> None:
        """Give the repository this first session's read order, unless someone did meanwhile
        (the first machine to boot a version pays the cold boot; the others prefetch)."""
        if self.profile_saved:
            return
        m = self.device.manifest
        order = self.device.profile()
        if not order:
            return
        try:
            if await in_daemon_thread(functools.partial(self.repo.get_profile, m.image, m.id, inherit=False)):
                return  # someone recorded this version's own meanwhile (an inherited one is merged)
            await in_daemon_thread(self.repo.put_profile, m.image, m.id, order)
            self.profile_saved = True
            log.info("saved a boot profile of %d chunk(s) for %s@%s", len(order), m.image, m.id)
        except BlockprovError as e:  # e.g. a read-only token: the agent serves on regardless
            log.warning("could not save the boot profile of %s@%s: %s", m.image, m.id, e)

    def status(self) -> StatusReport:
        return StatusReport(device=self.device.status(),
                            hydration=self.hydrator.status() if self.hydrator is not None else None,
                            profile=self.prefetch if self.prefetch is not None and self.prefetch.chunks else None)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- hydration and boot profiles ----------------------------------------------------------
    async def _repo_profile(self) -> list[int]:
        """The repository's boot profile of this version, if any (a missing one is no error)."""
        m = self.device.manifest
        if not self._use_profile:
            return []
        try:
            order = await self._run(self.repo.get_profile, m.image, m.id)
        except BlockprovError as e:
            log.warning("no boot profile from %s: %s", self.repo.url, e)
            return []
        return order or []

    async def _start_hydration(self, rate: float | None, *, full: bool, profile_parallel: int = 1,
                               hold_rest: float = 0.0) -> list[int]:
        """Start hydration (or only the profile's prefetch); returns the repository's profile."""
        order = await self._repo_profile()
        if not full and not order:
            return order
        if self.hydrator is not None:
            await self.hydrator.stop()
        self.hydrator = Hydrator(self.device, order=order, rate=rate, profile_only=not full,
                                 profile_parallel=profile_parallel, hold_rest=hold_rest)
        self.hydrator.start()
        return order

    # -- ops ----------------------------------------------------------------------------------
    async def _op_reset(self, req: dict[str, Any]) -> lifecycle.ResetResult:
        # A client may still be sending data-file pieces it was handed: punch holes only when
        # nobody is connected (the space of reset chunks is reused when they are fetched again).
        eager = control.Args(req, "eager").flag("eager")
        return await lifecycle.reset(self.device, eager=eager, punch=self._connections() == 0)

    async def _op_snapshot(self, req: dict[str, Any]) -> lifecycle.SnapshotResult:
        a = control.Args(req, "to", "target", "rebase")
        return await lifecycle.snapshot(self.device, self.repo, a.text("to"), target=a.text("target") or "default",
                                        rebase=a.flag("rebase"))

    async def _op_update(self, req: dict[str, Any]) -> keep.KeptUpdate:
        a = control.Args(req, "to", "keep_modified", "force", "lazy")
        keep_modified, force, lazy = a.flag("keep_modified"), a.flag("force"), a.flag("lazy")
        new = await self._run(self._resolve, a.text("to"))
        return await keep.update(self.device, self.repo, new, keep_modified=keep_modified, force=force,
                                 eager=not lazy)

    async def _op_hydrate(self, req: dict[str, Any]) -> HydrationStatus:
        a = control.Args(req, "rate", "profile_parallel", "hold_rest")
        if self.device.overlay:
            raise UsageError("an overlay instance reads through its shared base: hydrate the base cache instead")
        h = self.hydrator
        rate = a.number("rate", MIN_RATE, 1e15)
        parallel = a.integer("profile_parallel", 1, 1, 64)
        hold_rest = a.number("hold_rest", 0.0, MAX_HOLD_REST) or 0.0
        if h is None or h.profile_only or (not h.running and self.device.chunks.first_missing() >= 0):
            await self._start_hydration(rate or self._hydrate_rate, full=True, profile_parallel=parallel,
                                        hold_rest=hold_rest)
        assert self.hydrator is not None
        return self.hydrator.status()

    async def _op_profile(self, req: dict[str, Any]) -> ReadOrder:
        control.Args(req)
        m = self.device.manifest
        return ReadOrder(image=m.image, version=m.id, order=self.device.profile())


@dataclass(frozen=True)
class ReadOrder:
    """A cache's first-read order (``profile save``, vm/lazy.py's resume profile)."""

    image: str
    version: str
    order: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PrefetchInfo:
    """The boot profile prefetched at start (``status``'s ``profile``)."""

    chunks: int = 0
    inherited: bool = False  # from the version this one was made from (catalog/inherit.py)
    first: list[int] = field(default_factory=list)  # its first indices


@dataclass(frozen=True)
class AgentInfo:
    """The process serving a cache (``status``'s ``agent``); ``running`` false: none does."""

    running: bool = False
    pid: int | None = omit_none()
    started: float | None = omit_none()
    uptime: float | None = omit_none()
    addresses: list[str] | None = omit_none()
    repository: str | None = omit_none()
    instance: str | None = omit_none()
    metrics: str | None = omit_none()
    site: str | None = omit_none()
    peer_url: str | None = omit_none()
    clones: str | None = omit_none()  # a clones agent: its directory


@dataclass(frozen=True)
class StatusReport:
    """``blockprov status`` of a cache: the cache's own part (cache/status.py) and the serving
    agent's (hydration, prefetch, the process, its NBD server, the site's peers)."""

    device: DeviceStatus = inline()
    hydration: HydrationStatus | None = omit_none()
    profile: PrefetchInfo | None = omit_none()
    agent: AgentInfo | None = omit_none()
    nbd: dict[str, Any] | None = omit_none()  # the NBD server's counters (nbd/server.py ServerStats)
    sources: dict[str, Any] | None = omit_none()  # bytes by source: peers, site cache, repository
    site: dict[str, Any] | None = omit_none()  # the site link and the peer server (agent/site.py)
