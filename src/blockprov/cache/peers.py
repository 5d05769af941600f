"""Chunks from the other agents of a site (issue 26): a layer under the fetcher, over the repository.

Where it sits, and why there: the stack is ``CacheDevice`` → ``Fetcher`` (coalescing, batches,
read-ahead, the random miss's neighbourhood, the boot profile's prefetch, verification) →
``PeerSource`` (this, a ``BlobSource``) → the repository or the site cache. Every fetch the cache
makes therefore passes through it, read-ahead and profile prefetch included, so all of them come
from the LAN when they can. It is a ``BlobSource``, not a ``ChunkSource`` above the fetcher,
because above the fetcher it would see only demand misses and leave the read-ahead to the
repository. The fetcher still verifies every blob it is handed (invariant 6); this layer verifies
a peer's blobs too, before accepting them, because a bad one must be replaced from the repository
rather than fail the read.

Who fetches a chunk from the repository: one agent per chunk, its *owner*. When thirty PCs start
the same version at once, nobody holds anything yet, and "ask the peers that hold it, else the
repository" sends the repository the same working set thirty times. So the agents of a site that
serve the same image agree, by rendezvous hashing of the chunk id over their instance names, on
one owner per chunk (the same image, not only the same version: when thirty PCs move to a v2 at
once, each fetches v2's changed chunks the moment it moves, before the others' new version has
reached it through the tracker; an owner still on v1 fetches a v2 chunk as well, for the others,
into its memory). An agent asks the owner for each chunk it misses (``fetch=1``); the owner
serves it if it holds it, else fetches it from the repository once for everyone (single flight:
``from_upstream`` joins a fetch already under way, its own client's included). Whatever came
from the repository is also kept in a bounded memory (``RECENT_BYTES``, least recently used out),
so that a peer asking a moment later, before the owner's cache stored the chunk, and the owner's
own boot reading a chunk it fetched for its peers, are answered without a second fetch; every use
of it is verified like any blob. The owner does not store a chunk it fetched for a peer in its
cache then and there: that would need its fetcher's repository slots, which may all be waiting on
other owners that wait on it. The repository then sends each chunk about once per site, and each
agent takes (N-1)/N of its misses from its LAN. An owner never
forwards a request to another peer, so views of the site that differ for a moment (an agent that
joined a second ago) cost at worst a fetch from the repository, never a loop.

A speculative ask goes only to an owner whose have-vector shows the chunk (cache/haves.py says why).

Failures (nothing here fails a read that the repository could answer):

* a peer that refuses our ticket, cannot be reached, times out or vanishes mid-answer is skipped
  for a back-off (``DOWN_FIRST`` doubling to ``DOWN_MAX`` seconds); the chunks it did not give go
  at once to their next owner (rendezvous hashing without that peer), and what that one does not
  give to the repository, all in the same call;
* a peer that does not hold a chunk and could not fetch it (``ABSENT``), or is busy (503): those
  chunks come from the repository in the same call;
* a peer whose blob does not match its digest (a lying or broken peer): the chunk comes from the
  repository, nothing of it is kept or served, and the peer is avoided for ``LIAR_SECONDS``
  (logged once, counted in ``stats``).

Who may ask whom: every request carries the caller's ticket (tickets.py), which the serving agent
checks with its site's keys (agent/peerserve.py). Membership (peers, ticket, keys) is kept fresh by
the agent's site link (agent/site.py), which joins the site through the repository, the tracker:
it already knows every agent, its address, its version and when it was last seen, and it checks
tokens and scopes. LAN announcements (multicast) would find peers without it but cannot check
scopes, do not cross subnets of a school's VLANs, and the repository is needed to boot anyway.

Threads: ``get_blob_views`` runs in the fetcher's worker threads (blocking, as every ``BlobSource``);
peers are asked in parallel from a small pool of this layer's own. ``membership`` is replaced whole
by the event loop and read without a lock. Counters (``stats``) are per version and source.
"""

