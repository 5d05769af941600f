"""Tickets: what an agent shows a peer of its site to be let in. Pure: no I/O, time passed in.

Why a ticket and not the caller's token: a peer (another PC of the site) cannot check a token.
Tokens live hashed in the catalog, behind the repository, and a peer must decide alone, also while
the repository is out of reach. So the repository, which does check tokens and scopes, gives an
agent that may read (and whose token is not bound to another site) two things when the agent joins
its site (``POST /v1/sites/SITE/join``): a ticket naming the site, the agent and an expiry, and the
site's keys, with which that agent checks the tickets of the peers that call it.

How: HMAC-SHA256. The catalog keeps one random secret. A site's key for one hour (an *epoch*) is
HMAC(secret, site, epoch); a ticket is its payload (site, instance, epoch, expiry) and
HMAC(key, payload). A joining agent gets the keys of the previous, the current and the next epoch,
so a ticket made around the turn of an hour checks everywhere.

What that trusts, and why it is enough: every agent of a site holds the site's keys, so one of them
could make tickets for that site, which gives it nothing it cannot already read. An agent of
another site holds other keys. An agent without the read scope gets neither keys nor a ticket. A
revoked token stops getting them: the agent's peers turn it away once its ticket expired (at most
``TICKET_SECONDS``) or, if it kept the keys to make its own, within two epochs, at once after
``blockprov site rotate-secret``. Ed25519 signatures would shrink that to one ticket's life, at the
price of a crypto library in the PC's initramfs (`cryptography` is 15 MB); hmac is in the stdlib.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from blockprov.errors import Forbidden, Unauthorized

EPOCH_SECONDS = 3600
TICKET_SECONDS = 600.0
SCHEME = "Ticket"  # Authorization: Ticket <ticket>
MAX_TICKET = 1024


def epoch(now: float) -> int:
    return int(now // EPOCH_SECONDS)


def site_key(secret: bytes, site: str, ep: int) -> bytes:
    return hmac.new(secret, f"blockprov-site-key\0{site}\0{ep}".encode(), hashlib.sha256).digest()


def site_keys(secret: bytes, site: str, now: float) -> dict[int, bytes]:
    """The keys a joining agent gets: previous, current and next epoch."""
    e = epoch(now)
    return {k: site_key(secret, site, k) for k in (e - 1, e, e + 1)}


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@dataclass(frozen=True)
class Ticket:
    site: str
    instance: str
    epoch: int
    expires: float


def issue(secret: bytes, site: str, instance: str, now: float, ttl: float = TICKET_SECONDS) -> str:
    """A ticket for ``instance`` of ``site``, valid ``ttl`` seconds from ``now``."""
    e = epoch(now)
    payload = json.dumps({"s": site, "i": instance, "e": e, "x": round(now + ttl, 3)},
                         separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(site_key(secret, site, e), payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def check(ticket: str, site: str, keys: dict[int, bytes], now: float) -> Ticket:
    """The ticket's claims, once its MAC, site and expiry are good. Unauthorized for a malformed,
    forged or expired ticket or one whose epoch has no key here; Forbidden for another site's."""
    if not ticket or len(ticket) > MAX_TICKET or ticket.count(".") != 1:
        raise Unauthorized(why="a peer of the site needs a ticket (malformed)")
    body, _, sig = ticket.partition(".")
    try:
        payload, mac = _unb64(body), _unb64(sig)
        d = json.loads(payload)
        claims = Ticket(str(d["s"]), str(d["i"]), int(d["e"]), float(d["x"]))
    except (ValueError, KeyError, TypeError):
        raise Unauthorized(why="a peer of the site needs a ticket (malformed)") from None
    key = keys.get(claims.epoch)
    if key is None:
        raise Unauthorized(why=f"the ticket is from another hour than this peer's keys (epoch {claims.epoch})")
    if claims.site != site:
        # checked before the MAC with this site's key, which another site's ticket cannot match
        raise Forbidden(scope=f"site {claims.site!r}", action=f"read from the peers of site {site!r}",
                        needed=f"site {site!r}")
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise Unauthorized(why="the ticket was not made by this site's repository")
    if claims.expires <= now:
        raise Unauthorized(why="the ticket expired")
    return claims
