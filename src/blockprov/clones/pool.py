"""Pools (seed 003): instances made before anyone asks for them, handed out by a mapping.

Layers: the golden version → a *configured* version (the golden plus settings common to many
hosts, made once by ``--configure CMD`` and committed to the repository, so other hosts reuse
it) → per-instance overlays of the configured version, each customized (``--customize``) and
then held untouched until ``acquire`` maps one to a host. Acquiring is a state change and a
name lookup: no data moves. ``release`` resets the instance (drops its overlay's chunks) and
returns it, or destroys it; the pool server refills to the configured size in the background.

A pool is a clones directory (clones/clones.py) plus ``pool.json``::

    {"name", "source": "IMG@ID", "configured": "IMG@ID", "size": K, "customize": CMD | null,
     "instances": {NAME: {"state": "ready" | "in-use", "host": ID | null, "since": T}}}

Reports: ``blockprov pool serve`` registers with its repository (agent/report.py, as ``attach``
does) as an agent of kind ``pool`` and reports, besides its clones (each with its state and
host), its pool: name, source and base (configured) version, ready and in-use counts, target size
and the last refill error, at once after a hand-out, a release or a refill.

Crash rules: ``pool.json`` is only written by ``atomic_write`` under an flock of ``pool.lock``
(one writer at a time, across processes). An instance enters the state as ``ready`` only after
it was created *and* customized, so a crash while making one leaves an instance directory the
state does not list; the next refill removes it (no instance is ever handed out half made).
State survives any restart of the process managing the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockprov.agent import control
from blockprov.clones.customize import customize
from blockprov.durable import atomic_write, ensure_dir
from blockprov.errors import BlockprovError, NotFound, PoolExhausted, UsageError
from blockprov.retry import RetryPolicy, retry_async

if TYPE_CHECKING:  # acquire / status / release through the server stay cheap to import (CLI start-up)
    from blockprov.clones.clones import ClonesAgent
    from blockprov.manifest import Manifest
    from blockprov.repo.base import Repository

log = logging.getLogger("blockprov.pool")

STATE = "pool.json"
REFILL_EVERY = 30.0  # seconds between refills when nothing wakes the refiller earlier
REFILL_RETRY = RetryPolicy(timeout=REFILL_EVERY, first_delay=1.0, max_delay=10.0)
LOCK = "pool.lock"
SOCKET = "nbd.sock"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[dict[str, Any]]:
    """The pool state, under the pool's lock; written back (atomically) when changed."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = (root / STATE).read_bytes()
        except FileNotFoundError:
            raise NotFound(msg=f"{root} holds no pool (no {STATE})") from None
        state: dict[str, Any] = json.loads(raw)
        before = json.dumps(state, sort_keys=True)
        yield state
        after = json.dumps(state, sort_keys=True)
        if after != before:
            atomic_write(root / STATE, json.dumps(state, indent=2, sort_keys=True).encode())
    finally:
        os.close(fd)


def read_state(root: Path) -> dict[str, Any]:
    try:
        out: dict[str, Any] = json.loads((root / STATE).read_bytes())
    except FileNotFoundError:
        raise NotFound(msg=f"{root} holds no pool (no {STATE})") from None
    return out


@contextlib.asynccontextmanager
async def serving(root: Path, repo: Repository, agent: ClonesAgent | None) -> AsyncIterator[ClonesAgent]:
    """The pool server itself when it runs, else a short-lived in-process one (customizing needs
    the instances served)."""
    if agent is not None:
        yield agent
        return
    from blockprov.clones.temporary import temporary_agent

    async with temporary_agent(root, repo, prefix="blockprov-pool-") as temp:
        yield temp


async def _make_ready(root: Path, repo: Repository, m: Manifest, count: int, cmd: str | None,
                      agent: ClonesAgent | None) -> list[str]:
    """Create and customize ``count`` instances; only those that succeed become ready."""
    from blockprov.clones.clones import create_instances, next_names, remove_instance

    prefix = f"{read_state(root)['name']}-"
    names = next_names(root, prefix, count)
    await create_instances(root, repo, m, names)
    ready: list[str] = []
    failed: list[str] = []
    async with serving(root, repo, agent) as a:
        await a.rescan()
        loop = asyncio.get_running_loop()
        for k, name in enumerate(names):
            try:
                if cmd:
                    await loop.run_in_executor(None, customize, cmd, a.uri(name), name, k)
                ready.append(name)
            except BlockprovError as e:
                log.error("%s", e)
                failed.append(f"{name}: {e}")
    for name in names:
        if name not in ready:
            if agent is not None:
                await agent.remove(name)
            else:
                remove_instance(root, name)
    with locked(root) as st:
        for name in ready:
            st["instances"][name] = {"state": "ready", "host": None, "since": time.time()}
    if failed and not ready:
        raise BlockprovError(msg="no instance could be made ready: " + "; ".join(failed))
    return ready