from __future__ import annotations

import functools
import http.client
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3

from blockprov import tickets
from blockprov.cache.haves import Haves
from blockprov.cache.link import LinkEstimate
from blockprov.codec import decode_view
from blockprov.errors import BlockprovError, ChunkCorrupt, ManifestError
from blockprov.manifest import Manifest
from blockprov.repo.base import BlobSource, BlobViews
from blockprov.repo.remote import LEN, KeepAlivePost, whole

log = logging.getLogger("blockprov.peers")

Blob = bytes | memoryview
Got = Blob | BlockprovError  # a blob, or the error that kept that one chunk away (a partial answer)
# a peer's answer (``PeerSource._ask``): verified blobs, ids still to fetch elsewhere, whether it failed
_Asked = tuple[dict[bytes, Blob], list[bytes], bool]
PEER_PATH = "/peer/v1/chunks"
PEER_MANIFEST_PATH = "/peer/v1/manifest"  # body ``IMAGE@ID``: that version's manifest (see ``manifest``)
MANIFESTS_KEPT = 4  # manifests from the repository or lent, kept for peers asking (a v2 rolling out)
ABSENT = 0xFFFFFFFF  # a frame's length when the peer does not hold (and did not fetch) the chunk
MAX_IDS = 4096  # ids in one peer request (128 KiB of body)
ASK_TIMEOUT = 10.0  # a peer may be fetching the chunk from the repository for us
DOWN_FIRST = 2.0
DOWN_MAX = 60.0
LIAR_SECONDS = 3600.0
RECENT_BYTES = 64 << 20  # blobs from the repository kept for a peer asking late and the owner's own reads
SOURCES = ("peers", "site_cache", "repository")
# small fetches from the layer below whose least time is the uplink's round trip: more than the
# fetcher keeps for its own link, since on a loaded machine few samples escape the CPU queueing
UPLINK_WINDOW = 256
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Peer:
    instance: str
    url: str
    version: str | None
    image: str | None = None


@dataclass(frozen=True)
class Membership:
    """What the last join of the site said (agent/site.py); replaced whole on each join."""

    site: str
    instance: str
    ticket: str
    keys: dict[int, bytes]
    peers: tuple[Peer, ...]


@dataclass
class _Health:
    down_until: float = 0.0
    failures: int = 0
    liar_until: float = 0.0


@dataclass
class SourceStats:
    """Chunks and bytes (as they crossed the network) by version and by source, and peer faults."""

    by_version: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    peer_bad_chunks: int = 0
    peer_failures: int = 0
    liars: set[str] = field(default_factory=set)
    # speculative chunks (``get_held``): asked of peers, and left unasked because the owner's
    # have-vector said it lacks them; requests sent to peers (demand and speculative)
    held_asked: int = 0
    held_skipped: int = 0
    peer_requests: int = 0
    # manifests (count, bytes) by where they came from, apart from chunks: a site moving to a v2
    manifests: dict[str, list[int]] = field(default_factory=lambda: {s: [0, 0] for s in SOURCES})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, version: str, source: str, chunks: int, nbytes: int) -> None:
        with self._lock:
            row = self.by_version.setdefault(version or "-", {s: [0, 0] for s in SOURCES})
            row[source][0] += chunks
            row[source][1] += nbytes

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            versions = {v: {s: {"chunks": c, "bytes": b} for s, (c, b) in row.items()}
                        for v, row in self.by_version.items()}
            manifests = {s: {"count": c, "bytes": b} for s, (c, b) in self.manifests.items()}
        return {"by_version": versions, "manifests": manifests, "peer_bad_chunks": self.peer_bad_chunks,
                "peer_failures": self.peer_failures, "liars": sorted(self.liars), "held_asked": self.held_asked,
                "held_skipped": self.held_skipped, "peer_requests": self.peer_requests}

    def add_manifest(self, source: str, nbytes: int) -> None:
        with self._lock:
            self.manifests[source][0] += 1
            self.manifests[source][1] += nbytes


