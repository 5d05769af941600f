"""An agent's membership of its site: it joins through the repository and keeps its peers fresh.

The repository is the site's tracker (cache/peers.py says why): ``join_site`` answers with the
site's online peers, a ticket for this agent and the site's keys (tickets.py). ``SiteLink`` hands
them to the agent's ``PeerSource`` (whom to ask) and, through it, to the peer server (whom to let
in), and joins again every ``refresh`` seconds the repository names (30), more often in the first
``EAGER_SECONDS`` after start, when the site's other PCs come up at the same time as this one (a
storm of thirty at nine o'clock): an agent that does not know its peers yet asks the repository.

Failures: a repository that cannot be reached keeps the last membership (peers keep sharing while
the repository is away, until the ticket expires) and is retried with back-off; a token that may
not join (no read scope, bound to another site) or a site that does not exist is said once in the
log, and the agent goes on without peers, asking again at the slow pace in case the operator fixes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import urllib.parse
from typing import Any

from blockprov.agent.instance import in_daemon_thread
from blockprov.cache import Membership, Peer, PeerSource
from blockprov.errors import AccessDenied, BlockprovError, NotFound
from blockprov.repo.base import Sites

log = logging.getLogger("blockprov.peers")

EAGER_SECONDS = 20.0
EAGER_EVERY = 2.0
SLOW_EVERY = 30.0
RETRY_MAX = 30.0


class SiteLink:
    def __init__(self, repo: Sites, site: str, instance: str, source: PeerSource) -> None:
        self.repo = repo
        self.site = site
        self.instance = instance
        self.source = source
        self.started = time.monotonic()
        self.last_error: str | None = None
        self.joined_at: float | None = None
        self.cache: str | None = None  # the site cache's URL, as the repository knows it
        self._task: asyncio.Task[None] | None = None
        self._refused = False

    @property
    def joined(self) -> bool:
        """The last join was let in (the agent is one of the site's peers)."""
        return self.source.membership is not None
    async def start(self) -> None:
        """Join once (so the first reads already know the peers), then keep joining in the background."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.join(), 10.0)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def join(self) -> float:
        """One join; returns how long to wait until the next."""
        try:
            got = await in_daemon_thread(self.repo.join_site, self.site, self.instance)
        except (AccessDenied, NotFound) as e:
            if not self._refused:
                log.warning("site %s: not taking part in peer sharing: %s", self.site, e)
            self._refused = True
            self.last_error = str(e)
            self.source.membership = None
            return SLOW_EVERY
        except (BlockprovError, OSError) as e:
            self.last_error = str(e)
            raise
        self._refused = False
        self.last_error = None
        self.joined_at = time.time()
        self.cache = got.get("cache")
        peers = tuple(Peer(str(p["instance"]), str(p["url"]), p.get("version"), p.get("image"))
                      for p in got.get("peers") or ())
        self.source.membership = Membership(self.site, self.instance, str(got["ticket"]),
                                            {int(e): bytes.fromhex(k) for e, k in got["keys"].items()}, peers)
        if time.monotonic() - self.started < EAGER_SECONDS:
            return EAGER_EVERY
        return float(got.get("refresh") or SLOW_EVERY)

    async def _run(self) -> None:
        delay = EAGER_EVERY
        retry = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                delay = await self.join()
                retry = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("site %s: joining through %s failed (%s); keeping the last peers", self.site,
                         getattr(self.repo, "url", "?"), e)
                delay, retry = retry, min(RETRY_MAX, retry * 2)

    def status(self) -> dict[str, Any]:
        m = self.source.membership
        return {"site": self.site, "joined": self.joined_at, "peers": len(m.peers) if m else 0,
                "cache": self.cache, "last_error": self.last_error, "sources": self.source.stats.to_dict()}


def advertised_url(host: str, port: int, repo_url: str) -> str:
    """How peers reach a listener bound to ``host:port``: that address, or, for a wildcard bind, the
    address this host uses toward the repository (its LAN address, as DHCP gave it)."""
    h = host
    if host in ("", "0.0.0.0", "::"):
        u = urllib.parse.urlsplit(repo_url.split(",")[0])
        h = "127.0.0.1"
        if u.hostname and u.scheme in ("http", "https"):
            family = socket.AF_INET6 if ":" in u.hostname else socket.AF_INET
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((u.hostname, u.port or 80))  # UDP: nothing is sent, the route is chosen
                h = str(s.getsockname()[0])
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"
