"""``blockprov store copy``: an embedded repository's chunks move from its packs into a real S3
bucket (SeaweedFS); with ``--store`` pointed there the same catalog exports the same bytes; a second
run copies nothing; a damaged source chunk is listed, not copied, and the rest still arrives."""

from __future__ import annotations

import json
from pathlib import Path

from blockprov import codec
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import corrupt_chunk, make_image, run_cli
from tests.s3fixture import SeaweedFS


def test_packs_to_s3_and_back(tmp_path: Path, seaweed: SeaweedFS, s3_env: dict[str, str]) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "a.img", 2 << 20, seed=11)
    repo = LocalRepository(data)
    _, _ = import_image(repo, src, "lab:v1")
    m = repo.resolve("lab:v1")
    ids = sorted(m.unique_digests() - {codec.ZERO_DIGEST})
    bad = ids[0]
    corrupt_chunk(repo, bad)
    repo.close()
    bucket = f"s3://{seaweed.new_bucket()}/repo"

    p = run_cli("store", "copy", "--to", bucket, "--json", data=data, env=s3_env, check=False)
    assert p.returncode == 4 and bad.hex() in p.stderr and "not copied" in p.stderr
    st = json.loads(p.stdout)
    assert st["chunks"] == len(ids) and st["copied"] == len(ids) - 1 and st["damaged"] == [bad.hex()]

    # repair the source (a verified upload of the chunk replaces the damaged copy), copy again
    i = next(i for i in range(m.count) if m.digest_at(i) == bad)
    with open(src, "rb") as f:
        f.seek(i * m.chunk_size)
        good = f.read(m.chunk_length(i))
    repo = LocalRepository(data)
    repo.put_blobs([(bad, codec.encode(good))])
    repo.close()
    st = json.loads(run_cli("store", "copy", "--to", bucket, "--json", data=data, env=s3_env).stdout)
    assert (st["copied"], st["present"], st["damaged"]) == (1, len(ids) - 1, [])

    out = tmp_path / "out.img"
    run_cli("--store", bucket, "export", "lab:v1", str(out), data=data, env=s3_env)
    assert out.read_bytes() == src.read_bytes()

    # and from the bucket into a fresh pack store (another data directory), nothing to copy twice
    other = tmp_path / "other"
    st = json.loads(run_cli("--store", bucket, "store", "copy", "--to", "local", "--json", data=other,
                            env=s3_env).stdout)
    assert st["copied"] == len(ids)
    st = json.loads(run_cli("--store", bucket, "store", "copy", "--to", "local", "--json", data=other,
                            env=s3_env).stdout)
    assert (st["copied"], st["present"]) == (0, len(ids))


def test_store_copy_bad_target(tmp_path: Path) -> None:
    p = run_cli("store", "copy", "--to", "ftp://x", data=tmp_path / "d", check=False)
    assert p.returncode == 2 and "s3://" in p.stderr
    p = run_cli("--repo", "http://127.0.0.1:9", "store", "copy", "--to", "local", check=False)
    assert p.returncode == 2 and "where it is" in p.stderr
