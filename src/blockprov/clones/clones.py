"""A host's clones (seed 004): one shared base cache per version, one copy-on-write overlay per
instance, all served as separate NBD exports by one agent process.

Layout of a clones directory ``ROOT``::

    ROOT/bases/<image>@<version>/    a base cache (cache/device.py) shared by the version's
                                     instances; filled lazily (or hydrated), never written
    ROOT/instances/<name>/           an overlay cache (cache/overlay.py): the chunks this
                                     instance wrote, its journal, its control socket
    ROOT/control.sock                the clones agent's control socket (status, rescan, stop)

Why one process: a cache is locked by the process using it, and the base is shared, so the
process that holds the base serves every instance over it. A chunk is then fetched from the
repository once per host, however many instances read it; an instance costs a few KiB of
metadata until it writes; a reset of one instance drops only its overlay's chunks.

Crash rules: an instance is created by creating its overlay cache, whose meta file is written
last, so a directory without ``meta`` is an unfinished clone (``list_instances`` ignores it and
``remove_instance`` cleans it). Removal renames the directory away first (atomic), then deletes.
Everything else is the caches' own crash rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from blockprov.agent import control
from blockprov.agent.instance import InstanceOps, wait_for_stop
from blockprov.cache.device import CacheDevice
from blockprov.cache.journal import META_NAME, load
from blockprov.durable import ensure_dir, fsync_dir
from blockprov.errors import AgentNotRunning, CacheError, NotFound, UsageError
from blockprov.manifest import Manifest
from blockprov.nbd.server import NbdServer
from blockprov.repo.base import Repository

log = logging.getLogger("blockprov.clones")

BASES = "bases"
INSTANCES = "instances"


def base_dir(root: Path, m: Manifest) -> Path:
    return root / BASES / f"{m.image}@{m.id}"


def instance_dir(root: Path, name: str) -> Path:
    return root / INSTANCES / name


_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def instance_name(text: str) -> str:
    """Instance names are export names and directory names: lowercase letters, digits and '-'."""
    if not _NAME.fullmatch(text):
        raise UsageError(f"an instance name is 1-63 lowercase letters, digits or '-', not {text!r}")
    return text


def list_instances(root: Path) -> list[str]:
    d = root / INSTANCES
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / META_NAME).exists())


def next_names(root: Path, prefix: str, count: int) -> list[str]:
    """``count`` unused names ``<prefix><n>``, continuing after the highest number in use."""
    taken = set(list_instances(root))
    n = 1 + max((int(x[len(prefix):]) for x in taken if x.startswith(prefix) and x[len(prefix):].isdigit()),
                default=0)
    out: list[str] = []
    while len(out) < count:
        name = instance_name(f"{prefix}{n}")
        if name not in taken:
            out.append(name)
        n += 1
    return out


async def ensure_base(root: Path, repo: Repository, m: Manifest) -> Path:
    """The base cache of ``m`` under ``root`` (created empty when missing: it fills lazily)."""
    b = base_dir(root, m)
    if not (b / META_NAME).exists():
        dev = await CacheDevice.open(b, repo, m, read_only=True)
        await dev.close()
    return b


async def create_instances(root: Path, repo: Repository, m: Manifest, names: list[str]) -> list[Path]:
    """New empty overlays of ``m`` (a few small files each; no image data is copied)."""
    base = await ensure_base(root, repo, m)
    ensure_dir(root / INSTANCES)
    made: list[Path] = []
    for name in names:
        d = instance_dir(root, instance_name(name))
        if (d / META_NAME).exists():
            raise UsageError(f"instance {name} already exists in {root}")
        dev = await CacheDevice.open(d, repo, m, base_cache=base)
        await dev.close()
        made.append(d)
    return made


def remove_instance(root: Path, name: str) -> None:
    d = instance_dir(root, name)
    if not d.exists():
        raise NotFound(msg=f"no instance {name} in {root}")
    gone = root / INSTANCES / f".removed-{name}-{uuid.uuid4().hex[:8]}"
    os.rename(d, gone)
    fsync_dir(root / INSTANCES)
    shutil.rmtree(gone, ignore_errors=True)


def rescan_served(root: Path) -> bool:
    """Tell the process serving ``root`` (``clones serve``, ``pool serve``) to pick up instances made
    or removed since; False when none serves it (the next one to start finds them itself)."""
    try:
        control.call(root, "rescan", timeout=60.0)
    except AgentNotRunning:
        return False
    return True


def remove(root: Path, name: str) -> None:
    """Remove an instance: through the process serving ``root`` when one does (it must stop serving
    the instance before its files go), else the files themselves."""
    try:
        control.call(root, "remove", timeout=60.0, name=name)
    except AgentNotRunning:
        remove_instance(root, name)


class _Served:
    def __init__(self, device: CacheDevice, ops: InstanceOps, ctl: control.ControlServer) -> None:
        self.device, self.ops, self.control = device, ops, ctl


class ClonesAgent:
    """Serves every instance of a clones directory as an export named after the instance."""

    def __init__(self, root: Path, repo: Repository, *, socket: Path | None = None,
                 listen: tuple[str, int] | None = None, control_socket: bool = True) -> None:
        """``control_socket=False``: a short-lived in-process server (customizing new instances)
        that must not take the directory's control socket or the instances' ones."""
        if socket is None and listen is None:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
        self.root = root
        self.repo = repo
        self.socket = socket
        self.listen = listen
        self.server = NbdServer({}, description=f"blockprov clones in {root}")
        self.control = control.ControlServer({"status": self._op_status, "rescan": self._op_rescan,
                                              "remove": self._op_remove, "stop": self._op_stop})
        self.bases: dict[str, _Served] = {}
        self.instances: dict[str, _Served] = {}
        self.addresses: list[str] = []
        self.started = time.time()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._control_socket = control_socket

    async def start(self) -> list[str]:
        ensure_dir(self.root / INSTANCES)
        try:
            await self.rescan()
            if self.socket is not None:
                await self.server.start_unix(self.socket)  # refuses a socket another process serves
                self.addresses.append(f"nbd+unix:///NAME?socket={self.socket}")
            if self.listen is not None:
                host, port = await self.server.start_tcp(*self.listen)
                self.addresses.append(f"nbd://{host}:{port}/NAME")
            if self._control_socket:
                await self.control.start(control.socket_path(self.root))
        except BaseException:
            await self._shutdown()
            raise
        return self.addresses

    def uri(self, name: str) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={self.socket}"
        assert self.listen is not None
        return self.addresses[0].replace("/NAME", f"/{name}")

    async def run(self) -> None:
        try:
            await wait_for_stop(self._stop)
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def rescan(self) -> dict[str, list[str]]:
        """Serve instances created since, stop serving removed ones."""
        async with self._lock:
            on_disk = set(list_instances(self.root))
            added: list[str] = []
            removed: list[str] = []
            for name in sorted(set(self.instances) - on_disk):
                log.warning("instance %s was removed from %s while served: its clients get errors now", name, self.root)
                self.server.exports.pop(name, None)
                with contextlib.suppress(Exception):  # its files are gone: nothing to save
                    await self._close(self.instances.pop(name))
                removed.append(name)
            for name in sorted(on_disk - set(self.instances)):
                try:
                    await self._open_instance(name)
                    added.append(name)
                except CacheError as e:
                    log.error("instance %s cannot be served: %s", name, e)
            return {"added": added, "removed": removed}

    async def _open_instance(self, name: str) -> None:
        d = instance_dir(self.root, name)
        meta = load(d).meta
        if meta.base_cache is None:
            raise CacheError(f"{d} is not an overlay (no base cache)")
        base = await self._base(Path(meta.base_cache))
        dev = await CacheDevice.open(d, self.repo, create=False, base=base.device)
        ops = InstanceOps(dev, self.repo, connections=lambda: self.server.stats.connections_active)
        ctl = control.ControlServer({"status": self._status_of(ops), **ops.handlers()})
        if self._control_socket:
            await ctl.start(control.socket_path(d))
        self.instances[name] = _Served(dev, ops, ctl)
        self.server.exports[name] = dev

    async def _base(self, path: Path) -> _Served:
        key = str(path)
        served = self.bases.get(key)
        if served is None:
            if not (path / META_NAME).exists():
                raise CacheError(f"the base cache {path} is gone")
            dev = await CacheDevice.open(path, self.repo, create=False, read_only=True)
            ops = InstanceOps(dev, self.repo, connections=lambda: 0)
            ctl = control.ControlServer({"status": self._status_of(ops), "hydrate": ops.handlers()["hydrate"]})
            if self._control_socket:
                await ctl.start(control.socket_path(path))
            served = self.bases[key] = _Served(dev, ops, ctl)
        return served

    def _status_of(self, ops: InstanceOps) -> control.Handler:
        async def status(req: dict[str, Any]) -> dict[str, Any]:
            st = ops.status()
            st["agent"] = {"running": True, "pid": os.getpid(), "started": self.started,
                           "uptime": time.time() - self.started, "addresses": self.addresses,
                           "repository": self.repo.url, "clones": str(self.root)}
            return st
        return status

    async def _close(self, served: _Served) -> None:
        with contextlib.suppress(Exception):
            await served.control.close()
        await served.ops.stop()
        await served.device.close()

    async def close(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.control.close()
        await self.server.close()
        for s in list(self.instances.values()):
            await self._close(s)
        for s in list(self.bases.values()):
            await self._close(s)
        self.instances.clear()
        self.bases.clear()

    # -- control ops ------------------------------------------------------------------------------
    async def _op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"root": str(self.root), "pid": os.getpid(), "addresses": self.addresses,
                "instances": {n: {"uri": self.uri(n), **_brief(s.device)} for n, s in self.instances.items()},
                "bases": {k: _brief(s.device) for k, s in self.bases.items()},
                "nbd": vars(self.server.stats).copy()}

    async def _op_rescan(self, req: dict[str, Any]) -> dict[str, Any]:
        out = await self.rescan()
        return {**out, "uris": {n: self.uri(n) for n in out["added"]}}

    async def remove(self, name: str) -> None:
        """Stop serving an instance (its clients get errors from now on), then delete it."""
        async with self._lock:
            served = self.instances.pop(name, None)
            self.server.exports.pop(name, None)
            if served is not None:
                await self._close(served)
            remove_instance(self.root, name)

    async def _op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.remove(instance_name(str(req.get("name", ""))))
        return {"removed": req["name"]}

    async def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self._stop.set()
        return {"stopping": True}


def _brief(dev: CacheDevice) -> dict[str, Any]:
    counts = dev.chunk_map.counts()
    m = dev.manifest
    return {"image": m.image, "version": m.id, "chunks_total": counts["total"], "chunks_present": counts["present"],
            "chunks_modified": counts["modified"], "chunks_missing": counts["missing"]}
