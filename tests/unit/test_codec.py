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
