"""Which chunk store a repository uses: ``open_store(spec, data_dir)``.

``spec`` is what ``--store`` / ``BLOCKPROV_STORE`` say: nothing (or ``local``) for the pack store in
``DATA/chunks``, ``s3://BUCKET[/PREFIX]`` for an S3-compatible bucket. The catalog is not a store
matter: it is chosen by ``--catalog`` (catalog/db.py), whatever the store; docs/operations.md says what
several servers over one bucket need (one shared catalog).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blockprov.errors import UsageError
from blockprov.store.base import ChunkStore


@dataclass(frozen=True)
class StoreOptions:
    """Options of the object-store backends (ignored by the local one)."""

    endpoint: str | None = None  # --s3-endpoint; else AWS_ENDPOINT_URL(_S3) / ~/.aws/config
    region: str | None = None  # --s3-region; else AWS_REGION / ~/.aws/config / us-east-1
    create_bucket: bool = False  # --s3-create-bucket
    timeout: float = 30.0  # --s3-timeout: how long temporary failures are retried


def open_store(spec: str | None, data_dir: str | os.PathLike[str], options: StoreOptions | None = None) -> ChunkStore:
    o = options or StoreOptions()
    if not spec or spec == "local":
        from blockprov.store.pack import PackChunkStore

        return PackChunkStore(Path(data_dir) / "chunks")
    if spec.startswith("s3://"):
        from blockprov.store.s3 import S3ChunkStore

        return S3ChunkStore(spec, endpoint=o.endpoint, region=o.region, create_bucket=o.create_bucket,
                            timeout=o.timeout)
    raise UsageError(f"--store must be 'local' or s3://BUCKET[/PREFIX], not {spec!r}")
