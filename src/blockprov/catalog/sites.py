"""Sites: named groups of hosts and agents (a café, a classroom) that share chunks on their LAN.

A site is the unit of peer sharing (its agents fetch chunks from each other), of the site cache
(``cache``: the URL of ``blockprov serve --upstream`` as the site's machines reach it) and of
pre-warm. Hosts are put in a site with ``host assign … --site``, agents with ``attach --site`` (a
network-booted PC by its kernel argument ``blockprov.site``).

Tables:

* ``sites``: name, the site cache's URL (or NULL), when it was added and last changed.
* ``site_secret``: one row, the random secret from which each site's ticket keys are derived
  (tickets.py says how). Made on first use; ``rotate_secret`` replaces it, so every ticket and key
  handed out before stops working at once (agents fetch new ones when they next join).

Which agents are a site's peers is not a table: an agent's registration (catalog/machines.py,
``agents``) says its site and where it serves chunks to peers; those seen within
``ONLINE_SECONDS`` are the site's online peers (``online``).

Crash rules: each change is one transaction; the secret is created inside one, so two servers
opening a new catalog at once agree on a single secret.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from blockprov.catalog.db import SQLDatabase
from blockprov.catalog.records import SiteInfo
from blockprov.errors import InvalidName, SiteNotFound
from blockprov.names import base_url, site_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
    name    TEXT PRIMARY KEY,
    cache   TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS site_secret (
    id      INTEGER PRIMARY KEY,
    secret  TEXT NOT NULL,
    created REAL NOT NULL
);
"""

# An agent re-registers at least every poll (agent/report.py: 20 s waits, ``last_seen`` kept every
# 5 s), so one unseen for 45 s is gone: its peers stop asking it.
ONLINE_SECONDS = 45.0


class Sites:
    def __init__(self, db: SQLDatabase) -> None:
        self.db = db
        self.db.script(SCHEMA)

    def add(self, name: str, cache: str | None = None) -> SiteInfo:
        """Add a site, or change its cache URL (``cache=""`` removes it; None keeps it)."""
        name = site_name(name)
        url = base_url(cache) if cache else None
        now = time.time()
        with self.db.tx() as db:
            row = db.execute("SELECT cache, created FROM sites WHERE name=?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO sites VALUES (?,?,?,?)", (name, url, now, now))
                return SiteInfo(name, url, now, now)
            keep = row[0] if cache is None else url
            db.execute("UPDATE sites SET cache=?, updated=? WHERE name=?", (keep, now, name))
            return SiteInfo(name, keep, float(row[1]), now)

    def get(self, name: str) -> SiteInfo:
        row = self.db.one("SELECT name, cache, created, updated FROM sites WHERE name=?", (site_name(name),))
        if row is None:
            raise SiteNotFound(site=name)
        return SiteInfo(*row)

    def all(self) -> list[SiteInfo]:
        return [SiteInfo(*r) for r in self.db.all("SELECT name, cache, created, updated FROM sites ORDER BY name")]

    def remove(self, name: str) -> None:
        name = site_name(name)
        with self.db.tx() as db:
            if db.execute("DELETE FROM sites WHERE name=?", (name,)).rowcount == 0:
                raise SiteNotFound(site=name)

    def secret(self) -> bytes:
        row = self.db.one("SELECT secret FROM site_secret WHERE id=1")
        if row is not None:
            return bytes.fromhex(row[0])
        with self.db.tx() as db:  # writers are serialized: the first one creates it
            row = db.execute("SELECT secret FROM site_secret WHERE id=1").fetchone()
            if row is not None:
                return bytes.fromhex(row[0])
            new = secrets.token_bytes(32)
            db.execute("INSERT INTO site_secret VALUES (1,?,?)", (new.hex(), time.time()))
            return new

    def rotate_secret(self) -> None:
        new = secrets.token_bytes(32)
        with self.db.tx() as db:
            db.execute("INSERT INTO site_secret VALUES (1,?,?) ON CONFLICT (id) DO UPDATE SET "
                       "secret=excluded.secret, created=excluded.created", (new.hex(), time.time()))


def online(agents: list[dict[str, Any]], site: str, *, exclude: str | None = None) -> list[dict[str, Any]]:
    """The site's agents that serve peers and were seen lately, from ``Registry.agents()`` rows:
    what a joining agent may ask for chunks."""
    out = []
    for a in agents:
        info = a.get("info") or {}
        if (info.get("site") != site or not isinstance(info.get("peer_url"), str) or a["instance"] == exclude
                or a.get("seen_ago", ONLINE_SECONDS) >= ONLINE_SECONDS):
            continue
        try:
            url = base_url(info["peer_url"])
        except InvalidName:  # an agent's report is not trusted to be a URL
            continue
        out.append({"instance": a["instance"], "url": url, "image": info.get("image"),
                    "version": info.get("version"), "seen_ago": a.get("seen_ago")})
    return out


SOURCES = ("peers", "site_cache", "repository")


def traffic(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes the agents took from their peers, their site cache and the repository, per site and
    version, summed over the agents' last reports (``info.sources``: version id → source →
    ``{chunks, bytes}``, counted since each agent started; agent/agent.py). Agents of no site are
    summed under site ``None``. Pure: the console's health and hosts pages and ``/metrics`` read it."""
    rows: dict[tuple[str | None, str], dict[str, Any]] = {}
    for a in agents:
        got = a.get("info")
        info: dict[str, Any] = got if isinstance(got, dict) else {}
        sources = info.get("sources")
        if not isinstance(sources, dict):
            continue
        site = info.get("site") if isinstance(info.get("site"), str) else None
        image = info.get("image") if isinstance(info.get("image"), str) else None
        for vid, by in sources.items():
            if not isinstance(by, dict):
                continue
            row = rows.setdefault((site, str(vid)), {"site": site, "image": image, "version": str(vid), "agents": 0,
                                                     **{s: 0 for s in SOURCES}})
            row["agents"] += 1
            for s in SOURCES:
                n = (by.get(s) or {}).get("bytes") if isinstance(by.get(s), dict) else None
                if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                    row[s] += n
    return sorted(rows.values(), key=lambda r: (r["site"] or "", r["image"] or "", r["version"]))
