"""Access tokens: who may read the repository, who may act as an agent, who may change it.

Why it looks like this:

* **A token is shown once and never stored.** ``token create`` prints ``bpt_`` + 43 url-safe
  characters (32 random bytes); the catalog keeps only its SHA-256. A token carries 256 bits
  of entropy, so a fast hash is enough — nobody can search for a preimage — and slow password hashes
  (scrypt, argon2) exist for low-entropy secrets: here they would cost tens of milliseconds per
  request for nothing. A copy of the catalog therefore gives no one access.
* **Scopes are ordered**: ``read`` < ``agent`` < ``write``. ``read`` reads images, chunks, the
  catalog, boot files, profiles and metrics. ``agent`` adds what an agent does for itself: register
  (heartbeat), take the repository's requests and answer them — but it cannot change the catalog,
  so a kiosk's agent token cannot be used to upload, commit, tag or delete. ``write`` can do
  everything (uploads, commits, tags, removals, gc, hosts, boot files, profiles, asking agents for
  snapshots). An agent that must answer repository-initiated snapshots needs ``write``: the snapshot
  is an upload and a commit. Registration is not ``read``: whoever registers as an instance takes its
  requests, so a read token could otherwise swallow another agent's snapshot requests.
* **Tokens live in the catalog** (table ``tokens``), so every server over one catalog agrees.
  Servers keep a lookup for ``CACHE_SECONDS`` (a request costs a dict lookup, not a query), so a
  revocation takes effect on every server within that time.
* **An unreachable catalog does not stop reads** (PostgreSQL restarting, a partition): a server goes
  on using the answers it last had, for at most ``STALE_SECONDS``, for tokens and for "is any token
  set"; only a token it has never seen gets 503. A revocation cannot reach a server that cannot read
  the catalog anyway, and chunks are what keeps machines running.
* **A token may be bound to a site** (``token create --site S``, column ``site``): it then gets
  tickets for that site's peers only (tickets.py); a PC's token that leaks opens no other site's
  LAN. A token without a site (an operator's) may join any site.
* **Revoked tokens keep their row** (with the time of revocation): the server's ``--auth auto`` turns
  enforcement on once any token was ever created, and revoking the last one must not reopen it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, replace

from blockprov.catalog.db import SQLDatabase
from blockprov.errors import CatalogUnavailable, NotFound, UsageError
from blockprov.names import site_name, token_name

SCOPES = ("read", "agent", "write")
LEVEL = {s: i for i, s in enumerate(SCOPES)}
PREFIX = "bpt_"
CACHE_SECONDS = 5.0
STALE_SECONDS = 600.0  # how long a cached answer serves while the catalog is unreachable

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id      TEXT PRIMARY KEY,
    hash    TEXT NOT NULL UNIQUE,
    name    TEXT UNIQUE,
    scope   TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""


def scope_name(s: str) -> str:
    if s not in LEVEL:
        raise UsageError(f"a token scope is one of {', '.join(SCOPES)}, not {s!r}")
    return s


def allows(scope: str, needed: str) -> bool:
    """Whether a token of ``scope`` may do what needs ``needed``."""
    return LEVEL.get(scope, -1) >= LEVEL[needed]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str | None
    scope: str
    created: float
    revoked: float | None = None
    site: str | None = None  # bound to this site's peers (tickets), or None: any site


class TokenStore:
    """The ``tokens`` table of a catalog (created on open, like every catalog table)."""

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db
        self.db.script(SCHEMA)
        self.db.add_column("tokens", "site", "TEXT")
        self._cache: dict[str, tuple[float, TokenInfo | None]] = {}
        self._any: tuple[float, bool] = (-float("inf"), False)  # (when learned, any token exists)

    def create(self, scope: str, name: str | None = None, site: str | None = None) -> tuple[str, TokenInfo]:
        """A new token (returned once, in clear) and what the catalog records about it."""
        scope_name(scope)
        if name is not None:
            token_name(name)
        if site is not None:
            site_name(site)
        token = PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(secrets.token_hex(6), name, scope, time.time(), site=site)
        with self.db.tx() as db:  # writers are serialized: checking first is enough
            if name is not None and db.execute("SELECT 1 FROM tokens WHERE name=?", (name,)).fetchone():
                raise UsageError(f"a token named {name!r} exists already (revoked tokens keep their names)")
            db.execute("INSERT INTO tokens (id, hash, name, scope, created, revoked, site) VALUES (?,?,?,?,?,NULL,?)",
                       (info.id, token_hash(token), name, scope, info.created, site))
        return token, info

    def tokens(self) -> list[TokenInfo]:
        rows = self.db.all("SELECT id, name, scope, created, revoked, site FROM tokens ORDER BY created")
        return [TokenInfo(*r) for r in rows]

    def revoke(self, key: str) -> TokenInfo:
        """Revoke a token by id or name; revoking a revoked token is no error (it stays revoked)."""
        with self.db.tx() as db:
            row = db.execute("SELECT id, name, scope, created, revoked, site FROM tokens WHERE id=? OR name=?",
                             (key, key)).fetchone()
            if row is None:
                raise NotFound(f"no token with id or name {key!r}")
            info = TokenInfo(*row)
            if info.revoked is None:
                info = replace(info, revoked=time.time())
                db.execute("UPDATE tokens SET revoked=? WHERE id=?", (info.revoked, info.id))
        self._cache.clear()
        return info

    # -- what servers ask, cached ---------------------------------------------------------------
    def lookup(self, token: str) -> TokenInfo | None:
        """The live (not revoked) token with this value, or None; answers are kept ``CACHE_SECONDS``."""
        h = token_hash(token)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        try:
            row = self.db.one("SELECT id, name, scope, created, revoked, site FROM tokens "
                              "WHERE hash=? AND revoked IS NULL", (h,))
        except CatalogUnavailable:
            if hit is not None and now - hit[0] < STALE_SECONDS:
                return hit[1]
            raise
        info = TokenInfo(*row) if row is not None else None
        if len(self._cache) > 10000:  # bounded: random bad tokens must not grow it without end
            self._cache.clear()
        self._cache[h] = (now, info)
        return info

    def cached(self, token: str) -> tuple[bool, TokenInfo | None]:
        """(known, info) from the cache only: lets the event loop skip a thread hop on the hot path."""
        hit = self._cache.get(token_hash(token))
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return True, hit[1]
        return False, None

    def any_created(self) -> bool:
        """Whether any token was ever created here (cached like lookups)."""
        now = time.monotonic()
        if now - self._any[0] < CACHE_SECONDS:
            return self._any[1]
        try:
            got = self.db.one("SELECT 1 FROM tokens LIMIT 1") is not None
        except CatalogUnavailable:
            if now - self._any[0] < STALE_SECONDS:
                return self._any[1]
            raise
        self._any = (float("inf") if got else now, got)  # rows are never deleted: once true, always true
        return got

    def any_cached(self) -> bool | None:
        return self._any[1] if time.monotonic() - self._any[0] < CACHE_SECONDS or self._any[1] else None
