"""Opening a cache in tests the way its callers do: the layers below it composed first.

``CacheDevice.open`` takes a built stack (cache/source.py); each caller builds its own (the
agent: repository, under the golden reserve on a PC's disk; clones: an overlay's base). Tests
open caches of every kind, so ``open_cache`` composes the stack from the same words the callers
use: the repository with ``readahead`` and ``fetch_timeout``, ``reserve`` over it, or for an
overlay (``base`` / ``base_cache`` given, or a cache whose metadata names a base) its base.
"""

from __future__ import annotations

import os
from typing import Any

from blockprov.cache import (
    DEFAULT_READAHEAD,
    DEFAULT_TIMEOUT,
    CacheDevice,
    Reserve,
    SourceFactory,
    base_source,
    is_cache,
    load_state,
    repository_source,
)
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository


def layers(repo: Repository, *, readahead: int = DEFAULT_READAHEAD, fetch_timeout: float = DEFAULT_TIMEOUT,
           reserve: Reserve | None = None) -> SourceFactory:
    """The agent's stack: the repository, under the golden reserve when there is one."""
    below = repository_source(repo, readahead=readahead, timeout=fetch_timeout)
    return reserve.source(below) if reserve is not None else below


async def open_cache(cache_dir: str | os.PathLike[str], repo: Repository, manifest: Manifest | None = None, *,
                     readahead: int = DEFAULT_READAHEAD, fetch_timeout: float = DEFAULT_TIMEOUT,
                     reserve: Reserve | None = None, base: CacheDevice | None = None,
                     source: SourceFactory | None = None, **kw: Any) -> CacheDevice:
    if source is None:
        overlay = base is not None or kw.get("base_cache") is not None or (
            is_cache(cache_dir) and load_state(cache_dir).base_cache is not None)
        source = base_source(base) if overlay else layers(repo, readahead=readahead, fetch_timeout=fetch_timeout,
                                                          reserve=reserve)
    return await CacheDevice.open(cache_dir, source, manifest, repo=repo, **kw)