def _mix(x: int) -> int:
    """splitmix64's finalizer: a 64-bit score per (chunk, agent) for rendezvous hashing."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def _key(instance: str) -> int:
    return int.from_bytes(blake3(instance.encode()).digest(8), "little")


def owner(cid: bytes, members: Sequence[tuple[str, int]]) -> str:
    """The instance (of ``(instance, _key(instance))`` pairs) that owns chunk ``cid``: the highest
    score wins, so an agent leaving moves only the chunks it owned. Pure."""
    h = int.from_bytes(cid[:8], "little")
    return max(members, key=lambda m: _mix(h ^ m[1]))[0]


def encode_frames(items: Sequence[Blob | None]) -> list[Blob]:
    """A peer's answer: per asked id, its length (u32 LE; ``ABSENT`` for none) and its blob."""
    out: list[Blob] = []
    for b in items:
        if b is None:
            out.append(LEN.pack(ABSENT))
        else:
            out += (LEN.pack(len(b)), b)
    return out


def decode_frames(data: memoryview, count: int) -> list[memoryview | None]:
    """The inverse of ``encode_frames``; ValueError for a torn or overlong answer. Pure."""
    out: list[memoryview | None] = []
    pos, end = 0, len(data)
    for _ in range(count):
        if end - pos < LEN.size:
            raise ValueError("torn answer")
        (n,) = LEN.unpack_from(data, pos)
        pos += LEN.size
        if n == ABSENT:
            out.append(None)
            continue
        if end - pos < n:
            raise ValueError("torn answer")
        out.append(data[pos:pos + n])
        pos += n
    if pos != end:
        raise ValueError(f"{end - pos} unexpected bytes after the last frame")
    return out


