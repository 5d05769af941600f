"""The peer layer's pure parts and its single flight: owners, frames, fetches from the layer below."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pytest

from blockprov import codec
from blockprov.cache.haves import decode_have, encode_have
from blockprov.cache.peers import (
    ABSENT,
    PeerSource,
    _key,
    decode_frames,
    encode_frames,
    owner,
)
from blockprov.errors import NotHeld


def test_owners_spread_and_move_only_a_leavers_chunks() -> None:
    members = [(f"pc-{i}", _key(f"pc-{i}")) for i in range(30)]
    cids = [os.urandom(32) for _ in range(6000)]
    owners = [owner(c, members) for c in cids]
    counts = {m: owners.count(m) for m, _ in members}
    assert min(counts.values()) > 100 and max(counts.values()) < 320, counts  # about 200 each
    fewer = [m for m in members if m[0] != "pc-7"]
    for c, o in zip(cids, owners, strict=True):
        if o != "pc-7":
            assert owner(c, fewer) == o  # rendezvous: nobody else's chunks move
    # every agent computes the same owner from the same members, in any order
    assert [owner(c, list(reversed(members))) for c in cids[:200]] == owners[:200]


def test_frames_round_trip_and_torn_answers() -> None:
    blobs = [b"a" * 10, None, b"", b"xyz"]
    data = memoryview(b"".join(encode_frames(blobs)))
    got = decode_frames(data, 4)
    assert [None if g is None else bytes(g) for g in got] == blobs
    with pytest.raises(ValueError):
        decode_frames(data[:-1], 4)
    with pytest.raises(ValueError):
        decode_frames(memoryview(bytes(data) + b"!"), 4)
    with pytest.raises(ValueError):
        decode_frames(memoryview(ABSENT.to_bytes(4, "little")[:3]), 1)


class SlowBelow:
    """A layer below that takes a while and counts what it was asked."""

    url = "mem://below"

    def __init__(self, blobs: dict[bytes, bytes]) -> None:
        self.blobs = blobs
        self.asked: list[bytes] = []
        self.lock = threading.Lock()

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        with self.lock:
            self.asked += ids
        time.sleep(0.2)
        return [self.blobs[c] for c in ids]


def test_single_flight_below_and_recent_memory() -> None:
    data = [os.urandom(4096) for _ in range(8)]
    blobs = {codec.digest(d): codec.encode(d) for d in data}
    cids = list(blobs)
    below = SlowBelow(blobs)
    src = PeerSource(below)  # no site: everything from below, counted
    try:
        out: list[list[bytes]] = []
        threads = [threading.Thread(target=lambda: out.append(src.get_blobs(cids))) for _ in range(4)]
        threads += [threading.Thread(target=lambda: out.append(list(src.fetch_for_peers(cids).values())))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(below.asked) == sorted(cids)  # five callers at once, each chunk asked for once
        assert all(sorted(o) == sorted(blobs.values()) for o in out)
        # asked again a moment later (before a cache stored them): answered from memory
        assert src.get_blobs(cids) == [blobs[c] for c in cids]
        assert len(below.asked) == len(cids)
        st = src.stats.to_dict()["by_version"]["-"]
        assert st["repository"]["chunks"] == len(cids) and st["peers"]["chunks"] == 0
    finally:
        src.close()


def test_a_bad_blob_below_is_not_served_to_peers() -> None:
    good = os.urandom(4096)
    cid = codec.digest(good)
    below = SlowBelow({cid: codec.encode(os.urandom(4096))})  # the repository (or a disk) is wrong
    src = PeerSource(below)
    try:
        assert src.fetch_for_peers([cid]) == {}
    finally:
        src.close()


def test_the_uplink_is_offered_only_while_there_are_peers_of_the_image() -> None:
    """A lone agent's fetcher must speculate as it always has: no uplink without a peer of its image;
    with one, the estimate of the fetches below (their least time)."""
    from blockprov.cache.peers import Membership, Peer

    data = [os.urandom(4096) for _ in range(3)]
    blobs = {codec.digest(d): codec.encode(d) for d in data}
    below = SlowBelow(blobs)
    src = PeerSource(below, shared=True)
    try:
        src.image_of = lambda: "lab"
        assert src.uplink() is None  # not in a site
        src.membership = Membership("s", "me", "t", {}, (Peer("other", "http://127.0.0.1:1", "v", "other-image"),))
        assert src.uplink() is None  # the only peer serves another image
        src.membership = Membership("s", "me", "t", {}, (Peer("pc-2", "http://127.0.0.1:1", "v", "lab"),))
        up = src.uplink()
        assert up is not None and up.rtt == 0.0
        src.from_upstream(list(blobs)[:1])
        assert 0.2 <= up.rtt < 5  # SlowBelow takes 0.2 s a call
    finally:
        src.close()


def test_peers_are_lent_the_kept_compressed_blob_and_never_a_bad_one() -> None:
    """What an owner fetched is lent as the repository sent it (compressed: fewer LAN bytes), after
    its digest is checked; a blob that does not match is dropped, not lent."""
    data = [bytes([i]) * 3000 + os.urandom(1096) for i in range(3)]  # compressible
    blobs = {codec.digest(d): codec.encode(d) for d in data}
    good, bad, never = list(blobs)
    blobs[bad] = codec.encode(os.urandom(4096))  # the repository's copy is broken
    src = PeerSource(SlowBelow(blobs), shared=True)
    try:
        assert src.kept_for_peers([good, bad]) == {}  # nothing kept yet
        src.from_upstream([good, bad])
        lent = src.kept_for_peers([good, bad, never])
        assert list(lent) == [good] and bytes(lent[good]) == blobs[good]
        assert len(lent[good]) < len(data[0]) // 2 and codec.decode(bytes(lent[good]), good) == data[0]
        assert src.kept_for_peers([bad]) == {}  # dropped from memory once found bad
    finally:
        src.close()
    lone = PeerSource(SlowBelow(blobs), shared=False)  # a lone agent keeps nothing to lend
    try:
        lone.from_upstream([good])
        assert lone.kept_for_peers([good]) == {}
    finally:
        lone.close()


class SiteCacheBelow(SlowBelow):
    """A site cache below (``get_held_views``): it holds ``held``; a held-only ask pulls nothing."""

    def __init__(self, blobs: dict[bytes, bytes], held: set[bytes]) -> None:
        super().__init__(blobs)
        self.held = held
        self.held_asked: list[bytes] = []

    def get_held_views(self, ids: Sequence[bytes]) -> list[bytes | NotHeld]:
        self.held_asked += ids
        return [self.blobs[c] if c in self.held else NotHeld() for c in ids]


def test_behind_a_site_cache_speculation_asks_only_what_it_holds() -> None:
    """Issue 26: an agent behind a site cache speculates only on what the site cache holds (no
    peers needed): ``get_held`` asks it held-only, verifies what came (a bad blob is dropped), and
    never calls the fetch that would make the site cache pull from its upstream. Behind a
    repository, with no peers, speculation stays the fetcher's own (``speculate_held`` False)."""
    data = [os.urandom(4096) for _ in range(4)]
    ids = [codec.digest(d) for d in data]
    blobs = {c: codec.encode(d) for c, d in zip(ids, data, strict=True)}
    blobs[ids[3]] = codec.encode(os.urandom(4096))  # the site cache's copy of chunk 3 is damaged
    below = SiteCacheBelow(blobs, held={ids[0], ids[3]})
    plain = PeerSource(below, shared=False)
    src = PeerSource(below, upstream_kind="site_cache", shared=False)
    try:
        assert not plain.speculate_held() and src.speculate_held()
        got = src.get_held(ids)
        assert got[0] is not None and bytes(got[0]) == blobs[ids[0]]
        assert got[1] is None and got[2] is None and got[3] is None  # not held, or held but bad
        assert below.held_asked == ids and below.asked == []  # nothing fetched for real
        by = next(iter(src.stats.to_dict()["by_version"].values()))
        assert by["site_cache"]["chunks"] == 2  # what came (the damaged one too: it crossed the LAN)
        assert src.get_blobs(ids[1:2]) == [blobs[ids[1]]] and below.asked == ids[1:2]  # a demand fetch: for real
    finally:
        plain.close()
        src.close()


