"""What each peer of the site holds: have-vectors (issue 26). Pure but for the clock.

BitTorrent's have message and bitfield, pulled rather than pushed. A speculative neighbourhood
(cache/peers.py, ``PeerSource.get_held``) is asked of each chunk's owner only if the owner holds
it. Asked blindly, at thirty agents most of 210,642 speculative chunks were answered "not held",
each a request both ends paid for. With the vectors 93% are never asked (bench/RESULTS.md, "Boot
storm", run 2); the agents' CPU did not fall with them (9.2 s an agent at N = 30): it goes to
serving and asking for demand misses, which this does not change.

So a peer request may carry ``have=1``, and the answer then carries the peer's *have-vector*
(``HAVE_HEADER``: the version's id and one byte per chunk index, 1 where it can lend that chunk or
keeps it in memory, zlib-compressed and base64: a 1 GiB image's 16,384 chunks in about 1 KiB;
built by cache/lending.py, ``Lender.have_vector``, served by agent/peerserve.py). An agent asks for
it with its next request to a peer once the one it has is ``HAVE_FRESH`` old; its demand asks go
to every owner often, so each vector stays about a second old. A guess the vector does not show
is not asked: at worst a chunk the owner got in the last second comes later, on demand, from that
owner. A peer with no vector yet, or one of another version (a site moving to a v2), is asked as
before. A vector that does not parse is dropped (the peer is then asked as before): it is only a
hint, and every chunk a peer sends is verified anyway.

Threads: ``Haves`` is used from the peer layer's worker threads; each entry is replaced whole
(a dict assignment), so a reader sees one vector or the next, never a torn one.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import zlib
from collections.abc import Sequence

from blockprov.manifest import Manifest

log = logging.getLogger("blockprov.peers")

HAVE_HEADER = "x-blockprov-have"
HAVE_FRESH = 1.0  # seconds a peer's vector is used before the next request to it asks again


def encode_have(version: str, vector: bytes) -> str:
    """A have-vector as a header value: the version's id, a space, the vector (zlib, base64). Pure."""
    return f"{version} {base64.b64encode(zlib.compress(vector, 1)).decode('ascii')}"


def decode_have(value: str, count_limit: int) -> tuple[str, bytes]:
    """The inverse of ``encode_have``, no longer than ``count_limit`` bytes (a peer's bomb is cut
    short and refused); ValueError for one that does not parse. Pure."""
    version, _, packed = value.strip().partition(" ")
    try:
        d = zlib.decompressobj()
        vector = d.decompress(base64.b64decode(packed, validate=True), count_limit)
    except (binascii.Error, zlib.error) as e:
        raise ValueError(f"bad have-vector: {e}") from None
    if not version or not d.eof or d.unconsumed_tail:
        raise ValueError("bad have-vector: no version, torn, or longer than the image")
    return version, vector


class Haves:
    """The last have-vector of each peer (by instance), and the cache's chunk index to read them."""

    def __init__(self) -> None:
        self._vectors: dict[str, tuple[str, bytes, float]] = {}  # instance → (version id, vector, when)
        self._index: tuple[str, dict[bytes, int]] = ("", {})  # the cache's version: chunk id → first index

    def stale(self, instance: str) -> bool:
        """Whether the next request to this peer should ask for its vector (``have=1``)."""
        v = self._vectors.get(instance)
        return v is None or time.monotonic() - v[2] >= HAVE_FRESH

    def note(self, instance: str, headers: Sequence[tuple[str, str]], own: Manifest | None) -> None:
        """Keep the vector a peer's answer carried (none, or one that does not parse: unknown)."""
        value = next((v for k, v in headers if k.lower() == HAVE_HEADER), None)
        if value is None or own is None:
            self._vectors.pop(instance, None)
            return
        try:
            vid, vector = decode_have(value, own.count)
        except ValueError as e:
            log.info("peer %s sent a have-vector that does not parse (%s): asked as if it had sent none", instance, e)
            self._vectors.pop(instance, None)
            return
        self._vectors[instance] = (vid, vector, time.monotonic())

    def set(self, instance: str, version: str, vector: bytes) -> None:
        """A vector as if the peer had just sent it (tests)."""
        self._vectors[instance] = (version, vector, time.monotonic())

    def likely_held(self, instance: str, cids: list[bytes], own: Manifest | None) -> list[bytes]:
        """Those of ``cids`` worth asking this peer for on a guess: the ones its vector shows; all
        of them when it sent none yet or one of another version than ``own`` (the cache's)."""
        v = self._vectors.get(instance)
        if v is None or own is None or v[0] != own.id:
            return cids
        vector, index = v[1], self._index_of(own)
        return [c for c in cids if (i := index.get(c)) is not None and i < len(vector) and vector[i]]

    def _index_of(self, m: Manifest) -> dict[bytes, int]:
        """Chunk id → its first index in ``m`` (as the lender looks a chunk up), built once per version."""
        vid, index = self._index
        if vid != m.id:
            index = {}
            for i in range(m.count):
                index.setdefault(m.digest_at(i), i)
            self._index = (m.id, index)
        return index
