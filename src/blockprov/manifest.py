"""The manifest: one immutable version of an image. Pure: no files, no sockets.

Format (JSON, ``"format": "blockprov-manifest/1"``)::

    {
      "format": "blockprov-manifest/1",
      "image": "lab",                 # image name
      "size": 1073741824,             # virtual size in bytes, a multiple of 512
      "chunk_size": 65536,            # power of two, 4 KiB .. 4 MiB
      "digest": "blake3",
      "chunks": "<base64(zstd(n × 32 bytes))>",
      "parent": "0123456789abcdef",   # version id or null
      "created": 1763765700.5,        # seconds since the epoch
      "labels": {"os": "debian"}
    }

``chunks`` is the ordered list of chunk ids, 32 raw bytes each, for
``n = ceil(size / chunk_size)`` chunks; the last chunk is short when ``size`` is not a multiple of
``chunk_size``. An all-zero chunk is written as 32 zero bytes (``codec.ZERO_DIGEST``): it is never
stored nor sent. The list is zstd-compressed and base64-encoded because a 100 GiB image at 64 KiB
has 1.6 M chunks (51 MB of ids, mostly repeated zero markers in sparse images) — JSON text would
be twice that and slow to parse.

The version id is the first 16 hex digits of the BLAKE3 digest of the canonical identity document:
the JSON above (sorted keys, no whitespace) with ``chunks`` replaced by the BLAKE3 hex digest of
the raw id list. It covers every field, so a manifest cannot be altered without changing its id,
and it does not depend on the bytes zstd happens to produce (another zstd version compresses
differently; the id stays the same).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from blockprov import jsonvalue
from blockprov.align import is_power_of_two
from blockprov.codec import DIGEST_SIZE, ZERO_DIGEST
from blockprov.errors import ManifestError, UsageError
from blockprov.names import image_name, version_id

FORMAT = "blockprov-manifest/1"
MIN_CHUNK = 4096
MAX_CHUNK = 4 << 20
DEFAULT_CHUNK = 64 << 10
MAX_MANIFEST_BYTES = 256 << 20
# At most 2^26 chunks (2 GiB of ids in memory): a 4 TiB image at 64 KiB chunks, 256 TiB at 4 MiB.
# A manifest's size decides how much its id list decompresses to, so a bound on it is a bound on
# what a posted manifest can make the server allocate.
MAX_CHUNKS = 1 << 26
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: what datetime (the console, the CLI) can show
MAX_LABELS = 256
MAX_LABEL_TEXT = 4096  # characters of a label's name or value


def check_geometry(size: int, chunk_size: int) -> None:
    if not is_power_of_two(chunk_size) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise UsageError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 4 MiB")
    if size < 0 or size % 512:
        raise UsageError(f"virtual size {size} is not a non-negative multiple of 512 bytes")
    if chunk_count(size, chunk_size) > MAX_CHUNKS:
        raise UsageError(f"virtual size {size} is more than {MAX_CHUNKS} chunks of {chunk_size} bytes; "
                         "use a larger chunk size")


def check_created(created: float) -> None:
    if not (math.isfinite(created) and 0 <= created <= LATEST_TIME):
        raise ManifestError(why=f"created {created!r} is not a time from 1970 to 9999")


def check_labels(labels: object) -> None:
    """Labels map text to text, within bounds: they are shown, stored and compared later."""
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ManifestError(why="labels must map strings to strings")
    if len(labels) > MAX_LABELS:
        raise ManifestError(why=f"{len(labels)} labels; at most {MAX_LABELS}")
    for k, v in labels.items():
        why = jsonvalue.text_problem(k) or jsonvalue.text_problem(v)
        if why is None and (len(k) > MAX_LABEL_TEXT or len(v) > MAX_LABEL_TEXT):
            why = f"a label's name and value are at most {MAX_LABEL_TEXT} characters each"
        if why is not None:
            raise ManifestError(why=f"label {k[:40]!r}: {why}")


def _integer(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if type(v) is not int:  # not a bool, not a float (1e400 reads as inf), not a string
        raise ManifestError(why=f"{key} must be an integer, not {type(v).__name__}")
    return v


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


@dataclass(frozen=True)
class Manifest:
    image: str
    size: int
    chunk_size: int
    chunks: bytes  # n × 32 bytes
    parent: str | None = None
    created: float = field(default_factory=time.time)
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        image_name(self.image)
        check_geometry(self.size, self.chunk_size)
        check_created(self.created)
        check_labels(self.labels)
        if len(self.chunks) != DIGEST_SIZE * chunk_count(self.size, self.chunk_size):
            raise ManifestError(why=f"{len(self.chunks) // DIGEST_SIZE} chunk ids for "
                                    f"{chunk_count(self.size, self.chunk_size)} chunks")

    # -- chunk access ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.chunks) // DIGEST_SIZE

    def digest_at(self, index: int) -> bytes:
        return self.chunks[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def is_zero(self, index: int) -> bool:
        return self.digest_at(index) == ZERO_DIGEST

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def digests(self) -> Iterator[bytes]:
        c = self.chunks
        for i in range(0, len(c), DIGEST_SIZE):
            yield c[i:i + DIGEST_SIZE]

    def unique_digests(self) -> set[bytes]:
        """Distinct stored chunk ids (zero marker excluded)."""
        s = set(self.digests())
        s.discard(ZERO_DIGEST)
        return s

    def stored_bytes_logical(self) -> int:
        """Bytes of the image that are not zero chunks."""
        return sum(self.chunk_length(i) for i in range(self.count) if not self.is_zero(i))

    # -- encoding -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        packed = zstandard.ZstdCompressor(level=3).compress(self.chunks)
        return self._document(base64.b64encode(packed).decode("ascii"))

    def _document(self, chunks: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "image": self.image,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "digest": "blake3",
            "chunks": chunks,
            "parent": self.parent,
            "created": self.created,
            "labels": dict(sorted(self.labels.items())),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @functools.cached_property
    def identity(self) -> str:
        """Full BLAKE3 hex digest of the identity document (see the module docstring). Computed once
        per manifest (it is immutable; its labels are never changed in place): an agent asks for its
        version id on every fetch, and hashing a 1 GiB image's 16384 chunk ids each time (zstd and
        base64 of them as well, before) was a tenth of a booting agent's CPU (bench_storm)."""
        d = self._document(blake3.blake3(self.chunks).hexdigest())
        return blake3.blake3(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def id(self) -> str:
        return self.identity[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(why=f"unknown format {d.get('format') if isinstance(d, dict) else d!r}")
        if d.get("digest", "blake3") != "blake3":
            raise ManifestError(why=f"unknown digest algorithm {d.get('digest')!r}")
        try:
            size, chunk_size = _integer(d, "size"), _integer(d, "chunk_size")
            check_geometry(size, chunk_size)
            expected = DIGEST_SIZE * chunk_count(size, chunk_size)
            if not isinstance(d.get("chunks"), str) or not isinstance(d.get("image"), str):
                raise ManifestError(why="image and chunks must be strings")
            chunks = _id_list(base64.b64decode(d["chunks"], validate=True), expected)
            labels = d.get("labels") or {}
            check_labels(labels)
            parent = d.get("parent")
            if parent is not None and not isinstance(parent, str):
                raise ManifestError(why="parent must be a version id or null")
            if parent is not None:
                version_id(parent)
            created = d.get("created", 0.0)
            if type(created) not in (int, float):
                raise ManifestError(why=f"created must be a number, not {type(created).__name__}")
            return cls(image=d["image"], size=size, chunk_size=chunk_size, chunks=chunks,
                       parent=parent, created=float(created), labels=labels)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, zstandard.ZstdError, UsageError) as e:
            raise ManifestError(why=f"{type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(why="manifest too large")
        try:
            d = jsonvalue.loads(raw, "the manifest")  # NaN, 1e400, lone surrogates, deep nesting: refused
        except UsageError as e:
            raise ManifestError(why=str(e)) from None
        return cls.from_dict(d)

    def summary(self) -> dict[str, Any]:
        zero = sum(1 for d in self.digests() if d == ZERO_DIGEST)
        return {
            "image": self.image,
            "id": self.id,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.count,
            "zero_chunks": zero,
            "unique_chunks": len(self.unique_digests()),
            "parent": self.parent,
            "created": self.created,
            "labels": self.labels,
        }



def _id_list(packed: bytes, expected: int) -> bytes:
    """The id list of ``expected`` bytes that ``packed`` decompresses to, never more: a zstd frame
    declares its own content size, and ``decompress`` would allocate whatever it says."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed)) as reader:
        while len(out) <= expected:
            part = reader.read(expected + 1 - len(out))
            if not part:
                break
            out += part
    if len(out) != expected:
        raise ManifestError(why=f"the chunk id list holds {len(out)} bytes, not the {expected} of "
                                f"{expected // DIGEST_SIZE} chunk ids")
    return bytes(out)


def build(image: str, size: int, chunk_size: int, ids: Sequence[bytes], **kw: Any) -> Manifest:
    return Manifest(image=image, size=size, chunk_size=chunk_size, chunks=b"".join(ids), **kw)


def diff(a: Manifest, b: Manifest) -> list[int]:
    """Indices of the chunks of ``b`` whose content differs from ``a`` (like EBS ListChangedBlocks).

    Both must use one chunk size. Chunks past the end of the shorter manifest count as changed
    unless they are zero in the longer one (a grown disk reads zeros there).
    """
    if a.chunk_size != b.chunk_size:
        raise UsageError(f"cannot diff versions with chunk sizes {a.chunk_size} and {b.chunk_size}")
    ca, cb = a.chunks, b.chunks
    n = min(len(ca), len(cb))
    out: list[int] = []
    # Compare 32-byte ids with a coarse skip: equal 4 KiB stretches (128 ids) are passed in one step.
    step = DIGEST_SIZE * 128
    pos = 0
    while pos < n:
        end = min(pos + step, n)
        if ca[pos:end] != cb[pos:end]:
            for p in range(pos, end, DIGEST_SIZE):
                if ca[p:p + DIGEST_SIZE] != cb[p:p + DIGEST_SIZE]:
                    out.append(p // DIGEST_SIZE)
        pos = end
    longer = ca if len(ca) > len(cb) else cb
    for p in range(n, len(longer), DIGEST_SIZE):
        if longer[p:p + DIGEST_SIZE] != ZERO_DIGEST:
            out.append(p // DIGEST_SIZE)
    return out