def test_have_vectors_round_trip_and_refuse_bombs_and_garbage() -> None:
    vec = bytes([0, 1, 1, 0] * 4096)
    vid, back = decode_have(encode_have("abc", vec), len(vec))
    assert vid == "abc" and back == vec
    with pytest.raises(ValueError):
        decode_have(encode_have("abc", bytes(1 << 20)), len(vec))  # longer than the image: cut, refused
    for bad in ("abc", "abc !!!not-base64", "abc " + "QUJD", " " + encode_have("x", vec).split(" ")[1]):
        with pytest.raises(ValueError):
            decode_have(bad, len(vec))


def test_speculation_asks_only_peers_whose_have_vector_holds_the_guess() -> None:
    """What a peer's have-vector says it lacks is not asked of it (no request at all when it lacks
    every guess); a peer with no vector yet, or one of another version, is asked as before (here:
    a peer at a closed port, so the ask fails and counts as a peer failure)."""
    from blockprov.cache.peers import Membership, Peer
    from blockprov.manifest import Manifest

    data = [os.urandom(4096) for _ in range(8)]
    ids = [codec.digest(d) for d in data]
    m = Manifest(image="lab", size=8 * 4096, chunk_size=4096, chunks=b"".join(ids))
    src = PeerSource(SlowBelow({}), shared=True)
    try:
        src.image_of = lambda: "lab"
        src.own_manifest = lambda: m
        src.membership = Membership("s", "me", "t", {}, (Peer("pc-2", "http://127.0.0.1:1", m.id, "lab"),))
        src.haves.set("pc-2", m.id, bytes(8))  # it holds nothing
        assert src.get_held(ids) == [None] * 8
        assert src.stats.peer_requests == 0 and src.stats.peer_failures == 0
        planned = src.stats.held_skipped
        assert planned > 0 and src.stats.held_asked == 0  # the chunks pc-2 owns (the rest are this agent's)
        src.haves.set("pc-2", "another-version", bytes(8))
        src.get_held(ids)
        assert src.stats.peer_requests == 1 and src.stats.peer_failures == 1  # asked as before: it failed
        assert src.stats.held_asked == planned
    finally:
        src.close()


