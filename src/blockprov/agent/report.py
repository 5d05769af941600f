"""An agent's link to its repository: it registers as an *instance*, reports its live state, and
long-polls the repository's queue for requests (seed 000 claims 10, 34: agents sit behind NAT, so
the repository cannot call them; they ask).

One mechanism for every kind of agent process: ``blockprov attach`` (agent/agent.py: a host's
instance, which accepts ``snapshot``, ``reset`` and ``status``), ``blockprov clones serve`` and
``blockprov pool serve`` (clones/clones.py, clones/pool.py: a host's clones and pools, which accept
``status``). What is reported is the owner's ``registration()``: it goes with every poll and, when
it changed, every ``REPORT_EVERY`` seconds or at once after ``poke()``, so the operator's console
(``/ui/``) and ``blockprov agents`` show it live.

Which repository takes the reports: the one the agent was given. A remote one (``blockprov serve``)
keeps them in its catalog, where the console shows them; the embedded one keeps them in the local
catalog (seen by a ``blockprov serve`` of the same data directory, and by ``blockprov agents``
there). A token that may not register (a read token: 403), or an older repository without the
agents API, is said once in the log and the agent goes on serving without reports; an unreachable
repository is retried with backoff for ever (retry.py), and the error is part of the next report.

Crash rules: nothing here is durable on the agent's side; the repository's catalog keeps the last
report and when it came (``last_seen``), so an agent that died shows as offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

from blockprov.agent import control
from blockprov.agent.instance import in_daemon_thread
from blockprov.errors import AccessDenied, BlockprovError, UsageError
from blockprov.repo.base import Repository
from blockprov.results import to_dict
from blockprov.retry import RetryPolicy, is_transient, retry_async

log = logging.getLogger("blockprov.agent")

POLL_WAIT = 20.0  # seconds a request poll waits at the repository
REPORT_EVERY = 5.0  # seconds between checks whether the reported state changed (console, `agents`)
FINAL_REPORT = 5.0  # seconds a stopping agent gives its last report
POLL_RETRY = RetryPolicy(timeout=None, first_delay=1.0, max_delay=60.0)  # for ever: see retry.py


def host_instance(prefix: str, name: str = "") -> str:
    """A stable instance name for a host-wide agent: ``PREFIX-[NAME-]HOSTNAME``, in the characters
    instance names allow (the same after a restart, so the console keeps one row per agent)."""
    parts = [prefix, name, socket.gethostname()]
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]", "-", text).replace("..", ".")[:128]


class RepositoryLink:
    """Registers ``instance`` with ``repo``, reports ``registration()`` and serves the requests the
    repository queues, with the control handlers named in ``ops`` (taken from ``handlers`` when the
    request arrives, so handlers added later count)."""

    def __init__(self, repo: Repository, instance: str, registration: Callable[[], dict[str, Any]],
                 handlers: Mapping[str, control.Handler], ops: tuple[str, ...]) -> None:
        self.repo = repo
        self.instance = instance
        self.registration = registration
        self.handlers = handlers
        self.ops = ops
        self.last_error: str | None = None  # the last failed repository request or poll: reported
        self._reported: dict[str, Any] | None = None  # the registration last sent
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._poll_requests()), asyncio.ensure_future(self._report_changes())]

    async def stop(self) -> None:
        """Stop polling; first send the state at this moment if it changed since the last report
        (bounded: FINAL_REPORT s), so what the repository keeps of a stopped agent is its last
        state — a clone removed just before the stop is not shown for ever (issue 27 item 5)."""
        if self._reported is not None and self._tasks:
            with contextlib.suppress(BlockprovError, OSError, TimeoutError):
                if self.registration() != self._reported:
                    await asyncio.wait_for(self._register(), FINAL_REPORT)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def poke(self) -> None:
        """The state changed now (an instance handed out): report it without waiting for the next check."""
        self._poke.set()

    async def register_now(self) -> None:
        """Register before the first poll would (a site's agents must find each other at once)."""
        with contextlib.suppress(BlockprovError, OSError):
            await self._register()

    async def _register(self) -> None:
        info = self.registration()
        await in_daemon_thread(self.repo.register_agent, self.instance, info)
        self._reported = info

    async def _report_changes(self) -> None:
        """Between polls, send the registration again when it changed (a hydration moving on, a
        write, a pool instance handed out), checked every ``REPORT_EVERY`` s or when poked;
        failures are the poll loop's to report."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), REPORT_EVERY)
            self._poke.clear()
            if self._reported is not None and self.registration() != self._reported:
                with contextlib.suppress(BlockprovError, OSError):
                    await self._register()

    async def _poll_requests(self) -> None:
        """Register with the repository and carry out what it asks, until stopped. A repository
        that is away is retried for ever (retry.py: an agent outlives its repository's outages);
        an error no retry can fix (a token that may not register, a server without the agents
        API) is said once, and the agent goes on serving without reports."""
        def away(e: BaseException, attempt: int, delay: float) -> None:
            self.last_error = f"repository requests: {e}"

        while True:
            try:
                req = await retry_async(self._poll_once, POLL_RETRY, f"repository requests from {self.repo.url}",
                                        on_retry=away)
                if req is not None:
                    await self._serve_request(req)
            except asyncio.CancelledError:
                raise
            except AccessDenied as e:
                log.warning("not registered with %s, no repository requests will be taken: %s", self.repo.url, e)
                return
            except Exception as e:
                self.last_error = f"repository requests: {e}"
                if is_transient(e):  # the repository went away before it took the answer: polled again
                    log.warning("repository requests from %s: %s", self.repo.url, e)
                    continue
                log.error("repository requests from %s: %s; no more repository requests will be taken",
                          self.repo.url, e)
                return

    async def _poll_once(self) -> dict[str, Any] | None:
        await self._register()
        req: dict[str, Any] | None = await in_daemon_thread(self.repo.next_request, self.instance, POLL_WAIT)
        return req

    async def _serve_request(self, req: dict[str, Any]) -> None:
        op, args, rid = req.get("op"), req.get("args") or {}, str(req.get("id"))
        ok, result, error = False, None, None
        try:
            if op not in self.ops:
                raise UsageError(f"the repository may ask this agent for {', '.join(self.ops)}, not {op!r}")
            handler = self.handlers[str(op)]
            result = to_dict(await handler({"op": op, **args}))  # the repository queue is an edge
            ok = True
        except BlockprovError as e:
            error = str(e)
        except Exception as e:  # the agent keeps serving whatever a request does
            log.exception("repository request %s failed", op)
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            self.last_error = f"{op}: {error}"
        await in_daemon_thread(self.repo.complete_request, self.instance, rid, ok, result, error)
