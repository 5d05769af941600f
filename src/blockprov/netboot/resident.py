"""The in-machine agent once the root is native (netboot/native.py): resident, out of the I/O path.

The kernel serves the machine's root; the agent keeps the cache open for what only it can do:

* registration with the repository and its live state (the console shows ``data_path: native``);
* repository-initiated snapshots of the running PC (``snapshot --instance``): a keep PC's
  snapshot takes its point in time from a device-mapper snapshot and sends the chunks the
  kernel's record says were written (``Native.snapshot``); a restore PC refuses (its session is
  dropped at its next boot);
* turning the keep session's kernel record into the modified map, so the console's modified
  count follows the machine (and a snapshot starts from a short record): at most every
  ``CONVERT_EVERY`` seconds and only while the machine is quiet (``quiet``, the every-day boot's
  rule: netboot/everyday.py). A conversion reads and compares every chunk of each MiB written
  since the last one (``CacheDevice.mark_written``): a 256 MiB file written is 256 MiB read and
  hashed, which under emulation took a quarter of the machine's own I/O figures while it ran
  (bench/RESULTS.md). Nothing needs it sooner: a snapshot of the running PC converts first
  anyway, and the next boot converts what is left (netboot/native.py, ``absorb``);
* on a restore PC, watching the copy-on-write store: the console is told when it passes
  ``WARN_AT`` of its size, and if the kernel dropped it (the session wrote more than the store
  holds: the machine then gets I/O errors).

Reset and update change the disk under the running system: on the native path they run at the
next boot, and asked of a running PC they are refused saying so.

A resident that does not start, or dies, is started again by the supervisor
(netboot/supervisor.py, ``RESIDENT_PAUSE``): a pause doubling to half an hour, for as long as the
machine runs, each failure said on the console with its reason; nothing waits on it meanwhile.

After the root switch the agent's root (the initramfs) has no /proc, which dmsetup needs (it
checks its control device against /proc/misc): each step mounts one of its own first
(``loader.own_proc``, out of the new root's sight).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockprov.agent import lifecycle
from blockprov.agent.control import Args, Handler
from blockprov.agent.hydrate import HydrationStatus
from blockprov.cache import CacheDevice
from blockprov.errors import BlockprovError, DeviceMapperError, UsageError
from blockprov.netboot import everyday
from blockprov.netboot.loader import own_proc
from blockprov.netboot.native import KEEP, Native
from blockprov.repo.base import Repository

log = logging.getLogger("blockprov.netboot")

CONVERT_EVERY = 120.0  # seconds at least between conversions of a keep session's kernel record
CONVERT_FIRST = 20.0  # before the first one looks for a quiet machine
WATCH_EVERY = 5.0  # seconds between looks at a restore session's store
WARN_AT = (0.75, 0.9)  # shares of the store at which the console is told


def load_now(disk_stat: Path, stat: Path = Path("/proc/stat")) -> tuple[int, int, int]:
    """(CPU jiffies busy, CPU jiffies in all, ms the disk was busy) since the machine started:
    busy is all but idle and iowait; the disk's ``io_ticks`` (its stat's tenth field)."""
    u, n, s, i, w, q, sq, st = (int(x) for x in stat.read_text().split("\n", 1)[0].split()[1:9])
    return u + n + s + q + sq + st, u + n + s + i + w + q + sq + st, int(disk_stat.read_text().split()[9])


def is_quiet(before: tuple[int, int, int], after: tuple[int, int, int], seconds: float) -> bool:
    """The machine was quiet between two ``load_now`` samples ``seconds`` apart: the CPU busy less
    than everyday.QUIET_CPU % and the disk less than QUIET_DISK % of the time (the rule the
    every-day boot starts this agent by). Pure."""
    cpu = 100 * (after[0] - before[0]) / max(1, after[1] - before[1])
    disk = (after[2] - before[2]) / (10 * seconds)
    return cpu < everyday.QUIET_CPU and disk < everyday.QUIET_DISK


def proc() -> None:
    """/proc for dmsetup after the root switch (a failure shows as dmsetup's own error next)."""
    with contextlib.suppress(BlockprovError, OSError):
        own_proc()


class Resident:
    """The native path's side of the running agent (see the module docstring)."""

    def __init__(self, native: Native, dev: CacheDevice, repo: Repository, say: Callable[[str], None]) -> None:
        self.native = native
        self.dev = dev
        self.repo = repo
        self.say = say
        self.converted = 0
        self._task: asyncio.Task[None] | None = None

    def handlers(self) -> dict[str, Handler]:
        return {"snapshot": self._op_snapshot, "reset": self._op_refused, "update": self._op_refused,
                "hydrate": self._op_hydrate}

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._convert_loop() if self.native.policy == KEEP else self._watch_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data_path": "native", "policy": self.native.policy, "converted": self.converted}
        with contextlib.suppress(BlockprovError):
            use = self.native.store_use()
            if use is not None:
                out["store_used"], out["store_size"] = use
        return out

    async def quiet(self) -> bool:
        """Whether the machine is quiet over the next QUIET_WINDOW seconds (``is_quiet``); True
        when its load cannot be read (no worse than before this rule)."""
        window = float(everyday.QUIET_WINDOW)
        disk_stat = Path("/sys/class/block") / self.native.geo.data.name / "stat"
        try:
            before = load_now(disk_stat)
            await asyncio.sleep(window)
            return is_quiet(before, load_now(disk_stat), window)
        except (OSError, ValueError, IndexError):
            return True

    async def _convert_loop(self) -> None:
        await asyncio.sleep(CONVERT_FIRST)
        while True:
            if not await self.quiet():
                continue  # the machine's work first: look again over the next window
            try:
                proc()
                self.converted += await self.native.convert(self.dev)
            except (BlockprovError, OSError) as e:
                log.warning("turning the kernel's write record into the modified map failed: %s", e)
            await asyncio.sleep(CONVERT_EVERY)

    async def _watch_loop(self) -> None:
        told = 0
        while True:
            await asyncio.sleep(WATCH_EVERY)
            try:
                proc()
                use = self.native.store_use()
            except DeviceMapperError as e:
                log.warning("cannot read the copy-on-write store's use: %s", e)
                continue
            except BlockprovError as e:
                self.say(f"error: {e}: the session wrote more than the copy-on-write store holds; the running "
                         "system gets I/O errors until the next boot restores the disk")
                return
            if use is None:
                return
            used, size = use
            while told < len(WARN_AT) and used >= WARN_AT[told] * size:
                self.say(f"warning: the session's copy-on-write store is {100 * used // max(1, size)}% full "
                         f"({used >> 20} of {size >> 20} MiB); when it is full the running system gets I/O errors")
                told += 1

    async def _op_snapshot(self, req: dict[str, Any]) -> lifecycle.SnapshotResult:
        proc()
        a = Args(req, "to", "target", "rebase")  # as the agent's own snapshot op reads them
        take = functools.partial(lifecycle.snapshot, self.dev, self.repo, a.text("to"),
                                 target=a.text("target") or "default", rebase=a.flag("rebase"))
        return await self.native.snapshot(self.dev, take)

    async def _op_refused(self, req: dict[str, Any]) -> dict[str, Any]:
        raise UsageError("this PC's root is native (served by the kernel from its disk): reset and update "
                         "run at its next boot")

    async def _op_hydrate(self, req: dict[str, Any]) -> HydrationStatus:
        Args(req, "rate", "profile_parallel", "hold_rest")  # as the agent's own hydrate op reads them
        return HydrationStatus(state="done", percent=100.0, message="the disk holds the whole image (native path)")
