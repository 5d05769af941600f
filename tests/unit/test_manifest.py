from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockprov import codec
from blockprov import manifest as mf
from blockprov.errors import InvalidName, ManifestError, UsageError
from blockprov.names import parse_ref

ids = st.sampled_from([codec.ZERO_DIGEST, codec.digest(b"a"), codec.digest(b"b"), codec.digest(b"c")])


def make(chunks: list[bytes], cs: int = 4096, **kw: object) -> mf.Manifest:
    return mf.build("img", len(chunks) * cs, cs, chunks, **kw)  # type: ignore[arg-type]


@given(st.lists(ids, max_size=600), st.lists(ids, max_size=600))
def test_diff_matches_naive(a: list[bytes], b: list[bytes]) -> None:
    ma, mb = make(a), make(b)
    naive = [i for i in range(max(len(a), len(b)))
             if (a[i] if i < len(a) else codec.ZERO_DIGEST) != (b[i] if i < len(b) else codec.ZERO_DIGEST)]
    assert mf.diff(ma, mb) == naive
    assert mf.diff(ma, ma) == []


@given(st.lists(ids, max_size=300), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_json_roundtrip_and_stable_id(chunks: list[bytes], labels: dict[str, str]) -> None:
    m = make(chunks, labels=labels, parent="0123456789abcdef")
    m2 = mf.Manifest.from_json(m.to_json())
    assert m2 == m and m2.id == m.id
    assert len(m.id) == 16


def test_identity_is_the_documented_digest_and_kept() -> None:
    """The version id is the BLAKE3 of the identity document (module docstring), the same value as
    before it was kept per manifest; the manifest computes it once."""
    import json

    import blake3

    m = mf.build("img", 3 * 4096, 4096, [codec.digest(b"x"), codec.ZERO_DIGEST, codec.digest(b"y")],
                 parent="0123456789abcdef", created=1763765700.5, labels={"os": "debian"})
    d = m.to_dict()
    d["chunks"] = blake3.blake3(m.chunks).hexdigest()
    assert m.identity == blake3.blake3(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m.identity == "6b0dd4c5e265a0186940d81527fd7b223d3ca7293672fbf06161989ceaa13793"  # before: the same
    assert m.id == m.identity[:16] and "identity" in vars(m)  # kept on the instance
    assert mf.Manifest.from_json(m.to_json()).identity == m.identity


def test_short_last_chunk() -> None:
    m = mf.build("img", 4096 + 512, 4096, [codec.digest(b"x"), codec.digest(b"y")])
    assert m.count == 2 and m.chunk_length(1) == 512


@pytest.mark.parametrize("size,cs", [(1000, 4096), (4096, 1000), (4096, 2048), (4096, 8 << 20)])
def test_bad_geometry(size: int, cs: int) -> None:
    with pytest.raises(UsageError):
        mf.check_geometry(size, cs)


@pytest.mark.parametrize("raw", [b"not json", b"{}", b'{"format":"blockprov-manifest/1"}',
                                 b'{"format":"blockprov-manifest/1","image":"a","size":4096,"chunk_size":4096,'
                                 b'"chunks":"!!"}', b"[" * 100_000 + b"]" * 100_000])
def test_bad_manifest(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        mf.Manifest.from_json(raw)


def test_wrong_chunk_count() -> None:
    with pytest.raises(ManifestError):
        mf.build("img", 8192, 4096, [codec.digest(b"x")])


@pytest.mark.parametrize("bad", ["", "UPPER", "../x", "a/b", "x:", "x:../y", "x@123", "x@" + "g" * 16, "-x"])
def test_bad_refs(bad: str) -> None:
    with pytest.raises(InvalidName):
        parse_ref(bad)


def test_refs() -> None:
    assert str(parse_ref("lab")) == "lab:latest"
    assert parse_ref("lab:v1").tag == "v1"
    assert parse_ref("lab@0123456789abcdef").version == "0123456789abcdef"
