"""The embedded repository: a chunk store and a catalog in one data directory, used in-process.

Layout of the data directory::

    DATA/catalog.sqlite   images, versions (manifests), tags
    DATA/chunks/          the pack-file chunk store (store/pack.py)
    DATA/tmp/             scratch space for imports of non-raw formats

Crash rules: ``commit`` first makes every chunk durable (``store.sync``), then records the version
in one catalog transaction, so a version that exists names only durable chunks. ``gc`` deletes
only chunks that no version references *and* that are older than a grace period, so chunks of an
upload in progress (not yet committed) survive a concurrent gc.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .. import manifest as mf
from ..catalog import Catalog
from ..codec import ZERO_DIGEST
from ..durable import ensure_dir
from ..errors import MissingChunks
from ..manifest import Manifest
from ..names import Ref, parse_ref
from ..store.base import ChunkStore
from ..store.pack import PackChunkStore
from .base import GcStats, ImageInfo, VersionInfo

GC_GRACE_SECONDS = 3600.0


def as_ref(ref: Ref | str) -> Ref:
    return ref if isinstance(ref, Ref) else parse_ref(ref)


class LocalRepository:
    def __init__(self, data_dir: str | os.PathLike[str], store: ChunkStore | None = None) -> None:
        self.data_dir = ensure_dir(data_dir)
        self.url = f"file://{Path(self.data_dir).resolve()}"
        self.store = store if store is not None else PackChunkStore(self.data_dir / "chunks")
        self.catalog = Catalog(self.data_dir / "catalog.sqlite")
        self.tmp_dir = ensure_dir(self.data_dir / "tmp")

    # -- reading --------------------------------------------------------------------------------
    def resolve(self, ref: Ref | str) -> Manifest:
        r = as_ref(ref)
        return self.catalog.manifest(r.name, self.catalog.resolve_id(r))

    def images(self) -> list[ImageInfo]:
        return self.catalog.images()

    def versions(self, name: str) -> list[VersionInfo]:
        return self.catalog.versions(name)

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return self.store.get_blobs(ids)

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        return self.store.missing(ids)

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]:
        return mf.diff(self.resolve(a), self.resolve(b))

    def raw_url(self, ref: Ref | str) -> str | None:
        return None

    # -- writing --------------------------------------------------------------------------------
    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        return self.store.put_blobs(items, trusted=trusted)

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        missing = self.store.missing(manifest.unique_digests())
        if missing:
            raise MissingChunks([c.hex() for c in missing])
        self.catalog.check_parent(manifest)
        self.store.sync()
        return self.catalog.add_version(manifest, tag)

    def set_tag(self, name: str, tag: str, version: str) -> None:
        self.catalog.set_tag(name, tag, version)

    def remove(self, ref: Ref | str) -> list[str]:
        return self.catalog.remove(as_ref(ref))

    def gc(self, grace: float = GC_GRACE_SECONDS) -> GcStats:
        referenced: set[bytes] = set()
        for m in self.catalog.all_manifests():
            referenced |= m.unique_digests()
        referenced.discard(ZERO_DIGEST)
        cutoff = time.time() - grace
        removed = freed = kept = 0
        for cid, _size, mtime in list(self.store.iter_ids()):
            if cid in referenced or mtime > cutoff:
                kept += 1
                continue
            freed += self.store.delete(cid)
            removed += 1
        if removed:
            self.store.compact()
        return GcStats(chunks_removed=removed, bytes_removed=freed, chunks_kept=kept)

    def close(self) -> None:
        self.store.close()
        self.catalog.close()
