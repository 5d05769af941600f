"""The agent process: one cache, exported over NBD, controllable through a local socket.

It composes the device stack (repository → CacheDevice → NBD server) and owns the process-level
concerns: the exports' names (the image name, ``NAME@ID``, and the default empty name), the
listeners (a unix socket and/or TCP, or the sockets of systemd socket activation), the control
socket, ``DIR/agent.json`` (who serves this cache and where, written atomically and removed on a
clean stop) and a clean shutdown on SIGINT/SIGTERM (listeners close, in-flight requests finish, the
cache is flushed and checkpointed).

Lifecycle operations (agent/lifecycle.py, agent/hydrate.py) are control ops, so ``blockprov
reset/snapshot/update/hydrate`` reach a running agent; an agent also registers with its repository
as an *instance* and long-polls it for requests (agent/report.py), so the repository can ask it for
a snapshot (seed 000 claims 10, 34) although agents usually sit behind NAT. Only ``snapshot``,
``reset`` and ``status`` are accepted from the repository. The registration carries the instance's
live state (hydration %, modified chunks, fetch latency, last error, host), so the operator's
console shows it live.
``--metrics HOST:PORT`` adds a Prometheus listener (agent/metrics.py).

Chunks come through a ``PeerSource`` (cache/peers.py) under the fetcher, always: it counts what
came from where (repository, site cache, peers) per version, which the registration reports. With
``--site`` the agent also takes part in its site's peer sharing: it joins the site (agent/site.py)
and, with ``--peer-listen``, serves its chunks to the site's other agents (agent/peerserve.py).

Crash rules: everything durable belongs to the cache (cache/device.py). ``agent.json`` is only a
hint for humans and ``status``; a stale one left by a killed agent is recognised because the
cache lock is free (``running`` is decided by the control socket answering, never by the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from socket import socket as Socket
from typing import Any, TypeVar

from blockprov.agent import control, lifecycle
from blockprov.agent.hydrate import HydrationStatus
from blockprov.agent.instance import AgentInfo, InstanceOps, StatusReport, catch_stop_signals, wait_for_stop
from blockprov.agent.metrics import AgentCollector, MetricsListener, registry_for
from blockprov.agent.offline import adopt_repository
from blockprov.agent.peerserve import DEFAULT_SLOTS, PeerServer
from blockprov.agent.report import RepositoryLink
from blockprov.agent.site import SiteLink, advertised_url
from blockprov.cache import (
    CHECKPOINT_FILL_BYTES,
    DEFAULT_READAHEAD,
    DEFAULT_TIMEOUT,
    CacheDevice,
    Lender,
    PeerSource,
    Reserve,
    SourceFactory,
    is_cache,
    load_state,
    repository_source,
)
from blockprov.durable import atomic_write
from blockprov.errors import AgentNotRunning, CacheError, UsageError
from blockprov.manifest import Manifest
from blockprov.names import parse_ref
from blockprov.nbd.activation import uri_template
from blockprov.nbd.server import FRAME_TIMEOUT, NbdServer
from blockprov.repo.base import Repository
from blockprov.repo.remote import RemoteRepository
from blockprov.results import from_dict

log = logging.getLogger("blockprov.agent")

AGENT_FILE = "agent.json"
REMOTE_OPS = ("snapshot", "reset", "status")
T = TypeVar("T")


@dataclass
class AgentConfig:
    cache_dir: Path
    socket: Path | None = None
    listen: tuple[str, int] | None = None
    data_path: str | None = None
    readahead: int = DEFAULT_READAHEAD
    fetch_timeout: float = DEFAULT_TIMEOUT
    nbd_timeout: float = FRAME_TIMEOUT  # an NBD peer stalled mid-request or not taking its replies: dropped
    read_only: bool = False
    reset_on_start: bool = False
    hydrate: bool = False
    hydrate_rate: float | None = None
    use_profile: bool = True
    auto_profile: bool = True  # a cold first session saves its read order as the version's profile
    instance: str | None = None  # name registered with the repository (default: from the cache's uuid)
    register: bool = True
    metrics: tuple[str, int] | None = None  # Prometheus listener (attach --metrics HOST:PORT)
    activated: list[Socket] = field(default_factory=list)  # listening sockets passed by socket activation
    # fills between checkpoints: bounds what an open after an unclean stop re-verifies (cache/device.py)
    checkpoint_fill_bytes: int = CHECKPOINT_FILL_BYTES
    reserve: Reserve | None = None  # golden reserve of the cache (cache/reserve.py): the in-machine agent's
    site: str | None = None  # take part in this site's peer sharing (attach --site; agent/site.py)
    peer_listen: tuple[str, int] | None = None  # serve chunks to the site's peers here (agent/peerserve.py)
    peer_url: str | None = None  # how peers reach that listener (default: from its address)
    peer_slots: int = DEFAULT_SLOTS  # peer requests served at once
    peer_rate: float | None = None  # bytes per second sent to peers at most (None: no limit)
    # what the embedding process adds: "host" (reported), "report" (a dict merged into the report the
    # repository shows: the in-machine agent's last move to another version, agent/keep.py)
    extra: dict[str, Any] = field(default_factory=dict)
    # run on the open cache before anything else sees it (before the reset on start): a PC's agent
    # turns the kernel's record of the last native session into the modified map (netboot/native.py)
    prepare: Callable[[CacheDevice], Awaitable[None]] | None = None


class Agent:
    def __init__(self, config: AgentConfig, repo: Repository, manifest: Manifest | None) -> None:
        if config.socket is None and config.listen is None and not config.activated:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both), or start it by socket activation")
        self.config = config
        self.repo = repo
        self.manifest = manifest
        self.device: CacheDevice | None = None
        self.server: NbdServer | None = None
        self.control = control.ControlServer({"status": self._op_status, "stop": self._op_stop})
        self.ops: InstanceOps | None = None
        self.addresses: list[str] = []
        self.started = time.time()
        self.instance = config.instance
        self.link: RepositoryLink | None = None  # registration, reports, requests (agent/report.py)
        self._stop = asyncio.Event()
        self.metrics: MetricsListener | None = None
        self.metrics_url: str | None = None
        self.peers: PeerSource | None = None  # what the fetcher reads through (cache/peers.py)
        self.peer_server: PeerServer | None = None
        self.peer_url: str | None = None
        self.site: SiteLink | None = None

    def layers(self, peers: PeerSource) -> SourceFactory:
        """The stack below the cache (cache/source.py): the repository's fetcher, reading through
        the site's peers (``peers``, a BlobSource: cache/peers.py), under the golden reserve when
        the cache has one (a PC's disk)."""
        cfg = self.config
        source = repository_source(peers, readahead=cfg.readahead, timeout=cfg.fetch_timeout)
        return cfg.reserve.source(source) if cfg.reserve is not None else source

    def _resolve(self, ref: str) -> Manifest:
        """The version ``ref`` names, to move to: the repository resolves the tag (an id, without the
        manifest), and the manifest comes through the site's peers when the agent has some of the
        image (cache/peers.py, ``PeerSource.manifest``, checked against the id); else, as always,
        the whole answer from the repository."""
        r = parse_ref(ref)
        peers = self.peers
        if peers is not None and peers.has_peers(r.name) and isinstance(self.repo, RemoteRepository):
            vid = self.repo.version_of(r)
            got = peers.manifest(r.name, vid) if vid is not None else None
            if got is not None:
                return got
        return self.repo.resolve(r)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        cfg = self.config
        catch_stop_signals(self._stop)  # a SIGTERM from now on is a clean stop (run() sees it at once)
        peers = self.peers = PeerSource(self.repo, upstream_kind=await self._upstream_kind(),
                                         shared=cfg.site is not None)
        try:
            self.device = await CacheDevice.open(cfg.cache_dir, self.layers(peers), self.manifest, repo=self.repo,
                                                 data_path=cfg.data_path, read_only=cfg.read_only,
                                                 checkpoint_fill_bytes=cfg.checkpoint_fill_bytes)
        except BaseException:
            peers.close()
            raise
        peers.version_of = lambda: self.device.manifest.id if self.device is not None else ""
        peers.image_of = lambda: self.device.manifest.image if self.device is not None else ""
        peers.own_manifest = lambda: self.device.manifest if self.device is not None else None
        peers.manifest_below = self.repo.resolve
        try:
            dev = self.device
            if self.manifest is None:  # re-attach: refuse a repository without the cache's version
                await adopt_repository(dev, self.repo)
            dev.record_repository(self.repo.url)
            if self.instance is None:
                self.instance = f"i-{dev.uuid[:12]}"
            if cfg.prepare is not None:
                await cfg.prepare(dev)
            if cfg.reset_on_start:
                done = await lifecycle.reset(dev, eager=False, punch=True)
                log.info("reset on start: %d chunk(s) back to the base", done.chunks_reset)
            await dev.checkpoint()
            m = self.device.manifest
            server = self.server = NbdServer({"": dev, m.image: dev, f"{m.image}@{m.id}": dev},
                                             description=f"blockprov {m.image}@{m.id}",
                                             frame_timeout=cfg.nbd_timeout, write_timeout=cfg.nbd_timeout)
            self.ops = InstanceOps(dev, self.repo, connections=lambda: server.stats.connections_active,
                                   hydrate=cfg.hydrate, hydrate_rate=cfg.hydrate_rate, use_profile=cfg.use_profile,
                                   auto_profile=cfg.use_profile and cfg.auto_profile, resolve=self._resolve)
            self.control.handlers.update(self.ops.handlers())
            if cfg.socket is not None:
                cfg.socket.parent.mkdir(parents=True, exist_ok=True)
                await self.server.start_unix(cfg.socket)  # refuses a socket another agent serves
                self.addresses.append(f"nbd+unix:///{m.image}?socket={cfg.socket}")
            if cfg.listen is not None:
                host, port = await self.server.start_tcp(*cfg.listen)
                shown = f"[{host}]" if ":" in host else host
                self.addresses.append(f"nbd://{shown}:{port}/{m.image}")
            for sock in cfg.activated:
                await self.server.start_socket(sock)
                self.addresses.append(uri_template(sock).replace("NAME", m.image))
            await self.control.start(control.socket_path(cfg.cache_dir))
            if cfg.metrics is not None:
                await self._start_metrics(*cfg.metrics)
            atomic_write(cfg.cache_dir / AGENT_FILE, json.dumps(self._describe(), indent=2).encode())
            await self.ops.start()
            if cfg.site is not None and cfg.peer_listen is not None:
                self.peer_server = PeerServer(Lender(dev), peers, self._who, slots=cfg.peer_slots, rate=cfg.peer_rate)
                host, port = await self.peer_server.start(*cfg.peer_listen)
                self.peer_url = peers.own_url = cfg.peer_url or advertised_url(host, port, self.repo.url)
            if cfg.site is not None:
                self.site = SiteLink(self.repo, cfg.site, self.instance, peers)
                await self.site.start()
            if cfg.register:
                self.link = RepositoryLink(self.repo, self.instance, self._registration, self.control.handlers,
                                           REMOTE_OPS)
                if self.site is not None:
                    await self.link.register_now()  # listed among the site's peers at once
                self.link.start()
        except BaseException:
            await self._shutdown()
            raise
        return self.addresses

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM or a ``stop`` control request, then stop cleanly."""
        try:
            await wait_for_stop(self._stop)
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _start_metrics(self, host: str, port: int) -> None:
        def hydration() -> HydrationStatus | None:
            h = self.ops.hydrator if self.ops is not None else None
            return h.status() if h is not None else None

        def labels() -> dict[str, str]:
            m = self.device.manifest if self.device is not None else None
            return {"image": m.image, "version": m.id, "instance": str(self.instance)} if m is not None else {}

        collector = AgentCollector(lambda: self.device, lambda: self.server.stats if self.server else None,
                                   hydration, labels)
        self.metrics = MetricsListener(registry_for(collector))
        try:
            self.metrics_url = await self.metrics.start(host, port)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None

    async def _upstream_kind(self) -> str:
        """``site_cache`` when the repository this agent was given is a site cache (its health says so)."""
        health = getattr(self.repo, "health", None)
        if not callable(health):
            return "repository"
        try:
            got = await asyncio.wait_for(self._run(health), 10.0)
        except Exception:  # an older server, or none yet: the first fetches will say more
            return "repository"
        return "site_cache" if isinstance(got, dict) and got.get("role") == "site-cache" else "repository"

    def _who(self) -> dict[str, Any]:
        m = self.device.manifest if self.device is not None else None
        return {"site": self.config.site, "instance": self.instance,
                "version": f"{m.image}@{m.id}" if m is not None else None}

    async def _shutdown(self) -> None:
        if self.site is not None:
            await self.site.stop()
            if self.link is not None and self.peer_url is not None:
                self.peer_url = None  # said to the repository now: the site's peers stop asking at once
                await self.link.register_now()
        if self.peer_server is not None:
            await self.peer_server.close()
        if self.link is not None:
            await self.link.stop()
        if self.ops is not None:
            await self.ops.stop()
        with contextlib.suppress(Exception):
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.server is not None:
            await self.server.close()
        if self.device is not None:
            await self.device.close()
        if self.peers is not None:
            self.peers.close()
        (self.config.cache_dir / AGENT_FILE).unlink(missing_ok=True)

    # -- control ops ----------------------------------------------------------------------------
    def _describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started": self.started, "addresses": self.addresses,
                "repository": self.repo.url, "instance": self.instance, "metrics": self.metrics_url,
                "site": self.config.site, "peer_url": self.peer_url}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- control ops ------------------------------------------------------------------------------
    async def _op_status(self, req: dict[str, Any]) -> StatusReport:
        control.Args(req)  # takes none: any argument is refused (a misspelt one is not ignored)
        assert self.ops is not None and self.server is not None
        site = None
        if self.site is not None:
            site = self.site.status() | {"serving": self.peer_server.status() if self.peer_server else None}
        return replace(self.ops.status(), agent=AgentInfo(running=True, uptime=time.time() - self.started,
                                                          **self._describe()),
                       nbd=vars(self.server.stats).copy(),
                       sources=self.peers.stats.to_dict() if self.peers is not None else None, site=site)

    async def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        control.Args(req)
        self._stop.set()
        return {"stopping": True}

    # -- repository-initiated requests -------------------------------------------------------
    def _registration(self) -> dict[str, Any]:
        """What the repository shows of this agent: where it serves, and its live state."""
        assert self.device is not None and self.ops is not None
        m = self.device.manifest
        st = self.ops.status()
        cs = st.device.cache
        total = cs.chunks_total or 1
        fetch = st.device.fetch
        return {"image": m.image, "version": m.id, "pid": os.getpid(), "addresses": self.addresses,
                "cache": str(self.config.cache_dir), "host": self.config.extra.get("host") or socket.gethostname(),
                "hydration": {"percent": round(100.0 * (cs.chunks_present + cs.chunks_zero) / total, 1),
                              "running": st.hydration is not None and st.hydration.state == "running"},
                "modified_chunks": cs.chunks_modified,
                "fetch_latency_ms": fetch.fetch_latency_ms.p50 if fetch is not None else None,
                "last_error": self.link.last_error if self.link is not None else None,
                # an agent is its site's peer once it joined (its token may): the tracker lists it then
                "site": self.config.site if self.site is not None and self.site.joined else None,
                "site_error": self.site.last_error if self.site is not None else None,
                "peer_url": self.peer_url if self.site is not None and self.site.joined else None,
                "sources": self.peers.stats.to_dict()["by_version"] if self.peers is not None else {},
                "peer_served": (self.peer_server.stats.bytes_sent if self.peer_server is not None else 0),
                **(self.config.extra.get("report") or {})}


def offline_status(cache_dir: Path) -> StatusReport:
    """Status of a cache no agent is serving, from its metadata and journal (nothing written)."""
    if not is_cache(cache_dir):
        raise CacheError(f"{cache_dir} is not a blockprov cache (no metadata)")
    return StatusReport(device=load_state(cache_dir).status(), agent=AgentInfo(running=False))


def status(cache_dir: Path) -> StatusReport:
    """Live status from the running agent if there is one, else what the cache holds on disk."""
    try:
        return from_dict(StatusReport, control.call(cache_dir, "status", timeout=10.0))
    except AgentNotRunning:
        return offline_status(cache_dir)
