"""Chunk identity and the stored chunk format. Pure: no files, no sockets.

A chunk's id is the BLAKE3 digest of its uncompressed bytes (32 bytes, written as 64 hex digits).
A stored chunk ("blob") is a small versioned header followed by the payload::

    offset size  field
    0      4     magic b"BPCK"
    4      1     format version (1)
    5      1     compression: 0 = none, 1 = zstd
    6      2     reserved, zero
    8      4     uncompressed length (little endian)
    12     ...   payload

Compression is skipped when it would not save at least 1/16 of the chunk, so incompressible data
costs no decompression on read. Every decode verifies the digest (docs/architecture.md, invariant 6): a blob that does
not hash to the id it is stored under raises ``ChunkCorrupt`` and its bytes are never returned.
"""

from __future__ import annotations

import struct
import threading

import blake3
import zstandard

from blockprov.errors import ChunkCorrupt

MAGIC = b"BPCK"
FORMAT_VERSION = 1
COMP_NONE = 0
COMP_ZSTD = 1
HEADER = struct.Struct("<4sBBHI")
HEADER_SIZE = HEADER.size
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)  # the manifest's explicit marker for an all-zero chunk
ZSTD_LEVEL = -1  # fast: ~1.7× the speed of level 1 for ~5% larger blobs (bench/RESULTS.md)

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def digest(data: bytes | memoryview) -> bytes:
    """The 32-byte chunk id of ``data``. BLAKE3 releases the GIL for large inputs."""
    return blake3.blake3(data, max_threads=1).digest()


def hexid(d: bytes) -> str:
    return d.hex()


def is_zero(data: bytes | memoryview) -> bool:
    mv = memoryview(data)
    n = len(mv)
    if n == 0:
        return True
    # Comparing against a zero bytes object runs at memcmp speed.
    return mv == _zeros(n)


_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CACHE) < 64:
            _ZERO_CACHE[n] = z
    return z


def encode(data: bytes | memoryview) -> bytes:
    """Plain chunk bytes → stored blob (header + payload)."""
    n = len(data)
    packed = _compressor().compress(data)
    if len(packed) <= n - (n >> 4):
        return HEADER.pack(MAGIC, FORMAT_VERSION, COMP_ZSTD, 0, n) + packed
    return HEADER.pack(MAGIC, FORMAT_VERSION, COMP_NONE, 0, n) + bytes(data)


def plain_header(n: int) -> bytes:
    """The header of a blob that stores ``n`` bytes uncompressed: a peer lends a chunk from its data
    file as this header followed by the bytes (no CPU spent compressing for the LAN)."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, COMP_NONE, 0, n)


def decode(blob: bytes | memoryview, expected: bytes) -> bytes:
    """Stored blob → plain bytes, verified against ``expected`` (the 32-byte id)."""
    data = decode_view(blob, expected)
    return data if type(data) is bytes else bytes(data)


def decode_view(blob: bytes | memoryview, expected: bytes) -> bytes | memoryview:
    """Like :func:`decode`, without copying an uncompressed payload: that is returned as a
    read-only memoryview of ``blob`` (which the caller must not change afterwards: it was
    verified as it is now)."""
    if len(blob) < HEADER_SIZE:
        raise ChunkCorrupt(digest=expected.hex(), why="truncated header")
    magic, version, comp, _reserved, n = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ChunkCorrupt(digest=expected.hex(), why="bad magic")
    if version != FORMAT_VERSION:
        raise ChunkCorrupt(digest=expected.hex(), why=f"unknown format version {version}")
    payload = memoryview(blob)[HEADER_SIZE:]
    data: bytes | memoryview
    if comp == COMP_NONE:
        data = payload.toreadonly()
    elif comp == COMP_ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise ChunkCorrupt(digest=expected.hex(), why=f"zstd: {e}") from None
    else:
        raise ChunkCorrupt(digest=expected.hex(), why=f"unknown compression {comp}")
    if len(data) != n:
        raise ChunkCorrupt(digest=expected.hex(), why=f"length {len(data)} != {n}")
    if digest(data) != expected:
        raise ChunkCorrupt(digest=expected.hex(), why="content does not match its id")
    return data


def parse_hexid(s: str) -> bytes:
    """Validate a chunk id given as text (names are checked in one place: here for chunk ids)."""
    from blockprov.errors import InvalidName

    if len(s) != 2 * DIGEST_SIZE:
        raise InvalidName(kind="chunk id", name=s[:80], why="must be 64 hex digits")
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise InvalidName(kind="chunk id", name=s[:80], why="must be 64 hex digits") from None
