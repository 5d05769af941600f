"""The agent process: one cache, exported over NBD, controllable through a local socket.

It composes the device stack (repository → CacheDevice → NBD server) and owns the process-level
concerns: the exports' names (the image name, ``NAME@ID``, and the default empty name), the
listeners (a unix socket and/or TCP), the control socket, ``DIR/agent.json`` (who serves this cache
and where, written atomically and removed on a clean stop) and a clean shutdown on SIGINT/SIGTERM
(listeners close, in-flight requests finish, the cache is flushed and checkpointed).

Crash rules: everything durable belongs to the cache (device/cache.py). ``agent.json`` is only a
hint for humans and ``status``; a stale one left by a killed agent is recognised because the
cache lock is free (``running`` is decided by the control socket answering, never by the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..device.cache import CacheDevice
from ..durable import atomic_write
from ..errors import CacheError, UsageError
from ..manifest import Manifest
from ..nbd.server import NbdServer
from ..repo.base import Repository
from . import control
from .fetcher import DEFAULT_READAHEAD, DEFAULT_TIMEOUT
from .journal import load

log = logging.getLogger("blockprov.agent")

AGENT_FILE = "agent.json"


@dataclass
class AgentConfig:
    cache_dir: Path
    socket: Path | None = None
    listen: tuple[str, int] | None = None
    data_path: str | None = None
    readahead: int = DEFAULT_READAHEAD
    fetch_timeout: float = DEFAULT_TIMEOUT
    read_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class Agent:
    def __init__(self, config: AgentConfig, repo: Repository, manifest: Manifest | None) -> None:
        if config.socket is None and config.listen is None:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
        self.config = config
        self.repo = repo
        self.manifest = manifest
        self.device: CacheDevice | None = None
        self.server: NbdServer | None = None
        self.control = control.ControlServer({"status": self._op_status, "stop": self._op_stop})
        self.addresses: list[str] = []
        self.started = time.time()
        self._stop = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        cfg = self.config
        self.device = await CacheDevice.open(cfg.cache_dir, self.repo, self.manifest, data_path=cfg.data_path,
                                             readahead=cfg.readahead, fetch_timeout=cfg.fetch_timeout,
                                             read_only=cfg.read_only)
        try:
            m = self.device.manifest
            self.server = NbdServer({"": self.device, m.image: self.device, f"{m.image}@{m.id}": self.device},
                                    description=f"blockprov {m.image}@{m.id}")
            if cfg.socket is not None:
                cfg.socket.parent.mkdir(parents=True, exist_ok=True)
                if cfg.socket.exists():
                    if cfg.socket.is_socket():
                        cfg.socket.unlink()
                    else:
                        raise UsageError(f"{cfg.socket} exists and is not a socket")
                await self.server.start_unix(cfg.socket)
                self.addresses.append(f"nbd+unix:///{m.image}?socket={cfg.socket}")
            if cfg.listen is not None:
                host, port = await self.server.start_tcp(*cfg.listen)
                shown = f"[{host}]" if ":" in host else host
                self.addresses.append(f"nbd://{shown}:{port}/{m.image}")
            await self.control.start(control.socket_path(cfg.cache_dir))
            atomic_write(cfg.cache_dir / AGENT_FILE, json.dumps(self._describe(), indent=2).encode())
        except BaseException:
            await self._shutdown()
            raise
        return self.addresses

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM or a ``stop`` control request, then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.control.close()
        if self.server is not None:
            await self.server.close()
        if self.device is not None:
            await self.device.close()
        (self.config.cache_dir / AGENT_FILE).unlink(missing_ok=True)

    # -- control ops ----------------------------------------------------------------------------
    def _describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started": self.started, "addresses": self.addresses,
                "repository": self.repo.url}

    async def _op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.device is not None and self.server is not None
        st = self.device.status()
        st["agent"] = self._describe() | {"running": True, "uptime": time.time() - self.started}
        st["nbd"] = vars(self.server.stats).copy()
        return st

    async def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self._stop.set()
        return {"stopping": True}


def offline_status(cache_dir: Path) -> dict[str, Any]:
    """Status of a cache no agent is serving, from its metadata and journal (nothing written)."""
    if not (cache_dir / "meta").exists():
        raise CacheError(f"{cache_dir} is not a blockprov cache (no metadata)")
    loaded = load(cache_dir)
    meta, counts = loaded.meta, loaded.map.counts()
    return {
        "image": meta.image, "version": meta.version, "size": meta.size, "chunk_size": meta.chunk_size,
        "cache_dir": str(cache_dir), "data_path": meta.data_path or str(cache_dir / "data"),
        "chunks_total": counts["total"], "chunks_present": counts["present"],
        "chunks_modified": counts["modified"], "chunks_zero": counts["zero"], "chunks_missing": counts["missing"],
        "journal_seq": loaded.seq, "clean_shutdown": meta.clean,
        "totals": {k: int(meta.totals.get(k, 0)) for k in ("bytes_fetched", "wire_bytes", "chunks_fetched")},
        "agent": {"running": False},
    }


def status(cache_dir: Path) -> dict[str, Any]:
    """Live status from the running agent if there is one, else what the cache holds on disk."""
    try:
        result: dict[str, Any] = control.call(cache_dir, "status", timeout=10.0)
        return result
    except control.AgentNotRunning:
        return offline_status(cache_dir)
