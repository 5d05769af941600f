"""S3 chunk store: one object per chunk in any S3-compatible service (AWS S3, SeaweedFS, MinIO, Ceph RGW).

Layout::

    s3://BUCKET/PREFIX/chunks/<hex[:2]>/<hex>     one blob (codec format) per chunk, named by its id

Why one object per chunk (and not packs as in store/pack.py): an object PUT costs the client one
request, not an inode and a rename, and whole immutable objects are what S3 replicates, lists,
expires and what HTTP caches and CDNs in front of it keep. Why the ``<hex[:2]>/`` level: S3
partitions its index by key prefix (AWS scales request rates per prefix), and stores backed by a
filesystem or a filer (SeaweedFS, MinIO) keep a directory per "folder"; 256 fan-out folders keep
each one small and let a listing be split. The catalog does not live here: it is SQLite in the data
directory or PostgreSQL shared by several servers (catalog/db.py; ``LocalRepository(data_dir, store=…,
catalog=…)``). Exactly one catalog may name the chunks under a prefix: gc deletes what its catalog
does not name.

Configuration comes from where every AWS tool looks: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE``, ``~/.aws/credentials`` or an
instance role; the endpoint from ``endpoint`` (``--s3-endpoint``), else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, else ``endpoint_url`` in ``~/.aws/config`` (boto3 reads the files and variables
itself); the region likewise (``--s3-region``, ``AWS_REGION``, the config file, else us-east-1).
With a custom endpoint, path-style addressing is used (``http://host/BUCKET/KEY``): it needs no
wildcard DNS, which self-hosted services rarely have.

Rules:

- Every blob is verified on arrival (the base class decodes it against its id) before the PUT, and on
  every read by whoever consumes it (``get`` decodes); a damaged object is reported ``ChunkCorrupt``
  and never served. ``put_blob`` of a chunk that exists compares the stored object's ETag with the
  MD5 of the verified upload (one HEAD; S3's ETag of a single-part, non-KMS object is its MD5); if they
  differ, the stored copy is read and verified, and replaced when it is damaged.
- Temporary failures (no connection, a timeout, a torn body, HTTP 5xx, 429, SlowDown) are retried
  with retry.py's backoff until ``timeout`` seconds, then raised as ``RepositoryUnavailable``;
  botocore's own retries are off so that one policy bounds the time. A missing object is
  ``ChunkMissing``; a missing bucket, refused or absent credentials are ``StoreMisconfigured``
  (not retried: waiting cannot fix them). The bucket is checked when the store opens; it is created
  only when asked (``create_bucket``, ``--s3-create-bucket``).
- ``missing`` and ``get_blobs`` run HEADs / GETs in parallel on a thread pool (``workers``, one
  keep-alive connection each). HEAD rather than a ListObjectsV2 cache: a listing costs O(bucket), is
  stale as soon as another server writes, and several stateless servers over one bucket would each
  keep their own; a HEAD is exact, costs O(ids asked) and 32 in flight answer thousands per second.

Crash rules:

- ``sync()`` does nothing: S3 acknowledges a PUT only once the object is durably stored and then
  visible to every reader (read-after-write consistency), so a chunk whose ``put`` returned is as
  durable as it will ever be, and ``commit`` (which syncs, then records the version) can never name a
  chunk that is not stored. A crash, or the server dying, mid-upload loses only objects whose PUT
  did not complete: no version refers to them, and S3 never shows a partial object.
- gc: ``iter_ids`` reports each object's LastModified; gc deletes only unreferenced chunks older than
  its grace period (an hour). Re-using a chunk that already exists (``put`` of a present chunk, or
  ``missing`` reporting it present to an uploader) refreshes its LastModified with an in-place
  CopyObject when it is older than ``TOUCH_AFTER`` (10 min), so a concurrent gc spares it for at
  least grace − 10 min after the re-use; younger objects need no request at all, so a re-import
  soon after an import costs HEADs only. gc relies on the bucket's clock and the gc host's clock
  agreeing to well within the grace period.
- ``delete`` is a DELETE, ``delete_many`` one DeleteObjects request per 1000 chunks; nothing needs
  compaction.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from blockprov import codec
from blockprov.errors import BlockprovError, ChunkCorrupt, ChunkMissing, RepositoryUnavailable, StoreMisconfigured
from blockprov.retry import RetryPolicy, retry_sync
from blockprov.store.base import ChunkStore

log = logging.getLogger("blockprov.store.s3")

T = TypeVar("T")
DEFAULT_WORKERS = 32
DEFAULT_TIMEOUT = 30.0
TOUCH_AFTER = 600.0  # refresh a re-used chunk's LastModified only when it is older than this

_TEMPORARY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
                    "InternalError", "ServiceUnavailable", "ServiceUnavailableException", "503", "500"}
_ACCESS_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "AllAccessDisabled", "AccountProblem"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing '/'; may be empty

    @classmethod
    def parse(cls, url: str) -> S3Location:
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc or u.query or u.fragment:
            raise StoreMisconfigured(url=url, why="expected s3://BUCKET[/PREFIX]")
        return cls(u.netloc, u.path.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class _Head:
    size: int
    mtime: float
    etag: str


def _code(e: Exception) -> tuple[str, int]:
    resp: dict[str, Any] = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class S3ChunkStore(ChunkStore):
    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 create_bucket: bool = False, timeout: float = DEFAULT_TIMEOUT, workers: int = DEFAULT_WORKERS,
                 touch_after: float = TOUCH_AFTER) -> None:
        import boto3
        from botocore.config import Config

        self.loc = S3Location.parse(url)
        self.url = str(self.loc)
        self.bucket = self.loc.bucket
        self._base = f"{self.loc.prefix}/chunks/" if self.loc.prefix else "chunks/"
        self.timeout = timeout
        self.touch_after = touch_after
        self._policy = RetryPolicy(timeout=timeout, first_delay=0.05, max_delay=2.0)
        self._once = RetryPolicy(timeout=0.0, max_attempts=1)
        self._down = False  # the last operation gave up: the service is unreachable (see _call)
        session = boto3.session.Session()
        region = region or session.region_name or "us-east-1"
        endpoint = endpoint or None
        custom = bool(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        # CPU per request is what limits a server (botocore spends ~1-2 ms per call): parameter
        # validation and botocore's own CRC32 checksums are off — we build every request ourselves, and
        # every blob is verified against its BLAKE3 id on arrival and on every read, which a CRC cannot
        # add to (SigV4 still signs the payload's SHA-256 over plain http; TLS covers https).
        cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=min(5.0, timeout),
                     read_timeout=max(1.0, timeout), max_pool_connections=workers, parameter_validation=False,
                     request_checksum_calculation="when_required", response_checksum_validation="when_required",
                     s3={"addressing_style": "path"} if custom else None)
        self.client: Any = session.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
        self.endpoint = str(self.client.meta.endpoint_url)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bp-s3")
        self._closed = False
        self._lock = threading.Lock()
        self._sizes: dict[bytes, int] = {}  # from the current/last listing, for delete
        self._open_bucket(create_bucket, region)

    # -- plumbing -----------------------------------------------------------------------------------
    def key(self, cid: bytes) -> str:
        h = cid.hex()
        return f"{self._base}{h[:2]}/{h}"

    def _id_of(self, key: str) -> bytes | None:
        name = key.rsplit("/", 1)[-1]
        if len(name) != 2 * codec.DIGEST_SIZE or not key.startswith(self._base):
            return None
        try:
            return bytes.fromhex(name)
        except ValueError:
            return None

    def _error(self, e: Exception, cid: bytes | None = None) -> BlockprovError | None:
        """The blockprov error an S3 client failure means (None: not an S3 failure; re-raise as is)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(e, BlockprovError):
            return e
        if isinstance(e, ClientError):
            code, status = _code(e)
            if code in ("NoSuchKey", "404") and cid is not None:
                return ChunkMissing(digest=cid.hex())
            if code == "NoSuchBucket" or (code == "404" and cid is None):
                return StoreMisconfigured(url=self.url, why=f"bucket {self.bucket!r} does not exist at "
                                          f"{self.endpoint} (create it, or pass --s3-create-bucket)")
            if code in _ACCESS_CODES or status == 403:
                return StoreMisconfigured(url=self.url, why=f"access denied ({code}) at {self.endpoint}: check the "
                                          "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                                          "~/.aws/credentials) and the bucket's policy")
            if code in _TEMPORARY_CODES or status >= 500 or status == 429:
                return RepositoryUnavailable(url=self.url, why=f"{code or status} from {self.endpoint}")
            return StoreMisconfigured(url=self.url, why=f"{code or status}: {e}")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StoreMisconfigured(url=self.url, why=f"{e} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                      "AWS_PROFILE, or ~/.aws/credentials)")
        if isinstance(e, BotoCoreError | OSError):  # connection refused/reset, timeouts, torn bodies
            return RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}")
        try:
            import urllib3.exceptions

            if isinstance(e, urllib3.exceptions.HTTPError):
                return RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}")
        except ImportError:  # pragma: no cover - botocore depends on urllib3
            pass
        return None

    def _call(self, fn: Callable[[], T], cid: bytes | None = None) -> T:
        """Run one S3 operation, mapped to blockprov errors, retrying the temporary ones (bounded).

        Once an operation has given up (the service is down), later ones make a single attempt until
        one succeeds: a batch of 128 HEADs on 32 threads would otherwise wait out the timeout four
        times over, and an import whose S3 died would take minutes to say so instead of ``timeout``."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as e:
                mapped = self._error(e, cid)
                if mapped is None or mapped is e:
                    raise
                raise mapped from None

        try:
            out = retry_sync(attempt, self._once if self._down else self._policy, f"S3 request to {self.url}")
        except RepositoryUnavailable:
            self._down = True
            raise
        self._down = False
        return out

    def _map(self, fn: Callable[[bytes], T], cids: Sequence[bytes]) -> list[T]:
        """``fn`` over ``cids`` on the pool, results in order; the first failure (in order) is raised."""
        if len(cids) <= 1:
            return [fn(c) for c in cids]
        return list(self._pool.map(fn, cids))

    def _open_bucket(self, create: bool, region: str) -> None:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return True
            except ClientError as e:
                if _code(e)[0] in ("404", "NoSuchBucket"):
                    return False
                raise

        if self._call(head):
            return
        if not create:
            raise StoreMisconfigured(url=self.url, why=f"bucket {self.bucket!r} does not exist at {self.endpoint} "
                                     "(create it, or pass --s3-create-bucket)")
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}

        def make() -> None:
            try:
                self.client.create_bucket(**kw)
            except ClientError as e:
                if _code(e)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call(make)
        log.info("created bucket %s at %s", self.bucket, self.endpoint)

    def _head(self, cid: bytes) -> _Head | None:
        from botocore.exceptions import ClientError

        def op() -> _Head | None:
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self.key(cid))
            except ClientError as e:
                if _code(e)[0] in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return _Head(int(r["ContentLength"]), r["LastModified"].timestamp(), str(r.get("ETag", "")).strip('"'))

        return self._call(op, cid)

    def _refresh(self, cid: bytes, head: _Head) -> None:
        """Make a re-used chunk young again for gc (see the crash rules), when it is old enough to need it."""
        if time.time() - head.mtime < self.touch_after:
            return
        key = self.key(cid)
        self._call(lambda: self.client.copy_object(
            Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
            Metadata={"blockprov-touched": str(int(time.time()))}, MetadataDirective="REPLACE"), cid)

    def _head_fresh(self, cid: bytes) -> _Head | None:
        h = self._head(cid)
        if h is not None:
            try:
                self._refresh(cid, h)
            except ChunkMissing:  # deleted (gc) between the HEAD and the copy: it is missing after all
                return None
        return h

    # -- ChunkStore -----------------------------------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        return self._head(cid) is not None

    def touch(self, cid: bytes) -> None:
        self._head_fresh(cid)

    def missing(self, cids: Iterable[bytes]) -> list[bytes]:
        want = [c for c in dict.fromkeys(cids) if c != codec.ZERO_DIGEST]
        heads = self._map(self._head_fresh, want)
        return [c for c, h in zip(want, heads, strict=True) if h is None]

    def get_blob(self, cid: bytes) -> bytes:
        key = self.key(cid)

        def op() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call(op, cid)

    def get_blobs(self, cids: Sequence[bytes]) -> list[bytes]:
        uniq = list(dict.fromkeys(cids))
        got = dict(zip(uniq, self._map(self.get_blob, uniq), strict=True))
        return [got[c] for c in cids]

    def _store_blob(self, cid: bytes, blob: bytes) -> bool:
        key = self.key(cid)
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=blob,
                                                  ContentType="application/octet-stream"), cid)
        return True

    def put(self, cid: bytes, data: bytes | memoryview) -> tuple[bool, int]:
        if self._head_fresh(cid) is not None:
            return False, 0
        blob = codec.encode(data)
        return self._store_blob(cid, blob), len(blob)

    def put_blob(self, cid: bytes, blob: bytes) -> bool:
        return self.put_blobs([(cid, blob)]) == 1

    def _keep_or_replace(self, cid: bytes, blob: bytes, head: _Head | None) -> bool:
        """Store ``blob`` unless an intact copy exists; True if it was stored (new, or replacing damage)."""
        if head is None:
            return self._store_blob(cid, blob)
        if head.etag != hashlib.md5(blob, usedforsecurity=False).hexdigest():
            try:  # another encoding of the same bytes, or a damaged copy: look at it
                codec.decode(self.get_blob(cid), cid)
            except ChunkCorrupt as e:
                log.warning("replacing a damaged copy of chunk %s in %s: %s", cid.hex(), self.url, e)
                return self._store_blob(cid, blob)
            except ChunkMissing:  # deleted meanwhile
                return self._store_blob(cid, blob)
        try:
            self._refresh(cid, head)
        except ChunkMissing:  # deleted (gc) since the HEAD: store it after all
            return self._store_blob(cid, blob)
        return False

    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        """Store (id, blob) pairs in parallel; every untrusted blob is verified before anything is stored,
        so a batch with one bad blob stores nothing.

        ``trusted`` (the in-process importer, which asked ``missing`` just before): PUT without a HEAD
        first. Requests, not bytes, are what an S3 service (and botocore's CPU per request) charges;
        re-putting a chunk that appeared meanwhile only rewrites the same bytes and makes it young."""
        uniq: dict[bytes, bytes] = {}
        for cid, blob in items:
            uniq.setdefault(cid, blob)
        ids = list(uniq)
        if trusted:
            return sum(self._map(lambda c: self._store_blob(c, uniq[c]), ids))
        self._map(lambda c: codec.decode(uniq[c], c), ids)
        heads = self._map(self._head, ids)
        head_of = dict(zip(ids, heads, strict=True))
        stored = self._map(lambda c: self._keep_or_replace(c, uniq[c], head_of[c]), ids)
        return sum(stored)

    def delete(self, cid: bytes) -> int:
        """DELETE; the size freed comes from the last ``iter_ids`` listing (gc lists, then deletes: one
        request per chunk instead of two) or else a HEAD."""
        with self._lock:
            size = self._sizes.pop(cid, None)
        if size is None:
            h = self._head(cid)
            if h is None:
                return 0
            size = h.size
        key = self.key(cid)
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), cid)
        return size

    def delete_many(self, cids: Sequence[bytes]) -> int:
        """DeleteObjects, 1000 keys a request (S3's limit); sizes as ``delete`` finds them."""
        uniq = list(dict.fromkeys(cids))
        with self._lock:
            sizes = {c: self._sizes.pop(c, None) for c in uniq}
        unknown = [c for c, s in sizes.items() if s is None]
        for c, h in zip(unknown, self._map(self._head, unknown), strict=True):
            sizes[c] = None if h is None else h.size
        gone = [c for c in uniq if sizes[c] is not None]
        for i in range(0, len(gone), 1000):
            objects = [{"Key": self.key(c)} for c in gone[i:i + 1000]]

            def op(objects: list[dict[str, str]] = objects) -> Any:
                return self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

            errors = self._call(op).get("Errors") or []
            if errors:  # per-key failures (access denied, ...): the rest were deleted
                e = errors[0]
                raise StoreMisconfigured(url=self.url, why=f"{len(errors)} chunks were not deleted, the first "
                                         f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip())
        return sum(s for s in sizes.values() if s is not None)

    def iter_ids(self) -> Iterator[tuple[bytes, int, float]]:
        token: str | None = None
        with self._lock:
            self._sizes = {}  # one listing's worth at most (gc holds the listing anyway)
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._base, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page: dict[str, Any] = self._call(functools.partial(self.client.list_objects_v2, **kw))
            for obj in page.get("Contents", []):
                cid = self._id_of(str(obj["Key"]))
                if cid is not None:
                    with self._lock:
                        self._sizes[cid] = int(obj["Size"])
                    yield cid, int(obj["Size"]), obj["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def sync(self) -> None:
        """Nothing to do: a completed PUT is durable and visible (see the crash rules)."""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self.client.close()