async def create(root: Path, repo: Repository, name: str, source: Manifest, size: int, *,
                 configure: str | None = None, customize_cmd: str | None = None) -> dict[str, Any]:
    """Make the configured version (once) and ``size`` ready instances of it."""
    if (root / STATE).exists():
        raise UsageError(f"pool {name} already exists in {root}")
    ensure_dir(root)
    configured = source
    if configure:
        configured = await _configure(root, repo, name, source, configure)
    state = {"name": name, "source": f"{source.image}@{source.id}", "configured": f"{configured.image}@{configured.id}",
             "size": size, "customize": customize_cmd, "instances": {}}
    atomic_write(root / STATE, json.dumps(state, indent=2, sort_keys=True).encode())
    await _make_ready(root, repo, configured, size, customize_cmd, None)
    return read_state(root)


async def _configure(root: Path, repo: Repository, name: str, source: Manifest, cmd: str) -> Manifest:
    """Golden → configured: run ``cmd`` on a scratch clone, commit the result as IMAGE:pool-NAME."""
    from blockprov.agent import lifecycle
    from blockprov.clones.clones import create_instances, remove_instance

    scratch = f"configure-{os.getpid()}"
    await create_instances(root, repo, source, [scratch])
    try:
        async with serving(root, repo, None) as a:
            await a.rescan()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, customize, cmd, a.uri(scratch), scratch, 0)
            out = await lifecycle.snapshot(a.instances[scratch].device, repo, f"{source.image}:pool-{name}")
    finally:
        remove_instance(root, scratch)
    return await asyncio.get_running_loop().run_in_executor(None, repo.resolve, f"{source.image}@{out.version}")


async def refill(root: Path, repo: Repository, agent: ClonesAgent | None) -> list[str]:
    """Back to ``size`` ready instances; removes instance directories the state does not know."""
    from blockprov.clones.clones import list_instances, remove_instance

    st = read_state(root)
    known = set(st["instances"])
    for stray in set(list_instances(root)) - known:
        if not stray.startswith("configure-"):
            log.warning("removing %s: a half-made instance (not in the pool state)", stray)
            if agent is not None:
                await agent.remove(stray)
            else:
                remove_instance(root, stray)
    ready = sum(1 for v in st["instances"].values() if v["state"] == "ready")
    want = int(st["size"]) - ready
    if want <= 0:
        return []
    m = await asyncio.get_running_loop().run_in_executor(None, repo.resolve, st["configured"])
    return await _make_ready(root, repo, m, want, st.get("customize"), agent)


def acquire(root: Path, host: str) -> str:
    """Map a ready instance to ``host`` (at once: a state change); returns its name."""
    with locked(root) as st:
        for name, v in st["instances"].items():
            if v["state"] == "in-use" and v["host"] == host:
                return str(name)  # the host already has one: acquiring twice is harmless
        for name, v in sorted(st["instances"].items()):
            if v["state"] == "ready":
                st["instances"][name] = {"state": "in-use", "host": host, "since": time.time()}
                return str(name)
        in_use = sum(1 for v in st["instances"].values() if v["state"] == "in-use")
    raise PoolExhausted(msg=f"pool {st['name']} is exhausted: 0 ready, {in_use} in use "
                            "(it refills in the background while `blockprov pool serve` runs; retry or --wait)")


def find(root: Path, instance: str | None, host: str | None) -> str:
    st = read_state(root)
    for name, v in st["instances"].items():
        if name == instance or (host is not None and v.get("host") == host):
            return str(name)
    raise NotFound(msg=f"pool {st['name']} has no instance {instance or 'for host ' + str(host)}")


