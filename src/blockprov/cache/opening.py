"""Opening a cache directory: lock aside, everything ``CacheDevice.open`` does before it serves.

A cache directory holds::

    lock           fcntl.flock'ed by the agent using it (cache/files.py; holds its pid, for the error message)
    meta, journal  chunk state (cache/journal.py: format and crash rules)
    manifest.json  the version's manifest, so a cache re-attaches without the repository
    data           the data file: sparse, the image's size, chunk i at byte i × chunk_size
                   (absent when the user named another file or a block device: meta.data_path)
    profile        first-read order of chunks (cache/profile.py)

``open_sync`` (blocking, run in the device's thread pool) replays meta and journal or creates
them, checks that the cache holds the version asked for, finds the manifest (stored copy first,
so a cache re-attaches with the repository down) and opens the data file. The device then
re-verifies what an unclean stop may have left half-filled (cache/device.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockprov.cache.files import open_data
from blockprov.cache.journal import META_NAME, CacheMeta, CacheState, Loaded
from blockprov.cache.maps import ChunkMap, base_zero_flags
from blockprov.durable import atomic_write, fsync_dir
from blockprov.errors import BlockprovError, CacheError, CacheMismatch
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_NAME = "data"


def manifest_digest(m: Manifest) -> str:
    """What meta records to tell a cache's manifest from another of the same version id."""
    return m.identity


class Opened:
    """What ``open_sync`` hands the device: the replayed state, the manifest and the data file."""

    def __init__(self, state: CacheState, loaded: Loaded | None, manifest: Manifest, fd: int,
                 data_path: Path) -> None:
        self.state, self.loaded, self.manifest, self.fd, self.data_path = state, loaded, manifest, fd, data_path


def open_sync(d: Path, repo: Repository | None, manifest: Manifest | None, data_path: str | None,
               create: bool, pool: ThreadPoolExecutor, base_cache: str | None = None) -> Opened:
    """Blocking part of ``CacheDevice.open`` (runs in a worker thread)."""
    want_data = str(Path(data_path).resolve()) if data_path is not None else None
    for stale in d.glob(".*.tmp"):  # left by atomic_write when an agent died mid-checkpoint
        with contextlib.suppress(OSError):
            stale.unlink()
    if (d / META_NAME).exists():
        state, loaded = CacheState.recover(d, pool)
        meta = loaded.meta
        if manifest is not None and (manifest.image != meta.image or manifest.id != meta.version):
            raise CacheMismatch(path=str(d), held=meta.describe(), wanted=f"{manifest.image}@{manifest.id}")
        if want_data is not None and want_data != meta.data_path and not (
                meta.data_path is None and want_data == str((d / DATA_NAME).resolve())):
            raise CacheError(f"cache {d} keeps its data in {meta.data_path or d / DATA_NAME}, not {want_data}")
        if manifest is None:
            manifest = load_manifest(d, meta, repo)
        if manifest_digest(manifest) != meta.manifest_digest or manifest.size != meta.size \
                or manifest.chunk_size != meta.chunk_size or manifest.count != meta.count:
            raise CacheMismatch(path=str(d), held=f"{meta.describe()} (digest {meta.manifest_digest[:16]})",
                                wanted=f"{manifest.image}@{manifest.id} (digest {manifest_digest(manifest)[:16]})")
        if loaded.tail_problem:
            log.warning("cache %s: journal replay stopped early (%s); %d byte(s) ignored",
                        d, loaded.tail_problem, loaded.dropped_bytes)
        path = Path(meta.data_path) if meta.data_path else d / DATA_NAME
        fd = open_data(path, meta.size, fresh=False, internal=meta.data_path is None)
        return Opened(state, loaded, manifest, fd, path)
    if manifest is None:
        raise CacheError(f"{d} holds no cache yet: name the image version to create one")
    if not create:
        raise CacheError(f"{d} holds no cache and creating one was not asked for")
    path = Path(want_data) if want_data else d / DATA_NAME
    fd = open_data(path, manifest.size, fresh=True, internal=want_data is None)
    try:
        store_manifest(d, manifest, base_cache)
        meta = CacheMeta(image=manifest.image, version=manifest.id, manifest_digest=manifest_digest(manifest),
                         chunk_size=manifest.chunk_size, size=manifest.size, count=manifest.count,
                         data_path=want_data, base_cache=base_cache)
        cmap = ChunkMap(manifest.count, base_zero_flags(manifest.chunks))
        state = CacheState.create(d, meta, cmap, pool)
    except BaseException:
        os.close(fd)
        raise
    return Opened(state, None, manifest, fd, path)


def store_manifest(d: Path, manifest: Manifest, base_cache: str | None) -> None:
    """An overlay shares its base's manifest file (a hard link: a manifest can be hundreds of KiB,
    and an instance should cost only what it writes); anything else gets its own copy."""
    if base_cache is not None:
        src = Path(base_cache) / MANIFEST_NAME
        try:
            if Manifest.from_json(src.read_bytes()).id == manifest.id:
                (d / MANIFEST_NAME).unlink(missing_ok=True)
                os.link(src, d / MANIFEST_NAME)
                fsync_dir(d)
                return
        except (OSError, BlockprovError):
            pass
    atomic_write(d / MANIFEST_NAME, manifest.to_json())


def next_manifest_name(version: str) -> str:
    return f"manifest-{version}.json"


def load_manifest(d: Path, meta: CacheMeta, repo: Repository | None) -> Manifest:
    # manifest-<id>.json: a base switch (update, rebase) that crashed after its checkpoint and
    # before renaming the new manifest into place.
    for name in (MANIFEST_NAME, next_manifest_name(meta.version)):
        try:
            m = Manifest.from_json((d / name).read_bytes())
            if m.id == meta.version and m.image == meta.image:
                return m
            log.info("cache %s: %s is %s@%s, expected %s", d, name, m.image, m.id, meta.describe())
        except FileNotFoundError:
            continue
        except (OSError, BlockprovError) as e:
            log.warning("cache %s: stored manifest %s unusable (%s)", d, name, e)
    if repo is None:
        raise CacheError(f"cache {d} has no stored manifest of {meta.describe()} and no repository was given")
    log.warning("cache %s: no stored manifest of %s; asking the repository", d, meta.describe())
    m = repo.resolve(meta.describe())
    atomic_write(d / MANIFEST_NAME, m.to_json())
    return m