def test_a_good_ticket_is_remembered_until_the_sites_keys_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer server checks a ticket in full once, then remembers it (a peer sends the same ticket
    with every request); a rotated secret (new keys at the next join) has it checked again, and
    refused: the cache never lets in what a full check would refuse."""
    from blockprov import tickets
    from blockprov.agent.peerserve import PeerServer, _Reply
    from blockprov.cache.peers import Membership

    now = time.time()
    old, new = b"o" * 32, b"n" * 32
    src = PeerSource(SlowBelow({}), shared=True)
    src.membership = Membership("cafe", "me", "t", tickets.site_keys(old, "cafe", now), ())
    server = PeerServer(None, src, lambda: {"instance": "me"})  # type: ignore[arg-type]
    calls = []
    real = tickets.check
    monkeypatch.setattr(tickets, "check", lambda *a: calls.append(1) or real(*a))
    try:
        t = f"{tickets.SCHEME} {tickets.issue(old, 'cafe', 'pc-2', now)}"
        server._check_ticket(t)
        server._check_ticket(t)
        assert len(calls) == 1  # the second from memory
        src.membership = Membership("cafe", "me", "t", tickets.site_keys(new, "cafe", now), ())  # rotate-secret
        with pytest.raises(_Reply) as refused:
            server._check_ticket(t)
        assert refused.value.status == 401 and len(calls) == 2 and server.stats.refused == 1
    finally:
        server._pool.shutdown()
        src.close()
