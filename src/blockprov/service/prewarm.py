"""Pre-warm: a version's boot working set pulled into a site cache before opening time (issue 26).

``blockprov host prewarm SITE NAME:TAG --at 08:30`` asks the site's cache (``POST
/v1/sitecache/prewarm``, a ``write`` token) to fetch, at that time, the chunks of the version's
boot profile (its own or the one it inherits) in profile order, then, with ``--all``, every other
chunk of the version, as far as the cache's budget allows. At nine the PCs find the working set on
their LAN. It is WDS's scheduled cast without the lock-step: nothing is pushed to the PCs, which stay
lazy and take what they read, and a PC that boots early simply gets it sooner.

Why into the site cache and not onto the PCs' disks: a PC's disk holds the version it runs and its
golden reserve, not the next one, and its agent is not running while the PC is off; the site cache
is up all night and is where every PC of the site looks first.

Jobs are kept in ``DATA/sitecache/prewarm.json`` (``durable.atomic_write``), so one scheduled for
tomorrow morning survives a restart; a job that was running when the cache stopped runs again (what
it had fetched is held, so it goes on where it stopped). One job runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blockprov.codec import ZERO_DIGEST
from blockprov.durable import atomic_write
from blockprov.errors import BlockprovError, UsageError
from blockprov.names import parse_ref
from blockprov.service.sitecache import SiteCache, answers_errors

log = logging.getLogger("blockprov.sitecache")

JOBS = "prewarm.json"
KEEP_JOBS = 50
BATCH = 128  # chunks pulled per step
SAVE_EVERY = 5.0  # seconds between saves of a running job's progress


class Prewarm:
    def __init__(self, sc: SiteCache) -> None:
        self.sc = sc
        self.path = sc.data_dir / JOBS
        self.jobs: list[dict[str, Any]] = []
        with contextlib.suppress(OSError, ValueError):
            self.jobs = list(json.loads(self.path.read_text()))
        for j in self.jobs:
            if j.get("state") == "running":
                j["state"] = "scheduled"
        self._wake = asyncio.Event()

    def routes(self) -> list[Route]:
        return [Route("/v1/sitecache/prewarm", answers_errors(self.post), methods=["POST"]),
                Route("/v1/sitecache/prewarm", answers_errors(self.list), methods=["GET"])]

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self.jobs[-KEEP_JOBS:], indent=1).encode())

    async def post(self, request: Request) -> Response:
        """Body ``{"ref": "NAME:TAG", "at": unix time or null (now), "all": false}``."""
        await self.sc.check(request, "write")
        try:
            d = json.loads(await request.body())
        except ValueError:
            raise UsageError("the body is not JSON") from None
        if not isinstance(d, dict) or not isinstance(d.get("ref"), str):
            raise UsageError('expected {"ref": "NAME:TAG", "at": UNIX_TIME, "all": false}')
        ref = str(parse_ref(d["ref"]))
        at = d.get("at")
        if at is not None and (not isinstance(at, int | float) or at != at):
            raise UsageError("at: a unix time in seconds, or null for now")
        job = {"id": secrets.token_hex(4), "ref": ref, "at": float(at or time.time()), "all": bool(d.get("all")),
               "state": "scheduled", "created": time.time(), "done": 0, "total": None, "error": None}
        self.jobs.append(job)
        await self.sc.run(self._save)
        self._wake.set()
        return JSONResponse(job, status_code=201)

    async def list(self, request: Request) -> Response:
        await self.sc.check(request)
        return JSONResponse({"jobs": self.jobs})

    async def run(self) -> None:
        """The scheduler: the next due job, one at a time, until cancelled."""
        while True:
            now = time.time()
            due = [j for j in self.jobs if j["state"] == "scheduled" and j["at"] <= now]
            if due:
                await self._execute(min(due, key=lambda j: j["at"]))
                continue
            later = [j["at"] for j in self.jobs if j["state"] == "scheduled"]
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(60.0, max(0.05, min(later) - now)) if later else 60.0)

    async def _keep_answers(self, ref: str, image: str, vid: str) -> None:
        """What a PC asks before its first chunk, kept too: its manifest (by tag and by id) and its
        boot profile (own and inherited), so a pre-warmed version boots while the uplink is down."""
        auth = dict(self.sc.upstream.client.headers)  # the site cache's own token, if it has one
        base = {k: v for k, v in auth.items() if k.lower() == "authorization"}
        tag = ref.partition(":")[2] if "@" not in ref else None
        targets = [f"/v1/images/{image}/manifest?ref=%40{vid}", *([f"/v1/images/{image}/manifest?ref={tag}"]
                                                                   if tag else [])]
        for t in targets:
            await self.sc.keep(t, base)
        octets = base | {"accept": "application/octet-stream"}
        for t in (f"/v1/images/{image}/versions/{vid}/profile", f"/v1/images/{image}/versions/{vid}/profile?own=1"):
            await self.sc.keep(t, octets)

    async def _execute(self, job: dict[str, Any]) -> None:
        sc = self.sc
        job["state"], job["started"] = "running", time.time()
        await sc.run(self._save)
        try:
            m = await sc.run(sc.upstream.resolve, job["ref"])
            profile = await sc.run(sc.upstream.get_profile, m.image, m.id) or []
            await self._keep_answers(job["ref"], m.image, m.id)
            first = set(profile)
            order = list(profile) + ([i for i in range(m.count) if i not in first] if job["all"] else [])
            digests = list(dict.fromkeys(d for d in (m.digest_at(i) for i in order) if d != ZERO_DIGEST))
            job.update(version=f"{m.image}@{m.id}", total=len(digests), profile_chunks=len(profile), done=0)
            saved = time.monotonic()
            for k in range(0, len(digests), BATCH):
                part = [c for c in digests[k:k + BATCH] if not sc.store.has(c)]
                if part:
                    await sc.blobs(part)
                job["done"] = min(len(digests), k + BATCH)
                if time.monotonic() - saved > SAVE_EVERY:
                    await sc.run(self._save)
                    saved = time.monotonic()
            job["state"] = "done"
        except BlockprovError as e:
            job["state"], job["error"] = "failed", str(e)
            log.warning("pre-warm of %s failed: %s", job["ref"], e)
        job["finished"] = time.time()
        await sc.run(self._save)
