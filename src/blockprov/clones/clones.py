"""A host's clones (seed 004): one shared base cache per version, one copy-on-write overlay per
instance, all served as separate NBD exports by one agent process.

Layout of a clones directory ``ROOT``::

    ROOT/bases/<image>@<version>/    a base cache (cache/device.py) shared by the version's
                                     instances; filled lazily (or hydrated), never written
    ROOT/instances/<name>/           an overlay cache (cache/overlay.py): the chunks this
                                     instance wrote, its journal, its control socket
    ROOT/instances/<name>/pristine/  a customized instance's pristine layer: an overlay of the
                                     base holding what its customization wrote, never written
                                     afterwards; the instance's overlay lies over it
    ROOT/control.sock                the clones agent's control socket (status, rescan, stop)

Why one process: a cache is locked by the process using it, and the base is shared, so the
process that holds the base serves every instance over it. A chunk is then fetched from the
repository once per host, however many instances read it; an instance costs a few KiB of
metadata until it writes; a reset of one instance drops only its overlay's chunks.

An instance's pristine state includes its customization (seed 004 claim 6: what cannot be
shared, its hostname and machine-id, is kept per instance in its own form), so ``reset`` must
return to it, not to the golden version. Customizing writes through the instance's export like any
client; *sealing* (``seal_instance``, right after customizing) then moves those writes into the
instance's pristine layer: the chunks the customization modified are written into a new overlay
of the base (``pristine/``), then one checkpoint of the instance's metadata puts its overlay over
that layer instead of the base and clears the chunks' modified marks. Each chunk reads the same
before and after; a reset now drops only what was written since, and reads fall through to the
layer (customization) and below it to the shared base (golden). A snapshot sends what was written
since the pristine state over the base version: the per-instance identity stays out of the shared
versions it makes, and an instance unchanged since it was made snapshots as its base version.
Crash rules of sealing: until the checkpoint the instance is over the base with its customization
as modified chunks, and a half-built layer is deleted by the next seal; after it, the layer is
complete (it was flushed and closed before).

Reports: ``blockprov clones serve`` (and ``pool serve``, which is a clones agent too) registers
with its repository as an agent of kind ``clones`` and reports its clones, each with its version
and modified chunks (agent/report.py, the mechanism ``attach`` uses; ``register=True``). Only
``status`` is accepted from the repository. Short-lived in-process agents never register.

Crash rules: an instance is created by creating its overlay cache, whose meta file is written
last, so a directory without ``meta`` is an unfinished clone (``list_instances`` ignores it and
``remove_instance`` cleans it). Removal renames the directory away first (atomic), then deletes.
Everything else is the caches' own crash rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from socket import gethostname
from socket import socket as Socket
from typing import Any

from blockprov.agent import control
from blockprov.agent.instance import AgentInfo, InstanceOps, StatusReport, catch_stop_signals, wait_for_stop
from blockprov.agent.offline import adopt_repository
from blockprov.agent.report import RepositoryLink, host_instance
from blockprov.cache import CacheDevice, base_source, is_cache, load_state, repository_source
from blockprov.device.base import result_bytes
from blockprov.durable import ensure_dir, fsync_dir
from blockprov.errors import AgentNotRunning, CacheError, NotFound, UsageError
from blockprov.manifest import Manifest
from blockprov.names import clone_name
from blockprov.nbd.activation import uri_template
from blockprov.nbd.server import NbdServer
from blockprov.repo.base import Repository
from blockprov.results import omit_none

log = logging.getLogger("blockprov.clones")

BASES = "bases"
INSTANCES = "instances"
PRISTINE = "pristine"  # a customized instance's pristine layer, inside its directory
REPORTED_CLONES = 200  # clones listed in a report (the repository takes 64 KiB of agent info)


def base_dir(root: Path, m: Manifest) -> Path:
    return root / BASES / f"{m.image}@{m.id}"


def instance_dir(root: Path, name: str) -> Path:
    return root / INSTANCES / name


def instance_name(text: str) -> str:
    """Instance names are export names and directory names (names.py, ``clone_name``)."""
    return clone_name(text)


def list_instances(root: Path) -> list[str]:
    d = root / INSTANCES
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if is_cache(p))


def next_names(root: Path, prefix: str, count: int, also_taken: Iterable[str] = ()) -> list[str]:
    """``count`` unused names ``<prefix><n>``, continuing after the highest number in use (by an
    instance, or in ``also_taken``: names reserved elsewhere, such as VMs')."""
    taken = set(list_instances(root)) | set(also_taken)
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
    if not is_cache(b):
        dev = await CacheDevice.open(b, repository_source(repo), m, repo=repo, read_only=True)
        dev.record_repository(repo.url)  # where its version lives
        await dev.close()
    return b


def recorded_repository(root: Path) -> Path | None:
    """A base cache of ``root`` whose record says which repository the directory's versions come
    from (``clones serve`` uses it when no repository is named, as ``attach`` does), or None."""
    bases = root / BASES
    found = sorted(p for p in bases.iterdir() if is_cache(p)) if bases.is_dir() else []
    return found[0] if found else None


async def create_instances(root: Path, repo: Repository, m: Manifest, names: list[str]) -> list[Path]:
    """New empty overlays of ``m`` (a few small files each; no image data is copied)."""
    base = await ensure_base(root, repo, m)
    ensure_dir(root / INSTANCES)
    made: list[Path] = []
    for name in names:
        d = instance_dir(root, instance_name(name))
        if is_cache(d):
            raise UsageError(f"instance {name} already exists in {root}")
        dev = await CacheDevice.open(d, base_source(None), m, repo=repo, base_cache=base)
        await dev.close()
        made.append(d)
    return made


async def seal_instance(d: Path, repo: Repository, base: CacheDevice) -> int:
    """Make what the instance in ``d`` (an overlay of ``base``, closed) has written so far part of its
    pristine state, in a layer between it and ``base`` (see the module doc); returns how many chunks
    the layer holds. Called right after customizing, while nobody else uses the instance."""
    layer = d / PRISTINE
    dev = await CacheDevice.open(d, base_source(base), repo=repo, create=False)
    try:
        if dev.base_cache == str(layer.resolve()):  # its layer is in use: never rebuild it
            raise CacheError(f"instance {d} is sealed already: its customization is its pristine state")
        m = dev.manifest
        modified = dev.modified_chunks()
        if not modified:
            return 0
        if layer.exists():  # a seal that crashed before its checkpoint: start that layer over
            shutil.rmtree(layer)
        top = await CacheDevice.open(layer, base_source(base), m, repo=repo, base_cache=base.cache_dir)
        try:
            for i in modified:
                off, n = i * m.chunk_size, m.chunk_length(i)
                if dev.chunks.zero(i):
                    await top.write_zeroes(off, n)
                else:
                    await top.write(off, result_bytes(await dev.read(off, n)))
            await top.flush()
        finally:
            await top.close()
        await dev.switch_base_cache(layer, modified)
        return len(modified)
    finally:
        await dev.close()


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
                 listen: tuple[str, int] | None = None, control_socket: bool = True,
                 activated: list[Socket] | None = None, register: bool = False,
                 instance: str | None = None) -> None:
        """``control_socket=False``: a short-lived in-process server (customizing new instances)
        that must not take the directory's control socket or the instances' ones. ``activated``:
        listening sockets passed by systemd socket activation (nbd/activation.py), served as well.
        ``register``: report to the repository as ``instance`` (default: ``default_instance``)."""
        if socket is None and listen is None and not activated:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both), or start it by socket activation")
        self.activated = list(activated or [])
        self.root = root
        self.repo = repo
        self.socket = socket
        self.listen = listen
        self.server = NbdServer({}, description=f"blockprov clones in {root}")
        self.control = control.ControlServer({"status": self._op_status, "rescan": self._op_rescan,
                                              "remove": self._op_remove, "seal": self._op_seal,
                                              "stop": self._op_stop})
        self.bases: dict[str, _Served] = {}
        self.instances: dict[str, _Served] = {}
        self.addresses: list[str] = []
        self.started = time.time()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._control_socket = control_socket
        self.register = register
        self.instance = instance or default_instance(root)
        self.link: RepositoryLink | None = None
        # what an owner adds to the report (pool serve: its pool), called with the report to amend
        self.amend_report: Callable[[dict[str, Any]], None] | None = None

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
            for sock in self.activated:
                await self.server.start_socket(sock)
                self.addresses.append(uri_template(sock))
            if self._control_socket:
                await self.control.start(control.socket_path(self.root))
            if self.register:
                self.link = RepositoryLink(self.repo, self.instance, self.registration, self.control.handlers,
                                           ("status",))
                self.link.start()
        except BaseException:
            await self._shutdown()
            raise
        return self.addresses

    def uri(self, name: str) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={self.socket}"
        assert self.addresses, "uri() of an agent that does not listen"
        return self.addresses[0].replace("/NAME", f"/{name}")

    async def run(self) -> None:
        try:
            await wait_for_stop(self._stop)
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def catch_signals(self) -> None:
        """SIGINT/SIGTERM stop this process cleanly from now on (``clones serve``, ``pool serve``;
        not a temporary agent inside a command, which Ctrl-C must still interrupt)."""
        catch_stop_signals(self._stop)

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
                await self._close_layers(name)
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
        below = load_state(d).base_cache
        if below is None:
            raise CacheError(f"{d} is not an overlay (no base cache)")
        base = await self._base(Path(below))
        dev = await CacheDevice.open(d, base_source(base.device), repo=self.repo, create=False)
        ops = InstanceOps(dev, self.repo, connections=lambda: self.server.stats.connections_active)
        ctl = control.ControlServer({"status": self._status_of(ops), **ops.handlers()})
        if self._control_socket:
            await ctl.start(control.socket_path(d))
        self.instances[name] = _Served(dev, ops, ctl)
        self.server.exports[name] = dev

    async def _base(self, path: Path) -> _Served:
        """The opened base cache at ``path``: a shared base, or an instance's pristine layer (itself
        an overlay, opened over its own base first)."""
        key = str(path)
        served = self.bases.get(key)
        if served is None:
            if not is_cache(path):
                raise CacheError(f"the base cache {path} is gone")
            below = load_state(path).base_cache
            under = (await self._base(Path(below))).device if below is not None else None
            layers = base_source(under) if under is not None else repository_source(self.repo)
            dev = await CacheDevice.open(path, layers, repo=self.repo, create=False, read_only=True)
            if under is None:  # a shared base fetches from the repository: one without its version is refused
                try:
                    await adopt_repository(dev, self.repo)
                except BaseException:
                    await dev.close()
                    raise
            ops = InstanceOps(dev, self.repo, connections=lambda: 0)
            ctl = control.ControlServer({"status": self._status_of(ops), "hydrate": ops.handlers()["hydrate"],
                                         "profile": ops.handlers()["profile"]})  # first-read order: vm/lazy.py
            if self._control_socket:
                await ctl.start(control.socket_path(path))
            served = self.bases[key] = _Served(dev, ops, ctl)
        return served

    def _status_of(self, ops: InstanceOps) -> control.Handler:
        async def status(req: dict[str, Any]) -> StatusReport:
            control.Args(req)
            return replace(ops.status(), agent=AgentInfo(
                running=True, pid=os.getpid(), started=self.started, uptime=time.time() - self.started,
                addresses=self.addresses, repository=self.repo.url, clones=str(self.root)))
        return status

    async def _close(self, served: _Served) -> None:
        with contextlib.suppress(Exception):
            await served.control.close()
        await served.ops.stop()
        await served.device.close()

    async def close(self) -> None:
        await self._shutdown()

    async def _close_layers(self, name: str) -> None:
        """Close the pristine layer of an instance that is no longer served (its files go with it)."""
        inside = str(instance_dir(self.root, name).resolve()) + os.sep
        for key in [k for k in self.bases if k.startswith(inside)]:
            with contextlib.suppress(Exception):
                await self._close(self.bases.pop(key))

    async def _shutdown(self) -> None:
        if self.link is not None:
            await self.link.stop()
        with contextlib.suppress(Exception):
            await self.control.close()
        await self.server.close()
        for s in list(self.instances.values()):
            await self._close(s)
        for s in reversed(list(self.bases.values())):  # layers were opened after the bases below them
            await self._close(s)
        self.instances.clear()
        self.bases.clear()

    def registration(self) -> dict[str, Any]:
        """What the repository shows of this agent: its clones and their versions (at most
        ``REPORTED_CLONES`` of them; ``clones_total`` counts all), where it serves, its last error."""
        clones = []
        for name, served in sorted(self.instances.items())[:REPORTED_CLONES]:
            b = _brief(served.device)
            clones.append({"name": name, "image": b.image, "version": b.version, "modified_chunks": b.chunks_modified})
        info: dict[str, Any] = {
            "kind": "clones", "host": gethostname(), "pid": os.getpid(), "dir": str(self.root),
            "addresses": self.addresses, "clones": clones, "clones_total": len(self.instances),
            "last_error": self.link.last_error if self.link is not None else None}
        if self.amend_report is not None:
            self.amend_report(info)
        return info

    # -- control ops ------------------------------------------------------------------------------
    async def _op_status(self, req: dict[str, Any]) -> ClonesStatus:
        control.Args(req)  # takes none: any argument is refused (a misspelt one is not ignored)
        return ClonesStatus(root=str(self.root), pid=os.getpid(), addresses=self.addresses,
                            instances={n: replace(_brief(s.device), uri=self.uri(n))
                                       for n, s in self.instances.items()},
                            bases={k: _brief(s.device) for k, s in self.bases.items()},
                            nbd=vars(self.server.stats).copy())

    async def _op_rescan(self, req: dict[str, Any]) -> dict[str, Any]:
        control.Args(req)
        out = await self.rescan()
        return {**out, "uris": {n: self.uri(n) for n in out["added"]}}

    async def remove(self, name: str) -> None:
        """Stop serving an instance (its clients get errors from now on), then delete it."""
        async with self._lock:
            served = self.instances.pop(name, None)
            self.server.exports.pop(name, None)
            if served is not None:
                await self._close(served)
            await self._close_layers(name)
            remove_instance(self.root, name)

    async def seal(self, name: str) -> int:
        """Seal a served instance's writes into its pristine state (``seal_instance``): it is closed,
        sealed, and served again over its new layer. Returns how many chunks were sealed."""
        async with self._lock:
            served = self.instances.pop(name, None)
            if served is None:
                raise NotFound(msg=f"instance {name} is not served from {self.root}")
            self.server.exports.pop(name, None)
            await self._close(served)
            try:
                d = instance_dir(self.root, name)
                below = load_state(d).base_cache
                if below is None:
                    raise CacheError(f"{d} is not an overlay (no base cache)")
                return await seal_instance(d, self.repo, (await self._base(Path(below))).device)
            finally:
                await self._open_instance(name)

    async def _op_seal(self, req: dict[str, Any]) -> dict[str, Any]:
        name = instance_name(control.Args(req, "name").text("name"))
        return {"instance": name, "sealed": await self.seal(name)}

    async def _op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = instance_name(control.Args(req, "name").text("name"))
        await self.remove(name)
        return {"removed": name}

    async def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        control.Args(req)
        self._stop.set()
        return {"stopping": True}


def default_instance(root: Path) -> str:
    """The name a clones directory's agent registers as: stable across restarts, distinct per
    directory and host."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return host_instance("clones", f"{root.name}-{digest}")


@dataclass(frozen=True)
class Brief:
    """One cache a clones agent serves, briefly (an instance has its ``uri``, a base none)."""

    image: str
    version: str
    chunks_total: int
    chunks_present: int
    chunks_modified: int
    chunks_missing: int
    uri: str | None = omit_none()


@dataclass(frozen=True)
class ClonesStatus:
    """``status`` of a clones agent (its directory's control socket)."""

    root: str
    pid: int
    addresses: list[str] = field(default_factory=list)
    instances: dict[str, Brief] = field(default_factory=dict)
    bases: dict[str, Brief] = field(default_factory=dict)
    nbd: dict[str, Any] = field(default_factory=dict)  # the NBD server's counters


def _brief(dev: CacheDevice) -> Brief:
    counts = dev.chunks.counts()
    m = dev.manifest
    return Brief(image=m.image, version=m.id, chunks_total=counts["total"], chunks_present=counts["present"],
                 chunks_modified=counts["modified"], chunks_missing=counts["missing"])