class PeerSource:
    """The ``BlobSource`` an agent's fetcher reads through (module docstring). ``upstream_kind``:
    how ``stats`` names what is below (``repository``, or ``site_cache`` when it is one)."""

    def __init__(self, upstream: BlobSource, *, upstream_kind: str = "repository", timeout: float = ASK_TIMEOUT,
                 workers: int = 8, shared: bool = True) -> None:
        self.upstream = upstream
        # ``shared``: the agent is in a site, so what came from the repository is remembered for its
        # peers. A lone agent remembers nothing: its cache stores every chunk, a copy in memory would
        # only cost it, and a chunk it reset would be served from memory, not from the repository.
        self.shared = shared
        self.url = upstream.url
        self.upstream_kind = upstream_kind
        self.timeout = timeout
        self.membership: Membership | None = None
        self.own_url: str | None = None  # where this agent serves its peers: a peer listed there is itself
        # the cache's image and version now (an update changes the version): a chunk's owner is among the
        # peers serving the same image; counters are by version
        self.version_of: Callable[[], str] = lambda: ""
        self.image_of: Callable[[], str] = lambda: ""
        # manifests (``manifest``): the cache's own, and how to fetch one from the layer below by id
        # (set by the agent; None: manifests are not shared)
        self.own_manifest: Callable[[], Manifest | None] = lambda: None
        self.manifest_below: Callable[[str], Manifest] | None = None
        self.stats = SourceStats()
        self._get: Callable[[Sequence[bytes]], Sequence[Got]] = (
            upstream.get_blob_views if isinstance(upstream, BlobViews) else upstream.get_blobs)
        # a site cache below answers speculation from what it holds (repo/remote.py, ``get_held_views``)
        held_views = getattr(upstream, "get_held_views", None)
        self._held_below: Callable[[Sequence[bytes]], Sequence[Got]] | None = (
            held_views if upstream_kind == "site_cache" and callable(held_views) else None)
        self._lock = threading.Lock()
        self._flights: dict[bytes, Future[Got]] = {}
        self._health: dict[str, _Health] = defaultdict(_Health)
        self._clients: dict[str, tuple[str, KeepAlivePost]] = {}
        self._recent: OrderedDict[bytes, Blob] = OrderedDict()  # from the repository, least recent first
        self._recent_bytes = 0
        self._manifests: OrderedDict[str, bytes] = OrderedDict()  # version id → its JSON, least recent first
        self._manifest_flights: dict[str, Future[tuple[Manifest, bytes]]] = {}
        self.haves = Haves()  # what each peer holds, as its last have-vector said (cache/haves.py)
        # the uplink (to the repository or the site cache), as this agent's own fetches below found it
        self._up = LinkEstimate(UPLINK_WINDOW, believe_first=True)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bp-peers")

    @property
    def version(self) -> str:
        return self.version_of()

    def uplink(self) -> LinkEstimate | None:
        """The link below, while this agent has peers of its image to share it with (cache/link.py:
        the fetcher then sizes its speculation by it too); None without peers, so that a lone agent
        speculates exactly as it always has."""
        return self._up if self.has_peers(self.image_of()) else None

    def has_peers(self, image: str) -> bool:
        """Whether the site has another agent serving ``image`` (as the last join said)."""
        m = self.membership
        return m is not None and self.shared and any(p.image == image and p.url != self.own_url for p in m.peers)

    # -- BlobSource -------------------------------------------------------------------------------
    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return [whole(b) for b in self.get_blob_views(ids)]

    def get_blob_views(self, ids: Sequence[bytes]) -> list[Got]:
        uniq = list(dict.fromkeys(ids))
        got: dict[bytes, Got] = {}
        rest: list[bytes] = []  # to fetch from the layer below
        todo = uniq
        for _round in range(2):  # a second round gives the chunks of an owner that failed to the next owner
            m = self.membership
            plan = self._plan(todo, m) if m is not None else {}
            planned = {c for cids in plan.values() for c in cids}
            mine = [c for c in todo if c not in planned]
            got.update(self._recent_of(mine))
            up = [c for c in mine if c not in got]
            asked = self._ask_all(m, plan, True, inline=not up)
            failed: BaseException | None = None
            try:
                got.update(self.from_upstream(up))
            except BaseException as e:  # the peers' answers are still wanted (and their threads awaited)
                failed = e
            todo = []
            for f in asked:
                good, left, broken = f()
                got.update(good)
                (todo if broken else rest).extend(left)
            if failed is not None:
                raise failed
            if not todo:
                break
        rest += todo
        if rest:
            got.update(self.from_upstream(rest))
        return [got[c] for c in ids]

    def speculate_held(self) -> bool:
        """Whether the fetcher's speculation goes to ``get_held`` now (cache/link.py, ``PeerHeld``):
        while the agent has peers of its image, or while the layer below is a site cache, whose
        uplink the site's agents share the same way."""
        return self._held_below is not None or self.has_peers(self.image_of())

    def near_regions(self) -> bool:
        """Whether a demand miss asks its whole aligned region at once (cache/link.py,
        ``NearRegions``; cache/fetcher.py, ``NEAR_REGION``): behind a site cache while the agent has
        no peers. With peers the region stays a held-only guess: its chunks' owners differ, so it
        would not be one request, and an owner would pull what nobody read."""
        return self._held_below is not None and not self.has_peers(self.image_of())

    def get_held(self, ids: Sequence[bytes]) -> list[Blob | None]:
        """Verified blobs of those of ``ids`` the site already holds (the owners' data files and
        memories, this agent's memory, the site cache's store), None for the others: nothing is
        fetched over the uplink. The fetcher's speculation goes here (``speculate_held``): what no
        agent of the site has read yet is not pulled over the uplink on a guess, so the site's
        egress is what its agents read, not the union of thirty agents' guesses."""
        uniq = list(dict.fromkeys(ids))
        got: dict[bytes, Blob] = {}
        m = self.membership
        plan = self._plan(uniq, m) if m is not None else {}
        planned = {c for cids in plan.values() for c in cids}
        own = self.own_manifest()
        worth = {peer: self.haves.likely_held(peer.instance, cids, own) for peer, cids in plan.items()}
        asked = self._ask_all(m, {peer: cids for peer, cids in worth.items() if cids}, False, inline=True)
        with self._lock:
            self.stats.held_asked += sum(map(len, worth.values()))
            self.stats.held_skipped += len(planned) - sum(map(len, worth.values()))
        got.update(self._recent_of([c for c in uniq if c not in planned]))
        for f in asked:
            got.update(f()[0])
        below = self._held_below
        rest = [c for c in uniq if c not in got] if below is not None else []
        if below is not None and rest:
            try:
                came = dict(zip(rest, below(rest), strict=True))
            except BlockprovError as e:  # a guess that failed is no fault: those are not held
                log.debug("speculative chunks from %s failed: %s", self.url, e)
                came = {}
            good = {c: b for c, b in came.items() if not isinstance(b, BlockprovError)}
            if good:
                self.stats.add(self.version, self.upstream_kind, len(good), sum(map(len, good.values())))
            got.update(self._verified_for_peers(good))  # a bad blob is dropped here, as a peer's
        return [got.get(c) for c in ids]

    def held_ids(self) -> list[bytes]:
        """The ids this agent keeps in memory from the layer below (lent to peers: part of what it
        holds, in its have-vector)."""
        with self._lock:
            return list(self._recent)

    def from_upstream(self, cids: Sequence[bytes]) -> dict[bytes, Got]:
        """Unverified blobs of ``cids`` from the layer below (or, in a partial answer, the error that
        kept one away), each fetched once however many ask at once (this agent's fetches and its
        peers' requests alike)."""
        if not cids:
            return {}
        futs: dict[bytes, Future[Got]] = {}
        mine: list[bytes] = []
        with self._lock:
            for c in cids:
                f = self._flights.get(c)
                if f is None:
                    f = self._flights[c] = Future()
                    mine.append(c)
                futs[c] = f
        if mine:
            try:
                t0 = time.monotonic()
                blobs = self._get(mine)
                took = time.monotonic() - t0
                if len(blobs) != len(mine):
                    raise ValueError(f"{self.url} returned {len(blobs)} blobs for {len(mine)} ids")
            except BaseException as e:
                for c in mine:
                    futs[c].set_exception(e)
                raise
            finally:
                with self._lock:
                    for c in mine:
                        self._flights.pop(c, None)
            for c, b in zip(mine, blobs, strict=True):
                futs[c].set_result(b)
            came = [(c, b) for c, b in zip(mine, blobs, strict=True) if not isinstance(b, BlockprovError)]
            with self._lock:
                self._up.observe(took, len(mine), sum(len(b) for _c, b in came))
            self._remember(came)
            self.stats.add(self.version, self.upstream_kind, len(came), sum(len(b) for _c, b in came))
        return {c: f.result() for c, f in futs.items()}

    def kept_for_peers(self, cids: Sequence[bytes]) -> dict[bytes, Blob]:
        """Verified blobs of those of ``cids`` this agent keeps in memory as the repository sent
        them: compressed, so a peer is lent these rather than the data file's plain bytes (on the
        test image a third of the LAN's bytes, and of the CPU that moves them)."""
        return self._verified_for_peers(dict(self._recent_of(cids)))

    def fetch_for_peers(self, cids: Sequence[bytes]) -> dict[bytes, Blob]:
        """Verified blobs of the chunks a peer asked this agent, as their owner, to fetch (those
        that fail verification are left out, and logged)."""
        got: dict[bytes, Got] = dict(self._recent_of(cids))
        got.update(self.from_upstream([c for c in cids if c not in got]))
        return self._verified_for_peers(got)

    def _verified_for_peers(self, got: Mapping[bytes, Got]) -> dict[bytes, Blob]:
        out: dict[bytes, Blob] = {}
        for c, b in got.items():
            if isinstance(b, BlockprovError):
                continue
            try:
                decode_view(b, c)
            except ChunkCorrupt as e:
                log.error("chunk %s from %s failed verification, not used: %s", c.hex()[:16], self.url, e)
                with self._lock:
                    if self._recent.get(c) is b:
                        self._recent_bytes -= len(self._recent.pop(c))
                continue
            out[c] = b
        return out

    def _recent_of(self, cids: Sequence[bytes]) -> dict[bytes, Blob]:
        out: dict[bytes, Blob] = {}
        if not self._recent:
            return out
        with self._lock:
            for c in cids:
                b = self._recent.get(c)
                if b is not None:
                    self._recent.move_to_end(c)
                    out[c] = b
        return out

    def _remember(self, items: Sequence[tuple[bytes, Blob]]) -> None:
        if not self.shared:
            return
        with self._lock:
            for c, b in items:
                if c not in self._recent:  # a copy: a view would keep its whole batch's buffer alive
                    self._recent[c] = b if type(b) is bytes else bytes(b)
                    self._recent_bytes += len(b)
            while self._recent_bytes > RECENT_BYTES and self._recent:
                self._recent_bytes -= len(self._recent.popitem(last=False)[1])

    # -- manifests --------------------------------------------------------------------------------
    def manifest(self, image: str, vid: str) -> Manifest | None:
        """Version ``vid`` of ``image``'s manifest through the site, or None when it is not shared
        here (no peer of that image, or no way below): the caller asks the repository.

        When thirty PCs move to a v2 at once, each needs v2's manifest (237 KiB for a 1 GiB image),
        and the repository sent it thirty times: more than the changed chunks themselves
        (bench/RESULTS.md, "Boot storm"). A manifest is named by its id, the digest of its identity
        document, so it is checked like a chunk: whatever a peer sends must parse, hash to ``vid`` and
        name ``image``, as ``RemoteRepository.resolve`` checks the repository's. As with chunks, one
        agent of the image owns it (rendezvous hashing on the id) and fetches it from below once for
        everyone; the others ask that owner. A peer that fails is skipped for a while, one that sends
        another manifest is avoided as a liar; either way the manifest then comes from below."""
        m = self.membership
        if m is None or self.manifest_below is None or not self.shared:
            return None
        now = time.monotonic()
        peers = {p.instance: p for p in m.peers
                 if p.image == image and p.url != self.own_url and self.usable(p.instance, now)}
        if not peers:
            return None
        members = [(m.instance, _key(m.instance))] + [(i, _key(i)) for i in peers]
        o = owner(bytes.fromhex(vid), members)
        if o != m.instance:
            got = self._ask_manifest(m, peers[o], image, vid)
            if got is not None:
                return got
        return self._manifest_from_below(image, vid)[0]

    def manifest_for_peers(self, image: str, vid: str, fetch: bool) -> bytes | None:
        """The JSON of a manifest a peer asked for: one kept, the cache's own, or (``fetch``: this
        agent owns it) fetched from below; None when none of these has it."""
        with self._lock:
            have = self._manifests.get(vid)
            if have is not None:
                self._manifests.move_to_end(vid)
                return have
        own = self.own_manifest()
        if own is not None and own.id == vid and own.image == image:
            raw = own.to_json()
            self._remember_manifest(vid, raw)
            return raw
        if not fetch or self.manifest_below is None:
            return None
        return self._manifest_from_below(image, vid)[1]

    def _manifest_from_below(self, image: str, vid: str) -> tuple[Manifest, bytes]:
        """From the layer below (which checks it), once however many ask at once; kept for peers."""
        below = self.manifest_below
        assert below is not None
        with self._lock:
            kept = self._manifests.get(vid)
            f = self._manifest_flights.get(vid)
            mine = f is None and kept is None
            if mine:
                f = self._manifest_flights[vid] = Future()
        if kept is not None:  # the agent's own update after it fetched the manifest for its peers
            return Manifest.from_json(kept), kept
        assert f is not None
        if not mine:
            return f.result()
        try:
            got = below(f"{image}@{vid}")
            raw = got.to_json()
            self.stats.add_manifest(self.upstream_kind, len(raw))
            self._remember_manifest(vid, raw)  # before the flight ends: a peer asking then finds it kept
            f.set_result((got, raw))
            return got, raw
        except BaseException as e:
            f.set_exception(e)
            raise
        finally:
            with self._lock:
                self._manifest_flights.pop(vid, None)

    def _remember_manifest(self, vid: str, raw: bytes) -> None:
        if not self.shared:
            return
        with self._lock:
            self._manifests[vid] = raw
            self._manifests.move_to_end(vid)
            while len(self._manifests) > MANIFESTS_KEPT:
                self._manifests.popitem(last=False)

    def _ask_manifest(self, m: Membership, peer: Peer, image: str, vid: str) -> Manifest | None:
        """The manifest from ``peer`` (its owner), checked; None if it did not give a good one."""
        try:
            status, _headers, data = self._client(peer).post(
                f"{PEER_MANIFEST_PATH}?fetch=1", f"{image}@{vid}".encode(),
                {"authorization": f"{tickets.SCHEME} {m.ticket}"})
        except (OSError, http.client.HTTPException) as e:
            self._down(peer, f"{type(e).__name__}: {e}")
            return None
        if status in (404, 503):  # it does not hold it and could not fetch it, or it is busy: no fault
            return None
        if status != 200:
            self._down(peer, f"HTTP {status}: {bytes(data[:200]).decode('utf-8', 'replace')}")
            return None
        raw = bytes(data)
        try:
            got = Manifest.from_json(raw)
            if got.id != vid or got.image != image:
                raise ManifestError(why=f"it is {got.image}@{got.id}")
        except ManifestError as e:
            self.stats.peer_bad_chunks += 1
            self._liar(peer, m, f"manifest {image}@{vid}", str(e))
            return None
        self.stats.add_manifest("peers", len(raw))
        self._remember_manifest(vid, raw)
        return got

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for _url, c in clients:
            c.close()

    # -- peers ------------------------------------------------------------------------------------
    def usable(self, instance: str, now: float | None = None) -> bool:
        h = self._health.get(instance)
        now = time.monotonic() if now is None else now
        return h is None or (h.down_until <= now and h.liar_until <= now)

    def _plan(self, cids: list[bytes], m: Membership) -> dict[Peer, list[bytes]]:
        """Which peer owns which chunk (those this agent owns are not in the plan)."""
        now = time.monotonic()
        # a peer at this agent's own address is this agent (PCs behind NATs that all look alike)
        image = self.image_of()
        peers = {p.instance: p for p in m.peers
                 if p.image == image and p.url != self.own_url and self.usable(p.instance, now)}
        if not peers:
            return {}
        members = [(m.instance, _key(m.instance))] + [(i, _key(i)) for i in peers]
        plan: dict[Peer, list[bytes]] = defaultdict(list)
        for c in cids:
            o = owner(c, members)
            if o != m.instance:
                plan[peers[o]].append(c)
        return plan

    def _client(self, peer: Peer) -> KeepAlivePost:
        with self._lock:
            have = self._clients.get(peer.instance)
            if have is not None and have[0] == peer.url:
                return have[1]
            client = KeepAlivePost(peer.url, self.timeout)
            self._clients[peer.instance] = (peer.url, client)
        if have is not None:
            have[1].close()
        return client

    def _down(self, peer: Peer, why: str) -> None:
        self.stats.peer_failures += 1
        h = self._health[peer.instance]
        h.failures += 1
        pause = min(DOWN_MAX, DOWN_FIRST * 2 ** (h.failures - 1))
        h.down_until = time.monotonic() + pause
        log.info("peer %s (%s): %s; its chunks go to the next owner for %.0f s", peer.instance, peer.url, why, pause)

    def _ask_all(self, m: Membership | None, plan: Mapping[Peer, list[bytes]], fetch: bool, *, inline: bool
                 ) -> list[Callable[[], _Asked]]:
        """Ask each peer of ``plan`` its chunks (``_ask``), in parallel; each returned callable gives
        one peer's answer. With ``inline`` (the calling thread has nothing else to do meanwhile) the
        last peer is asked in the calling thread when the others have been handed to the pool: a
        batch's chunks usually have one owner, and a hand-off to the pool and back was a visible
        part of an agent's CPU with thirty peers on two cores (bench/RESULTS.md, "Boot storm")."""
        if m is None or not plan:
            return []
        items = list(plan.items())
        last = items.pop() if inline else None
        out: list[Callable[[], _Asked]] = [self._pool.submit(self._ask, m, peer, cids, fetch).result
                                           for peer, cids in items]
        if last is not None:
            answer = self._ask(m, last[0], last[1], fetch)
            out.append(lambda: answer)
        return out

    def _ask(self, m: Membership, peer: Peer, cids: list[bytes],
             fetch: bool = True) -> _Asked:
        """(verified blobs the peer gave, ids still to fetch elsewhere, whether the peer failed and
        is now skipped): never raises. ``fetch``: the peer, as their owner, fetches those it lacks."""
        good: dict[bytes, Blob] = {}
        broken = False
        try:
            client = self._client(peer)
            for k in range(0, len(cids), MAX_IDS):
                part = cids[k:k + MAX_IDS]
                want_have = self.haves.stale(peer.instance)
                query = "&".join(q for q, on in (("fetch=1", fetch), ("have=1", want_have)) if on)
                with self._lock:
                    self.stats.peer_requests += 1
                status, headers, data = client.post(PEER_PATH + (f"?{query}" if query else ""), b"".join(part),
                                                    {"authorization": f"{tickets.SCHEME} {m.ticket}"})
                if status == 503:  # busy (upload slots full): no fault, just not now
                    break
                if status != 200:
                    self._down(peer, f"HTTP {status}: {bytes(data[:200]).decode('utf-8', 'replace')}")
                    broken = True
                    break
                if want_have:
                    self.haves.note(peer.instance, headers, self.own_manifest())
                for cid, blob in zip(part, decode_frames(data, len(part)), strict=True):
                    if blob is not None and self._verified(peer, m, cid, blob):
                        good[cid] = blob
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._down(peer, f"{type(e).__name__}: {e}")
            broken = True
        if good:
            self.stats.add(self.version, "peers", len(good), sum(len(b) for b in good.values()))
            h = self._health.get(peer.instance)
            if h is not None:
                h.failures = 0
        return good, [c for c in cids if c not in good], broken

    def _verified(self, peer: Peer, m: Membership, cid: bytes, blob: Blob) -> bool:
        try:
            decode_view(blob, cid)
            return True
        except ChunkCorrupt as e:
            self.stats.peer_bad_chunks += 1
            self._liar(peer, m, f"chunk {cid.hex()[:16]}", str(e))
            return False

    def _liar(self, peer: Peer, m: Membership, what: str, why: str) -> None:
        h = self._health[peer.instance]
        if h.liar_until <= time.monotonic():
            log.warning("peer %s (%s) of site %s sent %s that does not match its digest (%s): not used, "
                        "fetched from the repository; this peer is avoided for %.0f min",
                        peer.instance, peer.url, m.site, what, why, LIAR_SECONDS / 60)
        h.liar_until = time.monotonic() + LIAR_SECONDS
        self.stats.liars.add(peer.instance)