async def release(root: Path, repo: Repository, name: str, *, destroy: bool, agent: ClonesAgent | None) -> str:
    """Reset (drop its overlay's chunks) and return the instance, or destroy it."""
    from blockprov.agent import lifecycle
    from blockprov.clones.clones import remove_instance

    if destroy:
        with locked(root) as st:
            st["instances"].pop(name, None)
        if agent is not None:
            await agent.remove(name)
        else:
            remove_instance(root, name)
        return "destroyed"
    if agent is not None and name in agent.instances:
        await lifecycle.reset(agent.instances[name].device, punch=agent.server.stats.connections_active == 0)
    else:
        from blockprov.cache import CacheDevice, base_source
        from blockprov.clones.clones import instance_dir

        # an instance not served here: its reset reads nothing, so its base is not opened
        dev = await CacheDevice.open(instance_dir(root, name), base_source(None), repo=repo, create=False)
        try:
            await lifecycle.reset(dev)
        finally:
            await dev.close()
    # The reset dropped the per-instance customization too (it is a write like any other): give
    # the instance a fresh one before anyone gets it, or give it up.
    cmd = read_state(root).get("customize")
    if cmd:
        try:
            async with serving(root, repo, agent) as a:
                await a.rescan()
                await asyncio.get_running_loop().run_in_executor(None, customize, cmd, a.uri(name), name, 0)
        except BlockprovError as e:
            log.error("%s: destroying the released instance", e)
            return await release(root, repo, name, destroy=True, agent=agent)
    with locked(root) as st:
        st["instances"][name] = {"state": "ready", "host": None, "since": time.time()}
    return "ready"


class PoolServer:
    """``blockprov pool serve``: the clones agent of the pool plus acquire/release ops and refills."""

    def __init__(self, root: Path, repo: Repository, agent: ClonesAgent) -> None:
        self.root, self.repo, self.agent = root, repo, agent
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error = ""
        agent.control.handlers.update({"pool-acquire": self._op_acquire, "pool-release": self._op_release,
                                       "pool-status": self._op_status})
        agent.amend_report = self._amend_report

    def _amend_report(self, info: dict[str, Any]) -> None:
        """The pool in the agent's report to the repository (console's Pools page, ``blockprov agents``)."""
        info["kind"] = "pool"
        try:
            st = read_state(self.root)
        except (BlockprovError, OSError, ValueError) as e:  # pool.json gone or torn: report that
            info["pools"] = [{"name": self.root.name, "error": f"pool state unreadable: {e}"}]
            return
        states = st["instances"]
        info["pools"] = [{
            "name": st["name"], "source": st["source"], "base": st["configured"], "size": st["size"],
            "ready": sum(1 for v in states.values() if v["state"] == "ready"),
            "in_use": sum(1 for v in states.values() if v["state"] == "in-use"),
            "error": self.last_error or None}]
        for c in info["clones"]:
            v = states.get(c["name"])
            c["state"], c["host"] = (v["state"], v.get("host")) if v is not None else ("being made", None)

    def _changed(self) -> None:
        self._wake.set()
        if self.agent.link is not None:
            self.agent.link.poke()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._refill_loop())
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refill_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REFILL_EVERY)
            self._wake.clear()
            try:
                # a repository away or a full disk (transient, errors.py) is retried with backoff
                # within the period; anything else waits for the next one (a failing customizer)
                made = await retry_async(lambda: refill(self.root, self.repo, self.agent), REFILL_RETRY,
                                         f"refilling the pool in {self.root}")
                self.last_error = ""
                if self.agent.link is not None:
                    self.agent.link.poke()
                if made:
                    log.info("pool refilled: %s", ", ".join(made))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = str(e)
                log.error("pool refill failed: %s (tried again in %.0f s)", e, REFILL_EVERY)
                if self.agent.link is not None:
                    self.agent.link.poke()

    async def _op_acquire(self, req: dict[str, Any]) -> dict[str, Any]:
        name = acquire(self.root, control.Args(req, "host").text("host"))
        self._changed()
        return {"instance": name, "uri": self.agent.uri(name)}

    async def _op_release(self, req: dict[str, Any]) -> dict[str, Any]:
        a = control.Args(req, "instance", "destroy")
        name, destroy = a.text("instance", None), a.flag("destroy")  # no instance: a usage error, not a KeyError
        state = await release(self.root, self.repo, name, destroy=destroy, agent=self.agent)
        self._changed()
        return {"instance": name, "state": state}

    async def _op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        control.Args(req)  # takes none: any argument is refused (a misspelt one is not ignored)
        st = read_state(self.root)
        st["server"] = {"running": True, "pid": os.getpid(), "last_error": self.last_error,
                        "uris": {n: self.agent.uri(n) for n in st["instances"]}}
        return st


def server_call(root: Path, op: str, **args: Any) -> Any:
    """Ask a running pool server; raises AgentNotRunning when there is none, else the error the server raised."""
    return control.call(root, op, timeout=600.0, **args)
