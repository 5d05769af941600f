from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockprov import codec
from blockprov.errors import ChunkCorrupt


@given(st.binary(max_size=70000))
def test_roundtrip(data: bytes) -> None:
    cid = codec.digest(data)
    assert codec.decode(codec.encode(data), cid) == data


def test_compressible_is_compressed_and_random_is_not() -> None:
    text = b"abc" * 20000
    assert len(codec.encode(text)) < len(text) // 10
    rnd = os.urandom(65536)
    blob = codec.encode(rnd)
    assert blob[5] == codec.COMP_NONE and len(blob) == len(rnd) + codec.HEADER_SIZE


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "version", "comp", "wrong_id"])
def test_corruption_is_detected(damage: str) -> None:
    data = b"hello world " * 1000
    cid = codec.digest(data)
    blob = bytearray(codec.encode(data))
    if damage == "flip":
        blob[-1] ^= 1
    elif damage == "truncate":
        blob = blob[:-5]
    elif damage == "magic":
        blob[0] = 0
    elif damage == "version":
        blob[4] = 9
    elif damage == "comp":
        blob[5] = 7
    elif damage == "wrong_id":
        cid = codec.digest(b"other")
    with pytest.raises(ChunkCorrupt):
        codec.decode(bytes(blob), cid)


def test_short_blob() -> None:
    with pytest.raises(ChunkCorrupt):
        codec.decode(b"BP", codec.digest(b""))


def test_is_zero() -> None:
    assert codec.is_zero(bytes(65536))
    assert not codec.is_zero(bytes(65535) + b"\x01")
    assert codec.is_zero(b"")


def test_decode_view_does_not_copy_uncompressed_payloads() -> None:
    rnd = os.urandom(65536)
    blob = codec.encode(rnd)
    view = codec.decode_view(blob, codec.digest(rnd))
    assert isinstance(view, memoryview) and view.readonly and view == rnd
    text = b"abc" * 20000
    plain = codec.decode_view(codec.encode(text), codec.digest(text))
    assert isinstance(plain, bytes) and plain == text
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(ChunkCorrupt):  # verified before anything is returned (invariant 6)
        codec.decode_view(memoryview(damaged), codec.digest(rnd))
