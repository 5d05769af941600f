"""The cache: the lazy, crash-safe local copy of one image version (docs/architecture.md).

This package's public face: what other packages may use. Only ``blockprov.cache`` itself is
imported from outside, never its modules (an import-linter contract, ``cache-public-face``):

- the device: ``CacheDevice`` (``CacheDevice.open`` opens or creates one over a built stack of
  layers; its lifecycle steps are its methods), ``CHECKPOINT_FILL_BYTES``;
- the layers below it, composed by the caller (cache/source.py): ``ChunkSource``,
  ``SourceFactory``, ``CacheSide``, ``Filter`` (a layer over another), ``read_chunks``, ``Data``,
  ``Release``;
  ``repository_source`` (``DEFAULT_READAHEAD``, ``DEFAULT_TIMEOUT``), ``base_source`` (an
  overlay's base cache), ``Reserve`` (the golden reserve: ``Reserve.source`` over another layer);
  ``FetchStats`` and ``LATENCY_BUCKETS`` (the repository's counters, for metrics);
- status: ``DeviceStatus`` (``CacheStatus`` with ``Totals`` and ``TargetState``, and a served
  cache's figures);
- chunk states, read-only: ``Chunks``; a stopped cache: ``load_state`` → ``StoppedCache``,
  ``is_cache``;
- chunks shared with the site's peers (issue 26): ``PeerSource`` (a ``BlobSource`` under the
  fetcher), ``Membership``, ``Peer``, ``Lender`` (what a cache lends), and the peer protocol's
  ``PEER_PATH``, ``PEER_MANIFEST_PATH``, ``MAX_IDS``, ``Blob``, ``encode_frames`` (agent/peerserve.py
  answers with them).

Everything is loaded on first use, so a command that only looks at a stopped cache does not
load asyncio and the device.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockprov.cache.device import CHECKPOINT_FILL_BYTES, CacheDevice
    from blockprov.cache.fetcher import (
        DEFAULT_READAHEAD,
        DEFAULT_TIMEOUT,
        LATENCY_BUCKETS,
        FetchStats,
        repository_source,
    )
    from blockprov.cache.haves import HAVE_HEADER, encode_have
    from blockprov.cache.lending import Lender
    from blockprov.cache.overlay import base_source
    from blockprov.cache.peers import (
        MAX_IDS,
        PEER_MANIFEST_PATH,
        PEER_PATH,
        Blob,
        Membership,
        Peer,
        PeerSource,
        encode_frames,
    )
    from blockprov.cache.reserve import Reserve
    from blockprov.cache.source import CacheSide, ChunkSource, Data, Filter, Release, SourceFactory, read_chunks
    from blockprov.cache.status import CacheStatus, DeviceStatus, TargetState, Totals
    from blockprov.cache.view import Chunks, StoppedCache, is_cache, load_state

_WHERE = {
    "CacheDevice": "device", "CHECKPOINT_FILL_BYTES": "device",
    "DEFAULT_READAHEAD": "fetcher", "DEFAULT_TIMEOUT": "fetcher", "LATENCY_BUCKETS": "fetcher",
    "FetchStats": "fetcher", "repository_source": "fetcher",
    "base_source": "overlay",
    "Lender": "lending",
    "MAX_IDS": "peers", "PEER_PATH": "peers", "PEER_MANIFEST_PATH": "peers", "Blob": "peers",
    "Membership": "peers", "Peer": "peers",
    "PeerSource": "peers", "encode_frames": "peers", "HAVE_HEADER": "haves", "encode_have": "haves",
    "Reserve": "reserve",
    "CacheSide": "source", "ChunkSource": "source", "Data": "source", "Filter": "source", "Release": "source",
    "SourceFactory": "source", "read_chunks": "source",
    "CacheStatus": "status", "DeviceStatus": "status", "TargetState": "status", "Totals": "status",
    "Chunks": "view", "StoppedCache": "view", "is_cache": "view", "load_state": "view",
}

__all__ = [
    "CHECKPOINT_FILL_BYTES",
    "DEFAULT_READAHEAD",
    "DEFAULT_TIMEOUT",
    "HAVE_HEADER",
    "LATENCY_BUCKETS",
    "MAX_IDS",
    "PEER_MANIFEST_PATH",
    "PEER_PATH",
    "Blob",
    "CacheDevice",
    "CacheSide",
    "CacheStatus",
    "ChunkSource",
    "Chunks",
    "Data",
    "DeviceStatus",
    "FetchStats",
    "Filter",
    "Lender",
    "Membership",
    "Peer",
    "PeerSource",
    "Release",
    "Reserve",
    "SourceFactory",
    "StoppedCache",
    "TargetState",
    "Totals",
    "base_source",
    "encode_frames",
    "encode_have",
    "is_cache",
    "load_state",
    "read_chunks",
    "repository_source",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'blockprov.cache' has no attribute {name!r}")
    value = getattr(import_module(f"blockprov.cache.{module}"), name)
    globals()[name] = value
    return value
