"""``blockprov check``: every chunk the catalog names is read and verified; a missing and a damaged
chunk are found and the versions they spoil named (exit 4); ``--drop-damaged`` then a re-import of
the source repairs the repository. Over the pack store and over a real S3 bucket (SeaweedFS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.store.factory import open_store
from blockprov.store.s3 import S3ChunkStore
from tests.conftest import corrupt_chunk, make_image, run_cli
from tests.s3fixture import SeaweedFS


def damage(repo: LocalRepository, cid: bytes, seaweed: SeaweedFS | None) -> None:
    """Flip a byte of the stored copy, where this store keeps it."""
    if isinstance(repo.store, S3ChunkStore):
        assert seaweed is not None
        raw, key = seaweed.client(), repo.store.key(cid)
        body = raw.get_object(Bucket=repo.store.bucket, Key=key)["Body"].read()
        raw.put_object(Bucket=repo.store.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 0xFF]))
    else:
        corrupt_chunk(repo, cid)


@pytest.mark.parametrize("backend", ["pack", "s3"])
def test_check_finds_names_and_repairs(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data = tmp_path / "repo"
    env: dict[str, str] = {}
    seaweed: SeaweedFS | None = None
    spec = None
    if backend == "s3":
        seaweed = request.getfixturevalue("seaweed")
        env = request.getfixturevalue("s3_env")
        spec = f"s3://{seaweed.new_bucket()}/repo"
        env = {**env, "BLOCKPROV_STORE": spec}
    src1 = make_image(tmp_path / "v1.img", 1 << 20, seed=3)
    src2 = tmp_path / "v2.img"
    src2.write_bytes(src1.read_bytes()[:-4096] + b"v2" * 2048)
    repo = LocalRepository(data, store=open_store(spec, data) if spec else None)
    try:
        import_image(repo, src1, "lab:v1")
        import_image(repo, src2, "lab:v2")
        repo.set_boot_files("lab:v1", b"kernel" * 1000, b"initrd", "")
        m1, m2 = repo.resolve("lab:v1"), repo.resolve("lab:v2")
        only_v2 = sorted(m2.unique_digests() - m1.unique_digests() - {codec.ZERO_DIGEST})[0]
        shared = sorted(m1.unique_digests() & m2.unique_digests() - {codec.ZERO_DIGEST})[0]
    finally:
        repo.close()

    clean = json.loads(run_cli("check", "--json", data=data, env=env).stdout)
    assert clean["ok"] and clean["versions"] == 2 and clean["bytes_read"] > 0
    named = (m1.unique_digests() | m2.unique_digests()) - {codec.ZERO_DIGEST}
    assert clean["chunks"] == len(named) + 2  # and the kernel's and the initrd's pieces

    repo = LocalRepository(data, store=open_store(spec, data) if spec else None)
    try:
        damage(repo, only_v2, seaweed)
        repo.store.delete(shared)
        repo.store.sync()
    finally:
        repo.close()
    p = run_cli("check", data=data, env=env, check=False)
    assert p.returncode == 4, (p.stdout, p.stderr)
    assert f"damaged: lab@{m1.id}" in p.stdout and f"damaged: lab@{m2.id}" in p.stdout
    assert "1 missing and 1 damaged" in p.stderr and "--drop-damaged" in p.stderr

    p = run_cli("check", "--drop-damaged", "--json", data=data, env=env, check=False)
    rep = json.loads(p.stdout)
    assert p.returncode == 4 and rep["dropped"] == 1
    assert rep["damaged"] == [only_v2.hex()] and rep["missing"] == [shared.hex()]
    assert sorted(rep["affected"]) == sorted([f"lab@{m1.id}", f"lab@{m2.id}"])

    # repair: importing the sources again stores what the store now lacks, verified
    run_cli("import", str(src1), "lab:v1", data=data, env=env)
    run_cli("import", str(src2), "lab:v2", data=data, env=env)
    assert json.loads(run_cli("check", "--json", data=data, env=env).stdout)["ok"]
    out = tmp_path / "out.img"
    run_cli("export", f"lab@{m2.id}", str(out), data=data, env=env)
    assert out.read_bytes() == src2.read_bytes()


def test_check_refuses_a_remote_repository() -> None:
    p = run_cli("--repo", "http://127.0.0.1:9", "check", check=False)
    assert p.returncode == 2 and "where it is" in p.stderr


def test_lost_pack_index_is_rebuilt(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "v1.img", 1 << 20, seed=4, data_fraction=1.0)
    run_cli("import", str(src), "lab:v1", data=data)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (data / "chunks" / name).unlink(missing_ok=True)
    assert run_cli("check", data=data, check=False).returncode == 4  # every chunk "missing"
    out = json.loads(run_cli("store", "reindex", "--json", data=data).stdout)
    assert out["indexed"] > 0 and out["damaged"] == 0
    assert json.loads(run_cli("check", "--json", data=data).stdout)["ok"]
    p = run_cli("--store", "s3://b/p", "store", "reindex", data=data, check=False)
    assert p.returncode == 2 and "only the pack store" in p.stderr
